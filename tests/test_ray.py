"""The Ray launcher on a real Ray: started inside a network namespace that holds only `lo`, so no
traffic can leave the machine (Ray probes outside addresses to find its own). Every run here is a
driver process in that namespace with its roles as Ray actors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from areal.metrics import read_metrics

from test_async_pipeline import SMALL

pytest.importorskip("ray", reason="Ray is not installed (pip install ray): the Ray launcher tests need it")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = [*SMALL, "logging.progress_bar=false", "trainer.steps=3", "run.eval_every=3"]  # conftest's local_async_run


def _loopback_only_netns(name: str):
    """A network namespace with only loopback, removed (with anything left in it) afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("the Ray tests need iproute2's `ip netns` (a loopback-only network namespace)")
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot create a network namespace for Ray (needs root): {made.stderr.strip()}")
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    _kill_all_in(name)
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def netns():
    """For runs that start their own Ray (and must leave nothing behind)."""
    yield from _loopback_only_netns(f"areal-ray-{os.getpid()}")


@pytest.fixture(scope="module")
def cluster_ns():
    """A namespace holding a running Ray cluster (`ray start --head`) that runs join with
    launcher.ray.address=127.0.0.1:6379, as on a cluster users already run."""
    for name in _loopback_only_netns(f"areal-rayc-{os.getpid()}"):
        head = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "ray.scripts.scripts", "start",
                               "--head", "--port=6379", "--num-cpus=4", "--include-dashboard=false",
                               "--disable-usage-stats"], env=_env(), capture_output=True, text=True, timeout=120)
        assert head.returncode == 0, head.stdout + head.stderr
        yield name


JOIN = "launcher.ray.address=127.0.0.1:6379"


def _pids_in(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_all_in(ns: str) -> None:
    for pid in _pids_in(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "AREAL_FAULT"}
    return {**env, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "RAY_DEDUP_LOGS": "0", "COLUMNS": "300", **extra}


def _in_netns(ns: str, args: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def test_default_recipe_on_ray_finishes_with_the_summary_of_a_local_run(netns, tmp_path, local_async_run):
    ray_run = _in_netns(netns, ["-m", "areal.train", "recipe=math", "launcher.type=ray", *TINY,
                                f"run.run_dir={tmp_path / 'ray'}"])
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    assert "(trainer0 pid=" in ray_run.stdout + ray_run.stderr  # the actors' output reaches the driver, named
    on_ray = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert set(on_ray) == set(local_async_run.summary)
    assert on_ray["steps"] == 3 and on_ray["rollout_workers_live"] == 1
    assert (tmp_path / "ray" / "model" / "config.json").exists()
    assert _pids_in(netns) == []  # the private Ray the run started is gone with it


def test_two_nodes_trainer_on_one_rollout_on_the_other_and_a_killed_worker_is_replaced(netns, tmp_path):
    # two raylets on this host; custom resources put the trainer on one and both workers on the other,
    # so weights and messages cross nodes. rollout1's first process is killed mid-run and restarted.
    run = _in_netns(netns, ["tests/ray_two_nodes.py", *TINY, "trainer.steps=5", "run.eval_every=5",
                            "rollout.num_workers=2", f"run.run_dir={tmp_path / 'two'}"],
                    AREAL_FAULT="rollout1.0/rollout.step@10:kill")
    assert run.returncode == 0, run.stderr[-3000:]
    out, log = json.loads(run.stdout.strip().splitlines()[-1]), run.stdout + run.stderr
    nodes, placed, summary = out["nodes"], out["placed"], out["summary"]
    assert len(nodes) == 2
    assert nodes[placed["trainer0"]] == ["trainer_node"]
    assert nodes[placed["rollout0"]] == nodes[placed["rollout1"]] == ["rollout_node"]
    assert summary["steps"] == 5
    assert summary["rollout_workers_lost"] == 1
    assert "rollout worker 'rollout1' exited with code -9" in log and "restarting it" in log
    assert log.count("rollout1 on Ray node") == 2
    # placed["rollout1"] is where its replacement went: back onto the rollout node (its bundle)
    ids = [g for r in read_metrics(tmp_path / "two" / "metrics.jsonl")[1:] for g in r["data/group_ids"]]
    assert len(ids) == len(set(ids)) == 5 * 4  # nothing lost or repeated across the restart


def test_a_role_that_raises_shows_its_traceback_in_the_driver(cluster_ns, tmp_path):
    run = _in_netns(cluster_ns, ["-m", "areal.train", "recipe=math", "launcher.type=ray", JOIN, *TINY,
                            f"run.run_dir={tmp_path / 'fails'}"], AREAL_FAULT="trainer0/trainer.update@2:raise")
    assert run.returncode == 1
    assert "role 'trainer0' failed" in run.stderr and "Traceback" in run.stderr and "faults.py" in run.stderr


def test_bad_input_is_one_line_from_a_ray_run(cluster_ns, tmp_path):
    run = _in_netns(cluster_ns, ["-m", "areal.train", "recipe=math", "launcher.type=ray", JOIN, *TINY,
                            f"data.train_path={tmp_path / 'missing.jsonl'}", f"run.run_dir={tmp_path / 'bad'}"])
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error:") and "missing.jsonl" in run.stderr
    assert "Traceback" not in run.stderr


def test_ctrl_c_stops_every_actor_and_the_private_ray(netns, tmp_path):
    run_dir = tmp_path / "interrupted"
    driver = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "areal.train", "recipe=math", "launcher.type=ray",
         *TINY, "trainer.steps=400", f"run.run_dir={run_dir}"],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # a shell's background job (`cmd &`) starts with SIGINT ignored, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert (run_dir / "metrics.jsonl").exists(), "the run never started training"
    driver.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the driver
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err[-3000:]
    assert "interrupted" in err
    deadline = time.time() + 20  # ray.shutdown() has returned; its processes may take a moment to exit
    while time.time() < deadline and _pids_in(netns):
        time.sleep(0.5)
    assert _pids_in(netns) == []


def test_working_dir_ships_the_recipes_files_to_the_roles(cluster_ns, tmp_path):
    # the data and the reward function exist only in the folder Ray uploads; the driver runs elsewhere
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for split in ("train", "test"):
        (shipped / f"{split}.jsonl").write_text((ROOT / f"assets/data/arith/{split}.jsonl").read_text())
    (shipped / "my_reward.py").write_text("from areal.rewards.math import math_reward as reward\n")
    run = subprocess.run(
        ["ip", "netns", "exec", cluster_ns, sys.executable, "-m", "areal.train", "recipe=math", "launcher.type=ray",
         JOIN, *TINY, "trainer.steps=2", "run.eval_every=2", f"launcher.ray.working_dir={shipped}",
         "data.train_path=train.jsonl", "data.test_path=test.jsonl", "reward.fn=my_reward.py:reward",
         f"run.run_dir={tmp_path / 'wd'}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "wd" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_accuracy_initial"] > 0  # the shipped reward scored the answers
