"""Asynchronous vs synchronous areal, and TRL's GRPOTrainer: speedup at equal steps, the accuracy it
costs, time to an accuracy both reach, and how close the speedup comes to what overlap allows.

Runs, each a fresh subprocess, one after the other (a timing benchmark: keep the machine idle):
  sync-sK    `run.mode=sync run.num_threads=1 run.seed=K`: one process alternating generation and
             training (1 thread: on 2 shared cores a 2-thread sync run was 17x slower);
  async-sK   the recipe's default asynchronous configuration (`run.mode=async`, its eta, admission and
             objective), `run.seed=K`: a trainer process and a rollout worker process;
  trl        `benchmarks/trl_grpo_baseline.py`: TRL GRPOTrainer, same model, data, reward, group size,
             batch, lr schedule and clips (mapping in that file), scored by areal's held-out evaluation.
for every seed K of --seeds (TRL once).

Figures:
  wall           areal: summary `wall_seconds` (loading, processes, evaluations included);
                 trl: `train_clock_s` (trainer.train() without its evaluations or loading).
  bound          (G + T) / max(G, T) from the sync runs' own step timings: G = generation + rewards +
                 weight load, T = the rest of the step (pi_prox, advantages, updates). Overlapping the
                 two can at best turn G + T into max(G, T) per step.
  efficiency     measured speedup / bound.
  bound_run      the same ceiling for the whole run: W / (W - N * min(G, T)), W the sync run's wall and N
                 its steps. Loading, the first evaluation and the export are in both walls and overlap
                 cannot hide them, so the measured speedup can reach this, not `bound`;
                 efficiency_run = speedup / bound_run.
  time to acc    clock at the first evaluation reaching an accuracy BOTH runs of a pair reach (the
                 lower of their final accuracies), sync against async per seed, and TRL against async.
JSON (last line):
  speedup_vs_sync        mean over seeds of sync wall / async wall, equal steps
  accuracy_drop_vs_sync  mean over seeds of (sync - async) final held-out accuracy, in points
  seeds, bound, efficiency, bound_run, efficiency_run, time_to_accuracy_speedup_vs_sync
  speedup_vs_trl         TRL clock / async clock at the first evaluation where each reaches the lower
                         of the two final accuracies (async: seed 1's run); speedup_vs_trl_basis says so.
  Both clocks are conservative for areal: areal's include evaluation, TRL's exclude it.

    python benchmarks/async_speedup.py                  # 300 steps, seeds 1 2 3 + TRL: ~13 min idle
    python benchmarks/async_speedup.py --quick          # 40 steps, one seed, no TRL: a smoke test
    python benchmarks/async_speedup.py --seeds 1 --no-trl trainer.proximal=recompute

Why the bound is small on a CPU: decoding is compute-bound there like training, and a step's
training costs ~3 forward passes per token against ~1 for generating it, so generation is a small
share of the step and hiding it saves at most that share (`benchmarks/step_balance.py`). On GPUs
decoding is memory-bound and dominates the step, which is where AReaL's 2.57x comes from.
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
    return {**res, "name": name, "wall": summary["wall_seconds"], "loop_seconds": summary["loop_seconds"],
            "eval_seconds": eval_s, "accuracy": summary["eval_accuracy_final"],
            "accuracy_initial": summary["eval_accuracy_initial"], "evals": evals, "rewards": rewards,
            "max_version_lag": summary.get("max_version_lag"), "lag_mean": summary.get("lag_mean", 0.0),
            "wait_s": summary.get("trainer_wait_s_per_step", 0.0), "idle": summary.get("rollout_idle_fraction", 0.0)}


def run_trl(steps: int, threads: int, eval_every: int, out: Path, log) -> dict:
    result_path = out / "trl.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trl_grpo_baseline.py"), f"--steps={steps}",
           f"--eval-every={eval_every}", f"--threads={threads}", f"--out={result_path}", f"--save-dir={out / 'trl-model'}"]
    res = _run("trl", cmd, out, log)
    r = json.loads(result_path.read_text())
    return {**res, "name": "trl", "wall": r["train_clock_s"], "loop_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"],
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


def bound_from_sync(run_dir: Path) -> tuple[float, float]:
    """(G, T): mean seconds per step of generation (+ rewards + weight load) and of the rest, sync run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()][1:]
    g = [r["time/generate_s"] + r["time/reward_s"] + r.get("time/weight_sync_s", 0.0) for r in rows]
    step = [r["time/step_s"] for r in rows]
    G = sum(g) / len(g)
    return G, sum(step) / len(step) - G


