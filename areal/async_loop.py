"""The asynchronous loop, trainer side: admit prompts, collect groups, train, publish.

Generation never waits for training: rollout workers stream groups into the buffer while
the trainer updates. Admission keeps every rollout within eta versions of the trainer
(`areal.buffer.staleness`); weights go out in the background after each step, and held-out
evaluation runs on the workers (`RemoteEvaluator`), never on the trainer's critical path.

A checkpoint is a consistent cut of this distributed state (Chandy-Lamport, with the
trainer as initiator), taken by `AsyncLoop.capture()` right after an update:
  1. with the dispatcher and the collector paused, record the data position, the admission
     counters and the buffer's held groups, and send every worker a `SnapshotRequest`
     (inboxes are FIFO, so each worker has received every prompt admitted before it);
  2. each worker answers with its pending and in-flight groups (tokens so far), in its
     outbox after every group it shipped before: the groups the collector receives from a
     worker between step 1 and that worker's answer were in transit, and are recorded too.
Resume puts held and in-transit groups back in the buffer and sends the in-flight ones to
the workers (`ResumeGroups`), which continue them where they stopped; nothing admitted is
lost or trained twice.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future

from areal.buffer.staleness import StalenessController
from areal.buffer.trajectory_buffer import TrajectoryBuffer
from areal.evaluate import merge_eval_results
from areal.rollout.worker import EvalRequest, InFlightGroup, PromptBatch, ResumeGroups, SnapshotRequest
from areal.trajectory import Group
from areal.trainer.batch import build_batch


def token_lags(groups, version: int) -> Counter:
    """How many consumed tokens were generated 0, 1, 2, ... versions behind `version`."""
    return Counter(version - v for g in groups for t in g.trajectories for v in t.versions)


class Dispatcher(threading.Thread):
    """Admits prompts under the staleness rule and hands them to rollout workers, round-robin."""

    def __init__(self, staleness: StalenessController, sampler, inboxes, first_group_id: int = 0,
                 resumed: list[InFlightGroup] = (), worker_rng: dict | None = None):
        super().__init__(name="areal-dispatcher", daemon=True)
        self.staleness, self.sampler, self.inboxes = staleness, sampler, inboxes
        self.next_group_id, self.turn = first_group_id, 0
        self.resumed, self.worker_rng = list(resumed), worker_rng or {}
        self.lock = threading.Lock()  # a checkpoint cut holds it: no prompt leaves half-recorded
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # a checkpoint's in-flight groups go first; their running slots are already counted
            for rank, inbox in enumerate(self.inboxes):
                mine = self.resumed[rank::len(self.inboxes)]
                if mine or str(rank) in self.worker_rng:
                    inbox.put(ResumeGroups(mine, self.worker_rng.get(str(rank))))
            while not self.stop_event.is_set():
                if not self.staleness.admit(timeout=0.05):
                    continue
                with self.lock:
                    count = 1
                    while self.staleness.try_admit():  # take every slot open now, as one message
                        count += 1
                    ids = list(range(self.next_group_id, self.next_group_id + count))
                    self.next_group_id += count
                    prompts = [self.sampler.next()[1] for _ in ids]
                    inbox = self.inboxes[self.turn % len(self.inboxes)]
                    self.turn += 1
                    inbox.put(PromptBatch(self.staleness.version, ids, prompts))
        except BaseException as e:  # noqa: BLE001 - surfaced by the trainer loop
            self.error = e


class RemoteEvaluator:
    """Held-out evaluation on the rollout workers, so the trainer never stops for it: each worker
    scores a shard of the test prompts with the weights of the requested step (its engine's
    idle time); the Future resolves with the merged result once every shard is in."""

    def __init__(self, inboxes, prompts, max_new_tokens: int):
        shards = [prompts[r::len(inboxes)] for r in range(len(inboxes))]
        self.shards = [(inbox, shard) for inbox, shard in zip(inboxes, shards) if shard]  # the same every time
        self.max_new_tokens = max_new_tokens
        self._pending: dict[int, tuple[Future, list[dict], int]] = {}
        self._lock = threading.Lock()

    def __call__(self, step: int) -> Future:
        future: Future = Future()
        with self._lock:
            self._pending[step] = (future, [], len(self.shards))
        for inbox, shard in self.shards:
            inbox.put(EvalRequest(step, shard, self.max_new_tokens))
        return future

    def deliver(self, result: dict) -> None:
        """A worker's shard result (the Collector calls this)."""
        with self._lock:
            future, parts, expected = self._pending[result["eval/step"]]
            parts.append(result)
            if len(parts) < expected:
                return
            del self._pending[result["eval/step"]]
        future.set_result(merge_eval_results(parts))


