"""The synchronous RL loop: generate, score, update, publish, repeat.

Roles stay separate even here: the rollout worker owns its own copy of the model and
receives new weights only through `update_weights`, as a remote worker would.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from areal.config import to_dict, to_yaml
from areal.console import RunView, console
from areal.data import DataError, PromptSampler, encode_prompt, load_rows
from areal.evaluate import CORRECT_ABOVE, evaluate
from areal.metrics import MetricsSink, read_metrics
from areal.model import load_model, load_tokenizer
from areal.recipe import Recipe
from areal.report import write_report
from areal.rewards import RewardPool
from areal.rollout.types import SamplingParams
from areal.rollout.worker import Prompt, RolloutWorker, reward_fields
from areal.runtime import make_run_dir, pick_device, seed_everything, set_threads
from areal.trainer.advantages import filter_uniform_groups, group_advantages
from areal.trainer.batch import build_batch
from areal.trainer.engine import TrainEngine

log = logging.getLogger("areal")


def prepare_prompts(rows, recipe: Recipe, tokenizer, context_len: int | None, split: str) -> list[Prompt]:
    """Encode every row up front, so a bad row fails before any training, naming it."""
    budget = recipe.data.max_prompt_tokens
    if context_len:
        budget = min(budget, context_len - recipe.rollout.max_new_tokens)
    prompts = []
    for i, row in enumerate(rows):
        text, ids = encode_prompt(row, i, recipe.data, tokenizer)
        if len(ids) > budget:
            raise DataError(
                f"{split} row {i}: prompt of {len(ids)} tokens does not fit the context "
                f"({context_len} positions, {recipe.rollout.max_new_tokens} reserved for the completion): {text[:120]!r}"
            )
        prompts.append(Prompt(i, text, ids, reward_fields(row, recipe.data.prompt_key, recipe.data.answer_key)))
    return prompts


def eos_token_ids(model, tokenizer) -> list[int]:
    """The model's end-of-sequence ids (generation config first, the tokenizer's as fallback)."""
    eos = model.generation_config.eos_token_id
    ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    return ids or [tokenizer.eos_token_id]


def make_backend(recipe: Recipe, model, tokenizer):
    eos_ids = eos_token_ids(model, tokenizer)
    if recipe.rollout.backend == "engine":
        from areal.rollout import Engine

        return Engine(model, tokenizer=tokenizer, max_num_seqs=recipe.rollout.batch_size)
    from areal.rollout.hf_backend import HFGenerateBackend

    return HFGenerateBackend(model, eos_token_ids=eos_ids, pad_token_id=tokenizer.pad_token_id, batch_size=recipe.rollout.batch_size)


def step_metrics(groups, advantages_used: int) -> dict[str, float]:
    rewards = [t.reward for g in groups for t in g.trajectories]
    lengths = [len(t.completion_ids) for g in groups for t in g.trajectories]
    return {
        "reward/mean": sum(rewards) / len(rewards),
        "reward/accuracy": sum(r > CORRECT_ABOVE for r in rewards) / len(rewards),
        "rollout/response_length": sum(lengths) / len(lengths),
        "rollout/truncated_fraction": sum(t.finish_reason == "length" for g in groups for t in g.trajectories) / len(rewards),
        "train/groups_used": advantages_used,
    }


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def train(recipe: Recipe, recipe_path: str | None = None) -> RunResult:
    start = time.perf_counter()
    threads = set_threads(recipe.run.num_threads)
    seed_everything(recipe.run.seed)
    device = pick_device(recipe.run.device)
    tokenizer = load_tokenizer(recipe.model)
    policy = load_model(recipe.model, device)
    context_len = getattr(policy.config, "max_position_embeddings", None)
    train_prompts = prepare_prompts(load_rows(recipe.data, "train"), recipe, tokenizer, context_len, "train")
    test_prompts = prepare_prompts(load_rows(recipe.data, "test"), recipe, tokenizer, context_len, "test")

    run_dir = make_run_dir(recipe.run.run_dir, recipe_path)
    (run_dir / "config.yaml").write_text(to_yaml(recipe))
    console.print(f"[bold]areal[/bold] run_dir={run_dir} device={device} threads={threads} "
                  f"train={len(train_prompts)} test={len(test_prompts)} backend={recipe.rollout.backend}")

    backend = make_backend(recipe, copy.deepcopy(policy), tokenizer)  # the rollout worker's own copy
    engine = TrainEngine(policy, recipe.trainer, temperature=recipe.rollout.temperature,
                         gradient_checkpointing=recipe.model.gradient_checkpointing)
    sampler = PromptSampler(train_prompts, recipe.data.shuffle_seed)
    ro, tr = recipe.rollout, recipe.trainer
    params = SamplingParams(n=ro.group_size, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                            top_p=ro.top_p, top_k=ro.top_k, stop=list(ro.stop))
    sink = MetricsSink(run_dir, recipe.logging, to_dict(recipe))
    rc = recipe.reward
    generated_tokens = 0
    try:
        with RewardPool(rc.fn, rc.num_workers, rc.timeout_s, rc.max_logged_failures) as pool:
            worker = RolloutWorker(backend, pool, tokenizer)
            run_eval = lambda: evaluate(backend, pool, tokenizer, test_prompts, ro.eval_max_new_tokens)  # noqa: E731
            initial = run_eval()
            loop_start = time.perf_counter()
            sink.log(0, {**initial, "time/wall_s": 0.0})
            console.print(f"initial held-out accuracy {initial['eval/accuracy']:.3f}")
            final = initial
            with RunView(tr.steps, recipe.logging.progress_bar, recipe.logging.console_every) as view:
                for step in range(1, tr.steps + 1):
                    t0 = time.perf_counter()
                    prompts = [sampler.next()[1] for _ in range(tr.batch_size)]
                    groups, rollout_stats = worker.rollout(prompts, params, first_group_id=(step - 1) * tr.batch_size)
                    generated_tokens += rollout_stats["rollout/generated_tokens"]
                    metrics = step_metrics(groups, len(groups))
                    rewards = torch.tensor([g.rewards for g in groups])
                    if tr.filter_uniform_groups:
                        keep = filter_uniform_groups(rewards)
                        groups = [g for g, k in zip(groups, keep.tolist()) if k]
                        rewards = rewards[keep]
                        metrics["train/groups_used"] = len(groups)
                    if groups:
                        adv = group_advantages(rewards, method=tr.advantage)
                        batch = build_batch(groups, adv.tolist(), tokenizer.pad_token_id)
                        metrics.update(engine.train_step(batch))
                    else:
                        engine.version += 1  # an empty step still advances the version clock
                    t1 = time.perf_counter()
                    worker.update_weights(engine.version, engine.named_weights(), mode=ro.weight_update_mode)
                    t2 = time.perf_counter()
                    metrics.update(rollout_stats)
                    metrics.update({
                        "time/weight_sync_s": t2 - t1,
                        "time/step_s": t2 - t0,
                        "rollout/tokens_per_s": rollout_stats["rollout/generated_tokens"] / max(rollout_stats["time/generate_s"], 1e-9),
                        "version": engine.version,
                    })
                    if step % recipe.run.eval_every == 0 or step == tr.steps:
                        final = run_eval()
                        metrics.update(final)
                    metrics["time/wall_s"] = time.perf_counter() - loop_start
                    sink.log(step, metrics)
                    view.step(step, metrics)
            reward_failures = dict(pool.total_failures)
    finally:
        sink.close()
    summary = {
        "eval_accuracy_initial": initial["eval/accuracy"],
        "eval_accuracy_final": final["eval/accuracy"],
        "steps": tr.steps,
        "wall_seconds": time.perf_counter() - start,
        "train_seconds": time.perf_counter() - loop_start,
        "generated_tokens": generated_tokens,
        "reward_failures": reward_failures,
        "backend": recipe.rollout.backend,
        "threads": threads,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(read_metrics(run_dir / "metrics.jsonl"), run_dir / "report.png", title=str(run_dir.name))
    console.print(
        f"[bold]held-out accuracy {summary['eval_accuracy_initial']:.3f} -> {summary['eval_accuracy_final']:.3f}[/bold] "
        f"in {summary['wall_seconds']:.0f} s ({tr.steps} steps); run_dir={run_dir}"
    )
    return RunResult(run_dir, summary)
