"""Reward workers are sandboxed (areal/rewards/_sandbox.py): a reward that allocates, computes or
forks without bound is stopped, scored 0.0, counted by kind and its worker replaced with
everything it started; secrets in the environment never reach it. Real worker processes,
real limits: nothing here is mocked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from areal.config import ConfigError, build
from areal.driver import group_metrics
from areal.metrics import undeclared
from areal.recipe import Recipe
from areal.rewards import RewardPool, RewardRequest
from areal.rewards.pool import FAILURE_KINDS
from areal.trajectory import Group, Trajectory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the limits bite on Linux")

SANDBOX = Path(__file__).parent / "fixtures" / "rewards" / "sandbox_rewards.py"
NO_FAILURES = dict.fromkeys(FAILURE_KINDS, 0)


def make_pool(num_workers: int = 1, timeout_s: float = 30.0, **limits) -> RewardPool:
    # timeout_s is long: what stops each misbehaviour below must be the sandbox, not the wall clock.
    return RewardPool(f"{SANDBOX}:sandbox_reward", num_workers=num_workers, timeout_s=timeout_s, **limits)


def requests(*completions: str, **fields) -> list[RewardRequest]:
    return [RewardRequest("prompt", c, dict(fields)) for c in completions]


def scores_normally(pool: RewardPool) -> bool:
    return pool.score(requests("ab", "abc", "a")).rewards == [2.0, 3.0, 1.0]


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed process whose parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def still_running(pids: list[int], within_s: float = 5.0) -> list[int]:
    """The pids still running after up to `within_s` (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + within_s
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if running(p)]


def recorded_pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_unbounded_allocation_is_stopped_counted_as_memory_and_the_worker_replaced():
    with make_pool(memory_mb=256) as pool:
        first_pid = pool._workers[0].pid
        # Samples queued behind the bad one on the same worker are scored by its replacement.
        result = pool.score(requests("ab", "allocate", "abc", "abcd"))
        assert result.rewards == [2.0, 0.0, 3.0, 4.0]
        assert result.failures == {**NO_FAILURES, "memory": 1}
        assert pool._workers[0].pid != first_pid and not running(first_pid)
        assert scores_normally(pool)
        assert pool.total_failures["memory"] == 1


def test_memory_limit_off_lets_the_same_allocation_through():
    with make_pool(memory_mb=0) as pool:
        assert pool.score(requests("allocate")).rewards == [16.0]


def test_cpu_spin_is_stopped_by_the_cpu_limit_not_the_wall_clock(caplog):
    with make_pool(cpu_seconds=0.5) as pool:
        result = pool.score(requests("spin", "ab"))
        assert result.rewards == [0.0, 2.0]
        assert result.failures == {**NO_FAILURES, "cpu": 1}
        assert scores_normally(pool)
    (record,) = [r for r in caplog.records if r.name == "areal.rewards"]
    assert "[cpu]" in record.getMessage() and "CpuTimeExceeded" in record.getMessage()


def test_cpu_spin_that_swallows_the_limit_is_still_counted():
    with make_pool(cpu_seconds=0.5) as pool:
        result = pool.score(requests("spin_and_swallow"))
        assert result.rewards == [0.0] and result.failures == {**NO_FAILURES, "cpu": 1}
        assert scores_normally(pool)


def test_cpu_spin_in_c_code_holding_the_gil_is_killed_by_the_pool():
    # The limit's SIGXCPU handler cannot run; the pool reads the worker's CPU time and kills it.
    with make_pool(cpu_seconds=0.5) as pool:
        result = pool.score(requests("spin_in_c"))
        assert result.rewards == [0.0] and result.failures == {**NO_FAILURES, "cpu": 1}
        assert scores_normally(pool)


def test_fork_bomb_is_stopped_and_leaves_no_process_behind(tmp_path):
    pids_file = tmp_path / "pids"
    with make_pool(num_workers=2, max_processes=16) as pool:
        result = pool.score(requests("fork_bomb", "ab", "abc", pids_file=str(pids_file)))
        assert result.rewards == [0.0, 2.0, 3.0]
        assert result.failures == {**NO_FAILURES, "processes": 1}
        forked = recorded_pids(pids_file)
        assert 16 <= len(forked) < 200  # stopped once at the limit (or a few forks past it), long before the bomb's own cap
        assert still_running(forked) == []  # killed with its worker, not only at close
        assert scores_normally(pool)
    assert still_running(forked) == []


