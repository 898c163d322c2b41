"""The messages between a RewardPool and its reward workers, and how they travel.

    pool -> worker:  Start once (the reward fn and the limits); then Batches of Items.
    worker -> pool:  Ready once the reward fn is loaded, or LoadError; then Results, in the
                     order the items came (see _worker.py for when they are sent).

Each message is one of the dataclasses below, sent as one msgpack frame `[name, *fields]` over
the worker's pipe (multiprocessing.connection's length framing, send_bytes/recv_bytes), nested
dataclasses as lists of their fields. Never pickle: unpacking can build nothing but plain data,
so bytes written into a pipe (by reward code into its worker's, or by anyone into the pool's
end) cannot run code on the other side. A worker ends at a frame that is not a message it
expects (receive_in_worker): its pipe can no longer be trusted.

Stdlib and msgpack only: a worker reads Start with this before it splits off its scorer, and
whatever is imported then stays in its guardian's memory (see _sandbox.split_off_scorer).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, fields
from typing import Any

import msgpack


class ProtocolError(ValueError):
    """A frame that is not a message of this protocol, or not one the receiver expects now."""


class UnsendableSample(ValueError):
    """A sample that msgpack cannot carry (the message names the sample and the field)."""


# ------------------------------------------------------------------ messages
class _Message:
    """On the wire a message is [its class name, *to_wire()], to_wire() being its fields' values;
    from_wire(*values) reads it back. Messages with dataclasses inside override both (each inner
    one goes as a list of its fields)."""

    def to_wire(self) -> list:
        return [getattr(self, name) for name in self.__dataclass_fields__]

    @classmethod
    def from_wire(cls, *values):
        return cls(*values)


@dataclass
class Limits:
    """A worker's resource limits per call, 0 = no limit (reward.* of the same names; _sandbox.py)."""

    cpu_seconds: float = 0.0
    memory_mb: int = 0
    max_processes: int = 0


@dataclass
class Start(_Message):
    """The worker's configuration: the reward fn to load, the pool's pid (it dies with it), its limits."""

    fn_spec: str
    parent_pid: int
    limits: Limits

    def to_wire(self) -> list:
        limits = self.limits
        return [self.fn_spec, self.parent_pid, [limits.cpu_seconds, limits.memory_mb, limits.max_processes]]

    @classmethod
    def from_wire(cls, fn_spec, parent_pid, limits) -> Start:
        return cls(fn_spec, parent_pid, Limits(*limits))


@dataclass
class Item:
    """One call to make: fn(prompt, completion, **fields). `index`: the sample's place in its score() call."""

    index: int
    prompt: str
    completion: str
    fields: dict[str, Any]


@dataclass
class Batch(_Message):
    """Items for a worker to score in order. Sent as pack_batch makes it (its items packed as the
    pool queued them), so it has no to_wire."""

    items: list[Item]

    @classmethod
    def from_wire(cls, items) -> Batch:
        return cls([Item(*item) for item in items])


@dataclass
class Ready(_Message):
    """The reward fn is loaded; `pid`: the scorer's, the process that runs the calls."""

    pid: int


@dataclass
class LoadError(_Message):
    """The reward fn (or the limits) could not be set up in the worker; `detail`: the traceback."""

    detail: str


@dataclass
class Result:
    """How one item went: `kind` is "ok" or a failure kind (pool.FAILURE_KINDS but "timeout"),
    `reward` 0.0 unless ok, `detail` the failure's text, `seconds` the call's wall time."""

    index: int
    kind: str
    reward: float
    detail: str
    seconds: float


@dataclass
class Results(_Message):
    results: list[Result]

    def to_wire(self) -> list:
        return [[[r.index, r.kind, r.reward, r.detail, r.seconds] for r in self.results]]

    @classmethod
    def from_wire(cls, results) -> Results:
        parsed = [Result(*result) for result in results]
        for result in parsed:  # the pool keeps these numbers: nothing else may pass for them
            if not (type(result.index) is int and type(result.kind) is str and type(result.reward) is float
                    and type(result.detail) is str and type(result.seconds) is float):
                raise ValueError(f"a result of the wrong types: {result!r:.200}")
        return cls(parsed)


