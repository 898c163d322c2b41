"""The reward worker process: load the function once, then score items until the pipe closes.

Kept apart from pool.py so a worker imports only this, the loader and the reward's module.
A worker is a fresh interpreter started by `BOOTSTRAP` (see pool.py for why not
multiprocessing's spawn/forkserver): it reads (fn_spec, sys_path, parent_pid) from the pipe,
sets its sys.path to the parent's and only then imports areal.

Protocol over one duplex pipe (multiprocessing.connection framing, pickled messages):
  parent -> worker: (fn_spec, sys_path, parent_pid) once; then batches, each a list of
                    (index, pickled (prompt, completion, fields)); None to stop.
  worker -> parent: ("ready", pid) once the function is loaded, or ("load_error", text);
                    then lists of results (index, kind, reward, detail, seconds), in the
                    order received, with kind "ok" | "error" | "nan" | "non_number" | "out_of_range".
                    Results are sent at the end of each batch, or sooner once FLUSH_S passed.

Progress (shared memory, `PROGRESS` layout): before each item the worker writes the time and
then bumps `started`; after it, it bumps `finished`. The parent reads these without any
message, so results can be batched and yet a hang is attributed to exactly the item that
hangs, and timed from when that item really started.
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

from areal.parent import die_with_parent

_DETAIL_CHARS = 4000
FLUSH_S = 0.005  # longest a finished result waits in the worker before being sent
PROGRESS = struct.Struct("<qqd")  # started, finished (item counts), start time of the last started item
# Rewards are scores of order 1 (a reward model's logit, a few units). One sample at 1e30 takes a GRPO
# group's whole signal (advantage +2.6 for it, -0.38 for every other sample, right answers included), puts
# 1e29 into Dr.GRPO's advantages and the run's reward/mean: past this magnitude a value is a bug, not a score.
MAX_ABS_REWARD = 1e6


# Run with `python -c BOOTSTRAP <pipe fd> <progress fd>`: stdlib-only until sys.path is the parent's.
BOOTSTRAP = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "fn_spec, sys.path[:], parent_pid = conn.recv()\n"
    "from areal.rewards._worker import worker_main\n"
    "worker_main(conn, int(sys.argv[2]), fn_spec, parent_pid)\n"
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


def worker_main(conn, progress_fd: int, fn_spec: str, parent_pid: int) -> None:
    """Entry point of a worker process (see module docstring for the protocol)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    die_with_parent(parent_pid)  # the pool's spawner thread lives as long as the pool
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
            start = time.monotonic()
            started += 1
            struct.pack_into("<d", progress, 16, start)  # time first: the parent reads counts first
            struct.pack_into("<q", progress, 0, started)
            try:
                prompt, completion, fields = pickle.loads(blob)
                value = fn(prompt, completion, **fields)
                if inspect.isawaitable(value):
                    value = loop.run_until_complete(value)
                kind, reward, detail = classify(value)
            except (Exception, SystemExit):  # sys.exit() in a reward fn is a failure, not a crash
                kind, reward, detail = "error", 0.0, traceback.format_exc()[-_DETAIL_CHARS:]
            finished += 1
            struct.pack_into("<q", progress, 8, finished)
            end = time.monotonic()
            results.append((index, kind, reward, detail, end - start))
            if end - last_flush >= FLUSH_S:
                if not _send(conn, results):
                    return
                results, last_flush = [], end
        if results and not _send(conn, results):
            return
