"""Where a run writes, and what it resumes from.

`checkpoint.resume`:
    auto   continue the newest complete checkpoint of this run, else start fresh
    never  always start fresh (a new run folder)
    must   fail, before any work, when there is nothing to resume

"This run" is `run.run_dir` when it is set. When it is not, it is the newest *unfinished*
run of the same recipe under `runs/` (no summary.json, a complete checkpoint, a compatible
config), so rerunning the command that was killed continues it. A finished run is never
touched: a new folder is made beside it.

A checkpoint only continues under the recipe that made it, up to the keys in `MUTABLE`
(how long to train, logging, evaluation, checkpointing, process counts and memory knobs).
Any other change (model, data, group size, eta, learning rate, ...) would silently mix two
experiments, so it fails before any work and lists the keys.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from areal.checkpoint import store
from areal.config import ConfigError

log = logging.getLogger("areal")

MUTABLE = (
    "trainer.steps", "logging.", "checkpoint.", "run.run_dir", "run.eval_every", "run.num_threads",
    "run.trainer_threads", "data.test_path", "data.test_split", "data.eval_size", "rollout.eval_max_new_tokens",
    "rollout.num_workers", "rollout.threads_per_worker", "rollout.kv_blocks", "rollout.batch_size",
    "reward.num_workers", "reward.timeout_s", "reward.max_logged_failures", "buffer.capacity_groups",
    "rollout.max_restarts", "run.role_timeout_s", "trainer.world_size", "launcher.",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two recipe dicts, ignoring the MUTABLE ones."""
    a, b = _flat(saved), _flat(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == m or (m.endswith(".") and k.startswith(m))
                                                                  for m in MUTABLE)]


@dataclass
class RunPlace:
    run_dir: Path
    checkpoint: Path | None  # the checkpoint to resume from, or None for a fresh start


def _candidate(run_dir: Path, config: dict) -> tuple[Path | None, str]:
    """(checkpoint, why-not) for one run folder."""
    if (run_dir / "summary.json").exists():
        return None, "finished"
    found, skipped = store.find_latest(run_dir / "ckpt")
    for path, reason in skipped:
        log.warning("checkpoint %s skipped: %s", path, reason)
    if found is None:  # each refused one named with its reason (e.g. a file holding a pickle), on one line
        refused = "; ".join(f"{path.name}: {' '.join(reason.split())}" for path, reason in skipped)
        return None, "no complete checkpoint" + (f" ({refused})" if refused else "")
    saved = json.loads((found / store.STATE).read_text()).get("config", {})  # verified by find_latest
    bad = changed_keys(saved, config)
    if bad:
        return None, "recipe differs in " + ", ".join(f"{k} ({_flat(saved).get(k)!r} -> {_flat(config).get(k)!r})"
                                                       for k in bad)
    return found, ""


def place_run(config: dict, run_dir_key: str, recipe_path: str | None, mode: str) -> RunPlace:
    """Decide the run folder and the checkpoint to resume from (see the module docstring)."""
    from areal.runtime import make_run_dir

    if mode == "never":
        return RunPlace(make_run_dir(run_dir_key, recipe_path), None)
    if run_dir_key:
        explicit = Path(run_dir_key)
        if explicit.is_dir() and not (explicit / "summary.json").exists():
            found, why = _candidate(explicit, config)
            if found is not None:
                return RunPlace(explicit, found)
            if why.startswith("recipe differs"):
                raise ConfigError(f"cannot resume {explicit}: {why}; use another run.run_dir or checkpoint.resume=never")
            if mode == "must":  # `why` names every checkpoint refused, and why
                refused = why.removeprefix("no complete checkpoint")
                raise ConfigError(f"checkpoint.resume=must: no complete checkpoint in {explicit / 'ckpt'}{refused}")
            _clear_unfinished(explicit)  # killed before its first checkpoint: nothing to keep but a false start
            return RunPlace(explicit, None)
        if mode == "must":
            raise ConfigError(f"checkpoint.resume=must: {explicit} " + ("already finished" if explicit.is_dir()
                                                                      else "does not exist"))
        return RunPlace(make_run_dir(run_dir_key, recipe_path), None)
    name = Path(recipe_path).stem if recipe_path else "default"
    runs = sorted(Path("runs").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in runs:
        if not candidate.is_dir() or (candidate / "summary.json").exists() or not (candidate / "ckpt").is_dir():
            continue
        found, why = _candidate(candidate, config)
        if found is not None:
            return RunPlace(candidate, found)
        log.info("not resuming %s: %s", candidate, why)
    if mode == "must":
        raise ConfigError(f"checkpoint.resume=must: no unfinished run of recipe '{name}' with a compatible checkpoint "
                          f"under runs/ (set run.run_dir to choose one)")
    return RunPlace(make_run_dir(run_dir_key, recipe_path), None)


def _clear_unfinished(run_dir: Path) -> None:
    """An unfinished run without any checkpoint restarts from step 0: its partial metrics would
    otherwise be appended to."""
    for name in ("metrics.jsonl", "report.png"):
        (run_dir / name).unlink(missing_ok=True)
