"""The one network channel between the processes of a run (everything but weights).

Topology: a star. The controller binds one ZeroMQ ROUTER socket (`Hub`) on the interface
the launcher chose (loopback for local runs) and publishes its real address after binding;
every role connects one DEALER socket (`Endpoint`) named after itself ("trainer0",
"rollout1", ...) and sends typed messages to any other role by name. The hub forwards a
message to its destination without decoding it, holds messages for a role that has not
connected yet, and records when it last heard from each role (heartbeats), so a role that
stops answering is named instead of hanging the run.

Wire format (no pickle anywhere): a message is a registered dataclass (`areal.messages`)
turned into plain data by its `to_dict()` and packed with msgpack. Frames:
    role -> hub:   [dest, src, type, body, mac]
    hub  -> role:  [src, type, body, mac]          (ZeroMQ strips the routing frame)
    mac = HMAC-SHA256(run secret, dest | src | type | body)
Every receiver, and the hub before forwarding, checks the mac and that `src` is the
connection's own name; anything else is dropped and counted (`rejected`). Someone who can
reach the port without the secret can therefore neither inject a message nor make a role
decode more than msgpack plain data. (Replays of recorded traffic are not prevented: use
a private network or CURVE-encrypted transport when the network itself is hostile.)
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass

import msgpack
import zmq

log = logging.getLogger("areal.channel")

HEARTBEAT_S = 1.0
CONTROLLER = "controller"
_REGISTRY: dict[str, type] = {}


def message(cls):
    """Register a dataclass as a wire message. It needs `to_dict()` / `from_dict()` unless every
    field is plain data (numbers, strings, lists, dicts), in which case defaults are provided."""
    if not hasattr(cls, "to_dict"):
        cls.to_dict = lambda self: {f: getattr(self, f) for f in self.__dataclass_fields__}
    if not hasattr(cls, "from_dict"):
        cls.from_dict = classmethod(lambda c, d: c(**d))
    if cls.__name__ in _REGISTRY and _REGISTRY[cls.__name__] is not cls:
        raise ValueError(f"two message types named {cls.__name__}")
    _REGISTRY[cls.__name__] = cls
    return cls


def new_secret() -> str:
    return secrets.token_hex(32)


def encode(msg) -> tuple[bytes, bytes]:
    name = type(msg).__name__
    if _REGISTRY.get(name) is not type(msg):
        raise TypeError(f"{name} is not a registered message type (areal.channel.message)")
    return name.encode(), msgpack.packb(msg.to_dict(), use_bin_type=True)


def decode(type_name: bytes, body: bytes):
    cls = _REGISTRY.get(type_name.decode("utf-8", "replace"))
    if cls is None:
        raise ValueError(f"unknown message type {type_name[:64]!r}")
    return cls.from_dict(msgpack.unpackb(body, raw=False, strict_map_key=False))


def _mac(key: bytes, frames: list[bytes]) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for f in frames:
        h.update(len(f).to_bytes(8, "little"))  # length-prefixed: frame boundaries cannot be shifted
        h.update(f)
    return h.digest()


@dataclass
class Received:
    src: str
    msg: object


class _Socketed:
    """One socket owned by one IO thread; other threads hand it frames through a deque + wake-up."""

    def __init__(self, name: str, secret: str, socket_type: int):
        if not secret:
            raise ValueError("the run secret is empty: every message must be authenticated")
        self.name, self._key = name, bytes.fromhex(secret) if _is_hex(secret) else secret.encode()
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(socket_type)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.inbox: queue.Queue = queue.Queue()  # Received(src, msg), in arrival order
        self.rejected = 0  # frames dropped: bad mac, forged source, malformed
        self._out: collections.deque = collections.deque()
        self._wake_addr = f"inproc://areal-wake-{id(self)}"
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"areal-channel-{self.name}", daemon=True)
        self._thread.start()

    def _push(self, frames: list[bytes]) -> None:
        self._out.append(frames)
        with self._wake_lock:
            if not self._wake_tx.closed:
                try:
                    self._wake_tx.send(b"", zmq.NOBLOCK)
                except zmq.Again:  # wake-ups already queued: the IO thread will drain the deque
                    pass

    def _reject(self, why: str) -> None:
        self.rejected += 1
        if self.rejected <= 10 or self.rejected % 1000 == 0:
            log.warning("%s dropped a message (%s); %d dropped so far", self.name, why, self.rejected)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        next_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(timeout=100))
                if self._wake_rx in events:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                while self._out:
                    self._send_frames(self._out.popleft())
                if self.sock in events:
                    for _ in range(1000):  # drain, but let sends and ticks interleave
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + HEARTBEAT_S
                    self._tick()
            while self._out:  # flush what was sent before close()
                self._send_frames(self._out.popleft())
        except BaseException as e:  # noqa: BLE001 - surfaced by send()/recv()
            self.error = e
            log.exception("channel %s failed", self.name)

    def _tick(self) -> None: ...

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._push([])
        if self._thread is not None:
            self._thread.join(timeout)
        with self._wake_lock:
            self._wake_tx.close(0)
        self._wake_rx.close(0)
        self.sock.close()

    def recv(self, timeout: float | None = None) -> Received:
        """The next message (raises queue.Empty after `timeout`)."""
        if self.error is not None:
            raise ConnectionError(f"channel {self.name} failed: {self.error!r}") from self.error
        return self.inbox.get(timeout=timeout)


class Endpoint(_Socketed):
    """A role's connection to the hub: `send(dest, msg)` from any thread; `recv()` / `inbox` to read."""

    def __init__(self, name: str, hub_address: str, secret: str):
        super().__init__(name, secret, zmq.DEALER)
        self.hub_address = hub_address
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.connect(hub_address)
        self._start()
        from areal.messages import Hello

        self.send(CONTROLLER, Hello(name))

    def send(self, dest: str, msg) -> None:
        if self.error is not None:
            raise ConnectionError(f"channel {self.name} failed: {self.error!r}") from self.error
        type_name, body = encode(msg)
        head = [dest.encode(), self.name.encode(), type_name, body]
        self._push(head + [_mac(self._key, head)])

    def _send_frames(self, frames: list[bytes]) -> None:
        if frames:  # empty: a wake-up only
            self.sock.send_multipart(frames, copy=False)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 4:
            return self._reject(f"{len(frames)} frames")
        src, type_name, body, mac = frames
        if not hmac.compare_digest(mac, _mac(self._key, [self.name.encode(), src, type_name, body])):
            return self._reject("bad mac")
        try:
            msg = decode(type_name, body)
        except Exception as e:  # noqa: BLE001 - a malformed message must not kill the role
            return self._reject(f"undecodable {type_name[:40]!r}: {e}")
        self.inbox.put(Received(src.decode(), msg))

    def _tick(self) -> None:
        from areal.messages import Heartbeat

        type_name, body = encode(Heartbeat())
        head = [CONTROLLER.encode(), self.name.encode(), type_name, body]
        self._send_frames(head + [_mac(self._key, head)])


