"""The one transport interface between the trainer (sender) and rollout workers (receivers).

`areal.trainer.weight_publisher` and `areal.rollout.weight_receiver` both import this module and
never each other. Only the launcher chooses a transport and gives each side its end.

Protocol, per update (one control message, never one per parameter):
    sender:   start_update(header)  -> send_bucket(slice_0) ... send_bucket(slice_{n-1}) -> finish_update(header)
    receiver: recv_start() -> header -> recv_bucket(out_0) ... recv_bucket(out_{n-1})   -> finish_update(header)
The header (`UpdateHeader`) is the only control message: seq, version, the full layout (names, shapes,
dtypes, byte offsets, bucket byte ranges) and total bytes. `finish_update` sends nothing: broadcasts
are ordered, so the last bucket arriving completes the update. The layout goes with every header
(a few KB even for a 7B model) so a receiver never depends on an earlier message.

Data: the weights of one version live in ONE flat uint8 buffer (every tensor 64-byte aligned). Wire
buckets are consecutive byte ranges of ~bucket_bytes of that buffer (a big tensor may span buckets).

Transports:
- `DistSender` / `DistReceiver`: control = torch.distributed `TCPStore` hosted by the sender at
  `tcp://HOST:PORT` (port 0 = any free port; read `.address` back), data = `broadcast` over a private
  process group (rank 0 = sender, ranks 1..k = receivers) built directly on that store, so it never
  touches the default process group the trainer may use for its own data parallelism. gloo for CPU
  buffers, NCCL for CUDA buffers, chosen at run time from `device`. Every store wait and collective has
  a timeout (`timeout_s` per transfer, `connect_timeout_s` for forming the group), so a dead peer
  raises instead of hanging. Works across hosts (set GLOO_SOCKET_IFNAME /
  NCCL_SOCKET_IFNAME there; for a loopback address we set GLOO_SOCKET_IFNAME=lo if it is unset).
- `InProcessHub`: same-process sender and receivers (direct copies) for the synchronous loop and tests.
Headers are pickled: the store is the cluster's own, not an untrusted endpoint.
"""

from __future__ import annotations

import os
import pickle
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch

ALIGN = 64  # bytes; keeps every tensor view aligned for any dtype and for vectorised copies


class PeerClosed(ConnectionError):
    """The sender closed the channel in an orderly way (no more updates)."""


# ------------------------------------------------------------------ layout (pure)
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32", a torch dtype attribute name
    offset: int  # byte offset in the flat buffer
    nbytes: int


