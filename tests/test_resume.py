"""Crash anywhere, rerun the same command, lose nothing: real processes killed with SIGKILL at
seeded points, pre-empted with SIGTERM, failing to write, or resuming a corrupt checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from areal.checkpoint.resume import changed_keys, place_run
from areal.config import ConfigError, build, to_dict
from areal.metrics import read_metrics
from areal.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
SMALL = [
    f"trainer.steps={STEPS}", "trainer.batch_size=4", "rollout.group_size=4", "data.eval_size=16", "run.eval_every=4",
    "logging.wandb.mode=disabled", "logging.progress_bar=false", "run.num_threads=1", "trainer.lr=1e-4",
    "checkpoint.every_steps=2", "checkpoint.on_busy=wait", "rollout.max_new_tokens=6",
]
MODES = {
    "sync": ["run.mode=sync"],
    "eta0": ["run.mode=async", "rollout.max_staleness=0"],  # deterministic: equal to the sync loop
    "eta1": ["run.mode=async", "rollout.max_staleness=1"],
}
REFERENCE_OF = {"sync": "sync", "eta0": "eta0"}  # deterministic modes


def areal_train(run_dir: Path, *extra: str, fault: str | None = None, timeout: float = 240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("AREAL_FAULT", None)
    env.pop("WANDB_MODE", None)  # the recipe's logging.wandb.mode decides
    if fault:
        env["AREAL_FAULT"] = fault
    cmd = [sys.executable, "-m", "areal.train", "recipe=recipes/math.yaml", *SMALL, f"run.run_dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def consumed(run_dir: Path) -> list[int]:
    return [g for r in rows(run_dir)[1:] for g in r["data/group_ids"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per mode, computed once."""
    out = {}
    for mode in ("sync", "eta0"):
        run_dir = tmp_path_factory.mktemp("ref") / mode
        done = areal_train(run_dir, *MODES[mode])
        assert done.returncode == 0, done.stderr[-3000:]
        out[mode] = run_dir
    return out


def _assert_finished_whole(run_dir: Path, mode: str, reference: dict | None) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = rows(run_dir)
    assert [r["step"] for r in records] == list(range(STEPS + 1)), "a metrics row is missing or doubled"
    ids = consumed(run_dir)
    assert len(ids) == len(set(ids)) == STEPS * 4, "a group was trained twice or a step took too few"
    if mode in REFERENCE_OF:  # deterministic: the resumed run is the uninterrupted run, step for step
        ref_dir = reference[REFERENCE_OF[mode]]
        ref = rows(ref_dir)
        assert ids == consumed(ref_dir)
        assert [r["data/sample_ids"] for r in records[1:]] == [r["data/sample_ids"] for r in ref[1:]]
        for key in ("train/loss", "reward/mean", "train/grad_norm", "rollout/response_length"):
            assert [r[key] for r in records[1:]] == pytest.approx([r[key] for r in ref[1:]], rel=1e-4, abs=1e-6), key
        assert summary["eval_accuracy_final"] == json.loads((ref_dir / "summary.json").read_text())[
            "eval_accuracy_final"]
    else:  # eta > 0: timing decides which groups a step takes, never that one is lost
        holes = set(range(max(ids))) - set(ids)
        assert all(h >= max(ids) - 2 * 2 * 4 for h in holes), f"groups lost: {sorted(holes)}"
    assert (run_dir / "model" / "config.json").is_file()
    return summary


