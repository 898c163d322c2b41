"""One run's checkpoints: when they fall due, what goes in them, and how a run comes back from one.

A checkpoint at step N is a consistent cut of the whole run right after update N:
    trainer    policy, optimizer, LR schedule, critic (LIVE tensors: copied lazily, see lazy.py)
    rng        the trainer process's python and torch generators
    loop       the data position and what the loop holds: sync mode the sampler; async mode also
               the admission counters, the buffer's finished groups, and every rollout still in
               flight or in transit (reported by the workers, areal/async_loop.py:AsyncLoop.capture)
    drive      metrics continuity: generated tokens, the wall clock, the wandb run id
The metrics rows up to N are on disk before the checkpoint commits, so a resumed run truncates
metrics.jsonl to step N and appends from N + 1: no step is missing or doubled.

Pre-emption: SIGTERM or SIGUSR1 asks for a checkpoint at the end of the current step; once it
is committed the run exits with PREEMPTED_EXIT_CODE, and the same command resumes it.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from areal import faults
from areal.checkpoint import store
from areal.checkpoint.config import CheckpointConfig
from areal.checkpoint.lazy import LazyCheckpointer
from areal.metrics import read_metrics
from areal.runtime import rng_state, set_rng_state

log = logging.getLogger("areal")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — the rerun resumes from the committed checkpoint


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGUSR1 after committing checkpoint `step`."""

    def __init__(self, step: int, path: str | None):
        super().__init__(f"pre-empted: checkpoint of step {step} committed at {path}; rerun the command to resume")
        self.step, self.path = step, path


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (handlers installed from the main thread of the process that trains)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: dict = {}

    def install(self) -> "PreemptionFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __bool__(self) -> bool:
        return self.event.is_set()


@dataclass
class Restored:
    """What a resumed run continues from."""

    step: int
    path: Path
    state: dict  # state.json: config, trainer meta, rng, loop, drive, rollout (async)
    tensors: dict[str, torch.Tensor]


def load_checkpoint(path: Path, rank: int = 0) -> Restored:
    """Checkpoint `path` as trainer rank `rank` sees it: the run's state and that rank's tensors."""
    ckpt = store.load(path, ranks=[rank])
    return Restored(ckpt.step, ckpt.path, ckpt.state, ckpt.tensors[rank])


def truncate_metrics(run_dir: Path, step: int) -> list[dict]:
    """Keep the rows of steps <= `step` (written before the checkpoint committed); return them."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return kept


class CheckpointSession:
    """The run's checkpoint policy around a `LazyCheckpointer`. Rank 0 decides when; with ZeRO over several
    trainer ranks (`world_size` > 1) every rank writes its own shard of the same checkpoint when told."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, engine, config: dict, tokenizer, *, rank: int = 0,
                 world_size: int = 1):
        self.cfg, self.run_dir, self.engine, self.config, self.tokenizer = cfg, run_dir, engine, config, tokenizer
        # another rank writes whatever rank 0 started: it must never skip a step rank 0 saves
        self.checkpointer = LazyCheckpointer(run_dir / "ckpt", keep_last=cfg.keep_last,
                                             on_busy=cfg.on_busy if rank == 0 else "wait", rank=rank,
                                             world_size=world_size, config_hash=store.config_hash(config), log=log)
        engine.set_before_step(self._before_update)
        self.preempt = PreemptionFlag()
        self.on_export = None  # out_dir -> None: tells the other trainer ranks to join the export
        # (step, wait) -> futures of state to add: tells the other trainer ranks to write their shards
        self.on_save = None
        self._last_save = time.monotonic()
        # committed checkpoints' totals (folded in as they finish: a list of them would grow all run long)
        self.committed, self._blocked_s_max, self._persist_s_sum, self._last_bytes = 0, 0.0, 0.0, 0

    def _before_update(self) -> None:
        faults.hit("trainer.update")
        self.checkpointer.before_update()

    def due(self, step: int, last_step: int) -> bool:
        cfg = self.cfg
        if step >= last_step:
            return False  # the end of the run exports the model; a checkpoint there would only be deleted
        by_steps = cfg.every_steps > 0 and step % cfg.every_steps == 0
        by_time = cfg.every_seconds > 0 and time.monotonic() - self._last_save >= cfg.every_seconds
        return by_steps or by_time

    def busy(self) -> bool:
        return self.checkpointer.busy

    def wait_idle(self) -> None:
        """Until the checkpoint in flight (its rollout side included) is committed or failed."""
        self.checkpointer.wait()

    def skip(self, step: int) -> None:
        """A checkpoint fell due while the previous one is still being written (checkpoint.on_busy=skip)."""
        self.checkpointer.skip(step)

    def path_of(self, step: int) -> Path:
        return store.step_dir(self.checkpointer.directory, step)

    def export(self, out_dir: Path) -> None:
        """The policy as a Hugging Face model folder (every rank calls it; rank 0 writes)."""
        from areal.checkpoint.export import export_model

        t0 = time.perf_counter()
        if self.on_export is not None:
            self.on_export(out_dir)
        export_model(self.engine, out_dir, self.tokenizer)
        log.info("exported the policy to %s in %.2f s", out_dir, time.perf_counter() - t0)

    def save(self, step: int, loop_state: dict, extras: list[Future] = (), *, wait: bool = False) -> bool:
        """Start checkpoint `step` (returns at once unless `wait`); False when skipped."""
        if self.on_save is not None:
            extras = [*extras, *self.on_save(step, wait)]
        tensors, meta = self.engine.checkpoint_state()
        state = {"step": step, "config": self.config, "trainer": meta, "rng": rng_state(), **loop_state}
        self._last_save = time.monotonic()
        return self.checkpointer.save(step, tensors, state, extras=list(extras), wait=wait)

    def metrics(self) -> dict:
        """ckpt/* metrics of the checkpoints finished since the last call (for the step's row)."""
        out: dict = {}
        for r in self.checkpointer.records():
            if r.ok:
                self.committed += 1
                self._blocked_s_max = max(self._blocked_s_max, r.blocked_s)
                self._persist_s_sum += r.persist_s
                self._last_bytes = r.bytes
            out.update({"ckpt/step": r.step, "ckpt/ok": float(r.ok), "ckpt/bytes": r.bytes,
                        "ckpt/blocked_s": r.blocked_s, "ckpt/snapshot_s": r.snapshot_s, "ckpt/persist_s": r.persist_s})
        out["ckpt/skipped"] = self.checkpointer.skipped
        out["ckpt/failures"] = self.checkpointer.failures
        return out

    def summary(self) -> dict:
        """Totals over the run; waits for the checkpoint in flight, so the last one is counted too."""
        self.checkpointer.wait()
        self.metrics()  # records finished since the last step's row
        return {
            "checkpoints": self.committed,
            "checkpoint_skipped": self.checkpointer.skipped,
            "checkpoint_failures": self.checkpointer.failures,
            "checkpoint_blocked_s_max": self._blocked_s_max,
            "checkpoint_persist_s_mean": self._persist_s_sum / self.committed if self.committed else 0.0,
            "checkpoint_bytes": self._last_bytes,
        }

    def restore_trainer(self, restored: Restored) -> None:
        self.engine.load_checkpoint_state(restored.tensors, restored.state["trainer"])
        set_rng_state(restored.state["rng"])

    def close(self) -> None:
        self.checkpointer.wait()
        self.checkpointer.close()
