"""Reward functions and the process pool that runs them.

Imports are lazy so `import areal.rewards` stays cheap (math-verify/sympy and
multiprocessing are loaded only when used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "math_reward": "areal.rewards.math",
    "load_reward_fn": "areal.rewards.loader",
    "RewardConfig": "areal.rewards.config",
    "RewardPool": "areal.rewards.pool",
    "RewardRequest": "areal.rewards.pool",
    "RewardResult": "areal.rewards.pool",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'areal.rewards' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
