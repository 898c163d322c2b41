"""The Slurm launcher: the job script, where roles go, and real jobs on a real single-node Slurm
(scripts/slurm_local.sh: munged, slurmctld and slurmd on 127.0.0.1). Nothing of Slurm is mocked:
the real tests submit with sbatch, and every role is an srun step."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from areal.config import ConfigError
from areal.launchers.slurm import place_roles, slurm_seconds
from areal.metrics import read_metrics

from test_async_pipeline import SMALL

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def areal_train(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "areal.train", "recipe=math", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ no Slurm needed
def test_dry_run_prints_a_two_node_job_script_and_writes_nothing(tmp_path):
    out = areal_train(tmp_path, "launcher.type=slurm", "launcher.slurm.nodes=2", "rollout.num_workers=3",
                      "launcher.rollout.cpus=2", "launcher.slurm.partition=batch", "launcher.slurm.account=rl",
                      "launcher.slurm.time=02:00:00", "launcher.slurm.signal_before_s=300",
                      "launcher.slurm.gpus_per_node=4", "launcher.slurm.sbatch=[--qos=high,--constraint=a100]",
                      'launcher.slurm.setup=["module load cuda","source ~/venv/bin/activate"]',
                      f"run.run_dir={tmp_path}/run", "--dry-run")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    sbatch = re.findall(r"^#SBATCH (.*)$", script, re.M)
    assert sbatch == ["--job-name=areal", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=4",
                      "--gpus-per-node=4", "--partition=batch", "--account=rl", "--time=02:00:00", f"--chdir={tmp_path}",
                      f"--output={tmp_path}/run/slurm/job-%j.log", "--open-mode=append", "--signal=B:USR1@300",
                      "--requeue", "--qos=high", "--constraint=a100"]
    # trainer0 on the first node, the workers spread from the second: node 0 needs 1 + 2 CPUs, node 1 2 + 2
    assert "#   node 0: trainer0 (1 CPU), rollout1 (2 CPUs)" in script
    assert "#   node 1: rollout0 (2 CPUs), rollout2 (2 CPUs)" in script
    body = script.splitlines()
    assert body.index("module load cuda") < body.index("source ~/venv/bin/activate") < \
        body.index(f"{sys.executable} -m areal.launchers.slurm {tmp_path}/run/slurm/recipe.yaml &")
    assert "trap 'warned=1; kill -USR1 $areal' USR1" in body and "trap 'kill -TERM $areal' TERM" in body
    assert "  scontrol requeue $SLURM_JOB_ID" in body and body[-1] == "exit $code"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing and submits nothing

    no_requeue = areal_train(tmp_path, "launcher.type=slurm", "launcher.slurm.requeue=false", "--dry-run")
    assert no_requeue.returncode == 0 and "#SBATCH --no-requeue" in no_requeue.stdout
    assert "scontrol requeue" not in no_requeue.stdout and list(tmp_path.iterdir()) == []


def test_without_sbatch_the_command_is_one_line_and_writes_nothing(tmp_path):
    bare = {**ENV, "PATH": str(Path(sys.executable).parent)}  # no Slurm client on PATH
    out = subprocess.run([sys.executable, "-m", "areal.train", "recipe=math", "launcher.type=slurm"], cwd=tmp_path,
                         env=bare, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: launcher.type=slurm: sbatch not found on PATH")
    assert out.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_a_warning_later_than_the_time_limit_is_one_line(tmp_path):
    out = areal_train(tmp_path, "launcher.type=slurm", "launcher.slurm.time=00:01:00", "--dry-run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "launcher.slurm.signal_before_s=120 must be shorter than launcher.slurm.time=00:01:00" in out.stderr


def test_trainers_are_packed_and_workers_spread():
    needs = [("trainer0", 2, 1), ("trainer1", 2, 1), ("trainer2", 2, 1)] + [(f"rollout{i}", 1, 1) for i in range(3)]
    placed = place_roles(needs, nodes=3, cpus_per_node=8, gpus_per_node=2)
    assert [placed[f"trainer{r}"] for r in range(3)] == [0, 0, 1]  # first fit: node 0 full (2 GPUs), then node 1
    # round-robin from the node after the last trainer's, over the nodes with room (node 0 has no GPU left)
    assert [placed[f"rollout{i}"] for i in range(3)] == [2, 1, 2]
    with pytest.raises(ConfigError, match=r"launcher.rollout: rollout3 needs 1 CPU and 1 GPU but no node has that "
                                          r"left .*free: node 0 4 CPUs/0 GPUs, node 1 5 CPUs/0 GPUs, node 2 6 CPUs/0 GPUs"):
        place_roles(needs + [("rollout3", 1, 1)], nodes=3, cpus_per_node=8, gpus_per_node=2)
    # no CPU limit (the job takes what the busiest node needs): CPU-only trainers share node 0
    cpu_only = place_roles([("trainer0", 1, 0), ("trainer1", 1, 0), ("rollout0", 1, 0), ("rollout1", 1, 0),
                            ("rollout2", 1, 0)], nodes=2, cpus_per_node=0, gpus_per_node=0)
    assert cpu_only == {"trainer0": 0, "trainer1": 0, "rollout0": 1, "rollout1": 0, "rollout2": 1}


def test_a_role_that_fits_no_node_is_one_line_naming_it():
    with pytest.raises(ConfigError, match=r"launcher.rollout: rollout1 needs 4 CPUs and 0 GPUs but no node has "
                                          r"that left \(launcher.slurm.nodes=1, cpus_per_node=6"):
        place_roles([("trainer0", 2, 0), ("rollout0", 4, 0), ("rollout1", 4, 0)], nodes=1, cpus_per_node=6,
                    gpus_per_node=0)
    with pytest.raises(ConfigError, match=r"launcher.trainer: trainer0 needs 1 CPU and 1 GPU"):
        place_roles([("trainer0", 1, 1)], nodes=2, cpus_per_node=0, gpus_per_node=0)


def test_slurm_time_values():
    assert [slurm_seconds(t) for t in ("30", "5:00", "01:00:00", "1-0", "2-03:04", "1-00:00:05")] == \
        [1800, 300, 3600, 86400, 2 * 86400 + 3 * 3600 + 4 * 60, 86405]
    assert slurm_seconds("UNLIMITED") == float("inf")
    with pytest.raises(ConfigError, match="launcher.slurm.time: 'soon' is not a Slurm time"):
        slurm_seconds("soon")


# ------------------------------------------------------------------ a real Slurm on 127.0.0.1
@pytest.fixture(scope="module")
def slurm():
    if not all(shutil.which(b) for b in ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged")):
        pytest.skip("Slurm is not installed (apt-get install slurm-wlm)")
    script = ROOT / "scripts/slurm_local.sh"
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, f"scripts/slurm_local.sh up failed:\n{up.stdout}{up.stderr}"
    yield
    if "already up" not in up.stdout:  # this session started it: leave the machine as it was
        subprocess.run(["bash", str(script), "down"], capture_output=True, timeout=60)


def submit_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [*SMALL, "run.mode=async", f"run.run_dir={tmp_path / name}", "launcher.type=slurm",
            "launcher.slurm.time=00:10:00", "launcher.slurm.signal_before_s=60", f"launcher.slurm.job_name={name}",
            *extra]


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return re.search(r"JobState=(\S+)", out).group(1)


@pytest.mark.slow
def test_a_default_run_submitted_to_slurm_finishes_with_a_local_runs_summary(slurm, tmp_path, local_async_run):
    out = areal_train(tmp_path, *submit_args(tmp_path, "job", "trainer.steps=3", "run.eval_every=3"))
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"^submitted job (\d+)$", out.stdout, re.M).group(1)
    run_dir, log_dir = tmp_path / "job", tmp_path / "job" / "slurm"
    assert f"log:     {log_dir}/job-{job_id}.log" in out.stdout and f"run_dir: {run_dir}" in out.stdout
    assert "trainer done: 3 steps" in out.stdout  # the job's log, streamed while it ran
    assert f"job {job_id} completed" in out.stdout and job_state(job_id) == "COMPLETED"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["mode"] == "async" and summary["generated_tokens"] > 0
    for spec in (log_dir / "roles").iterdir():  # one spec per srun step, private, without the run secret
        assert os.stat(spec).st_mode & 0o077 == 0 and json.loads(spec.read_text())["secret"] == ""
        assert json.loads(spec.read_text())["bind_host"] == "127.0.0.1"  # the node's NodeAddr
    local = local_async_run  # the same recipe and overrides, run locally
    assert set(summary) == set(local.summary)
    assert summary["eval_accuracy_final"] == local.summary["eval_accuracy_final"]  # same seed, same run


@pytest.mark.slow
def test_a_job_sbatch_refuses_is_one_line(slurm, tmp_path):
    out = areal_train(tmp_path, *submit_args(tmp_path, "refused", "launcher.slurm.partition=nosuchpartition"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: sbatch {tmp_path}/refused/slurm/job.sbatch failed: ")
    assert "invalid partition" in out.stderr.lower()


@pytest.mark.slow
def test_a_failing_job_ends_the_command_with_the_roles_one_line_error(slurm, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "1+1=", "answer": "2"}\n')  # no prompt column: trainer0 finds it in the job
    out = areal_train(tmp_path, *submit_args(tmp_path, "bad", f"data.train_path={rows}", "trainer.steps=2"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: data.prompt_key: column 'question' not in {rows} " \
                                                  "(columns: ['query', 'answer'])"
    assert (tmp_path / "bad" / "slurm" / "error.txt").is_file()


def training_started(run_dir: Path, process: subprocess.Popen | None = None, timeout: float = 90) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:  # step 1 is done
        assert time.monotonic() < deadline and (process is None or process.poll() is None), "no training step"
        time.sleep(0.2)


@pytest.mark.slow
def test_wait_false_returns_at_once_and_scancel_ends_the_job_without_a_requeue(slurm, tmp_path):
    start = time.monotonic()
    out = areal_train(tmp_path, *submit_args(tmp_path, "nowait", "launcher.slurm.wait=false", "trainer.steps=40"))
    assert out.returncode == 0 and time.monotonic() - start < 15, out.stderr
    job_id = re.search(r"^submitted job (\d+)$", out.stdout, re.M).group(1)
    assert job_state(job_id) in ("PENDING", "RUNNING")
    training_started(tmp_path / "nowait")
    subprocess.run(["scancel", job_id], check=True)  # SIGTERM: the trainer checkpoints, the job is not requeued
    deadline = time.monotonic() + 30
    while job_state(job_id) != "CANCELLED":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(2)  # the batch script has ended: a requeue would show by now
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "JobState=CANCELLED" in shown and "Restarts=0" in shown


@pytest.mark.slow
def test_a_preempted_job_checkpoints_requeues_and_resumes_and_ctrl_c_only_detaches(slurm, tmp_path):
    run_dir, steps = tmp_path / "pre", 50
    follower = subprocess.Popen([sys.executable, "-m", "areal.train", "recipe=math",
                                 *submit_args(tmp_path, "pre", f"trainer.steps={steps}", f"run.eval_every={steps}")],
                                cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                # a shell's background job (`cmd &`) starts with SIGINT ignored; children inherit it
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    training_started(run_dir, follower)
    job_id = subprocess.run(["squeue", "-h", "-n", "pre", "-o", "%i"], capture_output=True, text=True).stdout.strip()
    # what Slurm sends the batch shell signal_before_s before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    follower.send_signal(signal.SIGINT)  # Ctrl-C: the command detaches, the job is not cancelled
    stdout, stderr = follower.communicate(timeout=30)
    assert follower.returncode == 0 and f"scancel {job_id}" in stderr and f"tail -f {run_dir}/slurm" in stderr
    assert f"submitted job {job_id}" in stdout

    deadline = time.monotonic() + 120
    while (state := job_state(job_id)) != "COMPLETED":
        assert time.monotonic() < deadline and state not in ("FAILED", "CANCELLED", "TIMEOUT"), \
            (run_dir / "slurm" / f"job-{job_id}.log").read_text()
        time.sleep(1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and 1 <= summary["resumed_from_step"] < steps
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(steps + 1))  # no step lost or doubled
    log = (run_dir / "slurm" / f"job-{job_id}.log").read_text()
    assert f"requeueing job {job_id}" in log and f"job {job_id} (restart 1)" in log
