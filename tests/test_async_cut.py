"""A checkpoint's cut on trainer0 (areal/async_loop.py, areal/fleet.py), message by message: what a worker lost while
its snapshot is awaited contributes, and what it must not (prompts handed to it after the cut)."""

from __future__ import annotations

import threading

import pytest

from areal.fleet import Collector, Dispatcher, Fleet, RemoteEvaluator
from areal.buffer import BufferConfig, StalenessController, TrajectoryBuffer
from areal.channel import Received
from areal.messages import GroupsDone, InFlightGroup, PromptBatch, RoleLost, WorkerSnapshot
from areal.rollout.messages import Prompt
from buffer_helpers import make_group


class Outbox:
    def __init__(self):
        self.sent: list[tuple[str, object]] = []

    def send(self, dest, msg):
        self.sent.append((dest, msg))


class Sampler:
    def __init__(self):
        self.i = 0

    def next(self):
        self.i += 1
        return self.i, Prompt(self.i, f"p{self.i}", [1, 2], {"answer": "1"})

    def state(self):
        return {"i": self.i}


def _parts(workers=(0,)):
    endpoint = Outbox()
    fleet = Fleet(endpoint, new_sender=None)
    for rank in workers:
        fleet.join(rank)
    staleness = StalenessController(4, max_staleness=2, max_concurrent=64)
    buffer = TrajectoryBuffer(BufferConfig(capacity_groups=64), staleness)
    dispatcher = Dispatcher(staleness, Sampler(), fleet)
    evaluator = RemoteEvaluator(fleet, [], 4)
    collector = Collector(endpoint, buffer, fleet, dispatcher, evaluator, on_membership=lambda: None)
    return fleet, staleness, buffer, dispatcher, collector


def _hand(fleet, staleness, rank, ids):
    for _ in ids:
        assert staleness.try_admit()
    groups = [InFlightGroup(g, 0, Prompt(g, f"p{g}", [1, 2], {"answer": "1"})) for g in ids]
    fleet.hand(rank, groups, PromptBatch(0, list(ids), [g.prompt for g in groups]))


def test_a_worker_lost_during_the_cut_contributes_only_what_it_held_at_the_cut():
    fleet, staleness, buffer, dispatcher, collector = _parts()
    _hand(fleet, staleness, 0, [0, 1, 2])
    with collector.lock:
        done = collector.start_cut([0])
    _hand(fleet, staleness, 0, [3, 4])  # admitted after the cut: the resumed run admits them again
    collector.handle(Received("rollout0", GroupsDone([make_group(1)])))  # shipped before it saw the request
    collector.handle(Received("controller", RoleLost("rollout0", "killed", False)))
    cut = done.result(timeout=1)["rollout"]
    assert [g["group_id"] for g in cut["in_transit"]] == [1]
    assert [g["group_id"] for g in cut["in_flight"]] == [0, 2]  # never 3 or 4
    assert sorted(g.group_id for g in dispatcher.orphans) == [0, 2, 3, 4]  # this run still finishes them all


def _cut_over_two_workers():
    """rollout0 holds groups 0 and 1, rollout1 holds 2; a cut has just started over both."""
    fleet, staleness, _, _, collector = _parts(workers=(0, 1))
    _hand(fleet, staleness, 0, [0, 1])
    _hand(fleet, staleness, 1, [2])
    with collector.lock:
        done = collector.start_cut([0, 1])
    return fleet, collector, done


def test_a_worker_that_answers_records_its_snapshot_and_later_groups_are_not_in_transit():
    fleet, collector, done = _cut_over_two_workers()
    collector.handle(Received("rollout0", GroupsDone([make_group(0)])))
    snapshot = WorkerSnapshot(1, [InFlightGroup(1, 0, Prompt(1, "p1", [1, 2], {"answer": "1"}))], {"seed": 1})
    collector.handle(Received("rollout0", snapshot))
    collector.handle(Received("rollout0", GroupsDone([make_group(1)])))  # after its answer: after the cut
    assert not done.done()
    # rollout1 dies before answering: it contributes group 2, which it held at the cut
    collector.handle(Received("controller", RoleLost("rollout1", "killed", False)))
    cut = done.result(timeout=1)["rollout"]
    assert [g["group_id"] for g in cut["in_transit"]] == [0]
    assert [g["group_id"] for g in cut["in_flight"]] == [1, 2]
    assert cut["worker_rng"] == {"0": {"seed": 1}}


def test_a_group_reissued_to_a_second_worker_during_the_cut_is_recorded_once():
    fleet, collector, done = _cut_over_two_workers()
    collector.handle(Received("controller", RoleLost("rollout0", "killed", True)))  # 0, 1 go to rollout1
    assert set(fleet.held[1]) == {0, 1, 2}
    collector.handle(Received("controller", RoleLost("rollout1", "killed", True)))
    cut = done.result(timeout=1)["rollout"]
    assert sorted(g["group_id"] for g in cut["in_flight"]) == [0, 1, 2]


def test_the_controllers_stop_ends_a_trainer_waiting_for_a_batch_or_an_evaluation():
    """Stop (the run failed elsewhere, e.g. its last rollout worker died) closes the buffer and fails the
    pending evaluation, so trainer0 leaves at once instead of being killed after the controller's grace."""
    from areal.buffer.trajectory_buffer import BufferClosed
    from areal.messages import Stop

    fleet, staleness, buffer, dispatcher, collector = _parts()
    evaluation = collector.evaluator(4)
    waiting: list[BaseException] = []

    def trainer():
        try:
            buffer.get_batch(4, 0)  # no timeout: only a closed buffer ends this wait
        except BaseException as e:  # noqa: BLE001
            waiting.append(e)

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    collector.handle(Received("controller", Stop("every rollout worker is gone")))
    thread.join(timeout=5)
    assert not thread.is_alive() and isinstance(waiting[0], BufferClosed)
    with pytest.raises(RuntimeError, match="stopped"):
        evaluation.result(timeout=1)
