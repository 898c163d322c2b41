"""The asynchronous pipeline end to end: eta=0 parity with the sync loop, the staleness bound,
accounting of every group, and failures that surface instead of hanging."""

import pytest

from areal.config import ConfigError, build
from areal.train import train
from areal.metrics import read_metrics, undeclared
from areal.recipe import Recipe

SMALL = [
    "trainer.batch_size=4", "rollout.group_size=4", "data.eval_size=16", "rollout.backend=engine",
    "logging.wandb.mode=disabled", "logging.progress_bar=false", "run.num_threads=1", "run.trainer_threads=1",
    "trainer.lr=1e-4",
]


def recipe(tmp_path, name, *extra):
    return build(Recipe, "recipes/math.yaml", [*SMALL, f"run.run_dir={tmp_path / name}", *extra])


@pytest.mark.slow
def test_eta0_async_reproduces_the_sync_loop_step_for_step(tmp_path):
    sync = train(recipe(tmp_path, "sync", "run.mode=sync", "trainer.steps=3", "run.eval_every=3"))
    asyn = train(recipe(tmp_path, "async", "run.mode=async", "rollout.max_staleness=0", "trainer.steps=3", "run.eval_every=3"))
    a, b = read_metrics(sync.run_dir / "metrics.jsonl"), read_metrics(asyn.run_dir / "metrics.jsonl")
    for key in ("reward/mean", "rollout/response_length", "train/loss", "train/grad_norm", "train/entropy"):
        assert [r.get(key) for r in a[1:]] == pytest.approx([r.get(key) for r in b[1:]], rel=1e-5, abs=1e-7), key
    assert sync.summary["eval_accuracy_final"] == asyn.summary["eval_accuracy_final"]
    assert all(r["staleness/lag_max"] == 0 for r in b[1:])
    assert undeclared({k for r in a + b for k in r}) == []  # sync and async rows follow the one schema


@pytest.mark.slow
def test_eta2_run_stays_within_the_bound_and_accounts_for_every_group(tmp_path):
    result = train(recipe(tmp_path, "eta2", "run.mode=async", "rollout.max_staleness=2", "trainer.steps=6",
                          "run.eval_every=6", "trainer.minibatches=2", "trainer.publish_every=minibatch"))
    records = read_metrics(result.run_dir / "metrics.jsonl")[1:]
    assert max(r["staleness/lag_max"] for r in records) <= 2  # in-step weights are labelled conservatively
    assert records[-1]["weights/updates_sent"] > 6 + 1  # the first version, one a step, and in-step ones
    assert all(sum(r["staleness/lag_hist"]) > 0 for r in records)
    s = result.summary
    assert s["max_version_lag"] <= 2
    buf, adm = s["buffer"], s["admission"]
    # every admitted group was put; every put group is consumed, filtered or still held
    assert adm["admitted_total"] == buf["put"] + adm["running"] + adm["aborted_total"]
    assert buf["put"] == buf["consumed"] + sum(buf["filtered"].values()) + buf["held_groups"]
    assert buf["consumed"] == 6 * 4
    # admission bound: accepted + running <= (eta + v + 1) * B
    assert adm["accepted"] + adm["running"] <= (2 + adm["version"] + 1) * 4
    # held-out evaluation ran on the rollout worker with exactly the weights of the step it is logged at
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval/accuracy" in r]
    assert [(r["step"], r["eval/step"], r["eval/version"]) for r in evals] == [(0, 0, 0), (6, 6, 6)]
    assert s["eval_accuracy_final"] == evals[-1]["eval/accuracy"]


@pytest.mark.slow
def test_a_kv_pool_too_small_for_a_prompt_is_one_line_and_leaves_no_run_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.kv_blocks: 1 blocks x 16 tokens cannot hold"):
        train(recipe(tmp_path, "small_kv", "run.mode=async", "rollout.kv_blocks=1", "trainer.steps=2"))
    assert not (tmp_path / "small_kv").exists()


def _session_members(sid: int) -> list[int]:
    from pathlib import Path

    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: session id
            members.append(int(stat.parent.name))
    return members


@pytest.mark.slow
def test_ctrl_c_stops_every_role_and_leaves_no_process_behind(tmp_path):
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "areal.train", "recipe=recipes/math.yaml", *SMALL, "trainer.steps=100000",
         f"run.run_dir={run_dir}"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # a shell's background job (`cmd &`) starts with SIGINT ignored, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.5)
    assert len(_session_members(proc.pid)) >= 3  # controller, trainer, rollout worker (and reward workers)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    time.sleep(1.0)
    assert _session_members(proc.pid) == [], "processes survived Ctrl-C"
    from areal.launchers.local import SPEC_DIR_PREFIX

    assert not list(Path(tempfile.gettempdir()).glob(f"{SPEC_DIR_PREFIX}{proc.pid}-*")), "the roles' specs were left"


@pytest.mark.slow
def test_uniform_reward_filtering_trains_on_b_groups_in_both_modes(tmp_path):
    for mode in ("sync", "async"):
        result = train(recipe(tmp_path, f"filter_{mode}", f"run.mode={mode}", "buffer.filter_uniform_rewards=true",
                              "trainer.steps=3", "run.eval_every=3"))
        rows = read_metrics(result.run_dir / "metrics.jsonl")[1:]
        assert [len(r["data/group_ids"]) for r in rows] == [4, 4, 4], mode  # a dropped group is replaced
        assert rows[-1]["buffer/filtered_groups"] > 0, mode  # and counted, the same way in both modes
        ids = [g for r in rows for g in r["data/group_ids"]]
        assert len(ids) == len(set(ids)), mode
