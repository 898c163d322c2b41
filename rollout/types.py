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
