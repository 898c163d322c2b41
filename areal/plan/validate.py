"""`python -m areal.plan --validate`: the planner against what can be checked.

Local: short real runs of `python -m areal.train` on this machine (subprocesses, the default recipe's
data and model), each compared on mean step time after warm-up (`time/step_s` of the run's own
metrics.jsonl) with the planner's prediction from a `here` profile measured first (areal/plan/profile.py;
`--stored-profile` uses areal/plan/data/here.json instead) -- one profile for every run, no per-run fitting. Workload inputs taken
from each run: its recipe, its mean completion length (metrics), and the data's mean prompt length.
The ~48-token cases use a random-init model of the shipped shape (it rarely emits EOS). Around each
run the profile's speed probe is timed again: `host_slowdown` says how much slower (> 1) the machine ran
then than when it was profiled, beside the error (a shared host drifts; the prediction is not adjusted).

Published: AReaL (Fu et al., 2025), DeepSeek-R1-Distill-Qwen-1.5B on 16 nodes of 8 H800 (41.0 h sync,
14.8 h async, 2.77x) and -7B on 24 nodes (57.7 h, 25.4 h, 2.27x). Assumed (not all stated in the
paper): 512 prompts x 16 answers per step, prompts of 256 tokens, completions lognormal (σ = 0.8)
with mean 0.35 x cap, cap 27,648 (1.5B) / 32,768 (7B) tokens, async on 3/4 of the GPUs for
generation, η = 4; the device efficiencies of areal/plan/hardware.py. Compared: the sync / async
speedup.

Also written: predicted scaling (8 to 1024 GPUs) beside AReaL's published points, the η curve, and
docs/plan_scaling.png when matplotlib is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from areal.plan.hardware import GPUS, HERE_PROFILE, load_profile
from areal.plan.models import KNOWN_MODELS
from areal.plan.simulate import Workload, simulate

ROOT = Path(__file__).resolve().parents[2]
WARMUP_STEPS = 10
RUN_STEPS = 32

LOCAL_CASES = [  # name, overrides (on recipes/math.yaml), uses the random-init model
    ("sync", ["run.mode=sync", "run.num_threads=1"], False),
    ("async eta=1", ["rollout.max_staleness=1"], False),
    ("async eta=2", ["rollout.max_staleness=2"], False),
    ("async eta=4", ["rollout.max_staleness=4"], False),
    ("async eta=1, 2 workers", ["rollout.max_staleness=1", "rollout.num_workers=2"], False),
    ("sync, ~48 tokens", ["run.mode=sync", "run.num_threads=1", "rollout.max_new_tokens=48"], True),
    ("async eta=1, ~48 tokens", ["rollout.max_staleness=1", "rollout.max_new_tokens=48"], True),
]

PUBLISHED = [  # name, model, GPUs, max completion, sync hours, async hours
    ("AReaL 1.5B, 16x8 H800", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 128, 27648, 41.0, 14.8),
    ("AReaL 7B, 24x8 H800", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 192, 32768, 57.7, 25.4),
]
PUBLISHED_SCALING = {  # AReaL's strong-scaling figure (effective tok/s), read off the paper
    "1.5B @16k": {32: 29e3, 256: 150e3},
    "7B @32k": {64: 19e3, 512: 90e3},
}
PUBLISHED_ETA_1P5B = {0: 128.7e3, 1: 269.3e3, 2: 356.6e3, 4: 356.6e3, 8: 371.7e3}


def random_model(folder: Path) -> Path:
    """The shipped model's shape and tokenizer with random weights (seed 0)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    src = ROOT / "assets" / "models" / "tiny-math"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(folder)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, folder / f.name)
    return folder


def mean_prompt_tokens(recipe) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(recipe.model.path)
    rows = [json.loads(line) for line in Path(recipe.data.train_path).read_text().splitlines()[:300]]
    key = recipe.data.prompt_key
    return float(np.mean([len(tok(recipe.data.prompt_template.format(**{"question": r[key]}))["input_ids"])
                          for r in rows]))