@dataclass(frozen=True)
class Layout:
    tensors: tuple[TensorSpec, ...]
    buckets: tuple[tuple[int, int], ...]  # [start, end) byte ranges of the flat buffer, in send order
    total_bytes: int

    def signature(self) -> tuple:
        return tuple((t.name, t.shape, t.dtype) for t in self.tensors)

    def new_buffer(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.empty(self.total_bytes, dtype=torch.uint8, device=device)

    def views(self, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) views into `flat`, no copies."""
        return [
            (t.name, flat[t.offset : t.offset + t.nbytes].view(getattr(torch, t.dtype)).view(t.shape))
            for t in self.tensors
        ]

    def bucket_slices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[a:b] for a, b in self.buckets]


def plan_layout(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Layout:
    """Pack tensors in order into one flat buffer; offset_i = align(offset_{i-1} + nbytes_{i-1}, 64);
    buckets = consecutive ranges [k*B, min((k+1)*B, total)) with B = bucket_bytes rounded up to 64."""
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    specs, offset = [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        specs.append(TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    total = offset
    step = -(-bucket_bytes // ALIGN) * ALIGN
    buckets = tuple((a, min(a + step, total)) for a in range(0, total, step))
    return Layout(tuple(specs), buckets, total)


@dataclass(frozen=True)
class UpdateHeader:
    """The one control message of an update."""

    seq: int  # 0, 1, 2, ... over updates actually sent (coalesced versions never get one)
    version: int
    layout: Layout
    total_bytes: int
    sent_at: float  # sender's time.time() at start_update, for end-to-end latency


# ------------------------------------------------------------------ interface
class SenderTransport(ABC):
    control_messages = 0  # counted where they are written

    def connect(self) -> None:
        """Form the group (blocks until every receiver joined, or raises after the timeout)."""

    @abstractmethod
    def start_update(self, header: UpdateHeader) -> None: ...
    @abstractmethod
    def send_bucket(self, bucket: torch.Tensor) -> None:
        """May return before the bucket is on the wire; `bucket` must stay untouched until finish_update."""
    @abstractmethod
    def finish_update(self, header: UpdateHeader) -> None:
        """Blocks until every bucket reached every receiver (or raises). Sends no message."""
    @abstractmethod
    def close(self) -> None: ...


class ReceiverTransport(ABC):
    control_messages = 0

    def connect(self) -> None:
        """Join the group (blocks until the sender and every other receiver joined, or raises)."""

    @abstractmethod
    def recv_start(self, timeout_s: float) -> UpdateHeader | None:
        """The next header, or None if none came within timeout_s. Raises PeerClosed at orderly end."""
    @abstractmethod
    def recv_bucket(self, out: torch.Tensor) -> None: ...
    @abstractmethod
    def finish_update(self, header: UpdateHeader) -> None: ...
    @abstractmethod
    def close(self) -> None: ...


# ------------------------------------------------------------------ torch.distributed
def _parse(address: str) -> tuple[str, int]:
    if not address.startswith("tcp://"):
        raise ValueError(f"address must look like tcp://HOST:PORT, got {address!r}")
    host, _, port = address[len("tcp://") :].rpartition(":")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, for a launcher that must hand the address out before the sender exists
    (racy by nature; when the sender's process starts the workers, prefer port 0 and `.address`)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _loopback_env(host: str) -> None:
    if host in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def _backend(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _make_group(store, rank: int, world_size: int, backend: str, timeout: timedelta):
    import torch.distributed as dist

    prefix = dist.PrefixStore("pg/", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(prefix, rank, world_size, opts)


class _DistEnd:
    """Shared by both ends: a private process group over the sender's TCPStore, two broadcasts in flight."""

    PIPELINE = 2  # double buffering on the wire: bucket k+1 is issued while bucket k completes

    def _init_common(self, store, rank, world_size, device, timeout_s, connect_timeout_s):
        import torch.distributed as dist

        self._dist, self.store = dist, store
        self.ctl = dist.PrefixStore("ctl/", store)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.backend, self.timeout = _backend(device), timedelta(seconds=timeout_s)
        # joining may take as long as a worker needs to start (imports, model load); a transfer should not
        self.connect_timeout = timedelta(seconds=connect_timeout_s or timeout_s)
        self._pg, self._inflight = None, deque()

    def connect(self) -> None:
        self._group()

    def _group(self):
        if self._pg is None:  # rendezvous: every rank must join within the timeout
            self._pg = _make_group(self.store, self.rank, self.world_size, self.backend, self.connect_timeout)
        return self._pg

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = self._dist.BroadcastOptions()
        opts.rootRank, opts.timeout = 0, self.timeout
        self._inflight.append(self._group().broadcast([tensor], opts))
        while len(self._inflight) > self.PIPELINE - 1:
            self._inflight.popleft().wait(self.timeout)

    def _drain(self) -> None:
        while self._inflight:
            self._inflight.popleft().wait(self.timeout)

    def _shutdown_group(self) -> None:
        self._inflight.clear()
        pg, self._pg = self._pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # best effort: the peer may already be gone
                pass


class DistSender(_DistEnd, SenderTransport):
    """Rank 0. Hosts the TCPStore; pass `.address` and `num_receivers` to every receiver."""

    def __init__(self, num_receivers: int, address: str = "tcp://127.0.0.1:0", device="cpu", timeout_s: float = 300.0,
                 connect_timeout_s: float | None = None):
        import torch.distributed as dist

        host, port = _parse(address)
        _loopback_env(host)
        wait = timedelta(seconds=connect_timeout_s or timeout_s)
        store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=wait)
        self.address = f"tcp://{host}:{store.port}"
        self._init_common(store, 0, num_receivers + 1, device, timeout_s, connect_timeout_s)
        self.ctl.set("meta", pickle.dumps({"backend": self.backend, "world_size": self.world_size}))

    def start_update(self, header: UpdateHeader) -> None:
        self.ctl.set(f"update/{header.seq}", pickle.dumps(header))
        self.control_messages += 1

    def send_bucket(self, bucket: torch.Tensor) -> None:
        self._broadcast(bucket)

    def finish_update(self, header: UpdateHeader) -> None:
        self._drain()
        # every receiver took part in the broadcasts, so all have read the header: free it in the store
        self.ctl.delete_key(f"update/{header.seq}")

    def close(self) -> None:
        try:
            self.ctl.set("closed", b"1")
        except Exception:
            pass
        self._shutdown_group()


