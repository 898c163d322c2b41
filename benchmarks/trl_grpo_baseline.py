"""TRL's GRPOTrainer on areal's default recipe, scored by areal's own held-out evaluation.

One run, in this process (`benchmarks/async_speedup.py` starts it in a fresh subprocess):
same model (assets/models/tiny-math), data (arith train.jsonl, prompt "Q: {question}\\nA: "),
reward (areal.rewards.math:math_reward wrapped into TRL's reward signature), group size 8,
16 prompts x 8 samples per generation, max 6 completion tokens, temperature 1.0, CPU fp32.

Mapping of areal's recipe onto TRL's knobs (what "one step" means):
  areal step = 16 groups, split into trainer.minibatches=4 optimizer updates of 4 groups.
  TRL: per_device_train_batch_size=32 completions (4 groups), steps_per_generation=4, so one
  generation of 128 completions feeds 4 optimizer updates; max_steps = 4 x areal steps.
  lr 1.5e-4, 20 warm-up updates, cosine to 10% of the peak (areal's schedule) =
  `cosine_with_min_lr` with min_lr_rate=0.1; clip eps 0.2 / 0.28 (clip-higher); beta=0 (no KL);
  group mean/std advantages (scale_rewards="group"); token-mean loss over each 32-completion
  update (loss_type="dapo" with no gradient accumulation); grad-norm clip 1.0; AdamW (0.9, 0.999).
  TRL recomputes old log-probs once per generation (as areal's decoupled pi_prox).

Held-out accuracy: every `--eval-every` areal-equivalent steps (and before/after training)
the in-memory policy goes through `areal.setup.make_backend` + `areal.evaluate.evaluate`
(greedy, 500 test prompts, same reward), exactly as areal's trainer evaluates itself.
Evaluation time is measured and excluded from `train_clock_s` (so TRL is not charged for it).

    python benchmarks/trl_grpo_baseline.py --steps 40 --out /tmp/trl.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROCESS_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
MINIBATCHES = 4  # areal recipe trainer.minibatches: optimizer updates per areal step


def areal_math_reward(prompts, completions, answer, **_):
    """areal's math_reward in TRL's reward-function signature (one float per completion)."""
    from areal.rewards.math import math_reward

    return [math_reward(p, c, answer=a) for p, c, a in zip(prompts, completions, answer)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="areal-equivalent steps (TRL max_steps = 4x)")
    ap.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every N areal-equivalent steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this (single) process")
    ap.add_argument("--out", required=True, help="JSON result file")
    ap.add_argument("--save-dir", default="", help="save the final TRL model here (optional)")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # recipe paths are relative to the repository root

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from areal.config import build
    from areal.data import format_prompt, load_rows
    from areal.evaluate import evaluate
    from areal.setup import make_backend, make_reward_pool, prepare_prompts
    from areal.model import load_model, load_tokenizer
    from areal.recipe import Recipe

    recipe = build(Recipe, "recipes/math.yaml", ["logging.wandb.mode=disabled"])
    ro, tr = recipe.rollout, recipe.trainer
    assert tr.minibatches == MINIBATCHES and tr.batch_size * ro.group_size % MINIBATCHES == 0
    torch.manual_seed(recipe.run.seed)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, torch.device("cpu"))
    context = model.config.max_position_embeddings
    test_prompts = prepare_prompts(load_rows(recipe.data, "test"), recipe, tokenizer, context, "test")
    train_rows = load_rows(recipe.data, "train")
    dataset = Dataset.from_list([{"prompt": format_prompt(r, recipe.data, tokenizer), "answer": r["answer"]}
                                 for r in train_rows])
    updates = args.steps * MINIBATCHES
    config = GRPOConfig(
        output_dir=str(Path(args.out).with_suffix("")) + "-trl", use_cpu=True, bf16=False, fp16=False,
        seed=recipe.run.seed, report_to=[], save_strategy="no", logging_steps=MINIBATCHES, disable_tqdm=True,
        max_steps=updates, per_device_train_batch_size=tr.batch_size * ro.group_size // MINIBATCHES,
        gradient_accumulation_steps=1, steps_per_generation=MINIBATCHES, num_iterations=1,
        num_generations=ro.group_size, max_completion_length=ro.max_new_tokens, temperature=ro.temperature,
        top_p=ro.top_p, learning_rate=tr.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=tr.warmup_steps, weight_decay=tr.weight_decay,
        adam_beta1=tr.betas[0], adam_beta2=tr.betas[1], max_grad_norm=tr.grad_clip, beta=0.0,
        epsilon=tr.eps_clip_low, epsilon_high=tr.eps_clip_high, scale_rewards="group", loss_type="dapo",
        disable_dropout=True, dataloader_num_workers=0,
    )

    with make_reward_pool(recipe) as pool:
        def held_out(policy) -> dict:
            backend = make_backend(recipe, policy, tokenizer)  # areal's engine over a copy of the policy
            result = evaluate(backend, pool, tokenizer, test_prompts, ro.eval_max_new_tokens)
            policy.train()
            return result

        class Clock(TrainerCallback):
            """Training clock without evaluation; held-out accuracy and reward per areal-equivalent step."""

            def __init__(self):
                self.t0, self.eval_s = None, 0.0
                self.evals, self.rewards = [], []

            def now(self) -> float:
                return time.perf_counter() - self.t0 - self.eval_s

            def on_train_begin(self, args_, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args_, state, control, model=None, **kw):
                step = state.global_step // MINIBATCHES
                if state.global_step % MINIBATCHES == 0 and (step % args.eval_every == 0 or step == args.steps):
                    clock = self.now()
                    t = time.perf_counter()
                    r = held_out(model)
                    self.eval_s += time.perf_counter() - t
                    self.evals.append({"step": step, "accuracy": r["eval/accuracy"], "train_clock_s": clock})
                    print(f"trl step {step}: held-out accuracy {r['eval/accuracy']:.3f} at {clock:.1f} s", flush=True)

            def on_log(self, args_, state, control, logs=None, **kw):
                if logs and "reward" in logs:
                    self.rewards.append({"step": state.global_step / MINIBATCHES, "reward": logs["reward"],
                                         "train_clock_s": self.now()})

        initial = held_out(model)["eval/accuracy"]
        clock = Clock()
        trainer = GRPOTrainer(model=model, reward_funcs=areal_math_reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[clock])
        t_train = time.perf_counter()
        trainer.train()
        train_wall = time.perf_counter() - t_train
        final = clock.evals[-1]["accuracy"] if clock.evals and clock.evals[-1]["step"] == args.steps \
            else held_out(trainer.model)["eval/accuracy"]
    if args.save_dir:
        trainer.save_model(args.save_dir)
    result = {
        "system": "trl", "trl_version": __import__("trl").__version__, "steps": args.steps, "updates": updates,
        "threads": args.threads, "eval_accuracy_initial": initial, "eval_accuracy_final": final,
        "train_seconds": train_wall, "train_clock_s": clock.now(), "eval_seconds": clock.eval_s,
        "wall_seconds": time.perf_counter() - PROCESS_START, "evals": clock.evals, "rewards": clock.rewards,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"trl: held-out accuracy {initial:.3f} -> {final:.3f}; train {result['train_clock_s']:.1f} s "
          f"(+{clock.eval_s:.1f} s evaluation), process {result['wall_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
