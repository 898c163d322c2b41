"""scripts/gpu_check.sh without a GPU: a fast skip with a distinct exit code and a JSON last line; its
summary and result parsing; the import shim for a plain source tree; timeouts; the CPU developer mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402

NO_GPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], env=NO_GPU_ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_without_gpu_exits_3_at_once_with_a_message_and_a_json_last_line():
    t0 = time.perf_counter()
    proc = _run()
    elapsed = time.perf_counter() - t0
    assert proc.returncode == gpu_check.EXIT_NO_GPU == 3, proc.stdout + proc.stderr
    assert elapsed < 30  # importing torch is the whole cost
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("gpu_check: no GPU") and "nothing checked" in lines[0]
    summary = json.loads(lines[-1])
    assert summary["status"] == "skipped" and summary["no_gpu"] is True and "no GPU" in summary["reason"]
    assert [c["name"] for c in summary["checks"]] == gpu_check.CHECK_NAMES
    assert {c["status"] for c in summary["checks"]} == {"skipped"}


def test_unknown_check_is_a_usage_error():
    proc = _run("--checks", "engine_parity,nope")
    assert proc.returncode == 2 and "unknown check(s) ['nope']" in proc.stderr


def test_overall_status_and_exit_code():
    ok, bad, skip = (gpu_check.check_result("a", s) for s in ("pass", "fail", "skipped"))
    assert gpu_check.overall_status([ok, skip]) == "pass"
    assert gpu_check.overall_status([ok, bad, skip]) == "fail"
    assert gpu_check.overall_status([skip, skip]) == gpu_check.overall_status([]) == "skipped"
    env = {"torch": "x"}
    assert gpu_check.exit_code(gpu_check.summarise([ok, skip], env, 1.0)) == 0
    assert gpu_check.exit_code(gpu_check.summarise([ok, bad], env, 1.0)) == 1
    assert gpu_check.exit_code({**gpu_check.summarise([skip], env, 1.0), "no_gpu": True}) == 3
    summary = gpu_check.summarise([ok, bad], env, 2.345, reason="why")
    assert summary["checks"] == [ok, bad] and summary["torch"] == "x" and summary["wall_s"] == 2.35
    assert summary["reason"] == "why"
    with pytest.raises(ValueError, match="status"):
        gpu_check.check_result("a", "passed")


def test_parse_result_takes_the_last_marker_line():
    marker = gpu_check.RESULT_MARKER
    out = f"noise\n{marker}{json.dumps({'status': 'fail'})}\nmore\n{marker}{json.dumps({'status': 'pass'})}\n"
    assert gpu_check.parse_result(out) == {"status": "pass"}
    assert gpu_check.parse_result("Traceback ...\nRuntimeError: boom\n") is None
    assert gpu_check.parse_result(f"{marker}{{not json") is None
    assert gpu_check.output_tail(f"a\n\nb\nc\nd\n{marker}{{}}\n") == "b | c | d"


def test_import_shim_imports_the_components_from_a_plain_tree(tmp_path):
    mapping = gpu_check.package_dirs(REPO / "pyproject.toml")
    assert mapping["areal"] == "areal" and mapping["areal.rollout"] == "rollout"
    shim = gpu_check.build_import_shim(REPO, mapping, tmp_path / "shim")
    # -S: no site-packages, so no editable install can answer; only the shim on PYTHONPATH can
    code = ("import areal.rollout, areal.kernels, areal.trainer, areal.buffer, areal.bundle as b\n"
            "print(areal.rollout.__file__); print(b.bundle_root())")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(shim)}
    proc = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rollout_file, bundle_root = proc.stdout.split()
    assert rollout_file == str(shim / "areal" / "rollout" / "__init__.py")
    assert Path(bundle_root) == REPO  # recipes/ and assets/ are found from the shim too
    env["PYTHONPATH"] = str(REPO)  # the repo root alone is not enough: areal/ has no rollout/
    proc = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'areal.rollout'" in proc.stderr


def test_a_check_past_its_timeout_fails_and_is_killed(tmp_path):
    t0 = time.perf_counter()
    result = gpu_check.run_check("engine_parity", "cpu", 1.0, dict(NO_GPU_ENV), tmp_path)
    assert time.perf_counter() - t0 < 10
    assert result["status"] == "fail" and result["reason"].startswith("timed out after 1 s")
    assert (tmp_path / "engine_parity.log").exists()


def test_cpu_developer_mode_runs_engine_parity_and_throughput(tmp_path):
    proc = _run("--device", "cpu", "--checks", "engine_parity,throughput", "--log-dir", str(tmp_path), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    checks = {c["name"]: c for c in summary["checks"]}
    assert summary["status"] == "pass" and summary["device_mode"] == "cpu" and list(checks) == ["engine_parity", "throughput"]
    assert summary["log_dir"] == str(tmp_path) and (tmp_path / "engine_parity.log").is_file()
    parity = checks["engine_parity"]["figures"]
    assert set(parity) == {"tiny_math", "qwen2", "llama", "qwen3", "mistral"}
    assert parity["tiny_math"]["prompts"] == 16 and parity["tiny_math"]["tokens"] > 16
    speed = checks["throughput"]["figures"]
    assert speed["engine_tokens_per_s"] > 0 and speed["hf_tokens_per_s"] > 0
    assert speed["greedy_token_agreement"] == 1.0  # float32 on the CPU: the engine is HF generate, token for token
