"""The GPU check's driver (run it through scripts/gpu_check.sh): every check of gpu_check_cases.py in a
process of its own, under a timeout and a total time budget, progress per check, and a last stdout line
that is one JSON object summarising every check (name, status pass|fail|skipped, seconds, figures, reason).

A failure in one check never stops the others: each runs in a fresh process group (a CUDA error cannot
poison the next check; a timeout kills the check and everything it started).

Exit status: 0 no check failed, 1 a check failed, 2 bad arguments, 3 no CUDA device (nothing ran).

Imports from a plain copy of the working tree: areal installs as one package whose sub-packages live in
top-level folders (pyproject [tool.setuptools] package-dir: areal.rollout -> rollout/, ...), so the repo root
on PYTHONPATH is not enough. Unless `areal.rollout` already imports from this tree (an editable install),
the driver builds an import shim: a folder whose areal/ holds symlinks to areal/'s entries and one symlink
per mapped sub-package, placed first on PYTHONPATH of every check process. Checks run with a scratch
folder as their current directory, so the repo's own areal/ folder never shadows the shim.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_MARKER = "GPU_CHECK_RESULT "
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3
TOTAL_BUDGET_S = 470.0  # all checks together: 8 minutes on one GPU, less process start-up and this driver
MIN_CHECK_S = 30.0  # a check is skipped rather than started with less time than this left
# (name, timeout seconds, what it checks), in the order they run: cheap and decisive first
CHECKS = [
    ("engine_parity", 90, "engine greedy == HF generate greedy: tiny-math and random qwen2/llama/qwen3/mistral"),
    ("kernels", 120, "Triton log-prob/entropy and paged-attention kernels, compiled, vs PyTorch references"),
    ("transport_single_gpu", 90, "weight broadcast: NCCL world size 1, and two processes over gloo with CUDA buffers"),
    ("transport_nccl_2gpu", 90, "weight broadcast over NCCL between two processes on two GPUs (GB/s)"),
    ("throughput", 120, "engine vs HF generate tokens/s, Qwen2.5-0.5B shape, bf16, 64 prompts x 128 tokens"),
    ("recipe_sync", 150, "python -m areal.train recipe=math.yaml run.mode=sync on the device: it learns"),
    ("recipe_async", 150, "python -m areal.train recipe=math.yaml (async, the default) on the device: it learns"),
]
CHECK_NAMES = [c[0] for c in CHECKS]


# ------------------------------------------------------------------ results and the summary (pure)
def check_result(name: str, status: str, seconds: float = 0.0, figures: dict | None = None, reason: str = "") -> dict:
    if status not in ("pass", "fail", "skipped"):
        raise ValueError(f"status must be pass, fail or skipped, got {status!r}")
    return {"name": name, "status": status, "seconds": round(seconds, 2), "figures": figures or {}, "reason": reason}


def overall_status(checks: list[dict]) -> str:
    """fail if any check failed; skipped if none ran (all skipped, or no checks); else pass."""
    statuses = [c["status"] for c in checks]
    if "fail" in statuses:
        return "fail"
    return "pass" if "pass" in statuses else "skipped"


def exit_code(summary: dict) -> int:
    if summary["status"] == "fail":
        return EXIT_FAIL
    if summary.get("no_gpu"):
        return EXIT_NO_GPU
    return EXIT_OK


def summarise(checks: list[dict], environment: dict, wall_s: float, reason: str = "") -> dict:
    """The final JSON object: overall status, the environment, every check in run order."""
    summary = {"gpu_check": 1, "status": overall_status(checks), "wall_s": round(wall_s, 2), **environment,
               "checks": checks}
    if reason:
        summary["reason"] = reason
    return summary


def parse_result(output: str) -> dict | None:
    """The result a check process printed (its last RESULT_MARKER line), or None if it printed none."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER):])
            except json.JSONDecodeError:
                return None
    return None


def output_tail(output: str, lines: int = 3, chars: int = 500) -> str:
    """The last non-empty lines of a log, joined: what a failure reason quotes."""
    kept = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith(RESULT_MARKER)]
    return " | ".join(kept[-lines:])[-chars:]


