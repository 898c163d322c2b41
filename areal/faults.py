"""Deterministic fault injection: make a named point in the code crash or fail on its N-th hit.

Set the environment variable AREAL_FAULT to comma-separated specs

    [role/]point[@N][:action]   e.g.  AREAL_FAULT=ckpt.rename:kill,ckpt.write@3:enospc

A `role/` prefix limits a spec to the processes of that role of an async run: `rollout1/...`
(every incarnation of rollout worker 1) or `rollout1.0/...` (its first process only, so its
replacement runs clean). Roles read their name from AREAL_ROLE (set by areal/role.py).

N (default 1): fire on the N-th hit of `point` in this process, counted from when this value of
AREAL_FAULT was first seen (a changed value is re-parsed and its counts start at zero). Each spec
fires once. Actions:

    kill     SIGKILL this process (default): a crash with no cleanup, no finally, no atexit
    enospc   raise OSError(ENOSPC)           "No space left on device"
    eio      raise OSError(EIO)              "Input/output error"
    raise    raise RuntimeError
    stop     SIGSTOP this process: alive but silent, a hang rather than a death (run.role_timeout_s names it)

Named points (grep for `faults.hit(` to find them):

    ckpt.copy       lazy checkpointer, host copy, between two tensors
    ckpt.write      checkpoint store, before each file is written (shard, rank entry, state, manifest)
    ckpt.persist    lazy checkpointer, between the shard write and the commit
    ckpt.rename     checkpoint store, after step_N.tmp -> step_N and before `latest` is swapped
    trainer.update  trainer, before optimizer.step()
    rollout.step    rollout worker, each generation step

Without AREAL_FAULT, hit() costs one environment lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

ENV = "AREAL_FAULT"
ROLE_ENV = "AREAL_ROLE"  # "<role name>.<incarnation>", e.g. rollout1.0
ACTIONS = ("kill", "enospc", "eio", "raise", "stop")

_lock = threading.Lock()
_parsed_value: str | None = None
_plan: dict[str, dict[int, str]] = {}  # point -> {nth hit: action}, for the value in _parsed_value
_hits: dict[str, int] = {}


def parse(value: str) -> dict[str, dict[int, str]]:
    """'a@2:eio,b' -> {'a': {2: 'eio'}, 'b': {1: 'kill'}}; a malformed spec raises ValueError."""
    plan: dict[str, dict[int, str]] = {}
    me = os.environ.get(ROLE_ENV, "")
    for spec in filter(None, (s.strip() for s in value.split(","))):
        role, _, rest = spec.rpartition("/")
        if role and role not in (me, me.split(".")[0]):
            continue  # another role's fault
        head, _, action = rest.partition(":")
        point, _, nth = head.partition("@")
        action = action or "kill"
        if not point or action not in ACTIONS or (nth and not nth.isdigit()) or nth == "0":
            raise ValueError(f"{ENV}: bad spec {spec!r} (expected [role/]point[@N][:{'|'.join(ACTIONS)}], N >= 1)")
        plan.setdefault(point, {})[int(nth or 1)] = action
    return plan


def hit(point: str) -> None:
    """Count one hit of `point` and fire the action planned for this hit, if any."""
    value = os.environ.get(ENV)
    if not value:
        return
    global _parsed_value, _plan
    with _lock:
        if value != _parsed_value:
            _plan, _parsed_value = parse(value), value
            _hits.clear()
        if point not in _plan:
            return
        _hits[point] = n = _hits.get(point, 0) + 1
        action = _plan[point].pop(n, None)  # pop: a spec fires once
    if action is not None:
        _fire(point, action)


def _fire(point: str, action: str) -> None:
    if action in ("kill", "stop"):
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
        return  # stop: continued (SIGCONT) where it stopped
    if action == "raise":
        raise RuntimeError(f"injected fault at {point}")
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at {point})")
