"""How one asynchronous step flows, across every process of a run.

Processes (each started from a plain-data spec, `python -m areal.role SPEC.json`, by a launcher):
    controller   areal/controller.py: places the run, binds the hub, starts the roles, watches them
    trainer0     this file: admission, buffer, updates, weight publishing, evaluation, checkpoints
    trainer1..   areal/roles.py: further data-parallel trainer ranks (trainer.world_size)
    rollout0..   areal/roles.py + rollout/worker.py: engine + rewards
Messages (typed, areal/messages.py) travel over one channel through the controller's hub
(areal/channel.py); weights travel over torch.distributed broadcasts (areal/transport.py).

One step, as trainer0 sees it:
  1. Dispatcher: while the staleness rule (areal/buffer/staleness.py) has room, admit prompts and
     send them as a `PromptBatch` to a live worker (round-robin). The `Fleet` records what each
     worker holds until its group comes back. The rule's lead (how many versions ahead of the
     trainer it admits, at most eta) is set after every update by areal/buffer/freshness.py, from
     measured latencies: data no older than the trainer needs to never wait.
  2. Workers generate continuously; each finished group comes back as `GroupDone`. The Collector
     puts it in the buffer (which may filter it, e.g. uniform rewards), exactly once per group id.
  3. AsyncLoop takes B groups from the buffer, sends them to the other trainer ranks (`TrainStep`),
     and all ranks take the update together (areal/trainer/engine.py).
  4. trainer0 publishes the new weights in the background (areal/trainer/weight_publisher.py);
     workers apply them between two engine steps, never stopping generation for the transfer. With
     trainer.publish_every=minibatch it also publishes after each minibatch of the step (labelled with
     the last whole version), and the dispatcher holds the next batch until it is due just in time,
     so that batch is generated with weights one or two optimizer updates old, not a whole step.
  5. areal/driver.py logs the step, asks the workers for a held-out evaluation when due
     (`RemoteEvaluator`, never on the trainer's path) and checkpoints when due (`capture`).

Workers that die: the controller reports a `RoleLost`; the fleet re-issues what that worker held
to the others (as `ResumeGroups`, ahead of newer prompts), re-forms the weight group without it,
and again when a replacement says `WorkerReady`. A group that arrives twice is dropped; so the
buffer's ledger holds: admitted = consumed + filtered + held (+ still running).

A checkpoint is a consistent cut of this distributed state (Chandy-Lamport, trainer0 initiating),
taken by `AsyncLoop.capture()` right after an update:
  1. with the dispatcher and the collector paused, record the data position, the admission
     counters and the buffer's held groups, and send every live worker a `SnapshotRequest`
     (messages between two processes stay in order, so each has every prompt admitted before it);
  2. each worker answers with its pending and in-flight groups (tokens so far), after every group
     it shipped before: groups received from a worker between step 1 and its answer were in
     transit, and are recorded too. A worker lost meanwhile contributes what the fleet held for it
     at step 1 and has not received since (never a prompt handed to it after the cut).
Resume puts held and in-transit groups back in the buffer and hands the in-flight ones to the
workers (`ResumeGroups`), which continue them where they stopped; nothing is lost or trained twice.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future

from areal.buffer.freshness import FreshnessPacer
from areal.buffer.staleness import StalenessController
from areal.buffer.trajectory_buffer import TrajectoryBuffer
from areal.evaluate import merge_eval_results
from areal.messages import (EvalRequest, EvalResult, EvalStarted, GroupDone, InFlightGroup, PromptBatch, ResumeGroups, RoleLost,
                            ShardSaved, SnapshotRequest, Stop, TrainStep, WeightGroup, WorkerReady, WorkerSnapshot,
                            WorkerStats)
from areal.trainer.batch import build_batch
from areal.trajectory import Group


def token_lags(groups, version: int) -> Counter:
    """How many consumed tokens were generated 0, 1, 2, ... versions behind `version`."""
    return Counter(version - v for g in groups for t in g.trajectories for v in t.versions)


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
                if not self.staleness.admit(timeout=0.05):
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
    def pending(self) -> bool:
        """An evaluation was asked for and is not complete yet."""
        with self._lock:
            return bool(self._pending)

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
        if isinstance(msg, GroupDone):
            if self.dispatcher.pacer is not None:
                self.dispatcher.pacer.arrived(msg.group.group_id)
            if self.fleet.returned(msg.group.group_id):
                if cut is not None and rank in cut.waiting:
                    cut.in_transit.append(msg.group)
                self.buffer.put(msg.group)  # never blocks for long: admission bounds what is held
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
                    got = self.endpoint.recv(timeout=0.05)
                except queue.Empty:
                    continue
                self.handle(got)
        except BaseException as e:  # noqa: BLE001
            self.error = e


@dataclasses.dataclass
class AsyncParts:
    """What the async loop drives; built by trainer0 (areal/roles.py) from the recipe."""

    engine: object  # areal.trainer.engine.TrainEngine
    publisher: object  # areal.trainer.weight_publisher.WeightPublisher
    staleness: StalenessController
    buffer: TrajectoryBuffer
    fleet: Fleet
    dispatcher: Dispatcher
    collector: Collector
    endpoint: object  # areal.channel.Endpoint
    trainer_ranks: int = 1
    in_step_updates: bool = False  # publish after every minibatch too (step 4 of the module docstring)


class AsyncLoop:
    """Yields (step, groups, metrics) for each training step; the caller logs, evaluates and
    checkpoints (`capture`)."""

    def __init__(self, parts: AsyncParts, trainer_cfg, pad_token_id: int, timeout_s: float, first_step: int = 1):
        self.parts, self.cfg, self.pad_token_id, self.timeout_s = parts, trainer_cfg, pad_token_id, timeout_s
        self.first_step = first_step
        self.lags: Counter = Counter()  # consumed tokens by version lag, over this process's steps
        self.wait_s_total, self.steps_run = 0.0, 0  # the trainer's wait for its batches, over this process's steps

    def totals(self) -> dict:
        """The run's freshness and balance (this process's steps: a resumed run counts from its resume)."""
        workers = self.parts.collector.worker_stats.values()
        busy, idle = sum(w.get("busy_s", 0.0) for w in workers), sum(w.get("idle_s", 0.0) for w in workers)
        tokens = sum(self.lags.values())
        return {"lag_mean": sum(k * c for k, c in self.lags.items()) / max(tokens, 1),
                "lag_max": max(self.lags, default=0),
                "trainer_wait_s_per_step": self.wait_s_total / max(self.steps_run, 1),
                "rollout_idle_fraction": idle / (busy + idle) if busy + idle > 0 else 0.0}

    def ledger(self) -> dict:
        """Where every admitted group is now: consumed, filtered, held in the buffer or still running
        (admitted == the four together), with the ids of the held and running ones, so that a group
        missing from the consumed ids can be told lost from still waiting. One consistent moment: the
        dispatcher and the collector are paused as for a checkpoint cut."""
        p = self.parts
        with p.collector.lock, p.dispatcher.lock, p.fleet.lock:  # capture's order
            stats, (_, held) = p.buffer.stats(), p.buffer.snapshot()
            running = {g for groups in p.fleet.held.values() for g in groups}
            running |= {g.group_id for g in p.dispatcher.orphans}
            return {"admitted": p.dispatcher.next_group_id, "consumed": stats["consumed"],
                    "filtered": sum(stats["filtered"].values()), "held": len(held), "running": len(running),
                    "held_ids": sorted(g.group_id for g in held), "running_ids": sorted(running)}

    def _in_step_update(self, _update: int) -> None:
        """After a minibatch (`in_step_updates`): the weights so far, labelled with the last
        whole version, so the next batch is generated fresher. Not while an evaluation still needs the
        workers' weights to stay put: it scores the whole version it asked for."""
        p = self.parts
        weights = p.engine.named_weights()  # under ZeRO-3 a gather the other ranks join (areal/roles.py)
        if p.collector.evaluator.holds_weights:
            for _ in weights:
                pass
        else:
            p.publisher.publish(p.engine.version, weights)

    def capture(self) -> tuple[dict, list[Future]]:
        """The cut of the module docstring: the trainer side now, the rollout side as a Future.
        Held groups are encoded here (small: at most (eta + 1) * B groups)."""
        p = self.parts
        # the collector's lock first, as the collector thread takes them (a worker joining or lost: it hands
        # prompts out again under the dispatcher's): the other order can deadlock a cut against such a message
        with p.collector.lock, p.dispatcher.lock:
            counters, held = p.buffer.snapshot()
            loop = {"sampler": p.dispatcher.sampler.state(), "next_group_id": p.dispatcher.next_group_id,
                    "admission": p.staleness.state(), "buffer": counters, "held": [g.to_dict() for g in held]}
            live = list(p.fleet.live)
            rollout = p.collector.start_cut(live, p.dispatcher.orphans)
            for rank in live:
                p.fleet.send(rank, SnapshotRequest(p.staleness.version))
        return {"loop": loop}, [rollout]

    def __iter__(self):
        parts, trainer_cfg = self.parts, self.cfg
        engine, staleness, buffer = parts.engine, parts.staleness, parts.buffer
        parts.publisher.publish(engine.version, engine.named_weights())  # the current version to every worker
        parts.dispatcher.start()
        pacer, last_version_at = parts.dispatcher.pacer, None
        in_step = self._in_step_update if parts.in_step_updates else None
        rollout_tokens_before = 0
        for step in range(self.first_step, trainer_cfg.steps + 1):
            t0 = time.perf_counter()
            groups = _get_batch(parts, trainer_cfg.batch_size, engine.version, self.timeout_s)
            groups.sort(key=lambda g: g.group_id)  # arrival order must not change the update
            for k in range(1, parts.trainer_ranks):
                parts.endpoint.send(f"trainer{k}", TrainStep(step, groups))
            t1 = time.perf_counter()
            lags = token_lags(groups, engine.version)
            self.lags.update(lags)
            self.wait_s_total, self.steps_run = self.wait_s_total + (t1 - t0), self.steps_run + 1
            metrics = engine.train_step(build_batch(groups, None, self.pad_token_id), after_update=in_step)
            t2 = time.perf_counter()
            if pacer is not None:  # the lead for the next admissions: the trainer's own time this step, waits apart
                own_s = (t2 - t1) + (t0 - last_version_at if last_version_at is not None else 0.0)
                pacer.stepped(own_s, t1 - t0)
                metrics.update(pacer.stats())
            staleness.set_version(engine.version)
            last_version_at = t2
            metrics["time/publish_snapshot_s"] = parts.publisher.publish(engine.version, engine.named_weights())
            t3 = time.perf_counter()
            workers = dict(parts.collector.worker_stats)
            rollout_tokens = sum(w.get("generated_tokens", 0) for w in workers.values())
            metrics.update(step_metrics(t0, t1, t3, lags, buffer, staleness, parts.fleet, workers,
                                        rollout_tokens - rollout_tokens_before, parts.publisher))
            rollout_tokens_before = rollout_tokens
            yield step, groups, metrics


