"""RewardPool: run a reward function in worker processes with a per-call time limit.

Why processes: reward code is user code. It can raise, hang in C code or `time.sleep`,
return garbage, or kill its own process. The parent enforces every deadline itself, kills
a stuck worker (terminate, then kill), starts a replacement and scores the sample 0.0; the
other samples carry on in the other workers. Training never stops for a bad reward.

Dispatch: one duplex pipe per worker, carrying typed msgpack messages (protocol.py, never
pickle); items are sent in batches (pipelined, so a worker never waits for the parent
between items) and results come back in batches too. Which item a worker is on, and since
when, the parent reads from a small shared-memory record the worker updates around each
call (see _worker.py), so batching costs no precision in enforcing deadlines or in blaming
the right sample.

Workers are fresh interpreters (`python -c BOOTSTRAP`, i.e. spawn semantics: no inherited
threads or locks from torch) rather than multiprocessing.Process: multiprocessing's spawn
and forkserver re-import the parent's __main__ script in every worker (CPython 3.11's
forkserver does not preload it), so with a training script that imports torch each
worker (and each replacement after a hang) took ~2-5 s to start and held its own copy of
torch. A bare worker starts in ~0.2 s and imports only the reward fn's module.

Sandbox (_sandbox.py): a worker runs under a CPU-time and an address-space limit, in its own
session under a guardian process that keeps every process the reward starts in its tree, with
secrets removed from its environment. A call that runs out of memory or CPU time, or whose
processes pass max_processes, scores 0.0 ("memory", "cpu", "processes"), and its worker is
killed with everything it started and replaced, as after a timeout.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from areal.rewards import _sandbox as sandbox
from areal.rewards._process import WorkerProcess as _Worker
from areal.rewards.config import RewardConfig
from areal.rewards.loader import load_reward_fn, resolve_spec
from areal.rewards.protocol import (Item, Limits, LoadError, ProtocolError, Ready, Results, UnsendableSample,
                                    pack_batch, pack_item, unpack)
from areal.role import SECRET_ENV

logger = logging.getLogger("areal.rewards")

FAILURE_KINDS = ("error", "timeout", "nan", "non_number", "out_of_range", "memory", "cpu", "processes")
_RESULT_KINDS = frozenset(("ok", *FAILURE_KINDS)) - {"timeout"}  # what a worker reports ("timeout" is the pool's)

# Items in flight per worker: enough that a worker never idles waiting for the parent, few
# enough that slow items do not pile up behind one worker. Adapted to the measured time per
# item (depth ~ _PIPELINE_SECONDS / item time); a new batch is sent once half have come back.
_MAX_PIPELINE_DEPTH = 32
_MIN_PIPELINE_DEPTH = 2
_PIPELINE_SECONDS = 0.01
# Bytes that may sit unread in a busy worker's pipe. Kept well under the socket buffer
# (~200 KiB on Linux) so that a send to a worker stuck in C code can never block the parent.
_PIPE_BYTE_BUDGET = 64 * 1024
_STARTUP_TIMEOUT_S = 120.0  # loading the reward fn (imports) in a fresh worker
_MAX_STARTUP_FAILURES = 3  # consecutive workers that die or fail before being ready
_SAMPLE_CHARS = 300  # per logged prompt/completion/fields
# While a call runs, how often its worker's process count and CPU time are read from /proc
# (~20 us a worker): a fork bomb gets this long, plus the time to stop it.
_WATCH_S = 0.05
_DEFAULTS = RewardConfig()
# After a worker's scorer died: how long its guardian gets to kill what is left and exit as the
# scorer did (so the log names the real exit code) before it is killed as well.
_GUARDIAN_GRACE_S = 0.5


@dataclass
class RewardRequest:
    """One sample to score: the reward fn is called as fn(prompt, completion, **fields)."""

    prompt: str
    completion: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardResult:
    """Rewards in request order (failed samples score 0.0), this call's failures by kind, and each
    request's failure kind (None where it scored), so one call can serve several groups."""

    rewards: list[float]
    failures: dict[str, int]
    kinds: list[str | None] = field(default_factory=list)

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


