"""Receiving on a channel endpoint, shared by the channel and listener tests."""

import time


def recv_type(ep, cls, timeout=10.0):
    """The next message of type `cls` on endpoint `ep` (others are skipped); raises on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = ep.recv(timeout=max(deadline - time.monotonic(), 0.01))
        if isinstance(got.msg, cls):
            return got
