"""Trainer rank 0's side of its rollout workers, the pieces `areal/async_loop.py` drives (its
docstring tells how one step flows through them):

    Fleet            which workers are live, what each holds, the weight group over them
    Dispatcher       admits prompts under the staleness rule and hands them out (a thread)
    RemoteEvaluator  held-out evaluation sharded over the workers
    Collector        trainer0's inbox: finished groups into the buffer, evaluation shards,
                     workers joining and lost, the rollout side of a checkpoint's cut (a thread)
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future

from areal.buffer.freshness import FreshnessPacer
from areal.buffer.staleness import StalenessController
from areal.buffer.trajectory_buffer import TrajectoryBuffer
from areal.evaluate import merge_eval_results
from areal.messages import (EvalRequest, EvalResult, EvalStarted, GroupsDone, InFlightGroup, PromptBatch, ResumeGroups,
                            RoleLost, ShardSaved, Stop, WeightGroup, WorkerReady, WorkerSnapshot, WorkerStats)
from areal.trajectory import Group


def worker_rank(role: str) -> int:
    return int(role.removeprefix("rollout"))


class Fleet:
    """The rollout workers as trainer0 sees them: which are live, what each was handed and has not
    returned, and the weight-broadcast group over the live ones (re-formed on every change)."""

    def __init__(self, endpoint, new_sender):
        self.endpoint = endpoint
        self.new_sender = new_sender  # num_receivers -> an areal.transport.DistSender on the chosen interface
        self.live: list[int] = []  # ranks that said WorkerReady and have not been lost, ascending
        self.held: dict[int, dict[int, InFlightGroup]] = {}  # rank -> group id -> group handed to it
        self.generation = 0
        self.turn = 0
        self.duplicates = 0  # groups that came back twice (a lost worker's, re-issued and finished again)
        self.lost = 0
        self.lock = threading.RLock()

    def send(self, rank: int, msg) -> None:
        self.endpoint.send(f"rollout{rank}", msg)

    def next_rank(self) -> int | None:
        with self.lock:
            if not self.live:
                return None
            self.turn += 1
            return self.live[(self.turn - 1) % len(self.live)]

    def hand(self, rank: int, groups: list[InFlightGroup], msg) -> None:
        with self.lock:
            self.held.setdefault(rank, {}).update({g.group_id: g for g in groups})
            self.send(rank, msg)

    def returned(self, group_id: int) -> bool:
        """A finished group came back: True the first time (and it is no longer held), False for a duplicate."""
        with self.lock:
            for groups in self.held.values():
                if groups.pop(group_id, None) is not None:
                    return True
            self.duplicates += 1
            return False

    def weight_group(self):
        """A new sender for the live workers; each is told its rank in the new group."""
        with self.lock:
            self.generation += 1
            sender = self.new_sender(len(self.live))
            for i, rank in enumerate(self.live):
                self.send(rank, WeightGroup(sender.address, i + 1, len(self.live) + 1, self.generation))
            return sender

    def join(self, rank: int) -> None:
        with self.lock:
            if rank not in self.live:
                self.live = sorted(self.live + [rank])

    def lose(self, rank: int) -> list[InFlightGroup]:
        """`rank` died: it leaves the rotation; returns what it held (fresh: its partial tokens died with it)."""
        with self.lock:
            if rank in self.live:
                self.live.remove(rank)
                self.lost += 1
            return [InFlightGroup(g.group_id, g.min_version, g.prompt) for g in self.held.pop(rank, {}).values()]


class Dispatcher(threading.Thread):
    """Admits prompts under the staleness rule and hands them to live rollout workers, round-robin."""

    def __init__(self, staleness: StalenessController, sampler, fleet: Fleet, first_group_id: int = 0,
                 resumed: list[InFlightGroup] = (), worker_rng: dict | None = None, pacer: FreshnessPacer | None = None):
        super().__init__(name="areal-dispatcher", daemon=True)
        self.staleness, self.sampler, self.fleet, self.pacer = staleness, sampler, fleet, pacer
        self.next_group_id = first_group_id
        self.resumed, self.worker_rng = list(resumed), worker_rng or {}
        self.orphans: list[InFlightGroup] = []  # admitted, held by no worker (every worker is being replaced)
        self.lock = threading.RLock()  # a checkpoint cut holds it: no prompt leaves half-recorded
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def reissue(self, groups: list[InFlightGroup]) -> None:
        """Hand a lost worker's groups (or a checkpoint's) to the live workers, ahead of newer prompts;
        with no worker live they wait in `orphans` for the next one that joins."""
        with self.lock:
            groups, self.orphans = self.orphans + list(groups), []
            live = list(self.fleet.live)
            if not live:
                self.orphans = groups
                return
            for i, rank in enumerate(live):
                mine = groups[i::len(live)]
                rng = self.worker_rng.pop(str(rank), None)
                if mine or rng is not None:
                    self.fleet.hand(rank, mine, ResumeGroups(mine, rng))

    def run(self) -> None:
        try:
            # a checkpoint's in-flight groups go first; their running slots are already counted
            self.reissue(self.resumed)
            while not self.stop_event.is_set():
                if not self.staleness.admit(timeout=0.5):  # the timeout only re-checks stop_event: rare wake-ups
                    continue
                while self.pacer is not None and (hold := self.pacer.hold_s()) > 0 and not self.stop_event.is_set():
                    self.stop_event.wait(min(hold, 0.05))  # a slot is ours; the batch is due just in time (freshness.py)
                with self.lock:
                    count = 1
                    while self.staleness.try_admit():  # take every slot open now, as one message
                        count += 1
                    ids = list(range(self.next_group_id, self.next_group_id + count))
                    self.next_group_id += count
                    prompts = [self.sampler.next()[1] for _ in ids]
                    rank = self.fleet.next_rank()
                    while rank is None and not self.stop_event.is_set():  # every worker is being replaced
                        time.sleep(0.1)
                        rank = self.fleet.next_rank()
                    version = self.staleness.version
                    if self.pacer is not None:
                        self.pacer.admitted(ids)
                    self.fleet.hand(rank, [InFlightGroup(g, version, p) for g, p in zip(ids, prompts)],
                                    PromptBatch(version, ids, prompts))
        except BaseException as e:  # noqa: BLE001 - surfaced by the trainer loop
            self.error = e


class RemoteEvaluator:
    """Held-out evaluation on the rollout workers, so the trainer never stops for it: the test prompts
    are split into one shard per live worker, each scored with the weights of the requested step; the
    Future resolves with the merged result once every shard is in. A lost worker's shards go to another.
    Until each shard has its own copy of those weights (`EvalStarted`) or is scored, `holds_weights`:
    in-step weights, labelled with the same version, would change what it scores."""

    def __init__(self, fleet: Fleet, prompts, max_new_tokens: int):
        self.fleet, self.prompts, self.max_new_tokens = fleet, prompts, max_new_tokens
        # by step: the Future, the shards' results, who was asked for each shard, the shards started on a copy
        self._pending: dict[int, tuple[Future, dict[int, dict], dict[int, tuple[int, EvalRequest]], set[int]]] = {}
        self._lock = threading.Lock()

    def __call__(self, step: int) -> Future:
        future: Future = Future()
        live = list(self.fleet.live)
        requests = {i: EvalRequest(step, self.prompts[i::len(live)], self.max_new_tokens, shard=i)
                    for i in range(len(live)) if self.prompts[i::len(live)]}
        with self._lock:
            self._pending[step] = (future, {}, {i: (live[i], r) for i, r in requests.items()}, set())
        for i, request in requests.items():
            self.fleet.send(live[i], request)
        return future

    @property
    def holds_weights(self) -> bool:
        """Some shard asked for is neither started on a copy of its weights nor scored."""
        with self._lock:
            return any(set(asked) - set(parts) - started for _, parts, asked, started in self._pending.values())

    def started(self, msg: EvalStarted) -> None:
        """A worker evaluates its shard on its own copy of the weights (the Collector calls this)."""
        with self._lock:
            if msg.version in self._pending:
                self._pending[msg.version][3].add(msg.shard)

    def deliver(self, result: dict) -> None:
        """A worker's shard result (the Collector calls this); a shard answered twice counts once."""
        with self._lock:
            step, shard = result["eval/step"], result.get("eval/shard", 0)
            if step not in self._pending:
                return
            future, parts, asked, _ = self._pending[step]
            parts[shard] = result
            if len(parts) < len(asked):
                return
            del self._pending[step]
        future.set_result(merge_eval_results(list(parts.values())))

    def close(self) -> None:
        """The run is stopping: every evaluation still pending fails, so nothing waits for it."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for step, (future, *_) in pending.items():
            future.set_exception(RuntimeError(f"the run stopped before the evaluation of step {step} was scored"))

    def lose(self, rank: int) -> None:
        """Shards `rank` had not answered go to another live worker (or to the next one that joins)."""
        self._reassign(lambda owner: owner == rank)

    def adopt(self) -> None:
        """A worker joined: shards whose worker died while none was live go to it."""
        self._reassign(lambda owner: owner is None)

    def _reassign(self, orphaned) -> None:
        with self._lock:
            for future, parts, asked, started in self._pending.values():
                for shard, (owner, request) in list(asked.items()):
                    if orphaned(owner) and shard not in parts:
                        other = self.fleet.next_rank()
                        asked[shard] = (other, request)
                        started.discard(shard)
                        if other is not None:
                            self.fleet.send(other, request)


@dataclasses.dataclass
class _Cut:
    """A checkpoint's rollout side being recorded (module docstring, step 2)."""

    waiting: set[int]  # workers whose snapshot has not arrived yet
    held: dict[int, set[int]]  # group ids each waiting worker held at the cut: all a lost one may contribute
    in_transit: list[Group]
    in_flight: list[InFlightGroup]
    rng: dict[str, dict]
    done: Future


