"""The reward pool and its workers exchange typed msgpack messages (areal/rewards/protocol.py),
never pickles: a pickle sent either way over a worker's pipe is refused without being loaded
(real worker processes; the pickle would create a file if it ever were), any other garbage is
a ProtocolError, and a sample that msgpack cannot carry is refused naming its field."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from areal.rewards import RewardPool, RewardRequest
from areal.rewards._worker import BOOTSTRAP
from areal.rewards.pool import FAILURE_KINDS
from areal.rewards.protocol import (Batch, Item, Limits, LoadError, ProtocolError, Ready, Result, Results, Start,
                                    UnsendableSample, pack, pack_batch, pack_item, unpack)

BAD = Path(__file__).parent / "fixtures" / "rewards" / "bad_rewards.py"
NO_FAILURES = dict.fromkeys(FAILURE_KINDS, 0)
REFUSED = "areal reward worker: refused a message from the pool and stopped"


class CreatesFile:
    """Unpickling this opens `path` for writing, creating it: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def requests(*completions: str, **fields) -> list[RewardRequest]:
    return [RewardRequest("prompt", c, dict(fields)) for c in completions]


def test_a_pickle_sent_to_a_ready_worker_is_refused_unread(tmp_path, capfd):
    marker = tmp_path / "unpickled"
    with RewardPool(f"{BAD}:length_reward", num_workers=1, timeout_s=10.0) as pool:
        assert pool.score(requests("ab")).rewards == [2.0]  # up, and waiting for its next Batch
        worker = pool._workers[0]
        worker.conn.send_bytes(pickle.dumps(CreatesFile(marker)))
        assert worker.proc.wait(timeout=30) == 2  # the worker stopped at it (its guardian exits as it did)
        result = pool.score(requests("abc", "a"))  # a replacement scores them
        assert result.rewards == [3.0, 1.0] and result.failures == NO_FAILURES
    assert not marker.exists()
    assert REFUSED in capfd.readouterr().err


def test_a_pickle_in_place_of_the_start_message_is_refused_unread(tmp_path):
    marker = tmp_path / "unpickled"
    parent_end, child_end = socket.socketpair()
    with parent_end, child_end, tempfile.TemporaryFile() as progress:
        fds = (child_end.fileno(), progress.fileno())
        worker = subprocess.Popen([sys.executable, "-c", BOOTSTRAP, *map(str, fds), json.dumps(sys.path)],
                                  pass_fds=fds, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        Connection(parent_end.detach()).send_bytes(pickle.dumps(CreatesFile(marker)))
        _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 2
    assert stderr.startswith(REFUSED) and stderr.count("\n") == 1  # one line, no traceback
    assert not marker.exists()


def test_a_pickle_written_by_reward_code_into_its_pipe_is_refused_by_the_pool(tmp_path, caplog):
    marker = tmp_path / "unpickled"
    with caplog.at_level(logging.WARNING, logger="areal.rewards"):
        with RewardPool(f"{BAD}:pipe_writer_reward", num_workers=1, timeout_s=10.0) as pool:
            # First in its worker's queue: the call that wrote is the one charged.
            result = pool.score(requests("write a pickle", "abc", "a", marker=str(marker)))
            assert result.rewards == [0.0, 3.0, 1.0] and result.failures == {**NO_FAILURES, "error": 1}
            assert pool.score(requests("ab", marker=str(marker))).rewards == [2.0]
    assert not marker.exists()
    assert "the reward worker sent a malformed message" in caplog.text


def test_a_sample_msgpack_cannot_carry_is_refused_naming_its_field(caplog):
    item = Item(7, "p", "c", {"answer": "4", "tags": {"algebra"}})
    with pytest.raises(UnsendableSample, match=r"^sample 7: field 'tags' cannot be sent to a reward worker.*'set'"):
        pack_item(item)
    with pytest.raises(UnsendableSample, match=r"^sample 0: completion cannot be sent"):
        pack_item(Item(0, "p", object(), {}))
    # In a pool: that sample scores 0.0 as an "error", named in the log; the others are scored.
    with caplog.at_level(logging.WARNING, logger="areal.rewards"):
        with RewardPool(f"{BAD}:length_reward", num_workers=1, timeout_s=10.0) as pool:
            batch = [RewardRequest("p", "ab"), RewardRequest("p", "abc", {"tags": {"algebra"}}), RewardRequest("p", "a")]
            result = pool.score(batch)
    assert result.rewards == [2.0, 0.0, 1.0] and result.failures == {**NO_FAILURES, "error": 1}
    assert "sample 1: field 'tags' cannot be sent to a reward worker" in caplog.text


def test_messages_round_trip():
    messages = [
        Start("pkg.mod:fn", 4321, Limits(2.5, 512, 8)),
        Ready(99),
        LoadError("Traceback ...\nImportError: no"),
        Results([Result(3, "ok", 0.5, "", 1e-4), Result(4, "error", 0.0, "Traceback", 0.25)]),
    ]
    for message in messages:
        assert unpack(pack(message), type(message)) == message
    items = [Item(0, "p", "c", {"answer": "12", "meta": {"level": 3, "tags": ["a", None], "raw": b"\x00"}}),
             Item(5, "", "é ∑", {})]
    assert unpack(pack_batch([pack_item(item) for item in items]), Batch) == Batch(items)
    with pytest.raises(ProtocolError, match="got Ready, expected Batch"):
        unpack(pack(Ready(1)), Batch)


plain = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text() | st.binary(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                     max_leaves=12)


@given(st.binary(max_size=64) | st.builds(lambda name, values: msgpack.packb([name, *values]),
                                          st.sampled_from(["Start", "Batch", "Ready", "LoadError", "Results", "X"]),
                                          st.lists(plain, max_size=4)))
@settings(max_examples=300, deadline=None)
def test_a_frame_is_a_message_of_the_expected_types_or_a_protocol_error(frame):
    expected = (Start, Batch, Ready, LoadError, Results)
    try:
        message = unpack(frame, *expected)
    except ProtocolError:
        return
    assert isinstance(message, expected)
    if isinstance(message, Results):  # what the pool keeps from a worker is of the right types
        assert all(type(r.index) is int and type(r.reward) is float and type(r.seconds) is float
                   for r in message.results)
