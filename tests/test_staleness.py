"""Unit tests of the admission rule: accepted + running < (η + v + 1)·B and running < max_concurrent."""

import itertools
import threading
import time

import pytest

from areal.buffer.staleness import StalenessController, admission_capacity, staleness_budget


def admit_all(ctl: StalenessController) -> int:
    """Admit until refused; return how many were admitted."""
    n = 0
    while ctl.try_admit():
        n += 1
    return n


# -- the pure formula ---------------------------------------------------------------------
def test_budget_formula_hand_values():
    assert staleness_budget(version=0, groups_per_step=4, max_staleness=0) == 4
    assert staleness_budget(version=0, groups_per_step=4, max_staleness=2) == 12
    assert staleness_budget(version=3, groups_per_step=2, max_staleness=1) == 10


@pytest.mark.parametrize(
    "accepted,running,v,B,eta,cap,expected",
    [
        (0, 0, 0, 4, 0, 64, 4),  # fresh, synchronous
        (0, 0, 0, 4, 2, 64, 12),  # fresh, η=2 -> 3B
        (0, 0, 0, 4, 2, 5, 5),  # concurrency cap binds
        (3, 2, 0, 4, 0, 64, 0),  # over budget: never negative
        (4, 0, 1, 4, 0, 64, 4),  # next version of synchronous RL
        (10, 1, 2, 4, 1, 3, 2),  # staleness room 16-11=5, concurrency room 3-1=2
        (14, 1, 2, 4, 1, 8, 1),  # staleness room 16-15=1 binds
    ],
)
def test_capacity_formula_table(accepted, running, v, B, eta, cap, expected):
    assert admission_capacity(accepted, running, v, B, eta, cap) == expected


def test_capacity_formula_matches_naive_definition_exhaustively():
    """capacity == number of sequential admissions a naive checker of the rule allows."""
    for accepted, running, v, B, eta, cap in itertools.product(
        range(0, 9), range(0, 6), range(0, 3), range(1, 4), range(0, 3), range(1, 7)
    ):
        naive, a, r = 0, accepted, running
        while a + r < (eta + v + 1) * B and r < cap:
            r += 1
            naive += 1
        assert admission_capacity(accepted, running, v, B, eta, cap) == naive


# -- the controller -------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 3, 8])
def test_eta0_admits_exactly_B_then_blocks_until_version_bump(B):
    ctl = StalenessController(groups_per_step=B, max_staleness=0, max_concurrent=64)
    assert admit_all(ctl) == B
    assert ctl.capacity() == 0
    for _ in range(B):
        ctl.on_finished(accepted=True)
    # all finished but the trainer has not consumed them / bumped: still blocked
    assert ctl.capacity() == 0 and not ctl.try_admit()
    ctl.set_version(1)
    assert admit_all(ctl) == B  # exactly one more batch per version: synchronous RL


@pytest.mark.parametrize("B,eta", [(1, 2), (4, 2), (2, 5)])
def test_eta_admits_eta_plus_one_batches(B, eta):
    ctl = StalenessController(groups_per_step=B, max_staleness=eta, max_concurrent=1000)
    assert admit_all(ctl) == (eta + 1) * B
    ctl.set_version(1)
    assert admit_all(ctl) == B  # each version bump opens exactly B more


def test_concurrency_cap_binds_before_staleness():
    ctl = StalenessController(groups_per_step=8, max_staleness=2, max_concurrent=5)
    assert admit_all(ctl) == 5
    ctl.on_finished(accepted=True)  # frees a running slot; staleness room is ample
    assert admit_all(ctl) == 1
    assert ctl.running == 5 and ctl.accepted == 1


def test_rejected_frees_budget_and_accepted_does_not():
    ctl = StalenessController(groups_per_step=2, max_staleness=0)
    assert admit_all(ctl) == 2
    ctl.on_finished(accepted=True)
    assert ctl.capacity() == 0  # accepted still occupies budget
    ctl.on_finished(accepted=False)  # rejected/filtered: its slot is free again
    assert ctl.capacity() == 1 and ctl.try_admit()
    assert ctl.accepted == 1 and ctl.running == 1


def test_aborted_frees_running_slot():
    ctl = StalenessController(groups_per_step=1, max_staleness=0)
    assert ctl.try_admit() and not ctl.try_admit()
    ctl.on_aborted()
    assert ctl.try_admit()
    assert ctl.state()["aborted_total"] == 1


