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
