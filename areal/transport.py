"""The one transport interface between the trainer (sender) and rollout workers (receivers).

`areal.trainer.weight_publisher` and `areal.rollout.weight_receiver` both import this module and
never each other. Only the launcher chooses a transport and gives each side its end.

Protocol, per update (one control message, never one per parameter):
    sender:   start_update(header)  -> send_bucket(slice_0) ... send_bucket(slice_{n-1}) -> finish_update(header)
    receiver: recv_start() -> header -> recv_bucket(out_0) ... recv_bucket(out_{n-1})   -> finish_update(header)
The header (`UpdateHeader`) is the only control message: seq, version, the full layout (names, shapes,
dtypes, byte offsets, bucket byte ranges) and total bytes. `finish_update` sends nothing: broadcasts
are ordered, so the last bucket arriving completes the update. The layout goes with every header
(~30 KB of JSON for a 7B model) so a receiver never depends on an earlier message.

Data: the weights of one version live in ONE flat uint8 buffer (every tensor 64-byte aligned). Wire
buckets are consecutive byte ranges of ~bucket_bytes of that buffer (a big tensor may span buckets).

Transport: `DistSender` / `DistReceiver`. Control = torch.distributed `TCPStore` hosted by the sender at
`tcp://HOST:PORT` (port 0 = any free port; read `.address` back), data = `broadcast` over a private
process group (rank 0 = sender, ranks 1..k = receivers) built directly on that store, so it never
touches the default process group the trainer may use for its own data parallelism.

Backend: every member writes where its buffers live (`MemberDevice`: host memory, or which GPU) into
the store, and each member, once all have written, applies the same pure rule to the same list
(`weight_group_backend`): NCCL when every member has a GPU of its own, else gloo, whose broadcast
takes CUDA tensors too (staged through host memory). NCCL refuses two ranks on one GPU, which is what
roles sharing a GPU get (one GPU for trainer and rollout, more roles than GPUs, fractional Ray GPUs).
Every group (re-)formation decides anew, so a re-formed group fits its new members.

Every store wait and collective has a timeout (`timeout_s` per transfer, `connect_timeout_s` for
forming the group), so a dead peer raises instead of hanging. Works across hosts.

Listeners: each member listens on one interface only, the one it is given. The store's socket is bound
here (`listening_store`) and handed to torch, whose own TCPStore listener binds every interface (`::`)
whatever host it is given; each member's gloo listener binds its `bind_host` (an explicit gloo device,
not the hostname torch would resolve). For a loopback address GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME
default to lo, for the groups torch builds itself (the trainer ranks' group) and NCCL's bootstrap.

Control messages in the store (`meta`, each member's device, each header) are JSON, never pickle: a
TCPStore takes writes from anyone who can reach its port, so unpickling an entry would run that writer's
code in every receiver. JSON carries only data, and `from_json` checks every field, raising ValueError
on a malformed entry.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import socket
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

CLOSED = b"\"closed\""  # the entry after the last header once the sender closed (JSON, as every entry; not an object)
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

    def to_json(self) -> bytes:
        """Compact JSON; each tensor is [name, shape, dtype, offset, nbytes], each bucket [start, end]."""
        layout = self.layout
        return json.dumps({
            "seq": self.seq, "version": self.version, "total_bytes": self.total_bytes, "sent_at": self.sent_at,
            "layout": {
                "tensors": [[t.name, list(t.shape), t.dtype, t.offset, t.nbytes] for t in layout.tensors],
                "buckets": [list(b) for b in layout.buckets],
                "total_bytes": layout.total_bytes,
            },
        }, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> UpdateHeader:
        """The header `to_json` wrote. Anything else (not JSON, a missing or extra field, a wrong type, a
        byte range outside the buffer) raises ValueError, so a receiver never acts on a half-valid header."""
        obj = _load_json(data, "update header")
        seq, version, total, sent_at, layout = _fields(
            obj, ("seq", "version", "total_bytes", "sent_at", "layout"), "update header")
        seq, total = _count(seq, "seq"), _count(total, "total_bytes")
        if type(version) is not int:
            raise ValueError(f"update header: version must be an integer, got {reprlib.repr(version)}")
        if type(sent_at) not in (int, float) or not math.isfinite(sent_at):
            raise ValueError(f"update header: sent_at must be a finite number, got {reprlib.repr(sent_at)}")
        tensors, buckets, layout_total = _fields(layout, ("tensors", "buckets", "total_bytes"), "update header layout")
        if type(layout_total) is not int or layout_total != total:
            raise ValueError(f"update header: layout total_bytes {reprlib.repr(layout_total)} != total_bytes {total}")
        tensors = tuple(_tensor_spec(t, total) for t in _list(tensors, "layout tensors"))
        buckets = tuple(_byte_range(b, total) for b in _list(buckets, "layout buckets"))
        return cls(seq, version, Layout(tensors, buckets, total), total, float(sent_at))


# JSON decoding of store entries: anyone who reaches the store can write them, so every value is checked
# (reprlib keeps a hostile value from flooding the error message).
def _load_json(data: bytes, what: str):
    try:
        return json.loads(data)
    except (TypeError, ValueError, RecursionError) as exc:  # not bytes, not UTF-8, not JSON, nested too deep
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


def _fields(obj, keys: tuple[str, ...], what: str) -> tuple:
    """The values of exactly `keys` in a JSON object."""
    if not isinstance(obj, dict) or set(obj) != set(keys):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{what} must be an object with fields {list(keys)}, got {reprlib.repr(got)}")
    return tuple(obj[k] for k in keys)


def _list(value, what: str, length: int | None = None) -> list:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        shape = "a list" if length is None else f"a list of {length}"
        raise ValueError(f"update header: {what} must be {shape}, got {reprlib.repr(value)}")
    return value


def _count(value, what: str) -> int:
    if type(value) is not int or value < 0:  # type(), not isinstance: JSON true/false are not counts
        raise ValueError(f"update header: {what} must be a non-negative integer, got {reprlib.repr(value)}")
    return value


def _byte_range(value, total: int) -> tuple[int, int]:
    start, end = (_count(x, "bucket bound") for x in _list(value, "a bucket", 2))
    if not start <= end <= total:
        raise ValueError(f"update header: bucket [{start}, {end}) is outside the {total}-byte buffer")
    return start, end


def _tensor_spec(value, total: int) -> TensorSpec:
    name, shape, dtype, offset, nbytes = _list(value, "a tensor entry", 5)
    if not isinstance(name, str):
        raise ValueError(f"update header: tensor name must be a string, got {reprlib.repr(name)}")
    label = reprlib.repr(name)
    shape = tuple(_count(d, f"a dimension of {label}") for d in _list(shape, f"the shape of {label}"))
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"update header: {label} has no torch dtype {reprlib.repr(dtype)}")
    offset, nbytes = _count(offset, f"the offset of {label}"), _count(nbytes, f"the size of {label}")
    if nbytes != math.prod(shape) * torch_dtype.itemsize or offset + nbytes > total:
        raise ValueError(f"update header: {label} ({nbytes} bytes at {offset}, shape {shape}, {dtype}) "
                         f"does not match its shape or lies outside the {total}-byte buffer")
    return TensorSpec(name, shape, dtype, offset, nbytes)


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


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def loopback_env(host: str) -> None:
    """For a run on loopback: the groups torch builds from the environment (gloo's default device, NCCL's
    bootstrap) listen on lo too, unless the user chose otherwise."""
    if host in LOOPBACK_HOSTS:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def listening_store(host: str, port: int, timeout: timedelta, world_size: int | None = None):
    """A master TCPStore that listens on `host` only (port 0: one the OS picks; read `.port`).

    torch binds its own listener to every interface whatever host it is given, so the socket is bound here
    and handed over (`master_listen_fd`; the store owns it from then on, with or without libuv)."""
    import torch.distributed as dist

    sock = None
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch does: a restart may reuse the port
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
        port = sock.getsockname()[1]
    except OSError as exc:  # an unknown host, an address not on this machine, a port in use
        if sock is not None:
            sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
    return dist.TCPStore(host, port, world_size, is_master=True, wait_for_workers=False, timeout=timeout,
                         master_listen_fd=sock.detach())


@dataclass(frozen=True)
class MemberDevice:
    """Where one member of the weight group keeps its buffers: `gpu` is None for host memory, else the
    GPU's UUID (unique across hosts, unlike an index: CUDA_VISIBLE_DEVICES renumbers GPUs per process,
    and two containers on one host have two hostnames but see one GPU)."""

    gpu: str | None

    def to_json(self) -> bytes:
        return json.dumps({"gpu": self.gpu}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> MemberDevice:
        """The entry `to_json` wrote; anything else raises ValueError (the store takes writes from anyone)."""
        (gpu,) = _fields(_load_json(data, "member device"), ("gpu",), "member device")
        if not (gpu is None or isinstance(gpu, str)):
            raise ValueError(f"member device: gpu must be a string or null, got {reprlib.repr(gpu)}")
        return cls(gpu)


def local_member_device(device: str | torch.device) -> MemberDevice:
    """This process's `device` as the weight group sees it."""
    device = torch.device(device)
    if device.type != "cuda":
        return MemberDevice(None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return MemberDevice(str(torch.cuda.get_device_properties(index).uuid))


def publish_member_device(store, rank: int, device: str | torch.device) -> None:
    """Write this rank's `MemberDevice` where `gather_member_devices` reads it (`store`: the group's)."""
    store.set(f"member/{rank}", local_member_device(device).to_json())


def gather_member_devices(store, world_size: int, timeout: timedelta) -> list[MemberDevice]:
    """Every rank's `MemberDevice`, once all have published theirs (raises on timeout)."""
    keys = [f"member/{r}" for r in range(world_size)]
    store.wait(keys, timeout)
    return [MemberDevice.from_json(store.get(k)) for k in keys]


def weight_group_backend(members: Sequence[MemberDevice]) -> str:
    """The weight group's torch.distributed backend, from where its members' buffers live:

        nccl   if every member m has m.gpu and the m.gpu are pairwise distinct
        gloo   otherwise (a member in host memory, or two members on one GPU)

    NCCL needs a CUDA buffer on every rank and refuses two ranks on one GPU ("Duplicate GPU detected");
    gloo broadcasts CPU and CUDA tensors alike (CUDA ones staged through host memory), only slower."""
    gpus = [m.gpu for m in members]
    if None not in gpus and len(set(gpus)) == len(gpus):
        return "nccl"
    return "gloo"


def _make_group(store, rank: int, world_size: int, backend: str, timeout: timedelta, bind_host: str | None):
    import torch.distributed as dist

    prefix = dist.PrefixStore("pg/", store)
    if backend == "gloo":
        if bind_host is None:  # torch's default device: GLOO_SOCKET_IFNAME, else this machine's hostname
            return dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]  # its listener binds bind_host
        return dist.ProcessGroupGloo(prefix, rank, world_size, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(prefix, rank, world_size, opts)


class _DistEnd:
    """Shared by both ends: a private process group over the sender's TCPStore, two broadcasts in flight."""

    PIPELINE = 2  # double buffering on the wire: bucket k+1 is issued while bucket k completes

    def _init_common(self, store, rank, world_size, device, timeout_s, connect_timeout_s, bind_host):
        import torch.distributed as dist

        self._dist, self.store, self.bind_host = dist, store, bind_host
        self.ctl = dist.PrefixStore("ctl/", store)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.timeout = timedelta(seconds=timeout_s)
        # joining may take as long as a worker needs to start (imports, model load); a transfer should not
        self.connect_timeout = timedelta(seconds=connect_timeout_s or timeout_s)
        self._pg, self._inflight = None, deque()
        self.members: list[MemberDevice] | None = None  # every rank's device, once the group formed
        self.backend: str | None = None  # weight_group_backend(members), once the group formed
        publish_member_device(self.ctl, rank, device)

    def connect(self) -> None:
        self._group()

    def _group(self):
        if self._pg is None:  # rendezvous: every rank must join within the timeout
            self.members = gather_member_devices(self.ctl, self.world_size, self.connect_timeout)
            self.backend = weight_group_backend(self.members)  # every rank decides alike from the same list
            self._pg = _make_group(self.store, self.rank, self.world_size, self.backend, self.connect_timeout,
                                   self.bind_host)
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
    """Rank 0. Hosts the TCPStore, listening on `address`'s host only, as does its gloo listener; pass
    `.address` and `num_receivers` to every receiver."""

    def __init__(self, num_receivers: int, address: str = "tcp://127.0.0.1:0", device="cpu", timeout_s: float = 300.0,
                 connect_timeout_s: float | None = None):
        host, port = _parse(address)
        loopback_env(host)
        store = listening_store(host, port, timedelta(seconds=connect_timeout_s or timeout_s))
        self.address = f"tcp://{f'[{host}]' if ':' in host else host}:{store.port}"
        wildcard = host in ("", "0.0.0.0", "::")  # gloo would publish it as its address: let torch pick one
        self._init_common(store, 0, num_receivers + 1, device, timeout_s, connect_timeout_s, None if wildcard else host)
        self.ctl.set("meta", json.dumps({"world_size": self.world_size}).encode())
        self._next_seq = 0

    def start_update(self, header: UpdateHeader) -> None:
        self.ctl.set(f"update/{header.seq}", header.to_json())
        self.control_messages += 1
        self._next_seq = header.seq + 1

    def send_bucket(self, bucket: torch.Tensor) -> None:
        self._broadcast(bucket)

    def finish_update(self, header: UpdateHeader) -> None:
        self._drain()
        # every receiver took part in the broadcasts, so all have read the header: free it in the store
        self.ctl.delete_key(f"update/{header.seq}")

    def close(self) -> None:
        try:
            self.ctl.set("closed", b"1")
            self.ctl.set(f"update/{self._next_seq}", CLOSED)  # wakes the receivers blocked on the next header
        except Exception:
            pass
        self._shutdown_group()


class DistReceiver(_DistEnd, ReceiverTransport):
    """Rank `rank` in 1..num_receivers. Its gloo listener binds `bind_host` (this member's interface; None: the
    sender's host when that is loopback, else torch's default device)."""

    def __init__(self, address: str, rank: int, num_receivers: int, device="cpu", timeout_s: float = 300.0,
                 connect_timeout_s: float | None = None, bind_host: str | None = None):
        import torch.distributed as dist

        if not 1 <= rank <= num_receivers:
            raise ValueError(f"receiver rank must be in 1..{num_receivers}, got {rank}")
        host, port = _parse(address)
        loopback_env(host)
        if bind_host is None and host in LOOPBACK_HOSTS:
            bind_host = host
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=connect_timeout_s or timeout_s))
        self.address = address
        meta = _load_json(dist.PrefixStore("ctl/", store).get("meta"), "meta")
        (world_size,) = _fields(meta, ("world_size",), "meta")
        if world_size != num_receivers + 1:
            raise ValueError(f"receiver (world {num_receivers + 1}) does not match sender (world "
                             f"{reprlib.repr(world_size)})")
        self._init_common(store, rank, num_receivers + 1, device, timeout_s, connect_timeout_s, bind_host)
        self._next_seq = 0

    def recv_start(self, timeout_s: float) -> UpdateHeader | None:
        key = f"update/{self._next_seq}"
        try:  # blocks in the store until the sender writes the key: polling it woke the sender's process
            # hundreds of times a second, and on shared cores the trainer paid for every wake-up
            self.ctl.wait([key], timedelta(seconds=max(timeout_s, 0.001)))
            entry = self.ctl.get(key)
        except self._dist.DistStoreError:  # none within timeout_s (the store's timeout error)
            if self._closed():
                raise PeerClosed("weight publisher closed the channel") from None
            return None
        except Exception as exc:  # the store lives in the publisher: it died or the network is gone
            raise ConnectionError(f"weight publisher's store at {self.address} unreachable: {exc}") from exc
        if entry == CLOSED:
            raise PeerClosed("weight publisher closed the channel")
        header = UpdateHeader.from_json(entry)  # a malformed entry raises ValueError, not "unreachable"
        self._next_seq += 1
        self.control_messages += 1
        return header

    def _closed(self) -> bool:
        try:
            return self.ctl.check(["closed"])
        except Exception as exc:
            raise ConnectionError(f"weight publisher's store at {self.address} unreachable: {exc}") from exc

    def recv_bucket(self, out: torch.Tensor) -> None:
        self._broadcast(out)

    def finish_update(self, header: UpdateHeader) -> None:
        self._drain()

    def close(self) -> None:
        self._shutdown_group()

