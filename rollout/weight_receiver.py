"""Rollout side of the weight broadcast: receive in the background, apply between two engine steps.

    recv = WeightReceiver(transport)            # transport: an areal.transport.ReceiverTransport
    while serving:
        update = recv.poll()                    # non-blocking; the newest complete version or None
        if update is not None:
            pause_s = apply(update, engine, mode="keep")   # the only time generation stops
        engine.step()
    # η = 0 (synchronous RL): before starting the prompts of step v
    update = recv.wait_for(v, timeout=...)      # blocks until weights of version >= v arrived
    recv.close()

A background thread reads each update's control message and takes part in its bucket broadcasts,
receiving into one of two flat buffers of its own, so generation is never stopped for the transfer.
If a newer update completes before the previous one was polled, the older one is dropped (counted in
`dropped`): the rollout always jumps to the latest weights. `update.named_tensors()` are views into the
received buffer, valid until `update.release()` or the next `poll()`/`wait_for()`; while an update is
held and another is ready, the thread waits for the release before receiving a third (so memory stays
at two copies of the weights).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from areal.transport import PeerClosed, ReceiverTransport, UpdateHeader


@dataclass
class WeightUpdate:
    version: int
    seq: int
    header: UpdateHeader
    flat: torch.Tensor
    recv_s: float  # first bucket requested -> last bucket in (this receiver's view of the transfer)
    latency_s: float  # publisher's start_update -> fully received (wall clocks of one host)
    pause_s: float | None = None  # set by apply()
    _owner: WeightReceiver | None = field(default=None, repr=False)

    @property
    def bytes(self) -> int:
        return self.header.total_bytes

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) views into the received buffer, names as in the trainer's model.named_parameters()."""
        return self.header.layout.views(self.flat)

    def release(self) -> None:
        if self._owner is not None:
            self._owner._release(self)


def apply(update: WeightUpdate, engine, mode: str = "keep") -> float:
    """Load `update` into `engine` between two steps and release it; returns (and records) the pause.

    Uses begin_update/load_bucket/finish_update when the engine has them, else update_weights."""
    t0 = time.perf_counter()
    try:
        if all(hasattr(engine, m) for m in ("begin_update", "load_bucket", "finish_update")):
            engine.begin_update(update.version)
            engine.load_bucket(update.named_tensors())
            engine.finish_update(update.version, mode=mode)
        else:
            engine.update_weights(update.version, update.named_tensors(), mode=mode)
    finally:
        update.pause_s = time.perf_counter() - t0
        if update._owner is not None:
            update._owner._record_pause(update)
        update.release()
    return update.pause_s