_MESSAGES = {cls.__name__: cls for cls in (Start, Batch, Ready, LoadError, Results)}
_FIELD_COUNTS = {cls: len(fields(cls)) for cls in _MESSAGES.values()}
_BATCH_HEAD = msgpack.packb("Batch")
_per_thread = threading.local()


# ------------------------------------------------------------------ wire format
def _packer() -> msgpack.Packer:
    """This thread's Packer: reusing one packs a sample in ~0.4 us, msgpack.packb's new one each time ~1 us."""
    try:
        return _per_thread.packer
    except AttributeError:
        _per_thread.packer = msgpack.Packer()
        return _per_thread.packer


def pack(message: Start | Ready | LoadError | Results) -> bytes:
    """One frame holding `message`."""
    return _packer().pack([type(message).__name__, *message.to_wire()])


def pack_item(item: Item) -> bytes:
    """`item` packed on its own, for pack_batch: the pool packs (and so checks) each sample once,
    when it is queued, and knows its size for the pipe's byte budget.

    Raises UnsendableSample, naming the field, for anything msgpack cannot carry (fields must
    be plain data, as a dataset row's columns are): such a sample is never pickled instead.
    """
    try:
        return _packer().pack([item.index, item.prompt, item.completion, item.fields])
    except (TypeError, ValueError, OverflowError) as exc:  # find the culprit, for the message
        for name, value in (("prompt", item.prompt), ("completion", item.completion), *item.fields.items()):
            try:
                msgpack.packb(value)
            except (TypeError, ValueError, OverflowError) as field_exc:
                what = name if name in ("prompt", "completion") else f"field {name!r}"
                raise UnsendableSample(
                    f"sample {item.index}: {what} cannot be sent to a reward worker, it is not plain data "
                    f"(str, number, bool, None, bytes, list, dict): {field_exc}"
                ) from None
        raise UnsendableSample(f"sample {item.index} cannot be sent to a reward worker: {exc}") from None


def pack_batch(packed_items: list[bytes]) -> bytes:
    """A Batch frame of items from pack_item: their bytes joined under the headers, not packed again."""
    items_head = _packer().pack_array_header(len(packed_items))
    return b"".join((b"\x92", _BATCH_HEAD, items_head, *packed_items))  # 0x92: a list of 2


def unpack(frame: bytes, *expected: type) -> Any:
    """The message in `frame`, which must be one of the `expected` types; else ProtocolError."""
    try:
        name, *values = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        cls = _MESSAGES[name]
    except Exception as exc:  # not msgpack, not a list, no such message: garbage or a foreign format
        raise ProtocolError(f"not a reward worker message ({type(exc).__name__}: {str(exc)[:200]}); "
                            f"first bytes {frame[:16]!r}") from None
    if cls not in expected:
        raise ProtocolError(f"got {name}, expected {' or '.join(c.__name__ for c in expected)}")
    if len(values) != _FIELD_COUNTS[cls]:
        raise ProtocolError(f"{name} with {len(values)} fields, expected {_FIELD_COUNTS[cls]}")
    try:
        return cls.from_wire(*values)
    except (TypeError, ValueError) as exc:  # a nested part of the wrong shape
        raise ProtocolError(f"malformed {name}: {exc}") from None


def receive_in_worker(conn, *expected: type) -> Any:
    """The next message from the pool, one of `expected`; None once the pool closed the pipe.

    A frame that is anything else ends the worker with one line on stderr and exit code 2
    (the pool then counts it as dead and replaces it): nothing in it is ever decoded further.
    """
    try:
        frame = conn.recv_bytes()
    except (EOFError, OSError):
        return None
    try:
        return unpack(frame, *expected)
    except ProtocolError as exc:
        print(f"areal reward worker: refused a message from the pool and stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
