"""The staleness study: accuracy, wall time and consumed lag against eta, objective and admission.

For every eta in --etas, objective in --objectives and admission in --admission, trains a recipe
asynchronously once per seed, each run a fresh `python -m areal.train` (one after the other):

  objective   naive       PPO with pi_prox = pi_behav (`trainer.decoupled=false`)
              decoupled   decoupled PPO, pi_prox recomputed by a forward pass (`trainer.proximal=recompute`)
              loglinear   decoupled PPO, pi_prox approximated from behaviour and current log-probs
                          by version (A-3PO, `trainer.proximal=loglinear`): no extra pass
  admission   fresh       `rollout.admission=fresh`: admit only as far ahead as the trainer needs
              greedy      `rollout.admission=greedy`: fill the whole eta budget
At eta = 0 every objective is the same update (pi_prox = pi_behav) and admission has nothing to
choose, so eta 0 runs once per seed.

Rows are appended to <out>/runs.jsonl as they finish; a rerun with the same --out skips the runs
already there, so a long study can be stopped and continued. The table gives mean ± sample std
over seeds of the final held-out accuracy, the wall time and the mean consumed lag. The last line
is one JSON object.

    python benchmarks/staleness_ablation.py --out runs/study              # the full grid, 3 seeds
    python benchmarks/staleness_ablation.py --etas 1 4 --objectives decoupled loglinear --admission fresh
    python benchmarks/staleness_ablation.py --recipe recipes/chain.yaml --out runs/study-chain
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    "naive": ["trainer.decoupled=false"],
    "decoupled": ["trainer.decoupled=true", "trainer.proximal=recompute"],
    "loglinear": ["trainer.decoupled=true", "trainer.proximal=loglinear"],
}


def configs(etas, objectives, admissions):
    """(eta, objective, admission) to run; eta 0 once (every objective and admission is the same there)."""
    out = []
    for eta in etas:
        if eta == 0:
            out.append((0, objectives[0], admissions[0]))
            continue
        out += [(eta, o, a) for o in objectives for a in admissions]
    return out


def run(recipe: str, eta: int, objective: str, admission: str, seed: int, steps: int, out: Path, extra) -> dict:
    name = f"eta{eta}-{objective}-{admission}-s{seed}"
    run_dir = out / name
    cmd = [sys.executable, "-m", "areal.train", f"recipe={recipe}", "run.mode=async", f"rollout.max_staleness={eta}",
           f"rollout.admission={admission}", *OBJECTIVES[objective], f"trainer.steps={steps}", f"run.seed={seed}",
           f"run.eval_every={steps}", f"run.run_dir={run_dir}", "logging.wandb.mode=disabled",
           "logging.progress_bar=false", "checkpoint.every_steps=0", *extra]
    load = os.getloadavg()[0]
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}); see {out / f'{name}.log'}")
    s = json.loads((run_dir / "summary.json").read_text())
    return {"eta": eta, "objective": objective, "admission": admission, "seed": seed,
            "accuracy": s["eval_accuracy_final"], "initial": s["eval_accuracy_initial"],
            "wall_seconds": round(s["wall_seconds"], 1), "lag_mean": round(s["lag_mean"], 3),
            "lag_max": s["lag_max"], "trainer_wait_s_per_step": round(s["trainer_wait_s_per_step"], 4),
            "rollout_idle_fraction": round(s["rollout_idle_fraction"], 3), "load_before": round(load, 2)}


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/math.yaml")
    ap.add_argument("--etas", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    ap.add_argument("--admission", nargs="+", default=["fresh", "greedy"], choices=["fresh", "greedy"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "runs" / f"staleness-{time.strftime('%Y%m%d-%H%M%S')}"))
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for every run (key=value)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "runs.jsonl"
    rows = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    key = lambda r: (r["eta"], r["objective"], r["admission"], r["seed"])  # noqa: E731
    have = {key(r) for r in rows}
    for eta, objective, admission in configs(args.etas, args.objectives, args.admission):
        for seed in args.seeds:
            if (eta, objective, admission, seed) in have:
                continue
            row = run(args.recipe, eta, objective, admission, seed, args.steps, out, args.overrides)
            rows.append(row)
            with open(done_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

    wanted = {(e, o, a) for e, o, a in configs(args.etas, args.objectives, args.admission)}
    print(f"\n{args.recipe}, {args.steps} steps, held-out greedy accuracy (points), mean ± sample std over seeds")
    print("| eta | objective | admission | seeds | accuracy | wall s | mean lag | trainer wait s/step |")
    print("|---|---|---|---|---|---|---|---|")
    table = {}
    for eta, objective, admission in sorted(wanted):
        mine = [r for r in rows if (r["eta"], r["objective"], r["admission"]) == (eta, objective, admission)
                and r["seed"] in args.seeds]
        if not mine:
            continue
        acc, acc_sd = mean_std(100 * r["accuracy"] for r in mine)
        wall, wall_sd = mean_std(r["wall_seconds"] for r in mine)
        lag, _ = mean_std(r["lag_mean"] for r in mine)
        wait, _ = mean_std(r["trainer_wait_s_per_step"] for r in mine)
        table[f"eta{eta}-{objective}-{admission}"] = {"accuracy": round(acc, 2), "accuracy_std": round(acc_sd, 2),
                                                     "wall": round(wall, 1), "wall_std": round(wall_sd, 1),
                                                     "lag_mean": round(lag, 3), "wait_s": round(wait, 4),
                                                     "seeds": sorted(r["seed"] for r in mine)}
        print(f"| {eta} | {objective} | {admission} | {len(mine)} | {acc:.1f} ± {acc_sd:.1f} | {wall:.1f} ± {wall_sd:.1f} "
              f"| {lag:.2f} | {wait:.3f} |")
    print(json.dumps({"recipe": args.recipe, "steps": args.steps, "seeds": args.seeds, "results": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
