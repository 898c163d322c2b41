"""The asynchronous loop, trainer side: admit prompts, collect groups, train, publish.

Generation never waits for training: rollout workers stream groups into the buffer while
the trainer updates. Admission keeps every rollout within eta versions of the trainer
(`areal.buffer.staleness`); weights go out in the background after each step, and held-out
evaluation runs on the workers (`RemoteEvaluator`), never on the trainer's critical path.
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
from areal.rollout.worker import EvalRequest, PromptBatch
from areal.trainer.batch import build_batch


def token_lags(groups, version: int) -> Counter:
    """How many consumed tokens were generated 0, 1, 2, ... versions behind `version`."""
    return Counter(version - v for g in groups for t in g.trajectories for v in t.versions)


class Dispatcher(threading.Thread):
    """Admits prompts under the staleness rule and hands them to rollout workers, round-robin."""

    def __init__(self, staleness: StalenessController, sampler, inboxes, first_group_id: int = 0):
        super().__init__(name="areal-dispatcher", daemon=True)
        self.staleness, self.sampler, self.inboxes = staleness, sampler, inboxes
        self.next_group_id, self.turn = first_group_id, 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                if not self.staleness.admit(timeout=0.05):
                    continue
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


class Collector(threading.Thread):
    """Moves finished groups from the rollout outbox into the buffer and evaluation results to the
    evaluator; keeps each worker's last stats."""

    def __init__(self, outbox, buffer: TrajectoryBuffer, evaluator: RemoteEvaluator | None = None):
        super().__init__(name="areal-collector", daemon=True)
        self.outbox, self.buffer, self.evaluator = outbox, buffer, evaluator
        self.worker_stats: dict[int, dict] = {}
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    kind, rank, payload = self.outbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                if kind == "group":
                    self.buffer.put(payload)
                elif kind == "eval":
                    self.evaluator.deliver(payload)
                else:
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


def async_steps(parts: AsyncParts, trainer_cfg, pad_token_id: int, timeout_s: float):
    """Yield (step, groups, metrics) for each training step; the caller logs and evaluates."""
    engine, staleness, buffer = parts.engine, parts.staleness, parts.buffer
    parts.publisher.publish(engine.version, engine.named_weights())  # version 0 to every worker
    parts.dispatcher.start()
    parts.collector.start()
    rollout_tokens_before = 0
    for step in range(1, trainer_cfg.steps + 1):
        t0 = time.perf_counter()
        groups = _get_batch(parts, trainer_cfg.batch_size, engine.version, timeout_s)
        groups.sort(key=lambda g: g.group_id)  # arrival order must not change the update
        t1 = time.perf_counter()
        lags = token_lags(groups, engine.version)
        metrics = engine.train_step(build_batch(groups, None, pad_token_id))
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
