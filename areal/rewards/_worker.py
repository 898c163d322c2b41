"""The reward worker process: load the function once, then score items until the pipe closes.

Kept apart from pool.py so a worker imports only this, the loader and the reward's module.
A worker is a fresh interpreter started by `BOOTSTRAP` (see pool.py for why not
multiprocessing's spawn/forkserver) with the parent's sys.path on its command line: it sets
it before it imports anything of areal, reads Start (the reward fn, the pool's pid, the
limits) from the pipe, then splits in two, a guardian that holds the worker's process tree
and the scorer below it that runs everything here (see _sandbox.py).

Messages (protocol.py: typed, msgpack over the pipe, never pickle): after Start the scorer
loads the reward fn and sends Ready, or LoadError; then for each Batch of Items it sends
Results, in the order received, with kind "ok" | "error" | "nan" | "non_number" |
"out_of_range". Results are sent at the end of each batch, or sooner once FLUSH_S passed.
After a "memory" | "cpu" | "processes" result (the call hit a limit of _sandbox.py) the
worker sends what it has and scores nothing more: the pool kills it with every process it
started and starts another. A frame that is not the message expected ends the worker.

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
import signal
import struct
import sys
import time
import traceback
from typing import Any

from areal.rewards import _sandbox as sandbox
from areal.rewards.protocol import (Batch, Item, Limits, LoadError, Ready, Result, Results, Start, pack,
                                    receive_in_worker)

_DETAIL_CHARS = 4000
FLUSH_S = 0.005  # longest a finished result waits in the worker before being sent
# started, finished (item counts); start time and process CPU time at the start of the last started item
PROGRESS = struct.Struct("<qqdd")
# Rewards are scores of order 1 (a reward model's logit, a few units). One sample at 1e30 takes a GRPO
# group's whole signal (advantage +2.6 for it, -0.38 for every other sample, right answers included), puts
# 1e29 into Dr.GRPO's advantages and the run's reward/mean: past this magnitude a value is a bug, not a score.
MAX_ABS_REWARD = 1e6


# Run with `python -c BOOTSTRAP <pipe fd> <progress fd> <the parent's sys.path as JSON>`:
# stdlib-only until sys.path is the parent's.
BOOTSTRAP = (
    "import json, sys\n"
    "sys.path[:] = json.loads(sys.argv[3])\n"
    "from multiprocessing.connection import Connection\n"
    "from areal.rewards.protocol import Start, receive_in_worker\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "start = receive_in_worker(conn, Start)\n"
    "if start is None:\n"  # the pool is gone already
    "    sys.exit(0)\n"
    "from areal.rewards._sandbox import split_off_scorer\n"
    "split_off_scorer(start.parent_pid)\n"  # the guardian stays in there; the scorer goes on
    "from areal.rewards._worker import worker_main\n"
    "worker_main(conn, int(sys.argv[2]), start)\n"
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
        conn.send_bytes(pack(message))
        return True
    except OSError:
        return False


def _call(fn, item: Item, loop, cpu: sandbox.CpuBudget, limits: Limits) -> tuple[str, float, str]:
    """(kind, reward, detail) of one reward call, within the worker's limits."""
    try:
        cpu.in_call = True
        try:
            value = fn(item.prompt, item.completion, **item.fields)
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
    elif kind == "memory" and limits.memory_mb:
        detail = f"out of memory under the {limits.memory_mb} MiB limit (reward.memory_mb)\n{detail}"
    if kind not in sandbox.TAINTING_KINDS:
        excess = sandbox.excess_processes(limits.max_processes)
        if excess:
            kind, reward = "processes", 0.0
            detail = (f"{excess} processes alive after the call, more than {limits.max_processes} "
                      "(reward.max_processes)")
    return kind, reward, detail


def _wait_for_the_end(conn) -> None:
    """Score nothing more (this worker hit a limit), keeping the process tree for the pool to kill."""
    while True:
        try:
            conn.recv_bytes()  # dropped unread: nothing more is scored
        except (EOFError, OSError):
            return


def worker_main(conn, progress_fd: int, start: Start) -> None:
    """Entry point of a worker's scorer process (see module docstring for the protocol); its
    limits are applied as _sandbox.py describes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    progress = mmap.mmap(progress_fd, PROGRESS.size)
    os.close(progress_fd)
    try:
        from areal.rewards.loader import load_reward_fn

        fn = load_reward_fn(start.fn_spec)
    except BaseException:
        _send(conn, LoadError(traceback.format_exc()[-_DETAIL_CHARS:]))
        return
    if "torch" in sys.modules:  # many workers x many torch threads would oversubscribe the CPU
        sys.modules["torch"].set_num_threads(1)
    loop = asyncio.new_event_loop()  # reused across async calls: cheaper than asyncio.run each time
    limits = start.limits
    try:  # after loading: the limit is the loaded worker's size plus memory_mb
        sandbox.limit_address_space(limits.memory_mb)
    except (OSError, ValueError):
        _send(conn, LoadError("reward.memory_mb could not be applied:\n" + traceback.format_exc()))
        return
    cpu = sandbox.CpuBudget(limits.cpu_seconds)
    if not _send(conn, Ready(os.getpid())):
        return
    started = finished = 0
    while True:
        batch = receive_in_worker(conn, Batch)
        if batch is None:
            return  # parent closed the pipe or exited
        results = []
        last_flush = time.monotonic()
        for item in batch.items:
            start, cpu_start = time.monotonic(), time.process_time()
            started += 1
            struct.pack_into("<dd", progress, 16, start, cpu_start)  # times first: the parent reads counts first
            struct.pack_into("<q", progress, 0, started)
            cpu.arm(cpu_start)
            kind, reward, detail = _call(fn, item, loop, cpu, limits)
            finished += 1
            struct.pack_into("<q", progress, 8, finished)
            end = time.monotonic()
            results.append(Result(item.index, kind, reward, detail, end - start))
            if kind in sandbox.TAINTING_KINDS:
                if _send(conn, Results(results)):
                    _wait_for_the_end(conn)
                return
            if end - last_flush >= FLUSH_S:
                if not _send(conn, Results(results)):
                    return
                results, last_flush = [], end
        if results and not _send(conn, Results(results)):
            return
