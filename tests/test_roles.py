"""The process model: roles started from plain-data specs, several trainer ranks, rollout workers that
die or stop answering. Every run here is real: a controller, its hub, and one process per role."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from areal.controller import RoleFailed
from areal.data import DataError
from areal.launchers.local import role_pids
from areal.metrics import read_metrics, undeclared
from areal.role import RoleSpec
from areal.train import train

from test_async_pipeline import recipe as small_recipe


def recipe(tmp_path, name, *extra):
    return small_recipe(tmp_path, name, "run.mode=async", *extra)


def _ledger_holds(summary: dict) -> None:
    buf, adm = summary["buffer"], summary["admission"]
    assert adm["admitted_total"] == buf["put"] + adm["running"] + adm["aborted_total"]
    assert buf["put"] == buf["consumed"] + sum(buf["filtered"].values()) + buf["held_groups"]


def _consumed_ids(run_dir: Path) -> list[int]:
    return [g for r in read_metrics(run_dir / "metrics.jsonl")[1:] for g in r["data/group_ids"]]


def test_a_role_spec_is_plain_json_and_a_bad_one_is_one_line(tmp_path):
    spec = RoleSpec("rollout", 1, {"run": {"seed": 3}}, str(tmp_path), "tcp://127.0.0.1:5555", incarnation=2)
    assert RoleSpec.from_json(spec.to_json()) == spec and spec.name == "rollout1"
    path = spec.write(tmp_path / "spec.json")
    assert os.stat(path).st_mode & 0o077 == 0  # it may hold the run secret
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"role": "janitor", "rank": 0, "recipe": {}, "run_dir": "x", "hub": "tcp://x:1"}))
    out = subprocess.run([sys.executable, "-m", "areal.role", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "role must be one of" in out.stderr


@pytest.mark.slow
def test_bad_data_found_by_the_trainer_process_is_one_clear_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "1+1=", "answer": "2"}\n')  # no prompt column
    with pytest.raises(DataError, match=r"column '.*' not in .*rows.jsonl"):
        train(recipe(tmp_path, "bad", f"data.train_path={rows}", "trainer.steps=2"))
    assert not (tmp_path / "bad").exists()  # the run gets its folder only once every input is valid


@pytest.mark.slow
def test_both_rollout_workers_killed_mid_run_lose_nothing_and_are_replaced(tmp_path, monkeypatch):
    # seeded generation steps of the workers' first processes; their replacements run clean. With both
    # killed, the run goes on only once a replacement has joined: the rejoin is certain, not a race. (One
    # worker of two lost and replaced while the other serves is test_a_silent_rollout_worker_is_named_and_replaced.)
    # Both die within their first few generation steps: 12 steps leave most of the run to the replacements.
    killed, steps = ("rollout0", "rollout1"), 12
    rng = random.Random(len(killed))
    monkeypatch.setenv("AREAL_FAULT", ",".join(f"{w}.0/rollout.step@{rng.randint(5, 25)}:kill" for w in killed))
    result = train(recipe(tmp_path, "kill2", "rollout.num_workers=2", "rollout.max_staleness=1",
                          f"trainer.steps={steps}", f"run.eval_every={steps // 2}", "checkpoint.every_steps=3"))
    s = result.summary
    assert s["steps"] == steps and s["rollout_workers_lost"] == len(killed)
    _ledger_holds(s)
    ids = _consumed_ids(result.run_dir)
    assert len(ids) == len(set(ids)) == steps * 4  # nothing trained twice, every step full
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["eval/step"] for r in rows if "eval/accuracy" in r] == [0, steps // 2, steps]
    # the replacements rejoined the fleet and the weight group, and served the last steps
    all_lost_at = next(i for i, r in enumerate(rows) if r.get("rollout/workers_lost") == 2)
    assert any(r["rollout/live_workers"] >= 1 for r in rows[all_lost_at:])
    # formed, then re-formed with a replacement in it (a group "without them" forms in between only when
    # the trainer publishes while both are gone: timing decides, so it is not asserted)
    assert rows[-1]["weights/groups_formed"] >= 2


@pytest.mark.slow
def test_the_only_worker_killed_during_the_first_evaluation_is_replaced_and_the_run_finishes(tmp_path, monkeypatch):
    # while no worker is live, its prompts and its evaluation shard wait for the replacement
    monkeypatch.setenv("AREAL_FAULT", "rollout0.0/rollout.step@3:kill")
    result = train(recipe(tmp_path, "only", "rollout.max_staleness=0", "trainer.steps=4", "run.eval_every=4"))
    assert result.summary["rollout_workers_lost"] == 1
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["eval/step"] for r in rows if "eval/accuracy" in r] == [0, 4]
    ids = _consumed_ids(result.run_dir)
    assert len(ids) == len(set(ids)) == 4 * 4
    _ledger_holds(result.summary)


@pytest.mark.slow
def test_without_restarts_the_run_finishes_on_the_workers_left(tmp_path, monkeypatch):
    monkeypatch.setenv("AREAL_FAULT", "rollout1/rollout.step@10:kill")
    result = train(recipe(tmp_path, "norestart", "rollout.num_workers=2", "rollout.max_restarts=0",
                          "trainer.steps=5", "run.eval_every=5"))
    # the step rows may be written before trainer0 hears of the loss; the summary is written after it
    assert result.summary["rollout_workers_lost"] == 1
    assert result.summary["rollout_workers_live"] == 1
    ids = _consumed_ids(result.run_dir)
    assert len(ids) == len(set(ids)) == 5 * 4
    _ledger_holds(result.summary)


def _role_pids(name: str) -> list[int]:
    """Processes of this test's run playing `name` (e.g. rollout1.0): the controller is this process."""
    return role_pids(os.getpid(), name)


