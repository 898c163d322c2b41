"""Lazy asynchronous checkpoints: the trainer pays for a checkpoint only when it outruns the host copy.

Parameters and optimizer state do not change between one optimizer.step() and the next (DataStates-LLM), so
checkpoint N is copied to host memory while step N+1 waits for its batch, runs forward and backward:

    trainer   optimizer.step() | save(N) | batch, forward, backward | before_update() | optimizer.step()
    copy                       |---- live tensors -> host buffers --->|  (before_update waits for it)
    persist                                                          |-- write shard, commit, prune -->

The trainer blocks (CheckpointRecord.blocked_s) only in before_update while the copy is unfinished, and in
save() when it must wait for the previous checkpoint (on_busy='wait', or wait=True for pre-emption).

Host buffer: one flat byte buffer laid out as the shard file (store.FlatShard), reallocated only when a
tensor's name, shape or dtype changes and reused by every checkpoint (pinned when the sources are on a GPU);
the CPU copy into it is one call, and it is written in a few large writes. The next copy overwrites them, so at most one checkpoint is in
flight: a save that finds the previous one still being written is skipped (on_busy='skip', logged and counted)
or waits for it (on_busy='wait').

CUDA (chosen per tensor at run time): the copy is issued non_blocking on a side stream, after an event recorded
on the trainer's stream at save() (so it sees the finished optimizer step); before_update makes the trainer's
stream wait for the copy's event, and the persist thread synchronizes that event before reading the buffers.

Failures: any exception while copying or writing (ENOSPC, a read-only dir, a rank that never wrote its shard)
removes the tmp dir, leaves earlier checkpoints intact, is logged and counted in `failures`; training goes on.
The format and the atomic commit are store.py's.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from areal import faults
from areal.checkpoint import store


def _yield_cpu() -> None:
    """Lower this thread's CPU priority (Linux: per thread). Writing a checkpoint is background work."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the same priority
        pass


@dataclass
class CheckpointRecord:
    step: int
    path: str | None  # the committed dir (rank 0 only; None on failure and on other ranks)
    bytes: int = 0  # rank 0: all files of the checkpoint; other ranks: their shard
    blocked_s: float = 0.0  # seconds the trainer was blocked: in save() + in before_update()
    snapshot_s: float = 0.0  # the host copy
    persist_s: float = 0.0  # writing + commit
    ok: bool = False
    error: str | None = None


