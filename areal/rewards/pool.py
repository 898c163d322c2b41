"""RewardPool: run a reward function in worker processes with a per-call time limit.

Why processes: reward code is user code. It can raise, hang in C code or `time.sleep`,
return garbage, or kill its own process. The parent enforces every deadline itself, kills
a stuck worker (terminate, then kill), starts a replacement and scores the sample 0.0; the
other samples carry on in the other workers. Training never stops for a bad reward.

Dispatch: one duplex pipe per worker; items are sent in small batches (pipelined, so a
worker never waits for the parent between items) and each result comes back on its own,
so the parent always knows which item a worker is on and when it started.

Workers are fresh interpreters (`python -c BOOTSTRAP`, i.e. spawn semantics: no inherited
threads or locks from torch) rather than multiprocessing.Process: multiprocessing's spawn
and forkserver re-import the parent's __main__ script in every worker (CPython 3.11's
forkserver does not preload it), so with a training script that imports torch each
worker (and each replacement after a hang) took ~2-5 s to start and held its own copy of
torch. A bare worker starts in ~0.2 s and imports only the reward fn's module.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import math
import os
import pickle
import socket
import subprocess
import sys
import threading
import weakref
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from areal.rewards._worker import BOOTSTRAP
from areal.rewards.loader import load_reward_fn, resolve_spec

logger = logging.getLogger("areal.rewards")

FAILURE_KINDS = ("error", "timeout", "nan", "non_number")

# Items in flight per worker: enough that a worker never idles waiting for the parent, few
# enough that slow items do not pile up behind one worker. Adapted to the measured time per
# item (depth ~ _PIPELINE_SECONDS / item time); a new batch is sent once half have come back.
_MAX_PIPELINE_DEPTH = 16
_MIN_PIPELINE_DEPTH = 2
_PIPELINE_SECONDS = 0.01
# Bytes that may sit unread in a busy worker's pipe. Kept well under the socket buffer
# (~200 KiB on Linux) so that a send to a worker stuck in C code can never block the parent.
_PIPE_BYTE_BUDGET = 64 * 1024
_STARTUP_TIMEOUT_S = 120.0  # loading the reward fn (imports) in a fresh worker
_MAX_STARTUP_FAILURES = 3  # consecutive workers that die or fail before being ready
_SAMPLE_CHARS = 300  # per logged prompt/completion/fields


@dataclass
class RewardRequest:
    """One sample to score: the reward fn is called as fn(prompt, completion, **fields)."""

    prompt: str
    completion: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardResult:
    """Rewards in request order (failed samples score 0.0) and this call's failures by kind."""

    rewards: list[float]
    failures: dict[str, int]

    @property
    def num_failures(self) -> int:
        return sum(self.failures.values())


_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


