"""Asynchronous vs synchronous areal vs TRL's GRPOTrainer: wall time, time to a reward threshold,
held-out accuracy, on the default recipe (recipes/math.yaml) for a fixed number of steps.

Configurations, each in a fresh subprocess, one after the other (a timing benchmark on 2 cores):
  sync-tN     `run.mode=sync run.num_threads=N`: one process alternating generation and training
              (N from --sync-threads; the recipe says 2, but see the note below);
  async-etaK  `run.mode=async rollout.max_staleness=K` (K from --etas): trainer process + one
              rollout worker process (1 torch thread each, the recipe's setting);
  trl         `benchmarks/trl_grpo_baseline.py`: TRL GRPOTrainer with the same model, data, reward,
              group size, batch, lr schedule and clips (mapping in that file), --trl-threads threads,
              scored by areal's own greedy held-out evaluation (500 test prompts, same reward).

Figures:
  wall        areal: summary `wall_seconds` (loading, processes, every evaluation included);
              trl: `train_clock_s` (trainer.train() without its held-out evaluations, model/data
              loading excluded): TRL is never charged for anything areal is not.
  t_reward    first step whose rolling mean (--window steps) train reward >= --threshold, and the
              clock at that step (areal: the run's `time/wall_s`, evaluations included; trl: its
              train clock, evaluations excluded).
  accuracy    held-out greedy accuracy after the last step.
JSON (last line):
  speedup_vs_sync  wall of the FASTEST sync run / wall of the fastest async run, at equal steps
                   ("best async eta"; the fastest sync is the conservative baseline).
  speedup_vs_trl   TRL's clock at the first evaluation where its held-out accuracy >= the best
                   async run's final accuracy, / the best async run's clock at ITS first
                   evaluation reaching that accuracy (`eval/wall_s`: when the result was in). If
                   TRL never reaches it, the ratio at equal steps (TRL train clock / the async
                   run's clock at its last evaluation), and `speedup_vs_trl_basis` says which.
  speedup_vs_trl_at_trl_final_accuracy  the same ratio at TRL's own final accuracy, when the
                   best async run reaches it.
  Both are conservative for areal: areal's clocks include evaluation (sync: inline; async: the
  wait for the last result), TRL's exclude it.

    python benchmarks/async_speedup.py             # 300 steps (the recipe), ~15 min on an idle 2-core CPU
    python benchmarks/async_speedup.py --quick     # 40 steps, smoke test
    python benchmarks/async_speedup.py --steps 100 --etas 2 --sync-threads 1,2

Note on threads: on this shared 2-core machine a 2-thread sync run was 17x slower than a
1-thread one (40 steps: 357 s vs 20 s loop at load average ~5, OpenMP threads waiting on each
other), so the default sync baseline uses 1 thread; pass --sync-threads 1,2 to measure both.

Measured 2026-11-21 (second round: shared-prompt packing, evaluation on the rollout worker),
300 steps, 2-core CPU, load average 1.0-1.6 (the runs themselves):
  config      wall s  t_reward>=0.45  held-out acc
  sync-t1       71.8   29.4 s (127)    0.870
  async-eta1    64.6   26.0 s (128)    0.838
  async-eta2    62.0   33.9 s (178)    0.822
  async-eta4    62.2   46.9 s (257)    0.674
  trl          140.3   62.3 s (132)    0.824   (train clock, evaluation and loading excluded)
  speedup_vs_sync 1.16 (eta 2; eta 1: 1.11), speedup_vs_trl 2.55 (to 0.822, TRL's step 300).
Why not 2x: on a CPU, decoding is compute-bound like training, and a step's training costs
~4 forward passes per token (pi_prox forward, then forward + backward) against ~1 for
generating it, so generation is 13% of a step's work here (0.018 s vs 0.145 s,
`benchmarks/step_balance.py`) and overlapping the two can save at most that: the bound
(G + T) / max(G, T) is 1.13 on this task and 1.43 even at 48-token completions. The rollout
worker idles ~60%; async also pays ~3 s more start-up (spawned processes import torch and
transformers again). AReaL's 2.57x is on GPUs, where decoding is memory-bound and dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/math.yaml"


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def rolling_first(points: list[tuple[float, float, float]], window: int, threshold: float):
    """First (step, clock) whose mean reward over the last `window` points is >= threshold, else None.

    points: (step, reward, clock) in step order.
    """
    for i in range(window - 1, len(points)):
        chunk = points[i - window + 1: i + 1]
        if sum(r for _, r, _ in chunk) / window >= threshold:
            return points[i][0], points[i][2]
    return None


def first_reaching(evals: list[tuple[float, float, float]], target: float):
    """First (step, clock) of an evaluation with accuracy >= target, else None. evals: (step, acc, clock)."""
    for step, acc, clock in evals:
        if acc >= target - 1e-9:
            return step, clock
    return None


def run_areal(name: str, overrides: list[str], steps: int, out: Path, log) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "areal.train", f"recipe={RECIPE}", f"trainer.steps={steps}",
           f"run.run_dir={run_dir}", "logging.wandb.mode=disabled", "logging.progress_bar=false", *overrides]
    res = _run(name, cmd, out, log)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    eval_s, evals, rewards = 0.0, [], []
    for r in rows:  # areal's clock: time/wall_s from the first evaluation; also one without evaluations
        eval_s += r.get("eval/seconds", 0.0)
        if "eval/accuracy" in r:  # clock when the result was in (async: evaluated on a rollout worker)
            evals.append((r["step"], r["eval/accuracy"], r.get("eval/wall_s", r["time/wall_s"])))
        if r["step"] > 0:
            rewards.append((r["step"], r["reward/mean"], r["time/wall_s"]))
    return {**res, "wall": summary["wall_seconds"], "loop_seconds": summary["loop_seconds"],
            "eval_seconds": eval_s, "accuracy": summary["eval_accuracy_final"],
            "accuracy_initial": summary["eval_accuracy_initial"], "evals": evals, "rewards": rewards,
            "max_version_lag": summary.get("max_version_lag")}


def run_trl(steps: int, threads: int, eval_every: int, out: Path, log) -> dict:
    result_path = out / "trl.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trl_grpo_baseline.py"), f"--steps={steps}",
           f"--eval-every={eval_every}", f"--threads={threads}", f"--out={result_path}", f"--save-dir={out / 'trl-model'}"]
    res = _run("trl", cmd, out, log)
    r = json.loads(result_path.read_text())
    return {**res, "wall": r["train_clock_s"], "loop_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"],
            "accuracy": r["eval_accuracy_final"], "accuracy_initial": r["eval_accuracy_initial"],
            "evals": [(0, r["eval_accuracy_initial"], 0.0)]
                     + [(e["step"], e["accuracy"], e["train_clock_s"]) for e in r["evals"]],
            "rewards": [(x["step"], x["reward"], x["train_clock_s"]) for x in r["rewards"]]}


def _run(name: str, cmd: list[str], out: Path, log) -> dict:
    before = loadavg()
    log(f"--- {name}: load average {before} (1/5/15 min); {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as f:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (out / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"{name} failed with exit code {proc.returncode}; log tail:\n{tail}")
    after = loadavg()
    log(f"    {name}: done in {seconds:.1f} s (process), load average after {after}")
    return {"name": name, "process_seconds": seconds, "load_before": before, "load_after": after}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps of every configuration (recipe: 300)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 40 steps, eta 2 only")
    ap.add_argument("--etas", default="1,2,4", help="rollout.max_staleness values of the async runs")
    ap.add_argument("--sync-threads", default="1", help="run.num_threads values of the sync runs (comma list)")
    ap.add_argument("--trl-threads", type=int, default=1, help="torch threads of the TRL process")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    ap.add_argument("--threshold", type=float, default=0.45, help="train-reward threshold for t_reward")
    ap.add_argument("--window", type=int, default=10, help="rolling-mean window (steps) for the threshold")
    ap.add_argument("--eval-every", type=int, default=20, help="held-out evaluation period (steps), all systems")
    ap.add_argument("--out", default="", help="output folder (default runs/async_speedup-<time>)")
    args = ap.parse_args(argv)
    steps = 40 if args.quick else args.steps
    etas = [2] if args.quick else [int(x) for x in args.etas.split(",") if x]
    sync_threads = [int(x) for x in args.sync_threads.split(",") if x]
    out = Path(args.out or ROOT / "runs" / f"async_speedup-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"async_speedup: {steps} steps, etas {etas}, sync threads {sync_threads}, out {out}; "
        f"cpus {os.cpu_count()}, load average {loadavg()}")
    common = [f"run.eval_every={args.eval_every}"]
    runs = []
    for n in sync_threads:
        runs.append(run_areal(f"sync-t{n}", ["run.mode=sync", f"run.num_threads={n}", *common], steps, out, log))
    for eta in etas:
        runs.append(run_areal(f"async-eta{eta}", ["run.mode=async", f"rollout.max_staleness={eta}", *common],
                              steps, out, log))
    trl = None if args.no_trl else run_trl(steps, args.trl_threads, args.eval_every, out, log)
    if trl:
        runs.append(trl)

    syncs = [r for r in runs if r["name"].startswith("sync")]
    asyncs = [r for r in runs if r["name"].startswith("async")]
    best_sync = min(syncs, key=lambda r: r["wall"])
    best_async = min(asyncs, key=lambda r: r["wall"])

    log(f"\n{steps} steps, threshold: rolling mean of {args.window} steps' train reward >= {args.threshold}")
    log(f"{'config':<12} {'wall s':>8} {'loop s':>8} {'eval s':>7} {'proc s':>7} {'t_reward (step)':>17} "
        f"{'acc0':>6} {'acc':>6} {'lag':>4}  load before -> after")
    for r in runs:
        hit = rolling_first(r["rewards"], args.window, args.threshold)
        r["t_reward"] = hit[1] if hit else None
        r["t_reward_step"] = hit[0] if hit else None
        t_rew = f"{hit[1]:.1f} ({hit[0]:g})" if hit else "never"
        lag = r.get("max_version_lag")
        log(f"{r['name']:<12} {r['wall']:>8.1f} {r['loop_seconds']:>8.1f} {r['eval_seconds']:>7.1f} "
            f"{r['process_seconds']:>7.1f} {t_rew:>17} {r['accuracy_initial']:>6.3f} {r['accuracy']:>6.3f} "
            f"{'' if lag is None else lag:>4}  {r['load_before']} -> {r['load_after']}")
    log("wall: areal summary wall_seconds (all loading/evaluation included); trl: train clock without "
        "evaluation or loading. loop: areal first-eval..last-step, trl trainer.train(). lag: max version lag consumed.")

    result = {
        "steps": steps,
        "speedup_vs_sync": best_sync["wall"] / best_async["wall"],
        "speedup_vs_sync_loop": best_sync["loop_seconds"] / best_async["loop_seconds"],
        "best_async": best_async["name"], "sync_baseline": best_sync["name"],
        "accuracy_sync": best_sync["accuracy"], "accuracy_async": best_async["accuracy"],
        "wall_sync": best_sync["wall"], "wall_async": best_async["wall"],
        "async_runs": {r["name"]: {"wall": round(r["wall"], 1), "accuracy": r["accuracy"],
                                   "speedup_vs_sync": round(best_sync["wall"] / r["wall"], 3)} for r in asyncs},
        "sync_runs": {r["name"]: {"wall": round(r["wall"], 1), "accuracy": r["accuracy"]} for r in syncs},
        "t_reward": {r["name"]: r["t_reward"] for r in runs}, "reward_threshold": args.threshold,
        "load_average": {r["name"]: r["load_before"] for r in runs},
    }
    if trl:
        target = best_async["accuracy"]
        areal_hit = first_reaching(best_async["evals"], target)
        trl_hit = first_reaching(trl["evals"], target)
        if trl_hit and areal_hit and areal_hit[1] > 0:
            result["speedup_vs_trl"] = trl_hit[1] / areal_hit[1]
            result["speedup_vs_trl_basis"] = (f"time to held-out accuracy {target:.3f}: trl step {trl_hit[0]} "
                                              f"{trl_hit[1]:.1f} s / {best_async['name']} step {areal_hit[0]} {areal_hit[1]:.1f} s")
        else:
            areal_end = best_async["evals"][-1][2]
            result["speedup_vs_trl"] = trl["wall"] / areal_end
            result["speedup_vs_trl_basis"] = (f"equal steps ({steps}): trl never reached {target:.3f} "
                                              f"(final {trl['accuracy']:.3f}); trl {trl['wall']:.1f} s / "
                                              f"{best_async['name']} {areal_end:.1f} s (run clock at its last step, evaluations included)")
        result["speedup_vs_trl_equal_steps"] = trl["wall"] / best_async["evals"][-1][2]
        # the other common level: TRL's own final accuracy, when the async run reaches it too
        trl_end, areal_at = first_reaching(trl["evals"], trl["accuracy"]), first_reaching(best_async["evals"], trl["accuracy"])
        if trl_end and areal_at and areal_at[1] > 0:
            result["speedup_vs_trl_at_trl_final_accuracy"] = trl_end[1] / areal_at[1]
        result["accuracy_trl"] = trl["accuracy"]
        result["wall_trl"] = trl["wall"]
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
