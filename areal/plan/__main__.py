"""`python -m areal.plan recipe=PATH|NAME cluster.gpus=N cluster.gpu=h100 [key=value ...]`

Recipe keys and overrides are those of `python -m areal.train`. The planner's own keys:

    cluster.gpus=N            devices in the cluster (default 8)
    cluster.gpu=NAME          h100 | h800 | a100 | h200 | here (the stored --profile) | a profile .json
    cluster.etas=[1,2,4,8]    staleness bounds η to tabulate
    cluster.lengths_from=DIR  a finished run's folder: mean completion length from its metrics.jsonl
    cluster.mean_len=T        mean completion length (default: half of rollout.max_new_tokens)
    cluster.max_len=T         completion cap (default: rollout.max_new_tokens)
    cluster.sigma=S           lognormal shape of completion lengths (default 0.8), capped at max_len
    cluster.prompt_len=T      prompt tokens (default 256)

    python -m areal.plan --profile [--out FILE]   measure this machine (the `here` device, ~2.5 min;
                                                  --quick: the shipped model only, a few seconds)
    python -m areal.plan --validate [--stored-profile]   predictions against real runs here (~8 min)
                                                         and AReaL's published figures

The last line printed is one JSON object with the numbers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from areal.config import ConfigError, build, coerce, parse_override

USAGE = ("usage: python -m areal.plan recipe=PATH|NAME cluster.gpus=N cluster.gpu=h100|h800|a100|h200|here "
         "[cluster.etas=[1,2,4,8]] [key=value ...] | --profile [--out FILE] | --validate")
CLUSTER_KEYS = {"gpus": int, "gpu": str, "etas": list, "lengths_from": str, "mean_len": float, "max_len": int,
                "sigma": float, "prompt_len": int}
DEFAULTS = {"gpus": 8, "gpu": "h100", "etas": [1, 2, 4, 8], "prompt_len": 256, "sigma": 0.8}


def split_cluster_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Take the `cluster.*` keys off the command line (checked and typed); the rest is for the recipe."""
    cluster, rest = dict(DEFAULTS), []
    for arg in argv:
        if not arg.startswith("cluster."):
            rest.append(arg)
            continue
        key, value = parse_override(arg)
        name = key.removeprefix("cluster.")
        if name not in CLUSTER_KEYS:
            raise ConfigError(f"unknown key '{key}'; the planner's keys are "
                              + ", ".join(f"cluster.{k}" for k in CLUSTER_KEYS))
        tp = CLUSTER_KEYS[name]
        if tp is list:
            if not (isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)):
                raise ConfigError(f"{key}: expected a list of integers >= 0, got {value!r}")
        elif tp is str:
            value = value if isinstance(value, str) else arg.split("=", 1)[1]  # as typed, as a recipe's text keys
        else:
            value = coerce(value, tp, key)  # "1e30" is a string to YAML 1.1
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key}: expected a positive finite {tp.__name__}, got {value!r}")
        cluster[name] = value
    return cluster, rest


