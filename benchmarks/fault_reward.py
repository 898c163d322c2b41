"""A reward function that misbehaves on purpose (benchmarks/faults.py): the bundled math reward,
except at the sample counts that AREAL_REWARD_FAULTS names.

    AREAL_REWARD_FAULTS="hang@700,raise@910,nan@1200,huge@1500,exit@1730"
    AREAL_REWARD_FAULT_DIR=/some/empty/folder

kind@N: the N-th reward call of the run (counted over every reward worker process of every rollout
worker, in a counter file in AREAL_REWARD_FAULT_DIR) misbehaves:

    hang   sleeps an hour (the pool's reward.timeout_s must kill it)
    raise  raises RuntimeError
    nan    returns NaN
    huge   returns 1e30 (finite, but no score)
    exit   os._exit(3): the reward worker process dies mid-call

Each spec fires once: it is claimed by creating fired-<i>-<kind> in the folder, which is also how
the harness counts what fired.
"""

from __future__ import annotations

import fcntl
import os
import time

from areal.rewards.math import math_reward

SPECS_ENV, DIR_ENV = "AREAL_REWARD_FAULTS", "AREAL_REWARD_FAULT_DIR"
KINDS = ("hang", "raise", "nan", "huge", "exit")


def parse(value: str) -> dict[int, tuple[int, str]]:
    """'hang@7,nan@9' -> {7: (0, 'hang'), 9: (1, 'nan')}: call number -> (spec index, kind)."""
    plan = {}
    for i, spec in enumerate(filter(None, (s.strip() for s in value.split(",")))):
        kind, _, nth = spec.partition("@")
        if kind not in KINDS or not nth.isdigit() or int(nth) < 1:
            raise ValueError(f"{SPECS_ENV}: bad spec {spec!r} (expected KIND@N, KIND one of {KINDS}, N >= 1)")
        if int(nth) in plan:
            raise ValueError(f"{SPECS_ENV}: two specs fire at call {nth}")
        plan[int(nth)] = (i, kind)
    return plan


def _next_call(folder: str) -> int:
    """This call's number in the run: one counter for every reward process (a file under a lock)."""
    fd = os.open(os.path.join(folder, "calls"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        count = int(os.read(fd, 32) or b"0") + 1
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(count).encode().ljust(32))
        return count
    finally:
        os.close(fd)


def _claim(folder: str, index: int, kind: str) -> bool:
    try:
        os.close(os.open(os.path.join(folder, f"fired-{index}-{kind}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def fired(folder: str) -> dict[str, int]:
    """How many specs of each kind fired (the markers in `folder`)."""
    counts = dict.fromkeys(KINDS, 0)
    for name in os.listdir(folder):
        if name.startswith("fired-"):
            counts[name.rsplit("-", 1)[1]] += 1
    return counts


def faulty_math_reward(prompt: str, completion: str, **fields) -> float:
    plan, folder = parse(os.environ.get(SPECS_ENV, "")), os.environ.get(DIR_ENV)
    if plan and folder:
        index, kind = plan.get(_next_call(folder), (None, None))
        if kind is not None and _claim(folder, index, kind):
            if kind == "hang":
                time.sleep(3600)
            if kind == "raise":
                raise RuntimeError("injected reward failure")
            if kind == "nan":
                return float("nan")
            if kind == "huge":
                return 1e30
            if kind == "exit":
                os._exit(3)
    return math_reward(prompt, completion, **fields)