def _stop_role_when_running(run_dir: Path, name: str, after_steps: int) -> threading.Thread:
    def stop():
        deadline = time.time() + 120
        while time.time() < deadline:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) > after_steps:
                for pid in _role_pids(name):
                    os.kill(pid, signal.SIGSTOP)  # alive, but silent: no heartbeat, no answer
                return
            time.sleep(0.2)

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_silent_rollout_worker_is_named_and_replaced(tmp_path, capsys):
    run_dir = tmp_path / "silent_worker"
    stopper = _stop_role_when_running(run_dir, "rollout1.0", after_steps=2)
    result = train(recipe(tmp_path, "silent_worker", "rollout.num_workers=2", "run.role_timeout_s=3",
                          "trainer.steps=8", "run.eval_every=8"))
    stopper.join()
    assert result.summary["rollout_workers_lost"] == 1
    printed = capsys.readouterr()
    said = (printed.out + printed.err).replace("\n", " ")
    assert "rollout worker 'rollout1' stopped answering" in said and "restarting it" in said
    # also the case of one worker of two lost mid-run and replaced, the other serving meanwhile: nothing lost
    ids = _consumed_ids(result.run_dir)
    assert len(ids) == len(set(ids)) == 8 * 4
    _ledger_holds(result.summary)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["eval/step"] for r in rows if "eval/accuracy" in r] == [0, 8]


@pytest.mark.slow
def test_a_silent_trainer_rank_ends_the_run_with_its_name(tmp_path):
    run_dir = tmp_path / "silent_trainer"
    stopper = _stop_role_when_running(run_dir, "trainer1.0", after_steps=1)
    t0 = time.time()
    with pytest.raises(RoleFailed, match=r"role 'trainer1' stopped answering \(nothing heard for"):
        train(recipe(tmp_path, "silent_trainer", "trainer.world_size=2", "run.role_timeout_s=3",
                     "trainer.steps=200", "checkpoint.every_steps=0"))
    stopper.join()
    assert time.time() - t0 < 120
    time.sleep(1.0)
    assert _role_pids("trainer1.0") == [] and _role_pids("trainer0.0") == []


