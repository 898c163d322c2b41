"""Configuration of the reward stage: which function scores completions and how it is run."""

from __future__ import annotations

from dataclasses import dataclass

from areal.options import option


@dataclass
class RewardConfig:
    """How completions are scored: the reward function and the worker pool that runs it."""

    fn: str = option(
        "areal.rewards.math:math_reward",
        "Reward function, as 'package.module:function' (importable module) or "
        "'path/to/file.py:function' (relative paths resolve against the current directory). "
        "It is called as fn(prompt: str, completion: str, **fields) -> float, where fields "
        "are the dataset sample's other columns (e.g. answer=...). `async def` functions "
        "are accepted. Raising, hanging, NaN/inf or non-numeric results score 0.0 and are "
        "counted as failures; training continues.",
    )
    num_workers: int = option(
        2, "Worker processes that run the reward function concurrently (CPU-bound work)."
    )
    timeout_s: float = option(
        10.0,
        "Time limit of one reward call in seconds; a call past it scores 0.0 and its worker "
        "process is killed and replaced.",
    )
    max_logged_failures: int = option(
        5,
        "How many reward failures (over the whole run) are logged with their sample and "
        "traceback; later ones are only counted.",
    )

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {self.num_workers}")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_logged_failures < 0:
            raise ValueError(f"reward.max_logged_failures must be >= 0, got {self.max_logged_failures}")