def test_a_call_that_leaves_processes_behind_and_returns_is_caught(tmp_path):
    # Caught by the pool's watch if the forks took long enough, else by the worker after the call.
    pids_file = tmp_path / "pids"
    with make_pool(max_processes=16) as pool:
        result = pool.score(requests("fork_and_return", "ab", pids_file=str(pids_file)))
        assert result.rewards == [0.0, 2.0] and result.failures == {**NO_FAILURES, "processes": 1}
        assert len(recorded_pids(pids_file)) > 16
        assert still_running(recorded_pids(pids_file)) == []
        assert scores_normally(pool)


def test_the_guardian_counts_reaps_and_cleans_up_the_rewards_processes():
    # A worker's two processes (split_off_scorer), in a real process with real children: the
    # scorer's count after a call sees live processes only (its own unreaped child does not count,
    # an orphan the guardian adopted does); the guardian reaps orphans, so none is left a zombie;
    # when the scorer exits the guardian kills what is left, even in its own session.
    script = """
import os, subprocess, time
from areal.rewards._sandbox import count_reward_processes, excess_processes, split_off_scorer
split_off_scorer(os.getppid())
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
kids = [subprocess.Popen(["sleep", "30"], **quiet) for _ in range(3)]
print(excess_processes(0), excess_processes(2), excess_processes(3))
kids[0].kill()
while open(f"/proc/{kids[0].pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.01)
print(excess_processes(1))
orphan = int(subprocess.run(["sh", "-c", "sleep 1 >/dev/null 2>&1 & echo $!"], capture_output=True).stdout)
print(count_reward_processes(os.getppid()))
deadline = time.monotonic() + 20
while os.path.exists(f"/proc/{orphan}") and time.monotonic() < deadline:
    time.sleep(0.05)
print("reaped" if not os.path.exists(f"/proc/{orphan}") else "left")
survivors = [kids[1].pid, kids[2].pid, subprocess.Popen(["sleep", "60"], start_new_session=True, **quiet).pid]
print(*survivors, flush=True)
os._exit(0)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert lines[:4] == ["0 3 0", "2", "3", "reaped"], out.stderr
    assert out.returncode == 0  # the guardian exits as its scorer did
    assert still_running([int(pid) for pid in lines[4].split()]) == []


def test_a_subprocess_in_its_own_session_dies_with_its_worker(tmp_path):
    # Out of the worker's process group, so only the walk of the worker's tree finds it.
    pids_file = tmp_path / "pids"
    with make_pool(timeout_s=1.0) as pool:
        result = pool.score(requests("own_session_then_hang", pids_file=str(pids_file)))
        assert result.failures == {**NO_FAILURES, "timeout": 1}
        (child,) = recorded_pids(pids_file)
        assert os.getsid(child) == child  # it did leave the worker's session
        assert still_running([child]) == []
        assert scores_normally(pool)


def test_secrets_in_the_environment_do_not_reach_the_reward(monkeypatch):
    planted = ["HF_TOKEN", "MY_API_KEY", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "AREAL_RUN_SECRET", "db_password"]
    for name in planted:
        monkeypatch.setenv(name, "s3cr3t")
    monkeypatch.setenv("ALLOWED_API_KEY", "needed by the reward")
    monkeypatch.setenv("AREAL_TEST_PLAIN", "not a secret")
    with make_pool(num_workers=2, env_allow=["ALLOWED_*"]) as pool:
        def seen(name: str) -> bool:
            return pool.score([RewardRequest("p", "env", {"name": name})]).rewards == [1.0]

        assert [name for name in planted if seen(name)] == []
        assert seen("ALLOWED_API_KEY") and seen("AREAL_TEST_PLAIN") and seen("PATH")
        assert scores_normally(pool)
    assert os.environ["HF_TOKEN"] == "s3cr3t"  # the parent's own environment is untouched


def test_limit_keys_are_checked_and_named():
    recipe = build(Recipe, None, ["reward.cpu_seconds=2.5", "reward.memory_mb=512", "reward.env_allow=[OPENAI_*]"])
    assert (recipe.reward.cpu_seconds, recipe.reward.memory_mb, recipe.reward.env_allow) == (2.5, 512, ["OPENAI_*"])
    for key in ("reward.cpu_seconds", "reward.memory_mb", "reward.max_processes"):
        with pytest.raises(ConfigError, match=rf"^{key}: must be >= 0"):
            build(Recipe, None, [f"{key}=-1"])


def test_a_runs_metrics_count_the_new_kinds():
    traj = Trajectory(prompt_ids=[1], completion_ids=[2], behaviour_logprobs=[0.0], versions=[0])
    group = Group(group_id=0, trajectories=[traj], fields={}, reward_failures={"memory": 1, "processes": 2})
    row = group_metrics([group])
    assert (row["reward/failures_memory"], row["reward/failures_cpu"], row["reward/failures_processes"]) == (1, 0, 2)
    assert undeclared(row) == []
