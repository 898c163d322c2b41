"""`BufferConfig`: trajectory-buffer knobs.

The staleness bound eta and the concurrency cap belong to admission control
(`rollout.max_staleness`, `rollout.max_concurrent`, passed to `StalenessController`);
the buffer reads eta from its controller for strict mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from areal.options import option

ORDERS = ("oldest_first", "newest_first", "fifo")


@dataclass
class BufferConfig:
    capacity_groups: int = option(
        1024,
        "Memory bound on groups held in the buffer; put() blocks when full "
        "(backpressure, never a silent drop). Must be >= groups consumed per step. Default 1024.",
    )
    order: str = option(
        "oldest_first",
        "Which held groups a batch takes: oldest_first (smallest oldest token version, "
        "ties in arrival order), newest_first (largest, ties in arrival order) or fifo "
        "(arrival order). Default oldest_first. newest_first can starve old groups (they "
        "then hold staleness budget) unless strict_staleness drops them.",
        choices=ORDERS,
    )
    strict_staleness: bool = option(
        False,
        "Drop (and count, reason 'stale') groups whose oldest token is more than "
        "rollout.max_staleness versions behind the trainer at consumption. Default False "
        "(AReaL: bound enforced at admission only).",
    )
    filter_uniform_rewards: bool = option(
        False,
        "Dynamic filtering: drop (and count, reason 'uniform_reward') groups whose "
        "rewards are all equal; they carry no GRPO signal. Default False.",
    )

    def __post_init__(self) -> None:
        if self.capacity_groups < 1:
            raise ValueError(f"capacity_groups must be >= 1, got {self.capacity_groups}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
