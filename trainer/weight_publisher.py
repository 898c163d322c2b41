"""Non-blocking publication of the trainer's weights to every rollout worker.

    pub = WeightPublisher(transport)                 # transport: an areal.transport.SenderTransport
    pub.publish(version, engine.named_weights())     # snapshot (one copy) and return at once
    ...
    pub.wait(); pub.close()

`publish` copies the tensors into a flat host/device snapshot buffer (the next optimizer step may
then change the parameters freely) and hands the snapshot to a background thread that sends the one
control message and the buckets. Two snapshot buffers: one being sent, one pending.

Latest version wins: if a publish arrives while the previous one is still being sent, it becomes the
pending snapshot; a further publish before that pending one has started overwrites it (the older
version is never sent; counted in `coalesced`). An update already on the wire is always completed, so
receivers only ever see whole versions, in increasing order. The trainer therefore never waits for a
slow rollout worker, and rollout workers skip versions rather than fall behind.

A version may be published more than once: with in-step updates (`trainer.publish_every=minibatch`)
the weights after each minibatch of the step towards v + 1 go out labelled v, the last whole version
they contain; the newest of them still wins.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from areal.transport import Layout, SenderTransport, UpdateHeader, plan_layout

HISTORY_LEN = 256  # updates whose PublishStats are kept: one per training step would grow for as long as a run lasts


@dataclass
class PublishStats:
    version: int
    seq: int
    bytes: int
    buckets: int
    snapshot_s: float  # time publish() spent copying (the trainer's whole cost)
    queued_s: float  # publish() -> start of sending (waiting for the previous update)
    transfer_s: float  # start_update -> every receiver has every bucket
    coalesced: int  # older versions replaced by this one without being sent


@dataclass
class _Snapshot:
    version: int
    layout: Layout
    flat: torch.Tensor
    snapshot_s: float
    published_at: float
    coalesced: int
    ready: object = None  # a CUDA event when the copy ran on the GPU


class WeightPublisher:
    def __init__(self, transport: SenderTransport, bucket_mb: float = 256.0, device: str | torch.device | None = None,
                 reform_wait_s: float = 120.0):
        self.transport = transport
        self.reform_wait_s = reform_wait_s  # after a failed send: how long to wait for reform() before failing
        self.groups_formed = 0
        self.bucket_bytes = max(int(bucket_mb * (1 << 20)), 1)
        self.device = None if device is None else torch.device(device)  # None: the tensors' own device
        self.history: deque[PublishStats] = deque(maxlen=HISTORY_LEN)  # the latest updates sent, oldest first
        self.updates_sent = 0
        self.coalesced_total = 0
        self.connect_s: float | None = None  # time to form the group with every receiver
        self._cond = threading.Condition()
        self._layout: Layout | None = None
        self._free: list[torch.Tensor] = []
        self._pending: _Snapshot | None = None
        self._sending: _Snapshot | None = None
        self._seq = 0
        self._next_transport: SenderTransport | None = transport  # the thread forms this group next
        self._last_sent: _Snapshot | None = None  # kept for members that join later (reform)
        self._last_version: int | None = None
        self._error: BaseException | None = None
        self._closing = False
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="areal-weight-publisher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ trainer side
    def publish(self, version: int, named_tensors) -> float:
        """Snapshot `named_tensors` ((name, tensor) pairs or a dict) as `version` (the last one's or newer);
        returns the copy seconds."""
        t0 = time.perf_counter()
        pairs = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        with self._cond:
            self._raise_if_failed()
            if self._closing:
                raise RuntimeError("publish() after close()")
            if self._last_version is not None and version < self._last_version:
                raise ValueError(f"version {version} is older than the last published {self._last_version}")
            self._last_version = version
            layout = self._layout_for(pairs)
            if self._pending is not None and self._pending.layout is layout:
                snap, coalesced = self._pending, self._pending.coalesced + 1  # latest wins: reuse its buffer
                self.coalesced_total += 1
            else:
                snap, coalesced = None, 0
                if self._pending is not None:  # layout changed: drop the stale pending snapshot
                    coalesced = self._pending.coalesced + 1
                    self.coalesced_total += 1
                flat = self._free.pop() if self._free else self._new_buffer(layout, pairs)
                snap = _Snapshot(version, layout, flat, 0.0, 0.0, coalesced)
            with torch.no_grad():
                for (_, dst), (_, src) in zip(layout.views(snap.flat), pairs):
                    dst.copy_(src.detach(), non_blocking=True)
            if snap.flat.is_cuda or any(t.is_cuda for _, t in pairs):
                snap.ready = torch.cuda.Event()
                snap.ready.record()  # the sender thread waits for the copy, not the trainer
            snap.version, snap.coalesced = version, coalesced
            snap.published_at = time.perf_counter()
            snap.snapshot_s = snap.published_at - t0
            self._pending = snap
            self._cond.notify_all()
            return snap.snapshot_s

    def wait_connected(self, timeout: float | None = None) -> None:
        """Block until every receiver joined the group (publishing before that is fine too: it queues)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._connected.wait(0.01):
            with self._cond:
                self._raise_if_failed()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"receivers did not join within {timeout}s")

    def wait(self, timeout: float | None = None) -> None:
        """Block until everything published has reached every receiver; raises the sender's error if any."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._pending is not None or self._sending is not None) and self._error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"weight publication still in flight after {timeout}s")
                self._cond.wait(left)
            self._raise_if_failed()

    def close(self, timeout: float | None = 60.0) -> None:
        """Finish what was published (up to `timeout`), tell receivers the channel is closed, stop."""
        try:
            if self._error is None:
                self.wait(timeout)
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join(timeout=5)
            self.transport.close()

    @property
    def stats(self) -> dict:
        last = self.history[-1] if self.history else None
        return {
            "weights/updates_sent": self.updates_sent,
            "weights/coalesced": self.coalesced_total,
            "weights/control_messages": self.transport.control_messages,
            **({} if last is None else {
                "weights/version_sent": last.version,
                "weights/bytes": last.bytes,
                "weights/buckets": last.buckets,
                "weights/snapshot_s": last.snapshot_s,
                "weights/transfer_s": last.transfer_s,
                "weights/queued_s": last.queued_s,
            }),
        }

    def reform(self, transport: SenderTransport) -> None:
        """Continue over a new group (a rollout worker died or joined): the update on the wire, if any,
        ends (or fails against the dead member), the old group is closed, the new one formed, and the
        newest version is sent again so every member of the new group holds it."""
        with self._cond:
            self._raise_if_failed()
            self._next_transport = transport
            self._cond.notify_all()

    # ------------------------------------------------------------------ internals
    def _new_buffer(self, layout: Layout, pairs) -> torch.Tensor:
        device = self.device if self.device is not None else (pairs[0][1].device if pairs else torch.device("cpu"))
        if device.type == "cpu" and any(t.is_cuda for _, t in pairs):  # GPU -> host snapshot: pinned, async
            return torch.empty(layout.total_bytes, dtype=torch.uint8, pin_memory=True)
        return layout.new_buffer(device)

    def _layout_for(self, pairs) -> Layout:
        sig = tuple((n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in pairs)
        if self._layout is None or self._layout.signature() != sig:
            self._layout = plan_layout(pairs, self.bucket_bytes)
            self._free = []  # buffers of the old layout are dropped
        return self._layout

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"weight publisher failed: {self._error}") from self._error

    def _recycle(self, snap: _Snapshot | None) -> None:
        if snap is not None and snap.layout is self._layout and snap is not self._pending:
            self._free.append(snap.flat)

    def _switch(self, old: SenderTransport | None) -> SenderTransport:
        """Close `old`, form the next group (with the cond released: joining waits for every member)."""
        with self._cond:
            transport, self._next_transport = self._next_transport, None
            self.transport, self._seq = transport, 0  # a new group numbers its updates from 0
            if self._pending is None and self._last_sent is not None:  # new members need the newest weights
                self._pending, self._last_sent = self._last_sent, None
        if old is not None:
            old.close()
        t0 = time.perf_counter()
        transport.connect()
        self.connect_s = time.perf_counter() - t0
        self.groups_formed += 1
        self._connected.set()
        return transport

    def _await_reform(self, exc: BaseException) -> bool:
        """A send or a join failed: a member died. Wait for the caller to re-form the group; False (and the
        error recorded) if it does not within `reform_wait_s`, or the publisher is closing."""
        deadline = time.monotonic() + self.reform_wait_s
        with self._cond:
            while self._next_transport is None and not self._closing and time.monotonic() < deadline:
                self._cond.wait(max(deadline - time.monotonic(), 0.0))
            if self._next_transport is None:
                self._error, self._sending = exc, None
                self._cond.notify_all()
                return False
            return True

    def _run(self) -> None:
        transport = None
        while True:
            if self._next_transport is not None:
                try:
                    transport = self._switch(transport)
                except BaseException as exc:  # a member left while the group was forming
                    if self._await_reform(exc):
                        continue
                    return
            with self._cond:
                while self._pending is None and not self._closing and self._next_transport is None:
                    self._cond.wait()
                if self._next_transport is not None:
                    continue
                if self._pending is None:  # closing and nothing left (close() closes the transport)
                    return
                snap, self._pending, self._sending = self._pending, None, self._pending
            try:
                if snap.ready is not None:
                    snap.ready.synchronize()
                t0 = time.perf_counter()
                header = UpdateHeader(self._seq, snap.version, snap.layout, snap.layout.total_bytes, time.time())
                transport.start_update(header)
                for bucket in snap.layout.bucket_slices(snap.flat):
                    transport.send_bucket(bucket)
                transport.finish_update(header)
                t1 = time.perf_counter()
            except BaseException as exc:  # a member died mid-update: send it again over the re-formed group
                with self._cond:
                    self._sending = None
                    if self._pending is None:
                        self._pending = snap
                    else:
                        self._recycle(snap)
                if self._await_reform(exc):
                    continue
                return
            with self._cond:
                self._seq += 1
                self.updates_sent += 1
                self.history.append(PublishStats(
                    snap.version, header.seq, snap.layout.total_bytes, len(snap.layout.buckets),
                    snap.snapshot_s, t0 - snap.published_at, t1 - t0, snap.coalesced,
                ))
                self._recycle(self._last_sent)
                self._last_sent = snap
                self._sending = None
                self._cond.notify_all()
