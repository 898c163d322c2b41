"""The network channel: typed messages through the hub, authentication, held and dropped messages."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
import zmq

from areal.channel import CONTROLLER, Endpoint, Hub, _mac, new_secret
from areal.messages import GroupsDone, Hello, PromptBatch, RoleError, Stop
from areal.rollout.messages import Prompt
from areal.trajectory import Group, Trajectory
from channel_helpers import recv_type


@pytest.fixture
def hub():
    secret = new_secret()
    h = Hub(secret, "127.0.0.1")
    yield h, secret
    h.close()


def test_hub_publishes_its_bound_address(hub):
    h, _ = hub
    assert h.address.startswith("tcp://127.0.0.1:") and int(h.address.rsplit(":", 1)[1]) > 0


def test_typed_messages_round_trip_between_roles(hub):
    h, secret = hub
    a, b = Endpoint("trainer0", h.address, secret), Endpoint("rollout0", h.address, secret)
    try:
        assert {recv_type(h, Hello).src, recv_type(h, Hello).src} == {"trainer0", "rollout0"}
        batch = PromptBatch(3, [7, 8], [Prompt(0, "1+1=", [1, 2], {"answer": "2"}), Prompt(5, "2+2=", [3], {"answer": "4"})])
        a.send("rollout0", batch)
        got = b.recv(timeout=10)
        assert got.src == "trainer0" and got.msg == batch
        group = Group(8, [Trajectory([1], [2, 3], [-0.5, -0.25], [3, 3], 1.0, "stop", "p", "c")], {"answer": "4"}, {}, 5)
        b.send("trainer0", GroupsDone([group]))
        got = a.recv(timeout=10)
        assert got.src == "rollout0" and got.msg.groups == [group]
        b.send(CONTROLLER, RoleError("rollout0", "ValueError", "boom", "tb"))
        assert recv_type(h, RoleError).msg.message == "boom"
    finally:
        a.close()
        b.close()


def test_messages_to_a_role_not_yet_connected_are_held_until_it_says_hello(hub):
    h, secret = hub
    a = Endpoint("trainer0", h.address, secret)
    try:
        recv_type(h, Hello)
        a.send("rollout1", Stop("early"))
        time.sleep(0.3)
        late = Endpoint("rollout1", h.address, secret)
        assert late.recv(timeout=10).msg == Stop("early")
        late.close()
        h.forget("rollout1")  # died: later messages are dropped, not held for a replacement
        time.sleep(0.3)
        a.send("rollout1", Stop("stale"))
        time.sleep(0.3)
        again = Endpoint("rollout1", h.address, secret)
        deadline = time.monotonic() + 10
        while "rollout1" not in h.connected and time.monotonic() < deadline:  # addressed once it said hello
            time.sleep(0.01)
        a.send("rollout1", Stop("fresh"))
        assert again.recv(timeout=10).msg == Stop("fresh")
        again.close()
    finally:
        a.close()


def test_a_stranger_without_the_secret_is_dropped_and_counted(hub):
    h, secret = hub
    a = Endpoint("trainer0", h.address, secret)
    stranger_ep = Endpoint("rollout0", h.address, new_secret())  # right address, wrong secret
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.IDENTITY, b"intruder")
    raw.connect(h.address)
    try:
        recv_type(h, Hello)  # trainer0's
        stranger_ep.send("trainer0", Stop("from a stranger"))
        body = msgpack.packb({"reason": "forged"})
        # a forged source name with a mac under a guessed key, and garbage frames
        raw.send_multipart([b"trainer0", b"trainer0", b"Stop", body, _mac(b"guess", [b"trainer0", b"trainer0", b"Stop", body])])
        raw.send_multipart([b"x"])
        deadline = time.monotonic() + 10
        while h.rejected < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h.rejected >= 3  # Hello of the stranger, its Stop, the forged and the garbage frames
        with pytest.raises(queue.Empty):
            a.recv(timeout=0.5)
    finally:
        raw.close(0)
        a.close()
        stranger_ep.close()


def test_a_valid_mac_with_another_roles_name_is_refused(hub):
    h, secret = hub
    thief = Endpoint("rollout0", h.address, secret)
    victim = Endpoint("trainer0", h.address, secret)
    try:
        recv_type(h, Hello)
        recv_type(h, Hello)
        before = h.rejected
        thief.name = "rollout9"  # claims to be somebody else over its own connection
        thief.send("trainer0", Stop("spoofed"))
        deadline = time.monotonic() + 10
        while h.rejected == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h.rejected == before + 1
        with pytest.raises(queue.Empty):
            victim.recv(timeout=0.3)
    finally:
        thief.close()
        victim.close()


def test_a_role_in_another_process_talks_through_the_hub(hub):
    h, secret = hub
    code = textwrap.dedent(f"""
        from areal.channel import Endpoint
        from areal.messages import Stop
        ep = Endpoint("rollout0", {h.address!r}, {secret!r})
        got = ep.recv(timeout=30)
        ep.send("controller", Stop("echo:" + got.msg.reason))
        ep.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        recv_type(h, Hello, timeout=60)
        h.send("rollout0", Stop("ping"))
        assert recv_type(h, Stop, timeout=30).msg.reason == "echo:ping"
        assert h.silent_for("rollout0") is not None
    finally:
        proc.wait(30)
