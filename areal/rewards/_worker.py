"""The reward worker process: load the function once, then score items until the pipe closes.

Kept apart from pool.py so a worker imports only this, the loader and the reward's module.
A worker is a fresh interpreter started by `BOOTSTRAP` (see pool.py for why not
multiprocessing's spawn/forkserver): it reads (fn_spec, sys_path, parent_pid, limits) from the
pipe, sets its sys.path to the parent's and only then imports areal; then it splits in two, a
guardian that holds the worker's process tree and the scorer below it that runs everything
here (see _sandbox.py).

Protocol over one duplex pipe (multiprocessing.connection framing, pickled messages):
  parent -> worker: (fn_spec, sys_path, parent_pid, limits) once; then batches, each a list of
                    (index, pickled (prompt, completion, fields)); None to stop.
  worker -> parent: ("ready", pid) once the function is loaded, or ("load_error", text);
                    then lists of results (index, kind, reward, detail, seconds), in the
                    order received, with kind "ok" | "error" | "nan" | "non_number" | "out_of_range".
                    Results are sent at the end of each batch, or sooner once FLUSH_S passed.
                    After a "memory" | "cpu" | "processes" result (the call hit a limit of
                    _sandbox.py) the worker sends what it has and scores nothing more: the pool
                    kills it with every process it started and starts another.

Progress (shared memory, `PROGRESS` layout): before each item the worker writes the time (and
its CPU time, for the pool's CPU watch) and then bumps `started`; after it, it bumps `finished`.
The parent reads these without any message, so results can be batched and yet a hang is
attributed to exactly the item that hangs, and timed from when that item really started.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import mmap
import numbers
import os
import pickle
import signal
import struct
import sys
import time
import traceback
from typing import Any

from areal.rewards import _sandbox as sandbox

_DETAIL_CHARS = 4000
FLUSH_S = 0.005  # longest a finished result waits in the worker before being sent
# started, finished (item counts); start time and process CPU time at the start of the last started item
PROGRESS = struct.Struct("<qqdd")
# Rewards are scores of order 1 (a reward model's logit, a few units). One sample at 1e30 takes a GRPO
# group's whole signal (advantage +2.6 for it, -0.38 for every other sample, right answers included), puts
# 1e29 into Dr.GRPO's advantages and the run's reward/mean: past this magnitude a value is a bug, not a score.
MAX_ABS_REWARD = 1e6


# Run with `python -c BOOTSTRAP <pipe fd> <progress fd>`: stdlib-only until sys.path is the parent's.
BOOTSTRAP = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "fn_spec, sys.path[:], parent_pid, limits = conn.recv()\n"
    "from areal.rewards._sandbox import split_off_scorer\n"
    "split_off_scorer(parent_pid)\n"  # the guardian stays in there; the scorer goes on
    "from areal.rewards._worker import worker_main\n"
    "worker_main(conn, int(sys.argv[2]), fn_spec, limits)\n"
)


def classify(value: Any) -> tuple[str, float, str]:
    """(kind, reward, detail) for a reward function's return value.

    Accepted: bool, int, float, any numbers.Real, and 0-dim numeric arrays/tensors
    (via .item()). NaN/inf -> "nan"; |reward| > MAX_ABS_REWARD -> "out_of_range";
    anything else -> "non_number".
    """
    if not isinstance(value, numbers.Real) and getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()  # numpy / torch scalar
    if isinstance(value, numbers.Real) and not isinstance(value, complex):
        try:
            reward = float(value)
        except (OverflowError, ValueError, TypeError) as exc:
            return "nan", 0.0, f"returned {value!r:.200} ({exc})"
        if not math.isfinite(reward):
            return "nan", 0.0, f"returned {reward!r}"
        if abs(reward) > MAX_ABS_REWARD:
            return "out_of_range", 0.0, f"returned {reward!r}, beyond ±{MAX_ABS_REWARD:g}"
        return "ok", reward, ""
    return "non_number", 0.0, f"returned {type(value).__name__}: {value!r:.200}"


def _send(conn, message) -> bool:
    """False when the parent is gone (its run ended while this worker started or scored): exit quietly."""
    try:
        conn.send(message)
        return True
    except OSError:
        return False


def _call(fn, blob: bytes, loop, cpu: sandbox.CpuBudget, limits: dict) -> tuple[str, float, str]:
    """(kind, reward, detail) of one reward call, within the worker's limits."""
    try:
        prompt, completion, fields = pickle.loads(blob)
        cpu.in_call = True
        try:
            value = fn(prompt, completion, **fields)
            if inspect.isawaitable(value):
                value = loop.run_until_complete(value)
        finally:
            cpu.in_call = False
        kind, reward, detail = classify(value)
    except sandbox.CpuTimeExceeded:
        cpu.in_call = False  # raised in the finally clause above, before it ran
        kind, reward, detail = "cpu", 0.0, traceback.format_exc()[-_DETAIL_CHARS:]
    except (Exception, SystemExit) as exc:  # sys.exit() in a reward fn is a failure, not a crash
        kind = "memory" if sandbox.is_out_of_memory(exc) else "error"
        reward, detail = 0.0, traceback.format_exc()[-_DETAIL_CHARS:]
    if cpu.exceeded and kind != "cpu":  # the reward code caught CpuTimeExceeded and carried on
        kind, reward, detail = "cpu", 0.0, f"the call used more than {cpu.seconds:g} s of CPU time (reward.cpu_seconds)"
    elif kind == "memory" and limits["memory_mb"]:
        detail = f"out of memory under the {limits['memory_mb']} MiB limit (reward.memory_mb)\n{detail}"
    if kind not in sandbox.TAINTING_KINDS:
        excess = sandbox.excess_processes(limits["max_processes"])
        if excess:
            kind, reward = "processes", 0.0
            detail = (f"{excess} processes alive after the call, more than {limits['max_processes']} "
                      "(reward.max_processes)")
    return kind, reward, detail


