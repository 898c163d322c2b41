"""Staleness-bounded admission control and the trajectory buffer (groups and versions, no models)."""

from areal.buffer.config import BufferConfig
from areal.buffer.staleness import StalenessController, admission_capacity, staleness_budget
from areal.buffer.trajectory_buffer import (
    FILTER_REASONS,
    FILTER_STALE,
    FILTER_UNIFORM_REWARD,
    BufferClosed,
    TrajectoryBuffer,
)

__all__ = [
    "BufferClosed",
    "BufferConfig",
    "FILTER_REASONS",
    "FILTER_STALE",
    "FILTER_UNIFORM_REWARD",
    "StalenessController",
    "TrajectoryBuffer",
    "admission_capacity",
    "staleness_budget",
]