def step_metrics(t0, t1, t3, lags: Counter, buffer, staleness, fleet: Fleet, workers: dict[int, dict],
                 new_tokens: int, publisher) -> dict:
    """The async step's own metrics (the engine's train/* and the driver's reward/* come beside them)."""
    busy = sum(w.get("busy_s", 0.0) for w in workers.values())
    idle = sum(w.get("idle_s", 0.0) for w in workers.values())
    last = publisher.history[-1] if publisher.history else None
    stats = buffer.stats()
    return {
        "time/wait_for_batch_s": t1 - t0,
        "time/step_s": t3 - t0,
        "idle/trainer": (t1 - t0) / max(t3 - t0, 1e-9),
        "idle/rollout": idle / (busy + idle) if busy + idle > 0 else 0.0,
        "staleness/lag_max": max(lags) if lags else 0,
        "staleness/lag_mean": sum(k * c for k, c in lags.items()) / max(1, sum(lags.values())),
        "staleness/lag_hist": [lags.get(k, 0) for k in range(max(lags) + 1)] if lags else [],
        "buffer/held_groups": stats["held_groups"],
        "buffer/running_groups": staleness.running,
        "buffer/filtered_groups": sum(stats["filtered"].values()),
        "rollout/new_tokens": new_tokens,
        "rollout/tokens_per_s": new_tokens / max(t3 - t0, 1e-9),
        "rollout/prefill_tokens_saved": sum(w.get("prefill_tokens_saved", 0) for w in workers.values()),
        "rollout/preemptions": sum(w.get("preemptions", 0) for w in workers.values()),
        "rollout/kv_blocks_used": sum(w.get("kv_blocks_used", 0) for w in workers.values()),
        "rollout/live_workers": len(fleet.live),
        "rollout/workers_lost": fleet.lost,
        "rollout/duplicate_groups": fleet.duplicates,
        "weights/pause_s_total": sum(w.get("pause_s", 0.0) for w in workers.values()),
        **{f"weights/pause_s_total_rollout{rank}": w.get("pause_s", 0.0) for rank, w in workers.items()},
        **({} if last is None else {"weights/bytes": float(last.bytes), "weights/transfer_s": float(last.transfer_s),
                                    "weights/coalesced_total": float(publisher.coalesced_total),
                                    "weights/updates_sent": float(publisher.updates_sent),
                                    "weights/groups_formed": float(publisher.groups_formed)}),
    }


def _get_batch(parts: AsyncParts, size: int, version: int, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:  # wake often, so a failed dispatcher or collector surfaces at once
        for thread in (parts.dispatcher, parts.collector):
            if thread.error is not None:
                raise RuntimeError(f"{thread.name} failed: {thread.error!r}") from thread.error
        try:
            return parts.buffer.get_batch(size, version, timeout=0.2)
        except TimeoutError:
            if time.monotonic() > deadline:
                held = {f"rollout{r}": sorted(g) for r, g in parts.fleet.held.items() if g}
                raise TimeoutError(
                    f"no batch of {size} groups within {timeout_s:.0f} s at version {version}; "
                    f"buffer {parts.buffer.stats()}, admission {parts.staleness!r}, live workers "
                    f"{parts.fleet.live}, groups still out per worker {held}"
                ) from None
