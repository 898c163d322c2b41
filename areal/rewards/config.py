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
    cpu_seconds: float = option(
        10.0,
        "CPU time one reward call may use, in seconds, all its threads together (0 = no limit). "
        "RLIMIT_CPU in the worker, moved ahead before calls (it counts a process's whole life), so "
        "a call gets between cpu_seconds and cpu_seconds + 1. Past it the call scores 0.0 as a "
        "'cpu' failure and its worker is replaced. Unlike timeout_s (wall clock) it stops only "
        "computing: waiting (sleep, I/O, a subprocess) is timeout_s's to stop. Code stuck in C "
        "that holds the GIL (where the limit's signal cannot act) is killed by the pool one CPU "
        "second later.",
    )
    memory_mb: int = option(
        4096,
        "Address space (MiB) a reward worker may add once its reward fn is loaded (RLIMIT_AS; "
        "0 = no limit). An allocation past it fails in the reward code (MemoryError); the call "
        "scores 0.0 as a 'memory' failure and the worker is replaced. Address space counts "
        "reservations, not only memory in use: each thread reward code starts reserves a stack "
        "(8 MiB) and maybe a malloc arena (64 MiB). The bundled math reward takes ~50 MiB of it "
        "(math-verify and sympy load on its first LaTeX answer).",
    )
    max_processes: int = option(
        64,
        "Processes a worker's reward code may have alive at once: its subprocesses and all "
        "their descendants (0 = no limit). Counted every 50 ms while a call runs and after each "
        "call; past it the call scores 0.0 as a 'processes' failure and the worker is killed with "
        "every process it started. Whatever reward code starts is always killed with its worker "
        "(on a timeout, a limit, or when the pool closes), even in its own session.",
    )
    env_allow: list[str] = option(
        [],
        "Environment variables reward workers see although they look like secrets, as names or "
        "glob patterns, e.g. [OPENAI_API_KEY]. Workers get the trainer's environment without "
        "*_TOKEN, *_KEY, *_SECRET, *_PASSWORD, *_CREDENTIALS and AWS_* (any case) and without the "
        "run's channel secret (AREAL_RUN_SECRET). This hides secrets from what reward code "
        "inherits; code that goes looking elsewhere (/proc/<pid>/environ, files) is not stopped.",
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
        for key in ("cpu_seconds", "memory_mb", "max_processes"):
            if getattr(self, key) < 0:
                raise ValueError(f"reward.{key} must be >= 0 (0 = no limit), got {getattr(self, key)}")
        if self.max_logged_failures < 0:
            raise ValueError(f"reward.max_logged_failures must be >= 0, got {self.max_logged_failures}")