@dataclasses.dataclass
class _Cut:
    """A checkpoint's rollout side being recorded (module docstring, step 2)."""

    waiting: set[int]  # workers whose snapshot has not arrived yet
    in_transit: list[Group]
    in_flight: list[InFlightGroup]
    rng: dict[str, dict]
    done: Future


class Collector(threading.Thread):
    """Moves finished groups from the rollout outbox into the buffer and evaluation results to the
    evaluator; keeps each worker's last stats; records the rollout side of a checkpoint cut."""

    def __init__(self, outbox, buffer: TrajectoryBuffer, evaluator: RemoteEvaluator | None = None):
        super().__init__(name="areal-collector", daemon=True)
        self.outbox, self.buffer, self.evaluator = outbox, buffer, evaluator
        self.worker_stats: dict[int, dict] = {}
        self.lock = threading.Lock()  # a checkpoint cut holds it: no group is between outbox and buffer
        self._cut: _Cut | None = None
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def start_cut(self, workers: int) -> Future:
        """Record the rollout side of a cut (call with `lock` held, before sending the requests);
        the Future resolves to {"rollout": ...} once every worker has answered."""
        if self._cut is not None:
            raise RuntimeError("a checkpoint cut is already being recorded")
        self._cut = _Cut(set(range(workers)), [], [], {}, Future())
        return self._cut.done

    def _record(self, kind: str, rank: int, payload) -> None:
        cut = self._cut
        if cut is None or rank not in cut.waiting:
            return
        if kind == "group":
            cut.in_transit.append(payload)
        elif kind == "snapshot":
            cut.waiting.discard(rank)
            cut.in_flight.extend(payload.groups)
            cut.rng[str(rank)] = payload.rng_state
            if not cut.waiting:
                self._cut = None
                cut.done.set_result({"rollout": {
                    "in_transit": [g.to_dict() for g in cut.in_transit],
                    "in_flight": [g.to_dict() for g in sorted(cut.in_flight, key=lambda g: g.group_id)],
                    "worker_rng": cut.rng,
                }})

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    kind, rank, payload = self.outbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                with self.lock:
                    self._record(kind, rank, payload)
                    if kind == "group":
                        self.buffer.put(payload)  # never blocks for long: admission bounds what is held
                if kind == "eval":
                    self.evaluator.deliver(payload)
                elif kind == "stats":
                    self.worker_stats[rank] = payload
        except BaseException as e:  # noqa: BLE001
            self.error = e


@dataclasses.dataclass
class AsyncParts:
    """What the async loop drives; built by the trainer role from the recipe."""

    engine: object  # areal.trainer.engine.TrainEngine
    publisher: object  # areal.trainer.weight_publisher.WeightPublisher
    staleness: StalenessController
    buffer: TrajectoryBuffer
    dispatcher: Dispatcher
    collector: Collector