class WeightReceiver:
    def __init__(self, transport: ReceiverTransport, device: str | torch.device | None = None, poll_interval_s: float = 0.2):
        self.transport = transport
        # receive buffers live where the transport moves data (CUDA for NCCL), unless told otherwise
        self.device = torch.device(device if device is not None else getattr(transport, "device", "cpu"))
        self.poll_interval_s = poll_interval_s  # how often the thread re-checks for close()
        self.received = 0
        self.dropped = 0  # complete updates superseded before anyone polled them
        self.applied_version: int | None = None
        self.last_pause_s: float | None = None  # the last update's (a list of every one would grow all run long)
        self.last_recv_s: float | None = None
        self._cond = threading.Condition()
        self._buffers: list[torch.Tensor] = []  # at most two, of the current layout's size
        self._ready: WeightUpdate | None = None
        self._held: WeightUpdate | None = None
        self._latest_version: int | None = None  # newest version received (held, ready or applied)
        self._error: BaseException | None = None
        self._peer_closed = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="areal-weight-receiver", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ rollout loop side
    def poll(self) -> WeightUpdate | None:
        """The newest fully received update not yet handed out, or None. Never blocks on the network."""
        with self._cond:
            self._raise_if_failed()
            return self._take()

    def wait_for(self, version: int, timeout: float | None = None) -> WeightUpdate | None:
        """Block until weights of version >= `version` are here. Returns the update to apply, or None if
        an update of that version was already handed out. Raises TimeoutError / ConnectionError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._raise_if_failed()
                if self._ready is not None and self._ready.version >= version:
                    return self._take()
                if self._ready is None and self._latest_version is not None and self._latest_version >= version:
                    return None
                if self._peer_closed:
                    raise ConnectionError(f"publisher closed before version {version} arrived")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"weights of version {version} did not arrive within {timeout}s "
                                       f"(latest received: {self._latest_version})")
                self._cond.wait(left)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self.transport.close()

    def abandon(self, wait_s: float = 0.5) -> None:
        """Leave for a re-formed group without waiting on this one: the thread may be blocked in a
        broadcast the sender gave up on (a member died); it ends on the transfer timeout by itself."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(wait_s)
        if not self._thread.is_alive():
            self.transport.close()

    @property
    def peer_closed(self) -> bool:
        """The publisher closed the channel; an update already received may still be waiting in poll()."""
        return self._peer_closed

    @property
    def stats(self) -> dict:
        out = {
            "weights/received": self.received,
            "weights/dropped": self.dropped,
            "weights/control_messages": self.transport.control_messages,
        }
        if self.applied_version is not None:
            out["weights/applied_version"] = self.applied_version
        if self.last_pause_s is not None:
            out["weights/pause_s"] = self.last_pause_s
        if self.last_recv_s is not None:
            out["weights/recv_s"] = self.last_recv_s
        return out

    # ------------------------------------------------------------------ internals
    def _take(self) -> WeightUpdate | None:
        if self._ready is None:
            return None
        # the previous hand-out (if any) is implicitly released: its views end here
        update, self._ready, self._held = self._ready, None, self._ready
        self._cond.notify_all()
        return update

    def _release(self, update: WeightUpdate) -> None:
        with self._cond:
            if self._held is update:
                self._held = None
                self._cond.notify_all()

    def _record_pause(self, update: WeightUpdate) -> None:
        with self._cond:
            self.last_pause_s = update.pause_s
            self.applied_version = update.version

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"weight receiver failed: {self._error}") from self._error

    def _free_buffer(self, nbytes: int) -> torch.Tensor | None:
        """A buffer neither ready nor held, or None if both are in use (caller waits)."""
        busy = {id(u.flat) for u in (self._ready, self._held) if u is not None}
        self._buffers = [b for b in self._buffers if b.numel() == nbytes or id(b) in busy]
        for b in self._buffers:
            if id(b) not in busy and b.numel() == nbytes:
                return b
        if len(self._buffers) < 2:
            b = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._buffers.append(b)
            return b
        return None

    def _run(self) -> None:
        try:
            self.transport.connect()
            while not self._stop:
                header = self.transport.recv_start(self.poll_interval_s)
                if header is None:
                    continue
                with self._cond:  # once a header is read we must take part in all its buckets
                    while (flat := self._free_buffer(header.total_bytes)) is None and not self._stop:
                        self._cond.wait()
                if flat is None:  # closing while the rollout loop still held both buffers
                    return
                t0 = time.perf_counter()
                for out in header.layout.bucket_slices(flat):
                    self.transport.recv_bucket(out)
                self.transport.finish_update(header)
                t1 = time.perf_counter()
                update = WeightUpdate(header.version, header.seq, header, flat, t1 - t0,
                                      time.time() - header.sent_at, _owner=self)
                with self._cond:
                    if self._ready is not None:
                        self.dropped += 1
                    self._ready = update
                    self._latest_version = header.version
                    self.received += 1
                    self.last_recv_s = update.recv_s
                    self._cond.notify_all()
        except PeerClosed:
            with self._cond:
                self._peer_closed = True
                self._cond.notify_all()
        except BaseException as exc:
            with self._cond:
                self._error = exc
                self._cond.notify_all()
