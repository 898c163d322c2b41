"""benchmarks/soak.py, run for real and short: the default recipe in a subprocess for 45 s (15 s
warm-up), stopped by SIGTERM. Checks the harness's report, not the soak targets (too short to mean anything)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOAK = ROOT / "benchmarks" / "soak.py"
TARGETS = {"rss", "fds", "threads", "shm", "throughput", "throughput_per_cpu_s", "clean_stop"}
ROLES = {"controller", "trainer0", "rollout0", "rollout1", "rollout0/reward0", "rollout1/reward0"}


def test_short_soak_reports_every_process_and_stops_the_run_cleanly(tmp_path):
    # 45 s are enough for the report: the run trains within ~10 s of its launch (~30 s on a loaded machine),
    # and a sample every 2 s gives the checks below several samples after the warm-up (15 on an idle machine)
    proc = subprocess.run([sys.executable, str(SOAK), "--minutes", "0.75", "--warmup-minutes", "0.25", "--interval", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert result["error"] is None, result["error"]

    # stopped by SIGTERM at the deadline: pre-empted (75) with the last step's checkpoint, nothing left running
    assert result["exit_code"] == 75 and result["leftover_processes"] == []
    assert result["checkpoint"] == str(tmp_path / "run" / "ckpt" / f"step_{result['steps']:08d}")
    assert result["targets"]["clean_stop"] is True

    # every process of the tree, matched by role, sampled after the warm-up (and the first step) until the stop
    assert result["samples"] >= 3
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == result["samples"]
    assert ROLES <= set(result["roles"]), sorted(result["roles"])
    for name in ROLES:
        role = result["roles"][name]
        assert len(role["pids"]) == 1 and role["samples"] == result["samples"], (name, role)
        assert role["rss_mb_first"] > 5 and role["rss_mb_last"] > 5, (name, role)  # a Python interpreter at least
        assert role["fds_first"] >= 3 and role["threads_first"] >= 1 and role["shm_first"] >= 0, (name, role)
        assert isinstance(role["rss_growth_pct"], float)
    total = result["total"]
    assert total["rss_mb_first"] >= sum(result["roles"][n]["rss_mb_first"] for n in ROLES) - 1e-6
    assert total["fds_first"] >= sum(result["roles"][n]["fds_first"] for n in ROLES)
    assert result["dev_shm_first"] >= 0 and result["sysv_shm_first"] >= 0

    # throughput over the first and last windows of the steps logged after the warm-up
    assert 0 < result["warm_step"] < result["steps"]
    rate = result["throughput"]
    for key in ("steps_per_s_first", "steps_per_s_last", "tokens_per_s_first", "tokens_per_s_last"):
        assert rate[key] > 0, rate
    assert isinstance(rate["change_pct"], float)
    cpu = result["cpu"]  # steps per CPU second of the whole tree, over the same windows
    assert cpu["steps_per_cpu_s_first"] > 0 and cpu["steps_per_cpu_s_last"] > 0, cpu

    assert set(result["targets"]) == TARGETS and all(isinstance(v, bool) for v in result["targets"].values())
    assert set(result["missed_by"]) <= {"rss", "fds", "threads", "shm"}
    assert all(set(roles) <= set(result["roles"]) for roles in result["missed_by"].values())
    assert result["ok"] == all(result["targets"].values()) and proc.returncode == (0 if result["ok"] else 1)
    assert "verdicts:" in proc.stdout and "trainer0" in proc.stdout


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SOAK), "--minutes", "1", "--warmup-minutes", "2", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --warmup-minutes must be >= 0 and shorter than --minutes (1), got 2"
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_bad_override_is_the_runs_own_one_line_error_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SOAK), "--minutes", "3", "--out", str(tmp_path), "trainer.lrr=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown key 'trainer.lrr' in override 'trainer.lrr=1'; did you mean 'trainer.lr'?"
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] is False


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_processes_are_matched_by_role_so_a_restarted_worker_keeps_its_row():
    soak = _soak_module()
    py, reward = "/venv/bin/python", "import sys\nfrom areal.rewards._worker import worker_main\n"

    def table(rollout1_pid: int, incarnation: int) -> dict:
        rows = [(10, 1, [py, "-m", "areal.train", "recipe=math.yaml"]),
                (11, 10, [py, "-m", "areal.role", "/tmp/areal-roles-10-x/trainer0.0.json"]),
                (rollout1_pid, 10, [py, "-m", "areal.role", f"/tmp/areal-roles-10-x/rollout1.{incarnation}.json"]),
                (rollout1_pid + 1, rollout1_pid, [py, "-c", reward, "13", "14"]),
                (14, 11, ["/venv/lib/wandb/bin/wandb-core", "--port-filename", "x"]),
                (15, 14, ["/venv/lib/wandb/bin/wandb-symon", "--portfile", "y"])]
        return {pid: soak.ProcInfo(pid, ppid, cmd, float(pid)) for pid, ppid, cmd in rows}

    first, restarted = soak.role_keys(table(12, 0), 10), soak.role_keys(table(40, 1), 10)
    assert first == {10: "controller", 11: "trainer0", 12: "rollout1", 13: "rollout1/reward0",
                     14: "trainer0/wandb-core", 15: "trainer0/wandb-core/wandb-symon"}
    assert sorted(first.values()) == sorted(restarted.values()) and restarted[40] == "rollout1"