def test_discarded_returns_accepted_slot():
    ctl = StalenessController(groups_per_step=1, max_staleness=0)
    assert ctl.try_admit()
    ctl.on_finished(accepted=True)
    assert ctl.capacity() == 0
    ctl.on_discarded()  # dropped at consumption: needs a replacement
    assert ctl.accepted == 0 and ctl.capacity() == 1
    with pytest.raises(RuntimeError):
        ctl.on_discarded()


def test_events_without_admission_are_errors():
    ctl = StalenessController(groups_per_step=1)
    with pytest.raises(RuntimeError):
        ctl.on_finished(accepted=True)
    with pytest.raises(RuntimeError):
        ctl.on_aborted()
    assert ctl.state()["running"] == 0 and ctl.accepted == 0


def test_version_never_goes_backwards_and_validation():
    ctl = StalenessController(groups_per_step=1)
    ctl.set_version(3)
    with pytest.raises(ValueError):
        ctl.set_version(2)
    for bad in [dict(groups_per_step=0), dict(groups_per_step=1, max_staleness=-1),
                dict(groups_per_step=1, max_concurrent=0)]:
        with pytest.raises(ValueError):
            StalenessController(**bad)


def test_resume_resets_accepted_to_v_times_B():
    ctl = StalenessController(groups_per_step=4, max_staleness=1, max_concurrent=64)
    admit_all(ctl)
    for _ in range(5):
        ctl.on_finished(accepted=True)
    ctl.on_finished(accepted=False)
    ctl.set_version(1)
    saved = ctl.state()
    assert saved["running"] == 2 and saved["accepted"] == 5

    fresh = StalenessController(groups_per_step=4, max_staleness=1, max_concurrent=64)
    fresh.load_state(saved, version=3)
    s = fresh.state()
    assert s["version"] == 3 and s["accepted"] == 12 and s["running"] == 0
    assert s["accepted_total"] == 5 and s["rejected_total"] == 1 and s["admitted_total"] == 8
    # nothing held or in flight after resume: a full (η + 1)·B window is open
    assert fresh.capacity() == (1 + 1) * 4


def test_constructing_at_version_v_is_a_resume():
    ctl = StalenessController(groups_per_step=3, max_staleness=0, version=5)
    assert ctl.accepted == 15 and admit_all(ctl) == 3


def test_blocking_admit_waits_for_version_bump():
    ctl = StalenessController(groups_per_step=1, max_staleness=0)
    assert ctl.admit(timeout=0.01)
    assert not ctl.admit(timeout=0.02)  # times out, reserves nothing
    assert ctl.running == 1
    got = []
    t = threading.Thread(target=lambda: got.append(ctl.admit(timeout=5.0)))
    t.start()
    ctl.on_finished(accepted=True)
    ctl.set_version(1)
    t.join(5.0)
    assert got == [True] and ctl.running == 1


class YieldingController(StalenessController):
    """Yields the GIL between the capacity check and the reservation, so a missing lock
    would let two threads take the same last slot (the race this test must expose)."""

    def _capacity_locked(self) -> int:
        capacity = super()._capacity_locked()
        time.sleep(0.0002)
        return capacity


def test_thread_safety_many_threads_never_exceed_bound():
    B, eta, cap = 3, 1, 4
    ctl = YieldingController(groups_per_step=B, max_staleness=eta, max_concurrent=cap)
    violations, lock = [], threading.Lock()
    stop = threading.Event()

    def worker(seed: int) -> None:
        i = seed
        while not stop.is_set():
            if ctl.try_admit():
                s = ctl.state()
                if s["accepted"] + s["running"] > (eta + s["version"] + 1) * B or s["running"] > cap:
                    with lock:
                        violations.append(s)
                i += 1
                ctl.on_finished(accepted=(i % 3 != 0))

    def trainer() -> None:
        for v in range(1, 30):
            ctl.set_version(v)
            time.sleep(0.002)
        stop.set()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    threads.append(threading.Thread(target=trainer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    assert not violations
    s = ctl.state()
    assert s["running"] == 0
    assert s["admitted_total"] == s["accepted_total"] + s["rejected_total"] > 100
    assert s["accepted"] <= (eta + s["version"] + 1) * B