# eta=0: deterministic, so runs of several trainer ranks, of ZeRO-2 and of a resumed crash compute what one rank does
DETERMINISTIC = ["rollout.max_staleness=0", "trainer.steps=6", "run.eval_every=6", "trainer.max_tokens_per_microbatch=64"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """One torch trainer rank and one worker, uninterrupted: the run the tests below must equal (run once)."""
    return train(recipe(tmp_path_factory.mktemp("one_rank"), "one", *DETERMINISTIC))


@pytest.mark.slow
def test_two_trainer_ranks_and_two_workers_match_one_rank_in_deterministic_mode(tmp_path, one_rank):
    one = one_rank
    two = train(recipe(tmp_path, "two", "trainer.world_size=2", "rollout.num_workers=2", *DETERMINISTIC))
    a, b = read_metrics(one.run_dir / "metrics.jsonl")[1:], read_metrics(two.run_dir / "metrics.jsonl")[1:]
    assert [r["data/group_ids"] for r in a] == [r["data/group_ids"] for r in b]
    for key in ("reward/mean", "rollout/response_length", "train/loss", "train/grad_norm", "train/entropy",
                "train/num_valid_tokens"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key
    assert two.summary["trainer_ranks"] == 2
    evals = [r for r in read_metrics(two.run_dir / "metrics.jsonl") if "eval/accuracy" in r]
    assert [(r["eval/step"], r["eval/num_prompts"]) for r in evals] == [(0, 16), (6, 16)]  # two shards, merged
    assert {"weights/pause_s_total_rollout0", "weights/pause_s_total_rollout1"} <= set(b[-1])  # both reported
    assert undeclared({k for r in a + b for k in r}) == []  # every key has its meaning in the one schema
    assert one.summary["eval_accuracy_final"] == two.summary["eval_accuracy_final"]


@pytest.mark.slow
def test_two_zero2_ranks_checkpoint_their_shards_and_resume_exactly(tmp_path, monkeypatch, one_rank):
    common = ["trainer.backend=deepspeed", "trainer.zero_stage=2", "trainer.world_size=2", *DETERMINISTIC,
              "checkpoint.every_steps=2"]
    # trainer0 dies in step 5's update (4 minibatch updates per step): checkpoints 2 and 4 hold two shards each
    monkeypatch.setenv("AREAL_FAULT", "trainer0.0/trainer.update@19:kill")
    with pytest.raises(RoleFailed, match="trainer"):  # trainer0 died, or trainer1 lost it mid-collective
        train(recipe(tmp_path, "crashed", *common))
    monkeypatch.delenv("AREAL_FAULT")
    latest = sorted((tmp_path / "crashed" / "ckpt").glob("step_*[0-9]"))[-1]
    assert {p.name for p in latest.glob("rank*.safetensors")} == {"rank00000.safetensors", "rank00001.safetensors"}
    resumed = train(recipe(tmp_path, "crashed", *common))  # the same command
    assert resumed.summary["resumed_from_step"] in (2, 4)
    # equal to the uninterrupted run of one torch rank (ZeRO-2 over two ranks computes what one process does:
    # tests/test_deepspeed.py)
    a, b = read_metrics(one_rank.run_dir / "metrics.jsonl")[1:], read_metrics(resumed.run_dir / "metrics.jsonl")[1:]
    assert [r["data/group_ids"] for r in a] == [r["data/group_ids"] for r in b]
    for key in ("train/loss", "train/grad_norm", "reward/mean"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key


def test_a_role_leaves_what_it_loaded_out_of_the_garbage_collectors_passes():
    # full passes over torch's and transformers' objects paused roles 0.2-0.3 s a few times a run
    code = """
import gc
import torch  # what a role has loaded before its loop
from areal.runtime import freeze_startup_objects
loaded = [[i] for i in range(1000)]
freeze_startup_objects()
made_later = [[1]]
tracked = {id(o) for o in gc.get_objects()}
assert id(loaded) not in tracked and id(torch.nn.Module) not in tracked, "startup objects still scanned"
assert id(made_later) in tracked, "new objects must still be collected"
assert gc.get_freeze_count() > 10000
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