def _wait_for_the_end(conn) -> None:
    """Score nothing more (this worker hit a limit), keeping the process tree for the pool to kill."""
    while True:
        try:
            if conn.recv() is None:
                return
        except (EOFError, OSError):
            return


def worker_main(conn, progress_fd: int, fn_spec: str, limits: dict) -> None:
    """Entry point of a worker's scorer process (see module docstring for the protocol).

    `limits`: {"cpu_seconds": float, "memory_mb": int, "max_processes": int}, 0 = no limit
    (reward.* of the same names; applied as _sandbox.py describes).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    progress = mmap.mmap(progress_fd, PROGRESS.size)
    os.close(progress_fd)
    try:
        from areal.rewards.loader import load_reward_fn

        fn = load_reward_fn(fn_spec)
    except BaseException:
        _send(conn, ("load_error", traceback.format_exc()[-_DETAIL_CHARS:]))
        return
    if "torch" in sys.modules:  # many workers x many torch threads would oversubscribe the CPU
        sys.modules["torch"].set_num_threads(1)
    loop = asyncio.new_event_loop()  # reused across async calls: cheaper than asyncio.run each time
    try:  # after loading: the limit is the loaded worker's size plus memory_mb
        sandbox.limit_address_space(limits["memory_mb"])
    except (OSError, ValueError):
        _send(conn, ("load_error", "reward.memory_mb could not be applied:\n" + traceback.format_exc()))
        return
    cpu = sandbox.CpuBudget(limits["cpu_seconds"])
    if not _send(conn, ("ready", os.getpid())):
        return
    started = finished = 0
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return  # parent closed the pipe or exited
        if batch is None:
            return
        results = []
        last_flush = time.monotonic()
        for index, blob in batch:
            start, cpu_start = time.monotonic(), time.process_time()
            started += 1
            struct.pack_into("<dd", progress, 16, start, cpu_start)  # times first: the parent reads counts first
            struct.pack_into("<q", progress, 0, started)
            cpu.arm(cpu_start)
            kind, reward, detail = _call(fn, blob, loop, cpu, limits)
            finished += 1
            struct.pack_into("<q", progress, 8, finished)
            end = time.monotonic()
            results.append((index, kind, reward, detail, end - start))
            if kind in sandbox.TAINTING_KINDS:
                if _send(conn, results):
                    _wait_for_the_end(conn)
                return
            if end - last_flush >= FLUSH_S:
                if not _send(conn, results):
                    return
                results, last_flush = [], end
        if results and not _send(conn, results):
            return
