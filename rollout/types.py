"""What every rollout backend takes and returns (the engine and the HF reference alike)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request sampling settings, mirroring vLLM's names.

    `logprobs` of each generated token are always returned, under the distribution the
    token was sampled from (temperature, top-k and top-p applied; greedy => temperature 1).
    """

    n: int = 1  # samples per prompt (a GRPO group)
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings (checked on decoded text)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.temperature < 0:
            raise ValueError("SamplingParams.top_k and temperature must be >= 0")


@dataclass
class GenerationOutput:
    """One sample. `token_ids`, `logprobs` and `versions` have equal length."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]  # policy version that produced each token
    finish_reason: str  # "stop" or "length" (or "abort")
    sample_index: int = 0  # which of the prompt's n samples this is

    def to_dict(self) -> dict:
        return dict(prompt_index=self.prompt_index, token_ids=list(self.token_ids), logprobs=list(self.logprobs),
                    versions=list(self.versions), finish_reason=self.finish_reason, sample_index=self.sample_index)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationOutput":
        return cls(int(d["prompt_index"]), [int(t) for t in d["token_ids"]], [float(x) for x in d["logprobs"]],
                   [int(v) for v in d["versions"]], d["finish_reason"], int(d.get("sample_index", 0)))


@dataclass
class PartialSample:
    """A sample still generating: its completion so far (tokens, behaviour log-probs, versions).

    `Engine.unfinished()` reports these; `Engine.add_request(..., resume=[...])` continues them
    (prompt + tokens re-prefilled), so a checkpoint can hold rollouts in flight."""

    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.token_ids) == len(self.logprobs) == len(self.versions):
            raise ValueError(
                f"partial sample {self.sample_index}: {len(self.token_ids)} tokens, "
                f"{len(self.logprobs)} log-probs, {len(self.versions)} versions"
            )

    def to_dict(self) -> dict:
        return dict(sample_index=self.sample_index, token_ids=list(self.token_ids), logprobs=list(self.logprobs),
                    versions=list(self.versions))

    @classmethod
    def from_dict(cls, d: dict) -> "PartialSample":
        return cls(int(d["sample_index"]), [int(t) for t in d["token_ids"]], [float(x) for x in d["logprobs"]],
                   [int(v) for v in d["versions"]])
