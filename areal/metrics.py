"""Where step metrics go: metrics.jsonl always, the rich console, and wandb."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal.options import option

log = logging.getLogger("areal")


@dataclass
class WandbConfig:
    mode: str = option(
        "offline",
        "wandb mode: offline (written under run_dir/wandb, sync later), online (needs a key), or disabled.",
        choices=("online", "offline", "disabled"),
    )
    project: str = option("areal", "wandb project.")
    name: str = option("", "wandb run name (default: the run_dir's name).")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = option(WandbConfig(), "Weights & Biases logging.")
    console_every: int = option(5, "Print a metrics line every N steps (the progress bar updates every step).")
    progress_bar: bool = option(True, "Show a live progress bar with the reward.")
    level: str = option("INFO", "Python logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None marks it
    return value


# ------------------------------------------------------------------ the per-step schema
# Every key a step's row may hold, with what it means. Rows are assembled from each part's own
# stats (the engine's train/*, the driver's reward/* and eval/*, the loop's time/* and the rest);
# a key not declared here is logged once as a warning, so the schema stays the one list.
# "<N>" stands for a rollout worker's rank, "<kind>" for a reward failure kind.
STEP_METRICS: dict[str, str] = {
    "step": "the policy version this row's update produced (1, 2, ...; 0 = the initial evaluation)",
    "version": "the same as step (the trainer's version clock)",
    "train/*": "the update's statistics (trainer/engine.py, trainer/loss.py): loss, grad_norm, lr, clip and "
               "importance-weight fractions, entropy, approx_kl, num_valid_tokens, tokens_per_s, ...",
    "reward/mean": "mean reward of the consumed samples",
    "reward/accuracy": "fraction of consumed samples whose reward counts as correct",
    "reward/failures_<kind>": "samples scored 0 because the reward raised / timed out / was NaN / not a number / "
                              "out of range (|reward| > 1e6) / hit reward.memory_mb (memory), reward.cpu_seconds "
                              "(cpu) or reward.max_processes (processes)",
    "rollout/response_length": "mean completion length of the consumed samples (tokens)",
    "rollout/truncated_fraction": "consumed samples cut at rollout.max_new_tokens",
    "rollout/generated_tokens": "sync: tokens generated this step",
    "rollout/new_tokens": "async: tokens the workers generated during this step",
    "rollout/tokens_per_s": "generation throughput over this step",
    "rollout/prefill_tokens_saved": "async: prompt tokens shared within groups instead of prefilled again",
    "rollout/preemptions": "async: engine preemptions (KV pool full), in all",
    "rollout/kv_blocks_used": "async: KV blocks in use on all workers",
    "rollout/live_workers": "async: rollout workers serving now",
    "rollout/workers_lost": "async: rollout workers that died or fell silent, in all",
    "rollout/duplicate_groups": "async: groups that came back twice (a lost worker's, re-issued) and were dropped",
    "buffer/held_groups": "async: finished groups waiting in the buffer",
    "buffer/running_groups": "async: admitted groups still generating",
    "buffer/filtered_groups": "groups dropped by the buffer's filters (uniform rewards, staleness), in all",
    "staleness/lag_max": "async: most versions any consumed token lags the trainer",
    "staleness/lag_mean": "async: mean version lag of consumed tokens",
    "staleness/lag_hist": "async: consumed tokens per lag 0, 1, 2, ...",
    "admission/lead": "async: versions ahead of the trainer that prompts are admitted (1..eta; rollout.admission)",
    "admission/latency_s": "async, fresh admission: high quantile of admission-to-arrival seconds of recent groups",
    "admission/train_s": "async, fresh admission: the trainer's own seconds per step (waits apart), smoothed",
    "admission/bump": "async, fresh admission: extra lead after the trainer waited anyway",
    "admission/hold_s": "async, fresh admission with in-step weights: how long the next batch waits to be just in time",
    "admission/hold_slack_s": "async: taken off the hold after held batches came late",
    "idle/trainer": "async: fraction of the step the trainer waited for a batch",
    "idle/rollout": "async: fraction of the workers' time with nothing to generate",
    "time/step_s": "seconds of this step", "time/wall_s": "seconds since the run started (across resumes)",
    "time/generate_s": "sync: generation", "time/reward_s": "sync: reward scoring",
    "time/weight_sync_s": "sync: loading the new weights into the rollout engine",
    "time/wait_for_batch_s": "async: waiting for B groups", "time/proximal_s": "recomputing pi_prox",
    "time/advantage_s": "advantages", "time/train_s": "the PPO update", "time/critic_s": "the critic update",
    "time/train_step_cpu_s": "CPU time of the trainer's thread over proximal to critic (less than their sum by what "
                             "the thread spent waiting or preempted)",
    "time/publish_snapshot_s": "async: copying the weights for publication (the trainer's whole cost)",
    "weights/bytes": "async: bytes per weight update", "weights/transfer_s": "async: publish to every worker holding it",
    "weights/coalesced_total": "async: versions skipped because a newer one was ready",
    "weights/updates_sent": "async: weight updates sent, in-step ones (trainer.publish_every=minibatch) included",
    "weights/groups_formed": "async: weight-broadcast groups formed (re-formed when workers die or join)",
    "weights/pause_s_total": "async: seconds generation stopped to apply weights, all workers",
    "weights/pause_s_total_rollout<N>": "async: the same, worker N",
    "eval/accuracy": "held-out greedy accuracy", "eval/reward_mean": "held-out mean reward",
    "eval/response_length": "held-out mean completion length", "eval/num_prompts": "held-out prompts scored",
    "eval/seconds": "evaluation time (the slowest shard)", "eval/step": "the step whose weights were evaluated",
    "eval/version": "the weights' version the workers used", "eval/wall_s": "when the result was in",
    "ckpt/step": "the checkpoint that finished", "ckpt/ok": "1 if it committed", "ckpt/bytes": "its size",
    "ckpt/blocked_s": "seconds the trainer waited for it", "ckpt/snapshot_s": "host copy",
    "ckpt/persist_s": "write and commit", "ckpt/skipped": "checkpoints skipped while one was being written",
    "ckpt/failures": "checkpoints that failed, in all",
    "data/group_ids": "the consumed groups' ids (nothing lost or trained twice, across resumes)",
    "data/sample_ids": "the consumed groups' prompt rows",
}


def _schema_key(key: str) -> str:
    """The STEP_METRICS entry `key` falls under."""
    if key.startswith("train/"):
        return "train/*"
    if key.startswith("reward/failures_"):
        return "reward/failures_<kind>"
    if key.startswith("weights/pause_s_total_rollout"):
        return "weights/pause_s_total_rollout<N>"
    return key


def undeclared(keys) -> list[str]:
    """Keys of a row that STEP_METRICS does not declare."""
    return sorted(k for k in keys if _schema_key(k) not in STEP_METRICS)


class MetricsSink:
    """Appends one JSON line per step to run_dir/metrics.jsonl and mirrors it to wandb.

    `on_disk(step)` is a Future that resolves once the row of `step` is written and fsynced: a
    checkpoint of step N commits only after it, so a resumed run never misses a row. A resumed
    run passes the wandb run id it had, and wandb continues that run.
    """

    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict, wandb_id: str | None = None):
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        self._wandb = None
        self.wandb_id = wandb_id
        self._written = -1
        self._waiters: list[tuple[int, Future]] = []
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        if cfg.wandb.mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self._wandb = wandb.init(
                    project=cfg.wandb.project,
                    name=cfg.wandb.name or run_dir.name,
                    dir=str(run_dir),
                    mode=cfg.wandb.mode,
                    config=config_dict,
                    reinit="finish_previous",
                    id=wandb_id,
                    resume="allow" if wandb_id else None,
                )
                self.wandb_id = self._wandb.id
            except Exception as e:  # logging must never stop training
                log.warning("wandb disabled: %s", e)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        for key in undeclared(k for k in record if k not in self._warned):
            self._warned.add(key)
            log.warning("metric %r is not declared in areal.metrics.STEP_METRICS", key)
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        with self._lock:
            self._written = step
            due = [f for s, f in self._waiters if s <= step]
            self._waiters = [(s, f) for s, f in self._waiters if s > step]
        if due:
            self._file.flush()
            os.fsync(self._file.fileno())
            for f in due:
                f.set_result({})

    def on_disk(self, step: int) -> Future:
        """Resolves (with {}) once the row of `step` is written and fsynced."""
        future: Future = Future()
        with self._lock:
            if self._written < step:
                self._waiters.append((step, future))
                return future
        self._file.flush()
        os.fsync(self._file.fileno())
        future.set_result({})
        return future

    def close(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for step, future in waiters:  # a checkpoint waiting for these rows must fail, not hang
            future.set_exception(RuntimeError(f"metrics closed before the row of step {step} was written"))
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