class AsyncLoop:
    """Yields (step, groups, metrics) for each training step; the caller logs, evaluates and
    checkpoints (`capture`)."""

    def __init__(self, parts: AsyncParts, trainer_cfg, pad_token_id: int, timeout_s: float, first_step: int = 1):
        self.parts, self.cfg, self.pad_token_id, self.timeout_s = parts, trainer_cfg, pad_token_id, timeout_s
        self.first_step = first_step

    def capture(self) -> tuple[dict, list[Future]]:
        """The cut of the module docstring: the trainer side now, the rollout side as a Future.
        Held groups are encoded here (small: at most (eta + 1) * B groups)."""
        p = self.parts
        with p.dispatcher.lock, p.collector.lock:
            counters, held = p.buffer.snapshot()
            loop = {"sampler": p.dispatcher.sampler.state(), "next_group_id": p.dispatcher.next_group_id,
                    "admission": p.staleness.state(), "buffer": counters, "held": [g.to_dict() for g in held]}
            rollout = p.collector.start_cut(len(p.dispatcher.inboxes))
            for inbox in p.dispatcher.inboxes:
                inbox.put(SnapshotRequest(p.staleness.version))
        return {"loop": loop}, [rollout]

    def __iter__(self):
        parts, trainer_cfg = self.parts, self.cfg
        engine, staleness, buffer = parts.engine, parts.staleness, parts.buffer
        parts.publisher.publish(engine.version, engine.named_weights())  # the current version to every worker
        parts.dispatcher.start()
        parts.collector.start()
        rollout_tokens_before = 0
        for step in range(self.first_step, trainer_cfg.steps + 1):
            t0 = time.perf_counter()
            groups = _get_batch(parts, trainer_cfg.batch_size, engine.version, self.timeout_s)
            groups.sort(key=lambda g: g.group_id)  # arrival order must not change the update
            t1 = time.perf_counter()
            lags = token_lags(groups, engine.version)
            metrics = engine.train_step(build_batch(groups, None, self.pad_token_id))
            staleness.set_version(engine.version)
            metrics["time/publish_snapshot_s"] = parts.publisher.publish(engine.version, engine.named_weights())
            t3 = time.perf_counter()
            workers = list(parts.collector.worker_stats.values())
            rollout_tokens = sum(w.get("generated_tokens", 0) for w in workers)
            metrics.update({
                "time/wait_for_batch_s": t1 - t0,
                "time/step_s": t3 - t0,
                "idle/trainer": (t1 - t0) / max(t3 - t0, 1e-9),
                "staleness/lag_max": max(lags) if lags else 0,
                "staleness/lag_mean": sum(k * c for k, c in lags.items()) / max(1, sum(lags.values())),
                "staleness/lag_hist": [lags.get(k, 0) for k in range(max(lags) + 1)] if lags else [],
                "buffer/held_groups": buffer.stats()["held_groups"],
                "buffer/running_groups": staleness.running,
                "rollout/new_tokens": rollout_tokens - rollout_tokens_before,
                "rollout/tokens_per_s": (rollout_tokens - rollout_tokens_before) / max(t3 - t0, 1e-9),
                "rollout/prefill_tokens_saved": sum(w.get("prefill_tokens_saved", 0) for w in workers),
                "rollout/preemptions": sum(w.get("preemptions", 0) for w in workers),
                "rollout/kv_blocks_used": sum(w.get("kv_blocks_used", 0) for w in workers),
                "weights/pause_s_total": sum(w.get("pause_s", 0.0) for w in workers),
                **{f"weights/pause_s_total_rollout{rank}": w.get("pause_s", 0.0) for rank, w in parts.collector.worker_stats.items()},
                **{f"idle/rollout{rank}": _idle_fraction([w]) for rank, w in parts.collector.worker_stats.items()},
                "idle/rollout": _idle_fraction(workers),
                **_publisher_metrics(parts.publisher),
            })
            rollout_tokens_before = rollout_tokens
            yield step, groups, metrics


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
                raise TimeoutError(
                    f"no batch of {size} groups within {timeout_s:.0f} s at version {version}; "
                    f"buffer {parts.buffer.stats()}, admission {parts.staleness!r}"
                ) from None


def _idle_fraction(workers: list[dict]) -> float:
    busy = sum(w.get("busy_s", 0.0) for w in workers)
    idle = sum(w.get("idle_s", 0.0) for w in workers)
    return idle / (busy + idle) if busy + idle > 0 else 0.0


def _publisher_metrics(publisher) -> dict[str, float]:
    history = publisher.history
    if not history:
        return {}
    last = history[-1]
    return {
        "weights/bytes": float(last.bytes),
        "weights/transfer_s": float(last.transfer_s),
        "weights/coalesced_total": float(publisher.coalesced_total),
    }