# ------------------------------------------------------------------ importing areal from a source tree
def package_dirs(pyproject: Path) -> dict[str, str]:
    """[tool.setuptools] package-dir: import name -> folder relative to the repo root."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    data = tomllib.loads(pyproject.read_text())
    return dict(data["tool"]["setuptools"]["package-dir"])


def build_import_shim(repo: Path, mapping: dict[str, str], dest: Path) -> Path:
    """A folder that imports like the installed package: dest/<top>/ links every entry of the top package's
    folder, and each mapped sub-package (areal.rollout -> rollout/) links its folder. Returns dest."""
    tops = [name for name in mapping if "." not in name]
    if len(tops) != 1:
        raise ValueError(f"expected one top-level package in package-dir, got {tops}")
    top = tops[0]
    root = dest / top
    root.mkdir(parents=True)
    for entry in sorted((repo / mapping[top]).iterdir()):
        if entry.name != "__pycache__":
            (root / entry.name).symlink_to(entry.resolve())
    for name, folder in mapping.items():
        parts = name.split(".")
        if name == top or parts[0] != top or len(parts) != 2:
            continue
        link = root / parts[1]
        if link.exists() or link.is_symlink():
            raise ValueError(f"package-dir maps {name} to {folder}, but {mapping[top]}/{parts[1]} exists too")
        link.symlink_to((repo / folder).resolve())
    return dest


def _probe_import(env: dict, cwd: Path) -> str:
    """Where `areal.rollout` imports from for a process started with env in cwd ('' if it does not)."""
    code = "import importlib.util as u\ntry:\n s = u.find_spec('areal.rollout')\nexcept ImportError:\n s = None\n" \
           "print(s.origin if s else '')"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def ensure_importable(env: dict, work_dir: Path) -> str:
    """Make `import areal.rollout` resolve to this tree in processes started with env in work_dir.
    Returns how: 'installed' (it already did) or 'shim:<folder>'. Raises RuntimeError when neither works."""
    origin = _probe_import(env, work_dir)
    if origin and Path(origin).resolve().is_relative_to(REPO):
        return "installed"
    shim = build_import_shim(REPO, package_dirs(REPO / "pyproject.toml"), work_dir / "import-shim")
    env["PYTHONPATH"] = os.pathsep.join([str(shim)] + [p for p in [env.get("PYTHONPATH", "")] if p])
    origin = _probe_import(env, work_dir)
    if not (origin and Path(origin).resolve().is_relative_to(REPO)):
        raise RuntimeError(f"areal.rollout does not import from {REPO} even through the shim {shim} "
                           f"(found: {origin or 'nothing'})")
    return f"shim:{shim}"


# ------------------------------------------------------------------ running checks
def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_check(name: str, device: str, timeout_s: float, env: dict, work_dir: Path) -> dict:
    """Run one check in a new process group under timeout_s; its result, or a failure naming what went wrong."""
    log = work_dir / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-check", name, "--device", device]
    child_env = {**env, "GPU_CHECK_WORK_DIR": str(work_dir), "GPU_CHECK_TIMEOUT_S": str(timeout_s)}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work_dir, env=child_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # the check, or what it left running (role processes, receivers)
        proc.wait()
    seconds = time.perf_counter() - t0
    output = log.read_text(errors="replace")
    if timed_out:
        return check_result(name, "fail", seconds, reason=f"timed out after {timeout_s:.0f} s: "
                            f"{output_tail(output)} (log: {log})")
    result = parse_result(output)
    if result is None:
        return check_result(name, "fail", seconds, reason=f"exit {proc.returncode} without a result: "
                            f"{output_tail(output)} (log: {log})")
    reason = result.get("reason", "")
    if result["status"] == "fail":
        reason = f"{reason} (log: {log})"
    return check_result(name, result["status"], seconds, result.get("figures"), reason)


def run_in_this_process(name: str, device: str) -> int:
    """The --run-check side: run one check here and print its result line last."""
    import gpu_check_cases as cases

    timeout_s = float(os.environ.get("GPU_CHECK_TIMEOUT_S", "150"))
    recipe_timeout = max(timeout_s - 20.0, 10.0)  # leave time to report the run's output before the kill
    functions = {
        "engine_parity": cases.check_engine_parity,
        "kernels": cases.check_kernels,
        "transport_single_gpu": cases.check_transport_single_gpu,
        "transport_nccl_2gpu": cases.check_transport_nccl_two_gpus,
        "throughput": cases.check_throughput,
        "recipe_sync": lambda d: cases.check_recipe(d, "sync", recipe_timeout),
        "recipe_async": lambda d: cases.check_recipe(d, "async", recipe_timeout),
    }
    figures, reason = {}, ""
    try:
        figures, status = functions[name](device), "pass"
    except cases.Skipped as exc:
        status, reason = "skipped", str(exc)
    except BaseException as exc:  # reported as this check's failure; the driver goes on with the next
        traceback.print_exc()
        status, reason = "fail", f"{type(exc).__name__}: {exc}"[:800]
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps({"status": status, "figures": figures, "reason": reason}, default=str),
          flush=True)
    return 0


def environment(torch) -> dict:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count() if cuda else 0,
            "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
            "transformers": version("transformers"), "triton": version("triton") or version("pytorch-triton")}


def parse_args(argv: list[str]) -> argparse.Namespace:
    def check_list(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in CHECK_NAMES]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown check(s) {unknown or text!r}; choose from {','.join(CHECK_NAMES)}")
        return names

    p = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--checks", type=check_list, default=CHECK_NAMES, help=f"comma-separated subset of {','.join(CHECK_NAMES)}")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total seconds for all checks (default %(default)s)")
    p.add_argument("--log-dir", type=Path, help="folder for each check's log and run folders (default: a new temporary one)")
    # developer mode: the same checks with tiny sizes on the CPU (Triton under its interpreter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--run-check", choices=CHECK_NAMES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def emit(summary: dict) -> int:
    print(json.dumps(summary, default=str), flush=True)
    return exit_code(summary)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.run_check:
        return run_in_this_process(args.run_check, args.device)
    start = time.perf_counter()
    try:
        import torch
    except ImportError as exc:
        print(f"gpu_check: torch is not importable ({exc}); nothing checked", flush=True)
        return emit(summarise([check_result(n, "fail", reason="torch not importable") for n in args.checks], {},
                              time.perf_counter() - start, reason=f"torch not importable: {exc}"))
    env_info = environment(torch)
    if args.device == "cuda" and not torch.cuda.is_available():
        reason = f"no GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device"
        print(f"gpu_check: {reason}; nothing checked (exit {EXIT_NO_GPU})", flush=True)
        checks = [check_result(n, "skipped", reason="no GPU") for n in args.checks]
        return emit({**summarise(checks, env_info, time.perf_counter() - start, reason=reason), "no_gpu": True})
    if args.device == "cpu":
        print("gpu_check: developer mode on the CPU (tiny sizes; Triton interpreted): not a GPU result", flush=True)
    work_dir = args.log_dir.resolve() if args.log_dir else Path(tempfile.mkdtemp(prefix="areal-gpu-check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # set before any triton import in the check processes
    env_info["device_mode"] = args.device
    env_info["log_dir"] = str(work_dir)
    try:
        env_info["import_mode"] = ensure_importable(env, work_dir)
    except Exception as exc:  # nothing can run without areal; every check says why
        reason = f"areal not importable: {exc}"
        print(f"gpu_check: {reason}", flush=True)
        checks = [check_result(n, "fail", reason=reason) for n in args.checks]
        return emit(summarise(checks, env_info, time.perf_counter() - start, reason=reason))
    print(f"gpu_check: {env_info['gpu_name'] or 'cpu'} x{env_info['gpus']}, torch {env_info['torch']}, "
          f"transformers {env_info['transformers']}, triton {env_info['triton']}; areal via {env_info['import_mode']}; "
          f"logs in {work_dir}", flush=True)
    timeouts = {name: timeout for name, timeout, _ in CHECKS}
    results = []
    for i, name in enumerate(args.checks, 1):
        left = args.budget_s - (time.perf_counter() - start)
        label = f"[{i}/{len(args.checks)}] {name}"
        if left < MIN_CHECK_S:
            results.append(check_result(name, "skipped", reason=f"time budget ({args.budget_s:.0f} s) spent"))
            print(f"{label}: skipped (time budget spent)", flush=True)
            continue
        print(f"{label}: {dict((c[0], c[2]) for c in CHECKS)[name]} ...", flush=True)
        result = run_check(name, args.device, min(timeouts[name], left), env, work_dir)
        results.append(result)
        detail = result["reason"] or json.dumps(result["figures"], default=str)
        print(f"{label}: {result['status']} in {result['seconds']:.1f} s: {detail[:600]}", flush=True)
    summary = summarise(results, env_info, time.perf_counter() - start)
    print(f"gpu_check: {summary['status']} ({sum(r['status'] == 'pass' for r in results)} passed, "
          f"{sum(r['status'] == 'fail' for r in results)} failed, {sum(r['status'] == 'skipped' for r in results)} "
          f"skipped) in {summary['wall_s']:.0f} s", flush=True)
    return emit(summary)


if __name__ == "__main__":
    sys.exit(main())