class RewardPool:
    """Score (prompt, completion, fields) samples with a reward fn in `num_workers` processes.

    Each call gets `timeout_s`, `cpu_seconds` of CPU time, `memory_mb` more address space and
    `max_processes` processes (0 = no limit; see RewardConfig); failures (FAILURE_KINDS: raised,
    timed out, NaN/inf, not a number, beyond ±MAX_ABS_REWARD, out of memory, out of CPU time,
    too many processes) score 0.0, are counted per call (RewardResult.failures)
    and over the pool's lifetime (`total_failures`), and the first `max_logged_failures` are
    logged at WARNING on the "areal.rewards" logger with the sample and the traceback. Use as
    a context manager or call `close()`.
    """

    def __init__(
        self,
        fn_spec: str,
        num_workers: int,
        timeout_s: float,
        max_logged_failures: int = 5,
        *,
        cpu_seconds: float = _DEFAULTS.cpu_seconds,
        memory_mb: int = _DEFAULTS.memory_mb,
        max_processes: int = _DEFAULTS.max_processes,
        env_allow: tuple[str, ...] | list[str] = (),
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        for name, value in (("cpu_seconds", cpu_seconds), ("memory_mb", memory_mb), ("max_processes", max_processes)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no limit), got {value}")
        load_reward_fn(fn_spec)  # fail fast, here, with the loader's message
        self.fn_spec = fn_spec
        self.timeout_s = float(timeout_s)
        self.max_logged_failures = max_logged_failures
        self.total_failures = {kind: 0 for kind in FAILURE_KINDS}
        self.limits = Limits(float(cpu_seconds), int(memory_mb), int(max_processes))  # each worker applies them
        self.env_allow = tuple(env_allow)
        # Read from /proc while a call runs: the reward's processes, and CPU time past a limit
        # whose signal the worker could not act on (see _sandbox.py).
        self._watching = sandbox.LINUX and bool(cpu_seconds or max_processes)
        self._spec = resolve_spec(fn_spec)  # workers may not share our current directory
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="areal-reward-spawner")
        self._logged_failures = 0
        self._startup_failures = 0
        self._item_seconds = 0.0  # moving average of one call's time, as the workers measure it
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        _LIVE_POOLS.add(self)
        try:
            self._workers = [self._start_worker() for _ in range(num_workers)]
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, config) -> RewardPool:
        """Build from an areal.rewards.RewardConfig."""
        return cls(config.fn, config.num_workers, config.timeout_s, config.max_logged_failures,
                   cpu_seconds=config.cpu_seconds, memory_mb=config.memory_mb,
                   max_processes=config.max_processes, env_allow=config.env_allow)

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

    def _start_worker(self) -> _Worker:
        env = sandbox.worker_environment(dict(os.environ), self.env_allow, SECRET_ENV)
        return _Worker(self._spawner, self._spec, self.limits, env)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        worker.join_or_kill()
        fresh = self._start_worker()
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
        self.failed: list[tuple[int, str, str]] = []  # (request index, kind, detail), logged at the end
        self.queue: deque[tuple[int, bytes]] = deque()  # (index, packed Item)
        for index, request in enumerate(requests):
            try:
                item = Item(index, request.prompt, request.completion, dict(request.fields))
                self.queue.append((index, pack_item(item)))
            except UnsendableSample as exc:
                self._fail(index, "error", str(exc))

    def run(self) -> RewardResult:
        try:
            self._loop()
        finally:  # in request order, whichever worker finished first: the log reads the same every run
            for index, kind, detail in sorted(self.failed, key=lambda f: f[0]):
                self.pool._log_failure(kind, self.requests[index], detail)
        kinds: list[str | None] = [None] * len(self.requests)
        for index, kind, _ in self.failed:
            kinds[index] = kind
        return RewardResult(self.rewards, self.failures, kinds)

    def _loop(self) -> None:
        while self.remaining:
            if self.pool._closed:
                raise RuntimeError("RewardPool was closed while scoring")
            self._dispatch()
            now = time.monotonic()
            deadlines = [self._deadline(w, now) for w in self.pool._workers]
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
            self._enforce_limits()

    def _fail(self, index: int, kind: str, detail: str) -> None:
        self.rewards[index] = 0.0
        self.failures[kind] += 1
        self.pool.total_failures[kind] += 1
        self.remaining -= 1
        self.failed.append((index, kind, detail))

    def _deadline(self, worker: _Worker, now: float) -> float:
        """When the worker's current call runs out of time (a lower bound: checked again then)."""
        if not worker.ready:
            return worker.started_at + _STARTUP_TIMEOUT_S
        if not worker.pending:
            return math.inf
        started, finished, start_time, _ = worker.read_progress()
        calling = started > finished
        # Between calls the next one starts no earlier than now.
        deadline = (start_time if calling else now) + self.pool.timeout_s
        if self.pool._watching:  # in a call: its next watch; between calls: soon, to see the next one start
            deadline = min(deadline, worker.next_watch_at if calling else now + _WATCH_S)
        return deadline

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
                worker.conn.send_bytes(pack_batch([blob for _, blob in batch]))
            except OSError:  # died while idle: nothing of this batch ran, so retry elsewhere
                self.queue.extendleft(reversed(batch))
                self._worker_died(worker)
                continue
            worker.pending.extend(batch)
            worker.pending_bytes += batch_bytes

    def _drain(self, worker: _Worker) -> None:
        """Read every message waiting on a worker's pipe."""
        try:
            while True:
                self._on_message(worker, _receive(worker))
                if worker.tainted and worker in self.pool._workers:
                    # It hit a limit, reported it and scores nothing more: replace it.
                    self._kill_and_settle(worker, None, "", "")
                    return
                if worker not in self.pool._workers or not worker.conn.poll():
                    return
        except (EOFError, OSError):
            self._worker_died(worker)
        except ProtocolError as exc:
            self._garbled(worker, exc)

    def _on_message(self, worker: _Worker, message: Ready | LoadError | Results) -> None:
        if worker.ready and not isinstance(message, Results):
            raise ProtocolError(f"got {type(message).__name__} from a worker that was ready")
        if isinstance(message, Ready):
            worker.ready = True
            worker.scorer_pid = message.pid
            self.pool._startup_failures = 0
            return
        if isinstance(message, LoadError):
            self.pool._startup_failed(worker, "the reward fn failed to load:\n" + message.detail)
            return
        for result in message.results:
            index, kind, reward, detail = result.index, result.kind, result.reward, result.detail
            if not worker.pending or worker.pending[0][0] != index:
                expected = worker.pending[0][0] if worker.pending else "nothing"
                raise ProtocolError(f"answered sample {index}, expected {expected}")
            if kind not in _RESULT_KINDS:
                raise ProtocolError(f"answered sample {index} with kind {kind!r:.40}")
            _, blob = worker.pending.popleft()
            worker.pending_bytes -= len(blob)
            worker.reported += 1
            self.pool._item_seconds = 0.9 * self.pool._item_seconds + 0.1 * result.seconds
            if kind == "ok":
                self.rewards[index] = reward
                self.remaining -= 1
            else:
                if kind in sandbox.TAINTING_KINDS:
                    worker.tainted = True
                    detail += "\nThe worker and every process it started were killed and replaced."
                self._fail(index, kind, detail)

    def _settle_lost_worker(self, worker: _Worker, blamed: int | None, kind: str, detail: str) -> None:
        """After a worker is gone (and its pipe drained): charge item number `blamed` (if it
        had not finished) with a `kind` failure; put every other unanswered item back in the
        queue, in order (finished-but-unsent results are lost, so those run again)."""
        finished = worker.read_progress()[1]
        requeue = []
        for number, item in enumerate(worker.pending, start=worker.reported + 1):
            if number == blamed and finished < blamed:
                self._fail(item[0], kind, detail)
            else:
                requeue.append(item)
        self.queue.extendleft(reversed(requeue))
        worker.pending.clear()
        worker.pending_bytes = 0
        self.pool._replace(worker)

    def _worker_died(self, worker: _Worker) -> None:
        """The worker's pipe hit EOF (its results before that are already read)."""
        if worker not in self.pool._workers:
            return
        worker.kill(grace_s=_GUARDIAN_GRACE_S)  # whatever it started may still run
        if not worker.ready:
            self.pool._startup_failed(worker, f"worker exited with code {worker.exitcode} before it was ready")
            return
        started, finished, _, _ = worker.read_progress()
        detail = (
            f"the reward worker process died (exit code {worker.exitcode}) while scoring this sample; "
            "it was replaced"
        )
        self._settle_lost_worker(worker, started if started > finished else None, "error", detail)

    def _enforce_limits(self) -> None:
        """Startup and call timeouts, and (while a call runs) the reward's processes and CPU time."""
        now = time.monotonic()
        for worker in list(self.pool._workers):
            if worker not in self.pool._workers:
                continue
            if not worker.ready:
                if now < worker.started_at + _STARTUP_TIMEOUT_S:
                    continue
                if worker.conn.poll():  # "ready" arrived just in time
                    self._drain(worker)
                else:
                    self.pool._startup_failed(worker, f"not ready after {_STARTUP_TIMEOUT_S:.0f}s")
                continue
            started, finished, start_time, cpu_start = worker.read_progress()
            if not worker.pending or started <= finished:
                continue
            if now >= start_time + self.pool.timeout_s:
                detail = f"no result after {self.pool.timeout_s:g}s; the worker process was killed and replaced"
                # Item number `started` is blamed unless it finished in the instant before the kill.
                self._kill_and_settle(worker, started, "timeout", detail)
            elif self.pool._watching and now >= worker.next_watch_at:
                worker.next_watch_at = now + _WATCH_S
                breach = self._over_limit(worker, cpu_start)
                if breach:
                    self._kill_and_settle(worker, started, *breach)

    def _over_limit(self, worker: _Worker, cpu_start: float) -> tuple[str, str] | None:
        """(kind, detail) when the worker's current call has too many processes alive or has used
        CPU time well past its limit (so the worker could not stop it itself)."""
        limits = self.pool.limits
        if limits.max_processes:
            count = sandbox.count_reward_processes(worker.pid)
            if count > limits.max_processes:
                return "processes", (
                    f"{count} processes alive during the call, more than {limits.max_processes} "
                    "(reward.max_processes); the worker and every process it started were killed and replaced"
                )
        if limits.cpu_seconds:
            used = sandbox.cpu_seconds_used(worker.scorer_pid)
            kill_at = sandbox.cpu_soft_limit(cpu_start, limits.cpu_seconds) + sandbox.CPU_GRACE_S
            if used is not None and used > kill_at:
                return "cpu", (
                    f"{used - cpu_start:.1f} s of CPU time, more than {limits.cpu_seconds:g} (reward.cpu_seconds), "
                    "in code that never let the limit's signal through (C code holding the GIL?); "
                    "the worker was killed and replaced"
                )
        return None

    def _kill_and_settle(self, worker: _Worker, blamed: int | None, kind: str, detail: str) -> None:
        """Kill a worker that is still running, with all it started; keep the results it had sent."""
        worker.kill()
        try:  # results sent before the kill are still in the pipe: keep them
            while worker.conn.poll():
                self._on_message(worker, _receive(worker))
        except (EOFError, OSError, ProtocolError):
            pass
        self._settle_lost_worker(worker, blamed, kind, detail)

    def _garbled(self, worker: _Worker, exc: ProtocolError) -> None:
        """The worker sent what is not a message it may send (reward code writing into its pipe?):
        neither it nor anything more in its pipe can be trusted. Kill it and charge its oldest
        unanswered item: the call that wrote is that one or a later one, and as one item is charged
        per such message, a reward that always does it cannot keep a score() call going forever."""
        worker.kill()
        why = f"the reward worker sent a malformed message ({exc})"
        if not worker.ready:
            self.pool._startup_failed(worker, why)
            return
        if worker.pending:
            index, _ = worker.pending.popleft()
            self._fail(index, "error", f"{why} during or after this sample's call; it was killed and replaced")
        self._settle_lost_worker(worker, None, "", "")


def _receive(worker: _Worker) -> Ready | LoadError | Results:
    """The next message from a worker's pipe (raises EOFError or OSError once it closed, ProtocolError)."""
    return unpack(worker.conn.recv_bytes(), Ready, LoadError, Results)