def _shorten(value: Any, limit: int = _SAMPLE_CHARS) -> str:
    """repr(value), keeping its head and tail (a completion's answer is at the end)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    half = limit // 2
    return f"{text[:half]!r} ...[{len(text) - limit} chars]... {text[-half:]!r}"


class _Worker:
    """One worker process, its pipe end and the items it has been sent but not answered."""

    def __init__(self, spawner: concurrent.futures.Executor, spec: str):
        parent_sock, child_sock = socket.socketpair()
        self.conn = Connection(parent_sock.detach())
        child_fd = child_sock.detach()
        try:
            # Started from the pool's one long-lived thread: the worker's PDEATHSIG fires
            # when the thread that forked it exits, so that thread must live as long as the pool.
            self.proc = spawner.submit(
                subprocess.Popen,
                [sys.executable, "-c", BOOTSTRAP, str(child_fd)],
                pass_fds=(child_fd,),
                stdin=subprocess.DEVNULL,
            ).result()
        finally:
            os.close(child_fd)  # only the child holds its end now, so its death reads as EOF here
        self.conn.send((spec, list(sys.path), os.getpid()))
        self.started_at = time.monotonic()
        self.ready = False
        self.pending: deque[tuple[int, bytes]] = deque()  # (index, pickled item), in send order
        self.pending_bytes = 0
        self.head_started = 0.0  # when the parent saw the worker start pending[0]

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """Close the pipe and terminate without waiting (see join_or_kill)."""
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()

    def join_or_kill(self, grace_s: float = 0.5) -> None:
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:  # SIGTERM handled or ignored by the reward code
            self.proc.kill()
            self.proc.wait()


class RewardPool:
    """Score (prompt, completion, fields) samples with a reward fn in `num_workers` processes.

    Each call gets `timeout_s`; failures ("error", "timeout", "nan", "non_number") score
    0.0, are counted per call (RewardResult.failures) and over the pool's lifetime
    (`total_failures`), and the first `max_logged_failures` are logged at WARNING on the
    "areal.rewards" logger with the sample and the traceback. Use as a context manager or
    call `close()`.
    """

    def __init__(
        self,
        fn_spec: str,
        num_workers: int,
        timeout_s: float,
        max_logged_failures: int = 5,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        load_reward_fn(fn_spec)  # fail fast, here, with the loader's message
        self.fn_spec = fn_spec
        self.timeout_s = float(timeout_s)
        self.max_logged_failures = max_logged_failures
        self.total_failures = {kind: 0 for kind in FAILURE_KINDS}
        self._spec = resolve_spec(fn_spec)  # workers may not share our current directory
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="areal-reward-spawner")
        self._logged_failures = 0
        self._startup_failures = 0
        self._item_seconds = 0.0  # moving average of one call's time, as seen by the parent
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        _LIVE_POOLS.add(self)
        try:
            self._workers = [_Worker(self._spawner, self._spec) for _ in range(num_workers)]
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, config) -> RewardPool:
        """Build from an areal.rewards.RewardConfig."""
        return cls(config.fn, config.num_workers, config.timeout_s, config.max_logged_failures)

    # --- public API -----------------------------------------------------------------

    def score(self, requests: list[RewardRequest]) -> RewardResult:
        """Rewards for `requests`, in order. Blocks until every sample has a score."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool is closed")
            return _ScoringRun(self, requests).run()

    async def ascore(self, requests: list[RewardRequest]) -> RewardResult:
        """`score` for asyncio callers: runs in a thread so the event loop keeps going."""
        import asyncio

        return await asyncio.to_thread(self.score, requests)

    def close(self) -> None:
        """Stop all workers. Idempotent; terminates first, then waits, so it is fast."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.stop()
        for worker in self._workers:
            worker.join_or_kill()
        self._workers = []
        self._spawner.shutdown(wait=False)
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- used by _ScoringRun --------------------------------------------------------

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        worker.join_or_kill()
        fresh = _Worker(self._spawner, self._spec)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def _startup_failed(self, worker: _Worker, why: str) -> None:
        self._startup_failures += 1
        if self._startup_failures >= _MAX_STARTUP_FAILURES:
            self.close()
            raise RuntimeError(
                f"reward workers for {self.fn_spec!r} failed to start "
                f"{self._startup_failures} times in a row; last: {why}"
            )
        logger.warning("reward worker for %r failed to start (%s); starting another", self.fn_spec, why)
        self._replace(worker)

    def _log_failure(self, kind: str, request: RewardRequest, detail: str) -> None:
        if self._logged_failures >= self.max_logged_failures:
            return
        self._logged_failures += 1
        last_note = ""
        if self._logged_failures == self.max_logged_failures:
            last_note = "\n(max_logged_failures reached: later failures are only counted in total_failures)"
        logger.warning(
            "reward failure %d/%d [%s] from %s\n  prompt: %s\n  completion: %s\n  fields: %s\n%s%s",
            self._logged_failures,
            self.max_logged_failures,
            kind,
            self.fn_spec,
            _shorten(request.prompt),
            _shorten(request.completion),
            _shorten(request.fields),
            detail.rstrip(),
            last_note,
        )


class _ScoringRun:
    """The state of one `score()` call: queue, results and the event loop over worker pipes."""

    def __init__(self, pool: RewardPool, requests: list[RewardRequest]):
        self.pool = pool
        self.requests = requests
        self.rewards = [0.0] * len(requests)
        self.failures = {kind: 0 for kind in FAILURE_KINDS}
        self.remaining = len(requests)
        self.queue: deque[tuple[int, bytes]] = deque()
        for index, request in enumerate(requests):
            try:
                item = (index, request.prompt, request.completion, dict(request.fields))
                self.queue.append((index, pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)))
            except Exception:
                self._fail(index, "error", "sample cannot be sent to a worker:\n" + traceback.format_exc())

    def run(self) -> RewardResult:
        while self.remaining:
            if self.pool._closed:
                raise RuntimeError("RewardPool was closed while scoring")
            self._dispatch()
            now = time.monotonic()
            deadlines = [self._deadline(w) for w in self.pool._workers]
            timeout = max(0.0, min(deadlines) - now)
            try:
                readable = wait([w.conn for w in self.pool._workers], None if math.isinf(timeout) else timeout)
            except (OSError, ValueError):  # a pipe closed under us: only close() does that
                if self.pool._closed:
                    raise RuntimeError("RewardPool was closed while scoring") from None
                raise
            for worker in list(self.pool._workers):
                if worker.conn in readable:
                    self._drain(worker)
            self._enforce_deadlines()
        return RewardResult(self.rewards, self.failures)

    def _fail(self, index: int, kind: str, detail: str) -> None:
        self.rewards[index] = 0.0
        self.failures[kind] += 1
        self.pool.total_failures[kind] += 1
        self.remaining -= 1
        self.pool._log_failure(kind, self.requests[index], detail)

    def _deadline(self, worker: _Worker) -> float:
        if not worker.ready:
            return worker.started_at + _STARTUP_TIMEOUT_S
        if worker.pending:
            return worker.head_started + self.pool.timeout_s
        return math.inf

    def _pipeline_depth(self) -> int:
        seconds = self.pool._item_seconds
        if seconds <= 0:
            return _MIN_PIPELINE_DEPTH
        return max(_MIN_PIPELINE_DEPTH, min(_MAX_PIPELINE_DEPTH, int(_PIPELINE_SECONDS / seconds)))

    def _dispatch(self) -> None:
        ready = [w for w in self.pool._workers if w.ready]
        depth = self._pipeline_depth()
        for worker in ready:
            if not self.queue:
                return
            if len(worker.pending) > depth // 2:
                continue
            # Fair share of what is left, so the tail of a call is spread over all workers.
            take = min(depth - len(worker.pending), -(-len(self.queue) // len(ready)))
            batch: list[tuple[int, bytes]] = []
            batch_bytes = 0
            while self.queue and len(batch) < take:
                index, blob = self.queue[0]
                busy = worker.pending or batch
                if busy and worker.pending_bytes + batch_bytes + len(blob) > _PIPE_BYTE_BUDGET:
                    break  # an idle worker reads any size; a busy one only within the budget
                batch.append(self.queue.popleft())
                batch_bytes += len(blob)
            if not batch:
                continue
            try:
                worker.conn.send([blob for _, blob in batch])
            except OSError:  # died while idle: nothing of this batch ran, so retry elsewhere
                self.queue.extendleft(reversed(batch))
                self._worker_died(worker)
                continue
            if not worker.pending:
                worker.head_started = time.monotonic()
            worker.pending.extend(batch)
            worker.pending_bytes += batch_bytes

    def _drain(self, worker: _Worker) -> None:
        """Read every message waiting on a worker's pipe."""
        try:
            while True:
                message = worker.conn.recv()
                self._on_message(worker, message)
                if worker not in self.pool._workers or not worker.conn.poll():
                    return
        except (EOFError, OSError):
            self._worker_died(worker)

    def _on_message(self, worker: _Worker, message: tuple) -> None:
        if message[0] == "ready":
            worker.ready = True
            self.pool._startup_failures = 0
            return
        if message[0] == "load_error":
            self.pool._startup_failed(worker, "the reward fn failed to load:\n" + message[1])
            return
        index, kind, reward, detail = message
        head_index, blob = worker.pending.popleft()
        assert head_index == index, f"reward worker answered {index}, expected {head_index}"
        worker.pending_bytes -= len(blob)
        now = time.monotonic()
        self.pool._item_seconds = 0.9 * self.pool._item_seconds + 0.1 * (now - worker.head_started)
        worker.head_started = now
        if kind == "ok":
            self.rewards[index] = reward
            self.remaining -= 1
        else:
            self._fail(index, kind, detail)

    def _requeue_pending(self, worker: _Worker) -> None:
        """Put a dead worker's unstarted items back at the front of the queue, in order."""
        self.queue.extendleft(reversed(worker.pending))
        worker.pending.clear()
        worker.pending_bytes = 0

    def _worker_died(self, worker: _Worker) -> None:
        if worker not in self.pool._workers:
            return
        if not worker.ready:
            worker.join_or_kill()
            self.pool._startup_failed(worker, f"worker exited with code {worker.exitcode} before it was ready")
            return
        if worker.pending:
            index, blob = worker.pending.popleft()
            worker.pending_bytes -= len(blob)
            worker.join_or_kill()
            self._fail(
                index,
                "error",
                f"the reward worker process died (exit code {worker.exitcode}) while scoring this "
                "sample; it was replaced",
            )
        self._requeue_pending(worker)
        self.pool._replace(worker)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self.pool._workers):
            if now < self._deadline(worker):
                continue
            if worker.conn.poll():  # an answer arrived just in time: take it, decide again later
                self._drain(worker)
                continue
            if not worker.ready:
                self.pool._startup_failed(worker, f"not ready after {_STARTUP_TIMEOUT_S:.0f}s")
                continue
            index, blob = worker.pending.popleft()
            worker.pending_bytes -= len(blob)
            self._fail(
                index,
                "timeout",
                f"no result after {self.pool.timeout_s:g}s; the worker process was killed and replaced",
            )
            self._requeue_pending(worker)
            self.pool._replace(worker)
