"""Freshness-aware admission (areal/buffer/freshness.py): the lead formula, the pacer's feedback,
and a timed pipeline of real threads (a fake generator with a set latency, a fake trainer with a set
step time) over the real admission controller and buffer."""

from __future__ import annotations

import threading
import time

import pytest

from areal.buffer import BufferConfig, StalenessController, TrajectoryBuffer
from areal.buffer.freshness import FreshnessPacer, freshness_lead, high_quantile, just_in_time_hold
from buffer_helpers import make_group


@pytest.mark.parametrize("latency, train, eta, expected", [
    (0.01, 0.05, 4, 1),   # generation far faster than training: the floor of overlap
    (0.05, 0.05, 4, 2),   # 1.25 * 1.0 -> 2: the margin asks for one more
    (0.11, 0.05, 4, 3),
    (1.00, 0.05, 4, 4),   # generation-bound: eta, as greedy admission
    (1.00, 0.05, 1, 1),
    (0.00, 0.05, 2, 1),
    (0.30, 0.05, 0, 0),   # eta = 0: synchronous, whatever was measured
    (0.30, 0.00, 3, 3),   # the trainer not measured yet: no reason to hold back
])
def test_freshness_lead_hand_values(latency, train, eta, expected):
    assert freshness_lead(latency, train, eta) == expected


def test_high_quantile():
    assert high_quantile([]) == 0.0
    assert high_quantile([3.0]) == 3.0
    assert high_quantile(range(10)) == 9
    assert high_quantile(range(100)) == 90


def test_the_lead_never_leaves_one_to_eta_and_eta0_stays_synchronous():
    for eta in (0, 1, 3):
        ctl = StalenessController(2, max_staleness=eta)
        for asked in (-5, 0, 1, 2, 7):
            assert ctl.set_lead(asked) == max(min(1, eta), min(asked, eta))
        ctl.set_lead(99)
        assert ctl.lead == eta


def test_a_smaller_lead_admits_less_and_a_larger_one_opens_room_at_once():
    ctl = StalenessController(2, max_staleness=3, max_concurrent=100)
    ctl.set_lead(1)
    assert ctl.capacity() == (1 + 0 + 1) * 2
    for _ in range(4):
        assert ctl.try_admit()
    assert not ctl.try_admit()
    ctl.set_lead(3)
    assert ctl.capacity() == 4  # (3 + 1) * 2 - 4
    for _ in range(4):
        assert ctl.try_admit()
    ctl.set_lead(1)  # lowering below what runs already: nothing more starts, nothing breaks
    assert ctl.capacity() == 0 and ctl.running == 8


def test_pacer_waits_raise_the_lead_and_calm_steps_give_it_back():
    ctl = StalenessController(4, max_staleness=4)
    now = [0.0]
    pacer = FreshnessPacer(ctl, patience=3, clock=lambda: now[0])
    assert ctl.lead == 1  # fresh from the start
    pacer.admitted([0, 1, 2, 3], now=0.0)
    for g in range(4):
        pacer.arrived(g, now=0.01)
    assert pacer.stepped(own_s=0.1, wait_s=5.0) == 1  # the first batch always waits: not held against it
    assert pacer.stepped(own_s=0.1, wait_s=0.05) == 1  # waited half a step, once: a late wake-up
    assert pacer.stepped(own_s=0.1, wait_s=0.0) == 1
    assert pacer.stepped(own_s=0.1, wait_s=0.05) == 2  # two waits in three steps: one more version of lead
    assert pacer.stepped(own_s=0.1, wait_s=0.05) == 2
    assert pacer.stepped(own_s=0.1, wait_s=0.05) == 3
    for _ in range(2):
        assert pacer.stepped(own_s=0.1, wait_s=0.0) == 3
    assert pacer.stepped(own_s=0.1, wait_s=0.0) == 2  # patience 3 calm steps: one back
    pacer.arrived(99, now=1.0)  # a group admitted before a resume: no latency to learn from
    assert pacer.stats()["admission/latency_s"] == pytest.approx(0.01)


def test_just_in_time_hold_hand_values():
    assert just_in_time_hold(train_s=1.0, latency_s=0.2) == pytest.approx(0.75)  # 1 - 1.25 * 0.2
    assert just_in_time_hold(train_s=1.0, latency_s=0.2, margin=2.0) == pytest.approx(0.6)
    assert just_in_time_hold(train_s=1.0, latency_s=0.9) == 0.0  # generation as slow as training: no hold


def test_the_pacer_holds_only_with_in_step_updates_and_only_at_lead_one():
    now = [0.0]
    for in_step in (False, True):
        ctl = StalenessController(2, max_staleness=4)
        pacer = FreshnessPacer(ctl, patience=3, clock=lambda: now[0], in_step_updates=in_step)
        pacer.admitted([0, 1], now=0.0)
        pacer.arrived(0, now=0.02)
        pacer.arrived(1, now=0.02)
        pacer.stepped(own_s=0.1, wait_s=1.0, now=0.0)  # the first step: T is not known yet
        assert pacer.hold_s(now=0.0) == 0.0
        assert pacer.stepped(own_s=0.1, wait_s=0.0, now=1.0) == 1
        expected = just_in_time_hold(0.1, 0.02) if in_step else 0.0
        assert pacer.hold_s(now=1.0) == pytest.approx(expected)
        assert pacer.hold_s(now=1.0 + expected) == 0.0  # held until then, and no longer
        assert pacer.stats()["admission/hold_s"] == pytest.approx(expected)
        if in_step:  # a held batch came late: the holds shorten by the wait, the lead stays
            assert pacer.stepped(own_s=0.1, wait_s=0.05, now=2.0) == 1
            assert pacer.hold_s(now=2.0) == pytest.approx(expected - 0.05)
            assert pacer.stepped(own_s=0.1, wait_s=0.05, now=3.0) == 1
            assert pacer.hold_s(now=3.0) == 0.0  # nothing left to shorten
        assert pacer.stepped(own_s=0.1, wait_s=0.05, now=4.0) == 1  # waited, no hold to blame: once is chance
        assert pacer.stepped(own_s=0.1, wait_s=0.05, now=5.0) == 2  # twice is a shortfall: more lead
        assert pacer.hold_s(now=5.0) == 0.0


