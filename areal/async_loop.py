"""How one asynchronous step flows, across every process of a run.

Processes (each started from a plain-data spec, `python -m areal.role SPEC.json`, by a launcher):
    controller   areal/controller.py: places the run, binds the hub, starts the roles, watches them
    trainer0     this file (the loop: buffer, updates, weight publishing, checkpoints) and
                 areal/fleet.py (its rollout workers: admission, dispatch, evaluation, inbox)
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
  2. Workers generate continuously; finished groups come back in `GroupsDone` messages. The Collector
     puts each in the buffer (which may filter it, e.g. uniform rewards), exactly once per group id.
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
import time
from collections import Counter
from concurrent.futures import Future

from areal.buffer.staleness import StalenessController
from areal.buffer.trajectory_buffer import TrajectoryBuffer
from areal.fleet import Collector, Dispatcher, Fleet
from areal.messages import SnapshotRequest, TrainStep
from areal.trainer.batch import build_batch


def token_lags(groups, version: int) -> Counter:
    """How many consumed tokens were generated 0, 1, 2, ... versions behind `version`."""
    return Counter(version - v for g in groups for t in g.trajectories for v in t.versions)


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