# (mode, the kills: fault point, range of hit counts, seed of the draw that picks one): generation, the
# persist, a write, and between the rename and the `latest` swap; trainer and worker. Every phase that touches
# the disk is crashed once in a full run (the in-memory snapshot copy leaves the disk as a crash in the update
# does); the store and the lazy checkpointer also fail each phase, the copy included, in
# tests/test_checkpoint_store.py and tests/test_checkpoint_lazy.py. A kill in the update is
# test_a_run_killed_in_the_update_..._same_wandb_run's (sync) and, with ZeRO-2 over two trainer ranks,
# tests/test_roles.py's test_two_zero2_ranks_checkpoint_their_shards_and_resume_exactly (DeepSpeed computing
# what torch does is tests/test_deepspeed.py's).
CRASHES = [
    ("sync", [("ckpt.rename", (2, 3), 1001)]),
    ("eta0", [("rollout.step", (10, 35), 1002)]),
    # the trainer's two checkpoint phases in one run (one process fewer): killed in a write of checkpoint 2 or
    # 4, the rerun resumes and is killed in turn persisting the first or second checkpoint it writes (a run
    # checkpoints steps 2, 4 and 6 of 8)
    ("eta0", [("ckpt.write", (3, 7), 1004), ("ckpt.persist", (1, 2), 1003)]),
    ("eta1", [("rollout.step", (10, 35), 1005)]),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode, kills", CRASHES, ids=[f"{m}-{'-'.join(p for p, _, _ in k)}" for m, k in CRASHES])
def test_kill_9_anywhere_then_rerun_finishes_with_nothing_lost(tmp_path, reference, mode, kills):
    run_dir = tmp_path / "run"
    # async: the controller replaces a killed rollout worker and the run goes on (tests/test_roles.py);
    # without restarts, losing the only worker ends the run mid-generation, which is the case here
    extra = ["rollout.max_restarts=0"] if "rollout.step" in [p for p, _, _ in kills] and mode != "sync" else []
    for i, (point, hits, seed) in enumerate(kills):
        hit = random.Random(seed).randint(*hits)
        crashed = areal_train(run_dir, *MODES[mode], *extra, fault=f"{point}@{hit}:kill")
        assert crashed.returncode != 0, f"the fault {point}@{hit} never fired:\n{crashed.stderr[-2000:]}"
        assert not (run_dir / "summary.json").exists()
        if i:  # a rerun of the killed run: it resumed before it was killed in turn
            assert "resumed from step" in crashed.stdout + crashed.stderr, crashed.stdout[-2000:]
    resumed = areal_train(run_dir, *MODES[mode], *extra)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _assert_finished_whole(run_dir, mode, reference)
    print(f"{mode} {kills}: resumed from step {summary['resumed_from_step']}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "eta0"])
def test_sigterm_commits_a_checkpoint_exits_75_and_the_rerun_resumes_from_it(tmp_path, reference, mode):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("AREAL_FAULT", None)
    cmd = [sys.executable, "-m", "areal.train", "recipe=recipes/math.yaml", *SMALL, f"run.run_dir={run_dir}",
           *MODES[mode], "checkpoint.every_steps=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait for step 3's row, then pre-empt
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(r["step"] >= 3 for r in read_metrics(metrics)):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "pre-empted: checkpoint of step" in err
    committed = sorted(p.name for p in (run_dir / "ckpt").iterdir() if p.name.startswith("step_") and "tmp" not in p.name)
    assert len(committed) == 1
    step = int(committed[0].split("_")[1])
    resumed = areal_train(run_dir, *MODES[mode], "checkpoint.every_steps=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _assert_finished_whole(run_dir, mode, reference)
    assert summary["resumed_from_step"] == step


@pytest.mark.slow
def test_a_failed_write_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    # 4 writes per checkpoint (shard, rank entry, state, manifest): the 5th is the second checkpoint's first
    done = areal_train(run_dir, "run.mode=sync", fault="ckpt.write@5:enospc")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["checkpoint_failures"] == 1 and summary["checkpoints"] == 2  # steps 2 and 6 (4 failed)
    assert "No space left on device" in done.stderr
    assert [r["step"] for r in rows(run_dir)] == list(range(STEPS + 1))
    from areal.checkpoint import store

    found, skipped = store.find_latest(run_dir / "ckpt")
    assert found is not None and found.name == "step_00000006" and not skipped
    assert not list((run_dir / "ckpt").glob("*.tmp"))
    failed = [r for r in rows(run_dir) if r.get("ckpt/ok") == 0.0]
    assert [r["ckpt/step"] for r in failed] == [4]


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_skipped_by_name_and_the_older_one_resumes(tmp_path, reference):
    run_dir = tmp_path / "run"
    crashed = areal_train(run_dir, "run.mode=sync", fault="trainer.update@27:kill")  # in step 7
    assert crashed.returncode != 0
    # checkpoint 6 is persisted in the background while step 7 runs: whether it committed before the kill is
    # timing, so the newest committed one is corrupted, whichever it is
    committed = sorted(p for p in (run_dir / "ckpt").glob("step_*") if p.is_dir() and p.suffix != ".tmp")
    newest, older = committed[-1], committed[-2]
    shard = next(newest.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = areal_train(run_dir, "run.mode=sync")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert shard.name in resumed.stderr and newest.name in resumed.stderr
    summary = _assert_finished_whole(run_dir, "sync", reference)
    assert summary["resumed_from_step"] == int(older.name.split("_")[1])


def test_mutable_keys_may_change_and_others_are_listed():
    a = to_dict(build(Recipe, "recipes/math.yaml"))
    b = to_dict(build(Recipe, "recipes/math.yaml", ["trainer.steps=999", "logging.console_every=1", "run.eval_every=7",
                                                    "checkpoint.every_steps=3", "rollout.num_workers=2"]))
    assert changed_keys(a, b) == []
    c = to_dict(build(Recipe, "recipes/math.yaml", ["rollout.max_staleness=3", "model.path=elsewhere"]))
    assert changed_keys(a, c) == ["model.path", "rollout.max_staleness"]


def test_resume_must_without_a_checkpoint_fails_clearly(tmp_path):
    cfg = to_dict(build(Recipe, "recipes/math.yaml"))
    with pytest.raises(ConfigError, match="checkpoint.resume=must"):
        place_run(cfg, str(tmp_path / "nothing"), "recipes/math.yaml", "must")
    (tmp_path / "started").mkdir()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        place_run(cfg, str(tmp_path / "started"), "recipes/math.yaml", "must")
    fresh = place_run(cfg, str(tmp_path / "started"), "recipes/math.yaml", "auto")
    assert fresh.checkpoint is None and fresh.run_dir == tmp_path / "started"


@pytest.mark.slow
def test_a_run_killed_in_the_update_refuses_a_changed_recipe_then_resumes_exactly_into_the_same_wandb_run(
        tmp_path, reference):
    """A kill -9 in the update (sync), then two reruns: a changed recipe fails before any work and names the
    keys; the same command resumes, equal to the uninterrupted run, into the same wandb run."""
    run_dir, wandb = tmp_path / "run", "logging.wandb.mode=offline"
    # killed in step 6 (4 updates a step): checkpoint 4 waited for checkpoint 2 (on_busy=wait), so one is committed
    # however slowly this machine persists them
    crashed = areal_train(run_dir, "run.mode=sync", wandb, fault="trainer.update@22:kill")
    assert crashed.returncode != 0, f"the fault never fired:\n{crashed.stderr[-2000:]}"
    assert not (run_dir / "summary.json").exists()

    changed = areal_train(run_dir, "run.mode=sync", wandb, "rollout.group_size=8", "trainer.lr=2e-4")
    assert changed.returncode == 2
    assert "rollout.group_size" in changed.stderr and "trainer.lr" in changed.stderr
    assert "Traceback" not in changed.stderr

    resumed = areal_train(run_dir, "run.mode=sync", wandb)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _assert_finished_whole(run_dir, "sync", reference)
    assert summary["resumed_from_step"] in (2, 4)
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # one folder per process that trained, both the same wandb run
    assert len({p.name.rsplit("-", 1)[1] for p in runs}) == 1
