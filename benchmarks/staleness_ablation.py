"""Decoupled vs naive PPO under staleness, on the default task (AReaL's ablation, our scale).

For each eta in --etas, trains the default recipe asynchronously twice: with the decoupled
objective (pi_prox recomputed) and with naive PPO (pi_prox = pi_behav, `trainer.decoupled=false`).
Prints final held-out accuracy, the observed version lag and wall time; the last line is one
JSON object. Runs are sequential and each starts fresh processes.

    python benchmarks/staleness_ablation.py                 # eta 0 1 2 4 8, the recipe's 300 steps
    python benchmarks/staleness_ablation.py --steps 150 --etas 0 2 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from areal.config import build
from areal.train import train
from areal.recipe import Recipe


def run(eta: int, decoupled: bool, steps: int, seed: int, out: str) -> dict:
    name = f"eta{eta}-{'decoupled' if decoupled else 'naive'}-s{seed}"
    recipe = build(Recipe, "recipes/math.yaml", [
        "run.mode=async", f"rollout.max_staleness={eta}", f"trainer.decoupled={str(decoupled).lower()}",
        f"trainer.steps={steps}", f"run.seed={seed}", f"run.eval_every={steps}", f"run.run_dir={out}/{name}",
        "logging.wandb.mode=disabled", "logging.progress_bar=false",
    ])
    s = train(recipe).summary
    return {"eta": eta, "objective": "decoupled" if decoupled else "naive", "seed": seed,
            "accuracy": s["eval_accuracy_final"], "initial": s["eval_accuracy_initial"],
            "max_version_lag": s["max_version_lag"], "wall_seconds": round(s["wall_seconds"], 1),
            "load_avg": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--etas", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="areal-ablation-"))
    args = parser.parse_args()
    rows = []
    for eta in args.etas:
        for decoupled in (True, False):
            if eta == 0 and not decoupled:
                continue  # at eta = 0, pi_prox = pi_behav: both objectives are the same
            for seed in args.seeds:
                rows.append(run(eta, decoupled, args.steps, seed, args.out))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n| eta | naive PPO | decoupled PPO |  ({args.steps} steps, held-out greedy accuracy, "
          f"mean ± sample std over seeds {args.seeds})")
    print("|---|---|---|")
    table = {}
    for eta in args.etas:
        cells = []
        for objective in ("naive", "decoupled"):
            accs = [r["accuracy"] for r in rows if r["eta"] == eta and r["objective"] == objective]
            value = sum(accs) / len(accs) if accs else None
            table[f"{objective}_eta{eta}"] = value
            spread = "" if len(accs) < 2 else f" ± {100 * statistics.stdev(accs):.1f}"
            cells.append("-" if value is None else f"{100 * value:.1f}{spread}")
        print(f"| {eta} | {cells[0]} | {cells[1]} |")
    print(json.dumps({"steps": args.steps, "seeds": args.seeds, "accuracy": table, "runs": rows}))


if __name__ == "__main__":
    main()