def mean_length_from_run(run_dir: str) -> float:
    """Mean of `rollout/response_length` over a finished run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"cluster.lengths_from: {path} not found (a run folder holds metrics.jsonl)")
    values = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"cluster.lengths_from: {path} line {i} is not JSON") from None
        if "rollout/response_length" in row:
            values.append(float(row["rollout/response_length"]))
    if not values:
        raise ConfigError(f"cluster.lengths_from: {path} has no rollout/response_length rows")
    return sum(values) / len(values)


def workload_from(recipe, cluster: dict):
    """The simulator's Workload for a recipe on the cluster's device."""
    from areal.plan.hardware import get_hardware
    from areal.plan.models import load_architecture
    from areal.plan.simulate import Workload

    hw = get_hardware(cluster["gpu"])
    arch = load_architecture(recipe.model.path)
    ro, tr = recipe.rollout, recipe.trainer
    max_len = int(cluster.get("max_len", ro.max_new_tokens))
    if "lengths_from" in cluster:
        mean_len = mean_length_from_run(cluster["lengths_from"])
    else:
        mean_len = float(cluster.get("mean_len", max_len / 2))
    extra = (1 if tr.decoupled and tr.proximal == "recompute" else 0) + (1 if tr.kl_coef > 0 else 0)
    return Workload(arch, hw, tr.batch_size, ro.group_size, int(cluster["prompt_len"]), min(mean_len, max_len),
                    max_len, float(cluster["sigma"]), minibatches=tr.minibatches, extra_forwards=extra,
                    max_concurrent=ro.max_concurrent, max_seqs_per_server=ro.batch_size,
                    kv_tokens_per_server=ro.kv_blocks * ro.kv_block_size if hw.cores else 0,
                    admission=ro.admission, share_prompts=tr.share_prompts and tr.packing,
                    capped_mean="lengths_from" in cluster)  # a run's mean is of its capped lengths


def plan(recipe, cluster: dict) -> dict:
    """Sync, async at each η on the recommended split, and the split search: the JSON the CLI prints."""
    from areal.plan.costs import tensor_parallel
    from areal.plan.simulate import recommend_split, simulate

    w = workload_from(recipe, cluster)
    gpus = int(cluster["gpus"])
    tp = tensor_parallel(w.arch, w.hw)
    if gpus < tp + 1:
        raise ConfigError(f"cluster.gpus: {gpus} devices cannot hold a {tp}-device rollout server and a trainer")
    eta_for_split = max(1, recipe.rollout.max_staleness)
    best, tried = recommend_split(w, gpus, eta_for_split)
    sync = simulate(w, "sync", 0, (gpus // tp) * tp, gpus)
    rows = [simulate(w, "async", eta, best.rollout_devices, best.train_devices) for eta in cluster["etas"]]
    return {"recipe_mode": recipe.run.mode, "model": w.arch.name, "params": w.arch.params, "gpu": w.hw.name,
            "gpus": gpus, "tensor_parallel": tp,
            "workload": {"batch_prompts": w.groups_per_step, "group_size": w.group_size,
                         "prompt_len": w.prompt_len, "mean_len": w.mean_len, "max_len": w.max_len,
                         "sigma": w.sigma, "extra_forwards": w.extra_forwards, "minibatches": w.minibatches},
            "recommended": {"rollout_devices": best.rollout_devices, "train_devices": best.train_devices,
                            "eta": eta_for_split, "tokens_per_s": best.tokens_per_s},
            "splits": [{"rollout_devices": r.rollout_devices, "tokens_per_s": r.tokens_per_s} for r in tried],
            "sync": sync.row(), "async": [r.row() for r in rows],
            "speedup_async_vs_sync": {str(r.eta): r.tokens_per_s / sync.tokens_per_s for r in rows}}


def print_tables(result: dict) -> None:
    from rich.table import Table

    from areal.console import console

    table = Table(title=f"{result['model']} on {result['gpus']} x {result['gpu']} "
                        f"(async split: {result['recommended']['rollout_devices']} rollout / "
                        f"{result['recommended']['train_devices']} trainer)")
    for col in ("mode", "η", "step s", "tok/s", "rollout idle", "trainer idle", "weight sync s", "mean staleness"):
        table.add_column(col, justify="right")
    for r in [result["sync"], *result["async"]]:
        table.add_row(r["mode"], str(r["eta"]), f"{r['step_s']:.4g}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['rollout_idle']:.0%}", f"{r['trainer_idle']:.0%}", f"{r['weight_sync_s']:.3g}",
                      f"{r['mean_staleness']:.2f}")
    console.print(table)
    splits = Table(title=f"split search at η={result['recommended']['eta']}")
    splits.add_column("rollout devices", justify="right")
    splits.add_column("trainer devices", justify="right")
    splits.add_column("tok/s", justify="right")
    for s in result["splits"]:
        splits.add_row(str(s["rollout_devices"]), str(result["gpus"] - s["rollout_devices"]), f"{s['tokens_per_s']:,.0f}")
    console.print(splits)
    rec = result["recommended"]
    console.print(f"[bold]recommended:[/bold] {rec['rollout_devices']} rollout + {rec['train_devices']} trainer "
                  f"devices, {rec['tokens_per_s']:,.0f} trained tok/s at η={rec['eta']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    flags = [a for a in argv if a.startswith("--")]
    try:
        unknown = set(flags) - {"--profile", "--out", "--validate", "--quick", "--stored-profile"}
        if unknown:
            raise ConfigError(f"unknown flag(s) {sorted(unknown)}; {USAGE}")
        if "--profile" in argv:
            from areal.plan.profile import main as profile_main

            return profile_main(argv)
        if "--validate" in argv:
            from areal.plan.validate import main as validate_main

            return validate_main(argv)
        cluster, rest = split_cluster_args(argv)
        recipe_path, overrides = None, []
        for arg in rest:
            if arg.startswith("recipe="):
                from areal.bundle import find_recipe

                recipe_path = str(find_recipe(arg.split("=", 1)[1]))
            else:
                overrides.append(arg)
        from areal.recipe import Recipe

        recipe = build(Recipe, recipe_path, overrides)
        result = plan(recipe, cluster)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_tables(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