def run_local(overrides: list[str], run_dir: Path, steps: int = RUN_STEPS) -> list[dict]:
    """A real `python -m areal.train` run on the default recipe; its metrics rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "areal.train", "recipe=math.yaml", f"trainer.steps={steps}",
           f"run.run_dir={run_dir}", "run.eval_every=100000", "checkpoint.every_steps=0",
           "logging.progress_bar=false", "data.eval_size=50", *overrides]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from areal.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def steady_state(rows: list[dict], warmup: int = WARMUP_STEPS) -> tuple[float, float]:
    """(mean time/step_s, mean completion length) over the steps after `warmup`."""
    steady = [r for r in rows if "time/step_s" in r][warmup:]
    return (float(np.mean([r["time/step_s"] for r in steady])),
            float(np.mean([r["rollout/response_length"] for r in steady])))


def predict_local(recipe, mean_len: float, prompt_len: float, hw) -> float:
    from areal.plan.__main__ import workload_from

    cluster = {"gpu": "here", "prompt_len": round(prompt_len), "sigma": 0.3, "mean_len": mean_len}
    w = replace(workload_from(recipe, cluster), hw=hw, capped_mean=True)  # the run's measured mean is of capped lengths
    if recipe.run.mode == "sync":
        return simulate(w, "sync", 0, 1, 1, measured=10).step_s
    workers = recipe.rollout.num_workers
    return simulate(w, "async", recipe.rollout.max_staleness, workers, recipe.trainer.world_size, measured=10).step_s


def local_cases(hw) -> list[dict]:
    """Each case's run, predicted and measured. `host_slowdown`: the profile's speed probe timed before and
    after the run, over the same probe when the profile was measured (> 1: the host ran slower than then).
    It is reported beside the error, never applied to the prediction."""
    from areal.config import build
    from areal.plan.profile import speed_probe
    from areal.recipe import Recipe

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        rand = random_model(Path(tmp) / "random-tiny")
        for name, overrides, use_random in LOCAL_CASES:
            overrides = overrides + ([f"model.path={rand}"] if use_random else [])
            recipe = build(Recipe, "math.yaml", overrides)
            before = speed_probe()
            measured, mean_len = steady_state(run_local(overrides, Path(tmp) / name.replace(" ", "_").replace(",", "")))
            slowdown = (before + speed_probe()) / 2 / hw.probe_s if hw.probe_s else None
            predicted = predict_local(recipe, mean_len, mean_prompt_tokens(recipe), hw)
            out.append({"name": f"local: {name}", "predicted": predicted, "measured": measured,
                        "rel_error": abs(predicted - measured) / measured, "mean_len": mean_len,
                        "host_slowdown": slowdown})
            print(json.dumps(out[-1]), file=sys.stderr)
    return out


def published_workload(model: str, max_len: int, **kw) -> Workload:
    return Workload(KNOWN_MODELS[model], GPUS["h800"], 512, 16, 256, 0.35 * max_len, max_len, 0.8,
                    minibatches=4, extra_forwards=1, max_seqs_per_server=1024, admission="greedy", **kw)


def published_cases() -> list[dict]:
    out = []
    for name, model, gpus, max_len, sync_h, async_h in PUBLISHED:
        w = published_workload(model, max_len)
        sync = simulate(w, "sync", 0, gpus, gpus, measured=4)
        rollout = gpus * 3 // 4
        asyn = simulate(w, "async", 4, rollout, gpus - rollout, measured=4)
        predicted, published = sync.step_s / asyn.step_s, sync_h / async_h
        out.append({"name": name, "predicted": predicted, "published": published,
                    "rel_error": abs(predicted - published) / published,
                    "sync_step_s": sync.step_s, "async_step_s": asyn.step_s,
                    "sync_tokens_per_s": sync.tokens_per_s, "async_tokens_per_s": asyn.tokens_per_s})
    return out


def scaling_table(gpu_counts=(8, 16, 32, 64, 128, 256, 512, 1024)) -> dict:
    """Predicted effective tok/s, sync and async (η = 4, 3/4 of the GPUs generating)."""
    settings = {"1.5B @16k": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 16384),
                "7B @32k": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 32768)}
    table = {}
    for label, (model, max_len) in settings.items():
        w = published_workload(model, max_len)
        rows = {}
        for n in gpu_counts:
            sync = simulate(w, "sync", 0, n, n, measured=3)
            rollout = n * 3 // 4
            asyn = simulate(w, "async", 4, rollout, n - rollout, measured=3)
            rows[n] = {"sync": sync.tokens_per_s, "async": asyn.tokens_per_s}
        table[label] = rows
    return table


def eta_curve(etas=(0, 1, 2, 4, 8)) -> dict:
    w = published_workload("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 16384)
    return {eta: simulate(w, "async", eta, 96, 32, measured=3).tokens_per_s for eta in etas}


def plot(table: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (label, rows) in zip(axes, table.items()):
        n = sorted(rows)
        ax.plot(n, [rows[k]["sync"] for k in n], "o-", label="predicted sync")
        ax.plot(n, [rows[k]["async"] for k in n], "s-", label="predicted async (η=4)")
        pub = PUBLISHED_SCALING[label]
        ax.plot(sorted(pub), [pub[k] for k in sorted(pub)], "k^--", label="AReaL published (async)")
        ax.set(xscale="log", yscale="log", xlabel="GPUs (H800)", ylabel="effective tokens/s", title=label)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str]) -> int:
    from rich.table import Table

    from areal.console import console

    from areal.plan.profile import profile

    if "--stored-profile" in argv:
        if not HERE_PROFILE.is_file():
            print(f"error: {HERE_PROFILE} not found; run `python -m areal.plan --profile` first", file=sys.stderr)
            return 2
        hw = load_profile(HERE_PROFILE)
    else:  # measured now, under the load the runs will see (this machine may be shared)
        hw, _ = profile()
    local = local_cases(hw)
    print(json.dumps({"profile_used": hw.__dict__}), file=sys.stderr)
    published = published_cases()
    scaling = scaling_table()
    etas = eta_curve()
    plotted = plot(scaling, ROOT / "docs" / "plan_scaling.png")
    cases = Table(title="validation: predicted vs measured / published")
    for col in ("case", "predicted", "measured / published", "rel. error", "host vs profile"):
        cases.add_column(col, justify="right")
    for c in local + published:
        slowdown = c.get("host_slowdown")
        cases.add_row(c["name"], f"{c['predicted']:.4g}", f"{c.get('measured', c.get('published')):.4g}",
                      f"{c['rel_error']:.0%}", f"{slowdown:.2f}x" if slowdown else "")
    console.print(cases)
    sc = Table(title="predicted effective tok/s (sync / async η=4, 3:1 split) vs AReaL published async")
    for col in ("GPUs", *[f"{k} sync" for k in scaling], *[f"{k} async" for k in scaling], "published"):
        sc.add_column(col, justify="right")
    for n in next(iter(scaling.values())):
        pub = "; ".join(f"{k}: {v[n]:,.0f}" for k, v in PUBLISHED_SCALING.items() if n in v)
        sc.add_row(str(n), *[f"{scaling[k][n]['sync']:,.0f}" for k in scaling],
                   *[f"{scaling[k][n]['async']:,.0f}" for k in scaling], pub)
    console.print(sc)
    eta_t = Table(title="1.5B @16k, 128 GPUs: throughput against η (k tok/s)")
    for col in ("η", "predicted", "AReaL published"):
        eta_t.add_column(col, justify="right")
    for eta, v in etas.items():
        eta_t.add_row(str(eta), f"{v / 1e3:.1f}", f"{PUBLISHED_ETA_1P5B[eta] / 1e3:.1f}")
    console.print(eta_t)
    print(json.dumps({
        "local_max_rel_error": max(c["rel_error"] for c in local),
        "published_max_rel_error": max(c["rel_error"] for c in published),
        "cases": [{k: c[k] for k in ("name", "predicted", "rel_error", "host_slowdown") if k in c} | {
            "measured" if "measured" in c else "published": c.get("measured", c.get("published"))} for c in local + published],
        "scaling": {k: {str(n): v for n, v in rows.items()} for k, rows in scaling.items()},
        "published_scaling": {k: {str(n): v for n, v in rows.items()} for k, rows in PUBLISHED_SCALING.items()},
        "eta_curve": {str(k): v for k, v in etas.items()},
        "published_eta_curve": {str(k): v for k, v in PUBLISHED_ETA_1P5B.items()},
        "plot": "docs/plan_scaling.png" if plotted else None,
        "profile": vars(hw),
    }))
    return 0