class Hub(_Socketed):
    """The controller's router: binds `bind_host` on a port the OS picks (`address` is the real one),
    forwards role-to-role messages, and delivers those addressed to "controller" to its own inbox."""

    PENDING_LIMIT = 10_000  # messages held per role that has not connected yet

    def __init__(self, secret: str, bind_host: str = "127.0.0.1"):
        super().__init__(CONTROLLER, secret, zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable role raises instead of vanishing
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted role takes its name back
        host = f"[{bind_host}]" if ":" in bind_host else bind_host
        if ":" in bind_host:
            self.sock.setsockopt(zmq.IPV6, 1)
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.last_seen: dict[str, float] = {}  # role -> monotonic time of its last frame
        self.connected: set[str] = set()
        self.undeliverable = 0
        self._pending: dict[str, list[list[bytes]]] = collections.defaultdict(list)
        self._gone: set[str] = set()  # died and not back: messages to them are dropped, not held
        self._forget: collections.deque = collections.deque()
        self._start()

    def send(self, dest: str, msg) -> None:
        type_name, body = encode(msg)
        head = [dest.encode(), CONTROLLER.encode(), type_name, body]
        self._push(head + [_mac(self._key, head)])

    def forget(self, role: str) -> None:
        """`role` died: drop what is held for it (its replacement starts clean) and stop watching it."""
        self._forget.append(role)
        self._push([])  # wake the IO thread

    def _send_frames(self, frames: list[bytes]) -> None:
        if not frames:
            while self._forget:
                role = self._forget.popleft()
                self._pending.pop(role, None)
                self._gone.add(role)
                self.connected.discard(role)
                self.last_seen.pop(role, None)
            return
        dest = frames[0].decode()
        if dest in self._gone:
            self.undeliverable += 1
            return
        if dest not in self.connected:
            held = self._pending[dest]
            if len(held) < self.PENDING_LIMIT:
                held.append(frames)
            else:
                self.undeliverable += 1
            return
        try:
            self.sock.send_multipart(frames, copy=False)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the role's connection is gone
            self.undeliverable += 1
            log.debug("hub could not deliver %s to %s: %s", frames[2][:40], dest, e)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 6:
            return self._reject(f"{len(frames)} frames")
        ident, dest, src, type_name, body, mac = frames
        if not hmac.compare_digest(mac, _mac(self._key, [dest, src, type_name, body])):
            return self._reject("bad mac")
        if src != ident:
            return self._reject(f"source {src[:40]!r} sent from connection {ident[:40]!r}")
        name = src.decode()
        self.last_seen[name] = time.monotonic()
        if dest != CONTROLLER.encode():
            return self._send_frames([dest, src, type_name, body, mac])
        if type_name == b"Heartbeat":
            return
        try:
            msg = decode(type_name, body)
        except Exception as e:  # noqa: BLE001
            return self._reject(f"undecodable {type_name[:40]!r}: {e}")
        if type_name == b"Hello":
            self.connected.add(name)
            self._gone.discard(name)
            for held in self._pending.pop(name, []):
                self._send_frames(held)
        self.inbox.put(Received(name, msg))

    def silent_for(self, role: str) -> float | None:
        """Seconds since `role` was last heard from (None: never)."""
        seen = self.last_seen.get(role)
        return None if seen is None else time.monotonic() - seen


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
        return len(s) % 2 == 0
    except ValueError:
        return False