class DistReceiver(_DistEnd, ReceiverTransport):
    """Rank `rank` in 1..num_receivers."""

    def __init__(self, address: str, rank: int, num_receivers: int, device="cpu", timeout_s: float = 300.0,
                 connect_timeout_s: float | None = None):
        import torch.distributed as dist

        if not 1 <= rank <= num_receivers:
            raise ValueError(f"receiver rank must be in 1..{num_receivers}, got {rank}")
        host, port = _parse(address)
        _loopback_env(host)
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=connect_timeout_s or timeout_s))
        self.address = address
        self._init_common(store, rank, num_receivers + 1, device, timeout_s, connect_timeout_s)
        meta = pickle.loads(self.ctl.get("meta"))
        if meta["backend"] != self.backend or meta["world_size"] != self.world_size:
            raise ValueError(f"receiver ({self.backend}, world {self.world_size}) does not match sender {meta}")
        self._next_seq = 0

    def recv_start(self, timeout_s: float) -> UpdateHeader | None:
        key = f"update/{self._next_seq}"
        deadline, nap = time.monotonic() + timeout_s, 0.0005
        while True:
            try:  # check() polls without the C++ timeout warnings that store.wait(timeout) prints
                found, closed = self.ctl.check([key]), self.ctl.check(["closed"])
                header = pickle.loads(self.ctl.get(key)) if found else None
            except Exception as exc:  # the store lives in the publisher: it died or the network is gone
                raise ConnectionError(f"weight publisher's store at {self.address} unreachable: {exc}") from exc
            if header is not None:
                self._next_seq += 1
                self.control_messages += 1
                return header
            if closed:
                raise PeerClosed("weight publisher closed the channel")
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(nap, max(deadline - time.monotonic(), 0)))
            nap = min(nap * 2, 0.01)

    def recv_bucket(self, out: torch.Tensor) -> None:
        self._broadcast(out)

    def finish_update(self, header: UpdateHeader) -> None:
        self._drain()

    def close(self) -> None:
        self._shutdown_group()


# ------------------------------------------------------------------ in-process
class InProcessHub:
    """One sender, any number of receivers in the same process; buckets are copied directly.
    Create every receiver before the first update (like ranks of a process group)."""

    def __init__(self, timeout_s: float = 300.0):
        self.timeout_s = timeout_s
        self._queues: list[queue.Queue] = []

    def sender(self) -> InProcessSender:
        return InProcessSender(self)

    def receiver(self) -> InProcessReceiver:
        q: queue.Queue = queue.Queue()
        self._queues.append(q)
        return InProcessReceiver(q, self.timeout_s)


class InProcessSender(SenderTransport):
    def __init__(self, hub: InProcessHub):
        self.hub, self._pending = hub, []

    def start_update(self, header: UpdateHeader) -> None:
        for q in self.hub._queues:
            q.put(("start", header))
        self.control_messages += 1

    def send_bucket(self, bucket: torch.Tensor) -> None:
        for q in self.hub._queues:
            done = threading.Event()
            q.put(("bucket", bucket, done))
            self._pending.append(done)

    def finish_update(self, header: UpdateHeader) -> None:
        pending, self._pending = self._pending, []
        deadline = time.monotonic() + self.hub.timeout_s
        for done in pending:
            if not done.wait(max(deadline - time.monotonic(), 0)):
                raise TimeoutError(f"in-process receiver did not take update {header.version} in {self.hub.timeout_s}s")

    def close(self) -> None:
        for q in self.hub._queues:
            q.put(("closed",))


class InProcessReceiver(ReceiverTransport):
    def __init__(self, q: queue.Queue, timeout_s: float):
        self._q, self.timeout_s = q, timeout_s

    def recv_start(self, timeout_s: float) -> UpdateHeader | None:
        try:
            msg = self._q.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if msg[0] == "closed":
            raise PeerClosed("weight publisher closed the channel")
        assert msg[0] == "start", msg[0]
        self.control_messages += 1
        return msg[1]

    def recv_bucket(self, out: torch.Tensor) -> None:
        try:
            kind, bucket, done = self._q.get(timeout=self.timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no bucket from the in-process sender in {self.timeout_s}s") from None
        out.copy_(bucket)
        done.set()

    def finish_update(self, header: UpdateHeader) -> None:
        pass

    def close(self) -> None:
        pass