def _pipeline(latency_s: float, step_s: float, eta: int, fresh: bool, steps: int = 24, B: int = 2,
              in_step: bool = False, updates: int = 1):
    """A fake generator (each admitted group arrives latency_s later, its tokens of the version at
    admission) and a fake trainer (step_s per update, in `updates` optimizer updates) around the real
    controller, buffer and pacer. Returns (lag of every consumed group per step, the trainer's wait per
    step, and each consumed group's lag in optimizer updates: with in-step updates the generator starts
    with the weights of the updates done so far)."""
    ctl = StalenessController(B, max_staleness=eta, max_concurrent=64)
    buf = TrajectoryBuffer(BufferConfig(capacity_groups=64), ctl)
    pacer = FreshnessPacer(ctl, in_step_updates=in_step) if fresh else None
    stop = threading.Event()
    timers: list[threading.Timer] = []
    done_updates = [0]  # optimizer updates so far: the weights an in-step publication hands out
    started_at: dict[int, int] = {}

    def generate():
        gid = 0
        while not stop.is_set():
            if not ctl.admit(timeout=0.01):
                continue
            while pacer and pacer.hold_s() > 0 and not stop.is_set():  # as areal's Dispatcher does
                time.sleep(0.001)
            version = ctl.version  # min_version: generation starts with these weights
            started_at[gid] = done_updates[0] if in_step else version * updates
            if pacer:
                pacer.admitted([gid])

            def finish(gid=gid, version=version):
                if pacer:
                    pacer.arrived(gid)
                buf.put(make_group(gid, [0.0, 1.0], [(version,), (version,)]))

            timers.append(threading.Timer(latency_s, finish))
            timers[-1].start()
            gid += 1

    generator = threading.Thread(target=generate, daemon=True)
    generator.start()
    lags, waits, update_lags = [], [], []
    try:
        for v in range(steps):
            t0 = time.monotonic()
            batch = buf.get_batch(B, v, timeout=30)
            t1 = time.monotonic()
            lags.append([v - g.oldest_version for g in batch])
            update_lags.append([v * updates - started_at[g.group_id] for g in batch])
            waits.append(t1 - t0)
            for _ in range(updates):  # the update, one minibatch at a time
                time.sleep(step_s / updates)
                done_updates[0] += 1
            if pacer:
                pacer.stepped(time.monotonic() - t1, t1 - t0)
            ctl.set_version(v + 1)
    finally:
        stop.set()
        generator.join()
        for t in timers:
            t.cancel()
    return lags, waits, update_lags


@pytest.mark.parametrize("eta", [2, 4])
def test_a_fast_generator_is_consumed_one_version_behind_and_the_trainer_does_not_wait(eta):
    lags, waits, _ = _pipeline(latency_s=0.005, step_s=0.04, eta=eta, fresh=True)
    settled = lags[4:]
    assert all(lag == 1 for step in settled for lag in step), lags  # the floor of overlap, not eta
    assert sum(waits[4:]) / len(waits[4:]) < 0.1 * 0.04, waits  # about zero


def test_greedy_admission_fills_the_budget_with_a_fast_generator():
    lags, _, _ = _pipeline(latency_s=0.005, step_s=0.04, eta=4, fresh=False)
    assert all(lag == 4 for step in lags[8:] for lag in step), lags


def test_a_slow_generator_is_given_the_whole_eta():
    lags, _, _ = _pipeline(latency_s=0.25, step_s=0.04, eta=4, fresh=True)
    assert max(max(step) for step in lags[8:]) == 4, lags


def test_eta0_is_unchanged_by_the_pacer():
    lags, _, _ = _pipeline(latency_s=0.005, step_s=0.01, eta=0, fresh=True, steps=8)
    assert all(lag == 0 for step in lags for lag in step)


@pytest.mark.parametrize("eta", [1, 4])
def test_with_in_step_updates_a_fast_generator_starts_late_in_the_step_with_fresher_weights(eta):
    """Held until just in time, the next batch starts after most of the step's updates (without the
    hold, all 4 updates behind); still one version behind and the trainer still barely waits."""
    lags, waits, update_lags = _pipeline(latency_s=0.02, step_s=0.16, eta=eta, fresh=True, in_step=True, updates=4)
    settled = [lag for step in update_lags[4:] for lag in step]
    # a wake-up late by more than the margin costs the trainer a wait, and one batch a version more of lead
    assert sum(lag == 1 for step in lags[4:] for lag in step) >= 0.8 * len(settled), lags
    assert sum(settled) / len(settled) <= 2.5, update_lags
    assert sum(waits[4:]) / len(waits[4:]) < 0.25 * 0.16, waits
    _, _, plain = _pipeline(latency_s=0.02, step_s=0.16, eta=eta, fresh=True, steps=8, updates=4)
    assert all(lag == 4 for step in plain[4:] for lag in step), plain