class Collector(threading.Thread):
    """Reads trainer0's inbox: finished groups into the buffer (once each), evaluation shards to the
    evaluator, worker stats, workers joining and lost; records the rollout side of a checkpoint cut.
    The controller's `Stop` (the run failed elsewhere, e.g. every rollout worker is gone) closes the
    buffer and fails pending evaluations, so a trainer waiting for either ends instead of waiting out
    the controller's grace."""

    def __init__(self, endpoint, buffer: TrajectoryBuffer, fleet: Fleet, dispatcher: Dispatcher,
                 evaluator: RemoteEvaluator, on_membership, on_shard_saved=None):
        super().__init__(name="areal-collector", daemon=True)
        self.endpoint, self.buffer, self.fleet, self.dispatcher = endpoint, buffer, fleet, dispatcher
        self.evaluator, self.on_membership = evaluator, on_membership
        self.on_shard_saved = on_shard_saved  # another trainer rank's checkpoint shard (ZeRO)
        self.worker_stats: dict[int, dict] = {}
        self.lock = threading.Lock()  # a checkpoint cut holds it: no group is between inbox and buffer
        self._cut: _Cut | None = None
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def start_cut(self, workers: list[int], unassigned: list[InFlightGroup] = ()) -> Future:
        """Record the rollout side of a cut (call with `lock` held, before sending the requests);
        the Future resolves to {"rollout": ...} once every worker has answered. `unassigned`: admitted
        groups no worker holds right now (the dispatcher's orphans)."""
        if self._cut is not None:
            raise RuntimeError("a checkpoint cut is already being recorded")
        with self.fleet.lock:
            held = {rank: set(self.fleet.held.get(rank, {})) for rank in workers}
        self._cut = _Cut(set(workers), held, [], list(unassigned), {}, Future())
        done = self._cut.done
        self._finish_cut_if_done()  # no live worker: nothing to wait for
        return done

    def _finish_cut_if_done(self) -> None:
        cut = self._cut
        if cut is not None and not cut.waiting:
            self._cut = None
            cut.done.set_result({"rollout": {
                "in_transit": [g.to_dict() for g in cut.in_transit],
                "in_flight": [g.to_dict() for g in sorted(cut.in_flight, key=lambda g: g.group_id)],
                "worker_rng": cut.rng,
            }})

    def handle(self, got) -> None:
        """One message of trainer0's inbox (`run` calls this; trainer0 too, before the thread starts)."""
        with self.lock:
            self._handle(worker_rank(got.src) if got.src.startswith("rollout") else -1, got.msg)

    def _handle(self, rank: int, msg) -> None:
        cut = self._cut
        if isinstance(msg, GroupsDone):
            for group in msg.groups:
                if self.dispatcher.pacer is not None:
                    self.dispatcher.pacer.arrived(group.group_id)
                if self.fleet.returned(group.group_id):
                    if cut is not None and rank in cut.waiting:
                        cut.in_transit.append(group)
                    self.buffer.put(group)  # never blocks for long: admission bounds what is held
        elif isinstance(msg, WorkerSnapshot):
            if cut is not None and rank in cut.waiting:
                cut.waiting.discard(rank)
                cut.in_flight.extend(msg.groups)
                cut.rng[str(rank)] = msg.rng_state
                self._finish_cut_if_done()
        elif isinstance(msg, EvalStarted):
            self.evaluator.started(msg)
        elif isinstance(msg, EvalResult):
            self.evaluator.deliver(msg.result)
        elif isinstance(msg, WorkerStats):
            self.worker_stats[rank] = msg.stats
        elif isinstance(msg, WorkerReady):
            self.fleet.join(rank)
            self.on_membership()
            self.dispatcher.reissue([])  # what waited for a worker
            self.evaluator.adopt()
        elif isinstance(msg, Stop):
            self.buffer.close()
            self.evaluator.close()
        elif isinstance(msg, ShardSaved) and self.on_shard_saved is not None:
            self.on_shard_saved(msg)
        elif isinstance(msg, RoleLost) and msg.role.startswith("rollout"):
            lost = worker_rank(msg.role)
            groups = self.fleet.lose(lost)
            if cut is not None and lost in cut.waiting:  # its share of the cut: what it held AT the cut and
                cut.waiting.discard(lost)  # has not shipped; prompts handed to it since come after the cut
                cut.in_flight.extend(g for g in groups if g.group_id in cut.held[lost])
                self._finish_cut_if_done()
            self.on_membership()
            self.dispatcher.reissue(groups)
            self.evaluator.lose(lost)

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    got = self.endpoint.recv(timeout=0.5)  # re-checks stop_event; every wake-up costs the trainer
                except queue.Empty:
                    continue
                self.handle(got)
        except BaseException as e:  # noqa: BLE001
            self.error = e