def time_to(first: dict, second: dict) -> dict | None:
    """Clock of each run at its first evaluation reaching the lower of the two final accuracies."""
    target = min(first["accuracy"], second["accuracy"])
    a, b = first_reaching(first["evals"], target), first_reaching(second["evals"], target)
    if not a or not b or a[1] <= 0 or b[1] <= 0:
        return None
    return {"accuracy": target, first["name"]: {"step": a[0], "clock": round(a[1], 1)},
            second["name"]: {"step": b[0], "clock": round(b[1], 1)}, "ratio": a[1] / b[1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps of every configuration (recipe: 300)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--quick", action="store_true", help="smoke test: 40 steps, seed 1, no TRL")
    ap.add_argument("--trl-threads", type=int, default=1, help="torch threads of the TRL process")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    ap.add_argument("--eval-every", type=int, default=20, help="held-out evaluation period (steps), all systems")
    ap.add_argument("--out", default="", help="output folder (default runs/async_speedup-<time>)")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for the areal runs (key=value)")
    args = ap.parse_args(argv)
    steps, seeds = (40, [1]) if args.quick else (args.steps, args.seeds)
    out = Path(args.out or ROOT / "runs" / f"async_speedup-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"async_speedup: {steps} steps, seeds {seeds}, out {out}; cpus {os.cpu_count()}, load average {loadavg()}")
    common = [f"run.eval_every={args.eval_every}", *args.overrides]
    pairs = []
    for seed in seeds:  # sync and async of a seed back to back: the same machine state for both
        sync = run_areal(f"sync-s{seed}", ["run.mode=sync", "run.num_threads=1", f"run.seed={seed}", *common], steps, out, log)
        asyn = run_areal(f"async-s{seed}", ["run.mode=async", f"run.seed={seed}", *common], steps, out, log)
        G, T = bound_from_sync(out / sync["name"])
        pairs.append({"seed": seed, "sync": sync, "async": asyn, "G": G, "T": T})
    trl = None if (args.no_trl or args.quick) else run_trl(steps, args.trl_threads, args.eval_every, out, log)

    log(f"\n{steps} steps; G/T: the sync run's generation / training seconds per step")
    log(f"{'seed':>4} {'sync s':>8} {'async s':>8} {'speedup':>8} {'bound':>6} {'sync acc':>9} {'async acc':>9} "
        f"{'drop pt':>8} {'G s':>7} {'T s':>7} {'lag':>5} {'wait s':>7} {'idle':>5}  time to accuracy (sync/async)")
    for p in pairs:
        s, a = p["sync"], p["async"]
        p["speedup"] = s["wall"] / a["wall"]
        p["bound"] = (p["G"] + p["T"]) / max(p["G"], p["T"])
        p["bound_run"] = s["wall"] / (s["wall"] - steps * min(p["G"], p["T"]))
        p["drop"] = 100 * (s["accuracy"] - a["accuracy"])
        p["t2a"] = time_to(s, a)
        t2a = "-" if p["t2a"] is None else f"{p['t2a']['ratio']:.2f} at {p['t2a']['accuracy']:.3f}"
        log(f"{p['seed']:>4} {s['wall']:>8.1f} {a['wall']:>8.1f} {p['speedup']:>8.3f} {p['bound']:>6.3f} "
            f"{s['accuracy']:>9.3f} {a['accuracy']:>9.3f} {p['drop']:>8.1f} {p['G']:>7.4f} {p['T']:>7.4f} "
            f"{a['lag_mean']:>5.2f} {a['wait_s']:>7.4f} {a['idle']:>5.2f}  {t2a}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    speedup, bound = mean([p["speedup"] for p in pairs]), mean([p["bound"] for p in pairs])
    result = {
        "steps": steps, "seeds": seeds,
        "speedup_vs_sync": speedup,
        "accuracy_drop_vs_sync": mean([p["drop"] for p in pairs]),
        "bound": bound, "efficiency": speedup / bound,
        "bound_run": mean([p["bound_run"] for p in pairs]),
        "efficiency_run": speedup / mean([p["bound_run"] for p in pairs]),
        "accuracy_sync": mean([p["sync"]["accuracy"] for p in pairs]),
        "accuracy_async": mean([p["async"]["accuracy"] for p in pairs]),
        "wall_sync": mean([p["sync"]["wall"] for p in pairs]), "wall_async": mean([p["async"]["wall"] for p in pairs]),
        "lag_mean_async": mean([p["async"]["lag_mean"] for p in pairs]),
        "trainer_wait_s_per_step_async": mean([p["async"]["wait_s"] for p in pairs]),
        "rollout_idle_fraction_async": mean([p["async"]["idle"] for p in pairs]),
        "time_to_accuracy_speedup_vs_sync": mean([p["t2a"]["ratio"] for p in pairs if p["t2a"]] or [float("nan")]),
        "per_seed": [{"seed": p["seed"], "speedup": round(p["speedup"], 3), "bound": round(p["bound"], 3), "bound_run": round(p["bound_run"], 3),
                      "accuracy_sync": p["sync"]["accuracy"], "accuracy_async": p["async"]["accuracy"],
                      "wall_sync": round(p["sync"]["wall"], 1), "wall_async": round(p["async"]["wall"], 1),
                      "time_to_accuracy": p["t2a"]} for p in pairs],
        "overrides": args.overrides,
    }
    if trl:
        first = dict(pairs[0]["async"])
        hit = time_to(trl, first)
        log(f"trl: wall {trl['wall']:.1f} s (train clock), accuracy {trl['accuracy']:.3f}")
        if hit:
            result["speedup_vs_trl"] = hit["ratio"]
            result["speedup_vs_trl_basis"] = (f"time to held-out accuracy {hit['accuracy']:.3f} (the lower final "
                                              f"accuracy of the two): trl step {hit['trl']['step']} {hit['trl']['clock']} s"
                                              f" / {first['name']} step {hit[first['name']]['step']} "
                                              f"{hit[first['name']]['clock']} s")
        else:
            result["speedup_vs_trl"] = trl["wall"] / first["evals"][-1][2]
            result["speedup_vs_trl_basis"] = f"equal steps ({steps}): trl train clock / {first['name']} clock at its last step"
        result["accuracy_trl"], result["wall_trl"] = trl["accuracy"], trl["wall"]
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
