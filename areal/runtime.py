"""Process-wide setup: threads, seeds, device and the run folder."""

from __future__ import annotations

import base64
import os
import random
import time
from pathlib import Path

import torch


def set_threads(num_threads: int) -> int:
    """Set torch's intra-op threads; on small CPUs this dominates small-model speed."""
    n = num_threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def freeze_startup_objects() -> None:
    """Call once a process has loaded what it keeps for the run (imports, model, data), before its loop:
    the collector's full passes then skip those objects. Each pass over torch's and transformers'
    hundreds of thousands of objects paused a role for 0.2-0.3 s a few times a run, and a paused rollout
    worker paused the trainer waiting for its batch."""
    import gc

    gc.collect()
    gc.freeze()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's python and torch CPU generators, JSON-able (checkpoints keep every process's)."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss],
            "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_cpu"])), dtype=torch.uint8))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from areal.config import ConfigError

        raise ConfigError("run.device: cuda, but no CUDA device is available here (run.device=auto uses one when "
                          "there is)")
    return torch.device(name)


def make_run_dir(run_dir: str, recipe_path: str | None) -> Path:
    if not run_dir:
        name = Path(recipe_path).stem if recipe_path else "default"
        run_dir = f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(run_dir)
    suffix = 1
    while (path / "summary.json").exists() or (path / "metrics.jsonl").exists():
        path = Path(f"{run_dir}-{suffix}")  # never append to or overwrite an earlier run
        suffix += 1
    path.mkdir(parents=True, exist_ok=True)
    return path
