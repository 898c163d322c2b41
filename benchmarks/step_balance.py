"""How much of a training step could asynchrony hide? Generation vs training time per step.

Overlapping generation (G seconds per step) with training (T seconds per step) on separate
workers can at best turn a synchronous step of G + T into max(G, T), so

    async speedup over sync  <=  (G + T) / max(G, T)      (2x only when G == T)

This measures G and T for one step of the default recipe (16 prompts x 8 samples, the
shipped model, 1 thread) with every completion forced to L tokens (ignore_eos), so the
bound can be read off for the default's ~3-token answers and for longer completions:

    G   areal's engine: generate the step's 128 samples (the group's prompt prefilled once)
    T   areal's trainer: pi_prox forward + `trainer.minibatches` PPO updates (packed,
        shared prompts), i.e. exactly `TrainEngine.train_step`

    python benchmarks/step_balance.py                 # L = 3, 12, 24, 48; ~1 min
    python benchmarks/step_balance.py --lengths 3,96

The last line is JSON: per L, G, T and the bound. On a CPU both sides are compute-bound, and
training costs ~3 forward passes per token (forward + backward) plus the pi_prox forward,
while decoding costs about one; on a GPU decoding is memory-bound and dominates, which is
where AReaL's 2.57x comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="3,12,24,48", help="completion lengths L (comma list)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per side (the minimum is kept)")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(1)
    from areal.config import build
    from areal.setup import make_backend, new_train_engine, setup
    from areal.recipe import Recipe
    from areal.rollout.types import SamplingParams
    from areal.trainer.batch import build_batch
    from areal.trajectory import Group, Trajectory

    recipe = build(Recipe, "recipes/math.yaml", ["logging.wandb.mode=disabled"])
    s = setup(recipe, run_dir=Path(os.environ.get("TMPDIR", "/tmp")) / "areal-step-balance")
    ro, tr = recipe.rollout, recipe.trainer
    engine = make_backend(recipe, s.policy, s.tokenizer)
    trainer = new_train_engine(s)
    prompts = [p.token_ids for p in s.train_prompts[: tr.batch_size]]
    result = {}
    print(f"{tr.batch_size} prompts x {ro.group_size} samples, {tr.minibatches} minibatches; seconds per step")
    print(f"{'L':>4} {'generate G':>11} {'train T':>9} {'G/T':>6} {'bound':>6}")
    for length in [int(x) for x in args.lengths.split(",") if x]:
        params = SamplingParams(n=ro.group_size, max_new_tokens=length, temperature=ro.temperature, ignore_eos=True)
        gen_s, outs = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params)
            gen_s.append(time.perf_counter() - t0)
        groups = []
        for gi, prompt in enumerate(prompts):  # rewards alternate so every group has a learning signal
            mine = [o for o in outs if o.prompt_index == gi]
            groups.append(Group(gi, [Trajectory(list(prompt), o.token_ids, o.logprobs, [0] * len(o.token_ids),
                                                reward=float(k % 2)) for k, o in enumerate(mine)]))
        batch = build_batch(groups, None, s.tokenizer.pad_token_id)
        train_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            trainer.train_step(batch)
            train_s.append(time.perf_counter() - t0)
        g, t = min(gen_s), min(train_s)
        bound = (g + t) / max(g, t)
        result[length] = {"generate_s": round(g, 4), "train_s": round(t, 4), "async_speedup_bound": round(bound, 3)}
        print(f"{length:>4} {g:>11.4f} {t:>9.4f} {g / t:>6.2f} {bound:>6.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
