"""Hypothesis state machines over random interleavings of admit / finish / abort / train step /
a new admission lead: the staleness bound, whole groups, and accounting of every group."""


import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from areal.buffer import (
    BufferConfig,
    StalenessController,
    TrajectoryBuffer,
)
from areal.buffer.config import ORDERS
from areal.trajectory import Group
from buffer_helpers import accounting_holds, make_group


# -- property test: random interleavings of admit / finish / abort / train step -------------
class BufferMachine(RuleBasedStateMachine):
    """Model: a rollout side admits groups through the controller and finishes them (in
    admission order when ``in_order``, else in any order) with random per-token versions
    and rewards; a synchronous trainer consumes B groups per step, then bumps its version."""

    # The configuration space; subclasses narrow it so that rare interleavings are reached.
    B_values = (1, 2)
    eta_values = (0, 1, 2)
    max_concurrent_values = (1, 2, 3, 6)
    strict_values = (False, True)
    filter_values = (False, True)
    order_values = ORDERS
    in_order_values = (False, True)
    allow_abort = True

    @initialize(data=st.data())
    def setup(self, data):
        B = data.draw(st.sampled_from(self.B_values), label="B")
        eta = data.draw(st.sampled_from(self.eta_values), label="eta")
        max_concurrent = data.draw(st.sampled_from(self.max_concurrent_values), label="max_concurrent")
        strict = data.draw(st.sampled_from(self.strict_values), label="strict")
        filt = data.draw(st.sampled_from(self.filter_values), label="filter")
        order = data.draw(st.sampled_from(self.order_values), label="order")
        in_order = data.draw(st.sampled_from(self.in_order_values), label="in_order")
        self.B, self.eta, self.max_concurrent = B, eta, max_concurrent
        self.strict, self.filt, self.order, self.in_order = strict, filt, order, in_order
        self.ctl = StalenessController(B, max_staleness=eta, max_concurrent=max_concurrent)
        cfg = BufferConfig(
            capacity_groups=64,
            order=order,
            strict_staleness=strict,
            filter_uniform_rewards=filt,
        )
        self.buf = TrajectoryBuffer(cfg, self.ctl)
        self.v = 0
        self.next_id = 0
        self.running: list[tuple[int, int]] = []  # (group_id, start version), admission order
        self.start_version: dict[int, int] = {}
        self.held: dict[int, tuple[Group, int]] = {}  # gid -> (the object put, #trajectories)
        self.consumed: set[int] = set()
        self.put_seq: dict[int, int] = {}  # gid -> arrival order in the buffer
        self.model_accepted = 0  # the rule's "accepted", recomputed from the model
        self.lead = eta  # freshness-aware admission moves it within [min(1, eta), eta]

    @rule(data=st.data())
    def set_lead(self, data):
        asked = data.draw(st.integers(-1, self.eta + 1), label="lead")
        self.lead = max(min(1, self.eta), min(asked, self.eta))
        assert self.ctl.set_lead(asked) == self.lead

    @rule()
    def admit(self):
        allowed = (
            self.model_accepted + len(self.running) < (self.lead + self.v + 1) * self.B
            and len(self.running) < self.max_concurrent
        )
        assert self.ctl.try_admit() == allowed
        if allowed:
            self.running.append((self.next_id, self.v))
            self.start_version[self.next_id] = self.v
            self.next_id += 1

    @rule()
    def admit_while_capacity(self):
        """What a rollout loop does: start as many groups as the rule allows."""
        for _ in range(self.max_concurrent + (self.lead + 1) * self.B + 1):
            before = len(self.running)
            self.admit()
            if len(self.running) == before:
                break

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data):
        # out of order: counted from the newest, so the simplest draws (0) finish the
        # newest group first, which is what makes old groups stale
        idx = 0 if self.in_order else len(self.running) - 1 - data.draw(st.integers(0, len(self.running) - 1))
        gid, start = self.running.pop(idx)
        n = data.draw(st.integers(1, 3))
        rewards = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
        versions = []
        for i in range(n):
            # tokens are generated at versions in [start, now], non-decreasing
            min_len = 1 if (self.in_order and i == 0) else 0
            vs = sorted(data.draw(st.lists(st.integers(start, self.v), min_size=min_len, max_size=3)))
            if self.in_order and i == 0:
                vs[0] = start  # generation starts at admission: oldest token == start version
            versions.append(tuple(vs))
        group = make_group(gid, rewards, versions)
        uniform = len(set(rewards)) == 1
        held = self.buf.put(group, timeout=0)
        assert held == (not (self.filt and uniform))
        if held:
            self.put_seq[gid] = len(self.put_seq)
            self.held[gid] = (group, n)
            self.model_accepted += 1

    @precondition(lambda self: self.allow_abort and self.running)
    @rule(data=st.data())
    def abort(self, data):
        idx = data.draw(st.integers(0, len(self.running) - 1))
        self.running.pop(idx)
        self.ctl.on_aborted()

    @rule()
    def train_step(self):
        stale = {
            gid for gid, (g, _) in self.held.items()
            if self.strict and g.oldest_version >= 0 and self.v - g.oldest_version > self.eta
        }
        if len(self.held) - len(stale) < self.B:
            with pytest.raises(TimeoutError):
                self.buf.get_batch(self.B, self.v, timeout=0)
            for gid in stale:  # the attempt still drops (and counts) stale groups
                del self.held[gid]
                self.model_accepted -= 1
            return
        batch = self.buf.get_batch(self.B, self.v, timeout=0)
        for gid in stale:
            del self.held[gid]
            self.model_accepted -= 1
        assert len(batch) == self.B
        ids = [g.group_id for g in batch]
        assert len(set(ids)) == self.B
        for g in batch:
            put_obj, n = self.held.pop(g.group_id)
            assert g is put_obj and len(g.trajectories) == n  # whole, never split
            assert g.group_id not in self.consumed
            self.consumed.add(g.group_id)
            if self.strict and g.oldest_version >= 0:
                assert self.v - g.oldest_version <= self.eta
            if self.in_order and self.order in ("fifo", "oldest_first"):
                # admission-ordered consumption: the staleness bound is a hard guarantee
                assert self.v - self.start_version[g.group_id] <= self.eta
        if self.order == "oldest_first" and self.held:
            left = min(g.oldest_version for g, _ in self.held.values())
            assert max(g.oldest_version for g in batch) <= left
        if self.order == "newest_first" and self.held:
            left = max(g.oldest_version for g, _ in self.held.values())
            assert min(g.oldest_version for g in batch) >= left
        if self.order == "fifo" and self.held:
            assert max(self.put_seq[i] for i in ids) < min(self.put_seq[i] for i in self.held)
        self.v += 1
        self.ctl.set_version(self.v)

    @invariant()
    def bound_and_accounting(self):
        if not hasattr(self, "ctl"):
            return
        s = self.ctl.state()
        assert s["accepted"] + s["running"] <= (self.eta + self.v + 1) * self.B
        assert s["running"] <= self.max_concurrent
        assert s["running"] == len(self.running)
        stats = self.buf.stats()
        assert accounting_holds(stats)
        assert stats["held_groups"] == len(self.held)
        assert stats["held_trajectories"] == sum(n for _, n in self.held.values())
        assert stats["held_tokens"] == sum(t.num_tokens for g, _ in self.held.values() for t in g.trajectories)
        assert stats["consumed"] == len(self.consumed) == self.v * self.B
        # accepted == groups trained + groups held: stale drops and filtering freed budget
        assert s["accepted"] == self.model_accepted == stats["consumed"] + stats["held_groups"]
        # liveness: someone can always make progress (no deadlock by accounting)
        assert s["running"] > 0 or self.ctl.capacity() > 0 or stats["held_groups"] >= self.B


class OutOfOrderMachine(BufferMachine):
    """B=1, η=1, out-of-order completion: reorderings that expose ordering and lag bugs
    are a handful of steps away here."""

    B_values = (1,)
    eta_values = (1,)
    max_concurrent_values = (2,)
    filter_values = (False,)
    in_order_values = (False,)
    allow_abort = False


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestBufferMachine = BufferMachine.TestCase
TestBufferMachine.settings = settings(max_examples=200, stateful_step_count=40, **_SETTINGS)
TestOutOfOrderMachine = OutOfOrderMachine.TestCase
TestOutOfOrderMachine.settings = settings(max_examples=300, stateful_step_count=50, **_SETTINGS)