class LazyCheckpointer:
    def __init__(self, directory: Path, *, keep_last: int = 2, on_busy: str = "skip", rank: int = 0,
                 world_size: int = 1, config_hash: str = "", log: logging.Logger | None = None,
                 extras_timeout_s: float = 600.0):
        if on_busy not in ("skip", "wait"):
            raise ValueError(f"on_busy must be 'skip' or 'wait', got {on_busy!r}")
        self.directory, self.keep_last, self.on_busy = Path(directory), keep_last, on_busy
        self.rank, self.world_size, self.config_hash = rank, world_size, config_hash
        self.extras_timeout_s = extras_timeout_s
        self.log = log or logging.getLogger(__name__)
        self._host: store.FlatShard | None = None  # reused by every checkpoint while the tensors keep their shapes
        self._views: dict[str, torch.Tensor] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._copied = threading.Event()  # set when the pending host copy is finished (CUDA: issued)
        self._copied.set()
        self._copy_event: torch.cuda.Event | None = None  # CUDA: recorded after the last copy
        self._thread: threading.Thread | None = None
        self._current: CheckpointRecord | None = None
        self._done: list[CheckpointRecord] = []
        self._lock = threading.Lock()
        self._skipped = self._failures = 0
        self._closed = False

    @property
    def skipped(self) -> int:
        return self._skipped

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def busy(self) -> bool:
        """A checkpoint is being copied or written."""
        return self._thread is not None and self._thread.is_alive()

    def save(self, step: int, tensors: Mapping[str, torch.Tensor], state: dict,
             extras: Sequence[concurrent.futures.Future] = (), wait: bool = False) -> bool:
        """Start checkpoint `step`. `tensors` are LIVE references (params, optimizer state), valid until the
        caller's next before_update(); `state` is a JSON-able dict captured now by the caller; each of `extras`
        resolves to a dict merged into state before writing, waited for in the background thread only. Returns
        False when skipped (on_busy='skip' and a checkpoint in flight). on_busy='wait' or wait=True (pre-emption)
        blocks until the previous one is done; wait=True also blocks until this one is committed and re-raises
        its error if it failed."""
        if self._closed:
            raise RuntimeError("LazyCheckpointer.save after close()")
        t0 = time.perf_counter()
        if self.busy:
            if self.on_busy == "skip" and not wait:
                self.skip(step)
                return False
            self._thread.join()
        record = CheckpointRecord(step=step, path=None)
        # CUDA: the copy must see the optimizer step already queued on the trainer's stream
        gpus = {t.device for t in tensors.values() if t.is_cuda}
        ready = {d: torch.cuda.current_stream(d).record_event() for d in gpus}
        self._current, self._copy_event = record, None
        self._copied.clear()
        error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(record, dict(tensors), dict(state), list(extras),
                                                                ready, error), name=f"areal-ckpt-{step}", daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()
        with self._lock:
            record.blocked_s += time.perf_counter() - t0
        if wait and error:
            raise error[0]
        return True

    def skip(self, step: int) -> None:
        """Count and log checkpoint `step` as skipped: it fell due while the previous one is in flight. Callers
        that must not even gather a checkpoint's state then (an async run's cut) check `busy` and call this."""
        self._skipped += 1
        self.log.warning("checkpoint step %d skipped: the previous one is still being written "
                         "(%d skipped so far)", step, self._skipped)

    def before_update(self) -> None:
        """Call right before optimizer.step(): blocks until the pending host copy is finished (blocked time)."""
        if not self._copied.is_set():
            t0 = time.perf_counter()
            self._copied.wait()  # never skipped: after this the trainer may overwrite the tensors
            with self._lock:
                if self._current is not None:
                    self._current.blocked_s += time.perf_counter() - t0
        event, self._copy_event = self._copy_event, None
        if event is not None:  # the GPU, not the host, waits for the copy before the optimizer step
            torch.cuda.current_stream().wait_event(event)

    def wait(self) -> None:
        """Until nothing is being copied or written."""
        if self._thread is not None:
            self._thread.join()

    def records(self) -> list[CheckpointRecord]:
        """Finished checkpoints since the last call (drained)."""
        with self._lock:
            out, self._done = self._done, []
        return out

    def close(self) -> None:
        self.wait()
        self._closed = True
        self._host, self._views = None, {}

    # ------------------------------------------------------------ background thread

    def _run(self, record: CheckpointRecord, tensors: dict[str, torch.Tensor], state: dict,
             extras: list[concurrent.futures.Future], ready: dict, error: list[BaseException]) -> None:
        step, t0 = record.step, time.perf_counter()
        tmp = store.step_dir(self.directory, step).with_suffix(".tmp")
        persist_t0 = None
        try:
            try:
                host, event = self._snapshot(tensors, ready)
                self._copy_event = event
            finally:
                self._copied.set()
            if event is not None:
                event.synchronize()
            record.snapshot_s = time.perf_counter() - t0
            _yield_cpu()  # the snapshot is taken: the write may wait for the trainer, never the reverse
            for future in extras:
                state.update(future.result(timeout=self.extras_timeout_s))
            persist_t0 = time.perf_counter()
            # several ranks share the tmp dir: only a lone writer may clear a stale one
            store.tmp_dir_for(self.directory, step, fresh=self.world_size == 1)
            entry = store.write_shard(tmp, self.rank, host)
            faults.hit("ckpt.persist")
            if self.rank == 0:
                path = store.commit(self.directory, step, state, self.config_hash, self.world_size)
                record.path = str(path)
                record.bytes = sum(f.stat().st_size for f in path.iterdir())
                self._prune()
            else:
                record.bytes = entry["bytes"]
            record.ok = True
        except Exception as e:  # noqa: BLE001 - a failed checkpoint must never stop training
            error.append(e)
            record.error = f"{type(e).__name__}: {e}"
            with self._lock:
                self._failures += 1
            self._clean_up(tmp, record.error)
            self.log.warning("checkpoint step %d failed (%s); earlier checkpoints are intact", step, record.error)
        finally:
            if persist_t0 is not None:
                record.persist_s = time.perf_counter() - persist_t0
            with self._lock:
                self._done.append(record)

    def _snapshot(self, tensors: dict[str, torch.Tensor], ready: dict) -> tuple[store.FlatShard, torch.cuda.Event | None]:
        """Copy the live tensors into the reused host buffer (one call on CPU); CUDA copies are issued, not finished."""
        srcs = {name: t.detach() for name, t in tensors.items()}
        gpu = any(t.is_cuda for t in srcs.values())
        if self._host is None or not self._host.fits(srcs):
            self._host = store.FlatShard.like(srcs, pin=gpu)
            self._views = self._host.views()
        dst = [self._views[name] for name in srcs]
        half = len(dst) // 2
        stream = None
        for part in (slice(0, half), slice(half, None)):  # halves: the copy fault point falls between them
            if part.start == half:
                faults.hit("ckpt.copy")
            names, outs = list(srcs)[part], dst[part]
            if not outs:
                continue
            if not gpu:
                torch._foreach_copy_(outs, [srcs[n] for n in names])  # one call, the GIL released
                continue
            for name, out in zip(names, outs):
                src = srcs[name]
                if src.is_cuda:
                    stream = self._side_stream(src.device, ready)
                    with torch.cuda.stream(stream):
                        out.copy_(src, non_blocking=True)
                    src.record_stream(stream)  # the allocator must not reuse src before the copy ran
                else:
                    out.copy_(src)
        return self._host, (stream.record_event() if stream is not None else None)

    def _side_stream(self, device: torch.device, ready: dict) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        stream = self._streams[device]
        if device in ready:
            stream.wait_event(ready.pop(device))
        return stream

    def _prune(self) -> None:
        try:
            store.prune(self.directory, self.keep_last)
        except OSError as e:
            self.log.warning("pruning old checkpoints in %s failed: %s", self.directory, e)

    def _clean_up(self, tmp: Path, error: str) -> None:
        """Rank 0 removes the tmp dir; another rank tells rank 0's rendezvous that its shard will not come."""
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.mkdir(parents=True, exist_ok=True)
                store.mark_failed(tmp, self.rank, error)
        except OSError as e:
            self.log.warning("cleaning up %s failed: %s", tmp, e)
