"""Running a recipe: set up, step, log, evaluate, checkpoint, export, summarise.

`drive()` is the same for both modes; only the step loop and the evaluation differ:
  - `SyncLoop`: one process alternating generation and training (the reference),
    evaluating in place;
  - `areal.async_loop.AsyncLoop`: rollout workers and the trainer in separate processes,
    evaluating on the workers (`RemoteEvaluator` returns a Future).
Each yields (step, groups, metrics) after every policy update, and `capture()`s what a
checkpoint needs to continue it exactly (areal/checkpoint/session.py).
"""

from __future__ import annotations

import copy
import json
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from areal.checkpoint.resume import place_run
from areal.checkpoint.session import CheckpointSession, Preempted, Restored, load_checkpoint, truncate_metrics
from areal.config import to_dict, to_yaml
from areal.console import RunView, console
from areal.data import DataError, PromptSampler, encode_prompt, load_rows
from areal.evaluate import CORRECT_ABOVE, evaluate
from areal.metrics import MetricsSink, read_metrics
from areal.model import load_model, load_tokenizer
from areal.recipe import Recipe
from areal.report import write_report
from areal.rewards import RewardPool, load_reward_fn
from areal.rollout.types import SamplingParams
from areal.rollout.worker import Prompt, RolloutWorker, reward_fields
from areal.runtime import pick_device, seed_everything
from areal.trainer.advantages import filter_uniform_groups
from areal.trainer.batch import build_batch
from areal.trainer.engine import TrainEngine


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


def sampling_params(recipe: Recipe) -> SamplingParams:
    ro = recipe.rollout
    return SamplingParams(n=ro.group_size, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                          top_p=ro.top_p, top_k=ro.top_k, stop=list(ro.stop))


def make_backend(recipe: Recipe, model, tokenizer, version: int = 0):
    """The rollout backend over `model` (the engine copies it; HF generate uses it in place)."""
    if recipe.rollout.backend == "engine":
        from areal.rollout import Engine

        return Engine(model, tokenizer=tokenizer, max_num_seqs=recipe.rollout.batch_size, version=version,
                      num_blocks=recipe.rollout.kv_blocks, block_size=recipe.rollout.kv_block_size)
    from areal.rollout.hf_backend import HFGenerateBackend

    eos = model.generation_config.eos_token_id
    eos_ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None] or [tokenizer.eos_token_id]
    return HFGenerateBackend(model, eos_token_ids=eos_ids, pad_token_id=tokenizer.pad_token_id,
                             batch_size=recipe.rollout.batch_size, version=version)


def make_reward_pool(recipe: Recipe) -> RewardPool:
    rc = recipe.reward
    return RewardPool(rc.fn, rc.num_workers, rc.timeout_s, rc.max_logged_failures)


def check_kv_pool(recipe: Recipe, longest_prompt: int) -> None:
    """The engine's KV pool must hold at least one whole sequence, or nothing could ever run."""
    ro = recipe.rollout
    need = longest_prompt + max(ro.max_new_tokens, ro.eval_max_new_tokens)
    if ro.backend == "engine" and ro.kv_blocks * ro.kv_block_size < need:
        from areal.config import ConfigError

        raise ConfigError(
            f"rollout.kv_blocks: {ro.kv_blocks} blocks x {ro.kv_block_size} tokens cannot hold one sequence "
            f"of {need} tokens (longest prompt {longest_prompt} + completion)"
        )


@dataclass
class Setup:
    """Everything a run needs before its first step; built once per trainer process."""

    recipe: Recipe
    run_dir: Path
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module | None  # None where only the inputs are validated
    train_prompts: list[Prompt]
    test_prompts: list[Prompt]
    checkpoint: Path | None = None  # the checkpoint this run resumes from


def setup(recipe: Recipe, recipe_path: str | None = None, run_dir: Path | None = None,
          load_policy: bool = True, prompts: tuple[list[Prompt], list[Prompt]] | None = None,
          checkpoint: Path | None = None) -> Setup:
    """Validate every input (reward spec, model, data, prompt lengths) before any work is written,
    then choose the run folder and the checkpoint to resume from (areal/checkpoint/resume.py).

    `load_policy=False` (the async controller) checks the model's config but loads no weights;
    `prompts` (train, test) already validated by it are taken as they are, and `run_dir` and
    `checkpoint` as the controller chose them (the trainer role).
    """
    from transformers import AutoConfig

    load_reward_fn(recipe.reward.fn)
    seed_everything(recipe.run.seed)
    device = pick_device(recipe.run.device)
    tokenizer = load_tokenizer(recipe.model)
    policy = load_model(recipe.model, device) if load_policy else None
    config = policy.config if policy is not None else AutoConfig.from_pretrained(
        recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    context = getattr(config, "max_position_embeddings", None)
    if prompts is None:
        train_prompts = prepare_prompts(load_rows(recipe.data, "train"), recipe, tokenizer, context, "train")
        test_prompts = prepare_prompts(load_rows(recipe.data, "test"), recipe, tokenizer, context, "test")
    else:
        train_prompts, test_prompts = prompts
    check_kv_pool(recipe, max(len(p.token_ids) for p in train_prompts + test_prompts))
    if run_dir is None:
        place = place_run(to_dict(recipe), recipe.run.run_dir, recipe_path, recipe.checkpoint.resume)
        run_dir, checkpoint = place.run_dir, place.checkpoint
        (run_dir / "config.yaml").write_text(to_yaml(recipe))
    return Setup(recipe, run_dir, device, tokenizer, policy, train_prompts, test_prompts, checkpoint)


def new_train_engine(s: Setup) -> TrainEngine:
    return TrainEngine(s.policy, s.recipe.trainer, temperature=s.recipe.rollout.temperature,
                       gradient_checkpointing=s.recipe.model.gradient_checkpointing,
                       max_new_tokens=s.recipe.rollout.max_new_tokens)


class SyncLoop:
    """Generate B groups with the current weights, train on them, publish, repeat (the reference).

    Between two steps nothing is in flight, so its resumable state is the data position alone.
    """

    def __init__(self, s: Setup, worker: RolloutWorker, engine: TrainEngine, restored: Restored | None = None):
        self.s, self.worker, self.engine = s, worker, engine
        self.sampler = PromptSampler(s.train_prompts, s.recipe.data.shuffle_seed)
        self.first_step = 1
        if restored is not None:
            self.sampler.load_state(restored.state["loop"]["sampler"])
            self.first_step = restored.step + 1

    def capture(self) -> tuple[dict, list[Future]]:
        return {"loop": {"sampler": self.sampler.state()}}, []

    def __iter__(self):
        s, worker, engine = self.s, self.worker, self.engine
        tr = s.recipe.trainer
        for step in range(self.first_step, tr.steps + 1):
            t0 = time.perf_counter()
            prompts = [self.sampler.next()[1] for _ in range(tr.batch_size)]
            groups, metrics = worker.rollout(prompts, list(range((step - 1) * tr.batch_size, step * tr.batch_size)))
            used = groups
            if s.recipe.buffer.filter_uniform_rewards:
                keep = filter_uniform_groups(torch.tensor([g.rewards for g in groups])).tolist()
                used = [g for g, k in zip(groups, keep) if k]
            metrics["train/groups_used"] = len(used)
            if used:  # advantages are the engine's job (trainer.advantage, KL-in-reward, overlong penalty)
                metrics.update(engine.train_step(build_batch(used, None, s.tokenizer.pad_token_id)))
            else:
                engine.version += 1  # an empty step still advances the version clock
            t1 = time.perf_counter()
            worker.update_weights(engine.version, engine.named_weights(), mode=s.recipe.rollout.weight_update_mode)
            t2 = time.perf_counter()
            metrics.update({
                "time/weight_sync_s": t2 - t1,
                "time/step_s": t2 - t0,
                "rollout/tokens_per_s": metrics["rollout/generated_tokens"] / max(metrics["time/generate_s"], 1e-9),
            })
            yield step, groups, metrics


def group_metrics(groups) -> dict[str, float]:
    trajs = [t for g in groups for t in g.trajectories]
    rewards = [t.reward for t in trajs]
    failures = {f"reward/failures_{kind}": 0 for kind in ("error", "timeout", "nan", "non_number")}
    for g in groups:
        for kind, count in g.reward_failures.items():
            failures[f"reward/failures_{kind}"] = failures.get(f"reward/failures_{kind}", 0) + count
    return {
        **failures,
        "reward/mean": sum(rewards) / len(rewards),
        "reward/accuracy": sum(r > CORRECT_ABOVE for r in rewards) / len(rewards),
        "rollout/response_length": sum(len(t.completion_ids) for t in trajs) / len(trajs),
        "rollout/truncated_fraction": sum(t.finish_reason == "length" for t in trajs) / len(trajs),
    }


def drive(s: Setup, loop, eval_fn, session: CheckpointSession, restored: Restored | None = None,
          extra_summary=None) -> dict:
    """Log every step, evaluate every `run.eval_every`, checkpoint when due, export the model, and
    write report.png; returns the summary.

    `loop` yields (step, groups, metrics) after every update and `capture()`s its resumable state.
    eval_fn(step) returns the held-out metrics, or a Future of them (async runs evaluate on a
    rollout worker while training goes on): a step's row is logged once its evaluation is in,
    so rows stay in step order with the accuracy of that step's weights.
    A resumed run (`restored`) keeps metrics.jsonl up to its checkpoint and continues after it.
    """
    recipe, run_dir, last_step = s.recipe, s.run_dir, s.recipe.trainer.steps
    prior = truncate_metrics(run_dir, restored.step) if restored else []
    carried = restored.state["drive"] if restored else {"generated": 0, "wall_s": 0.0, "wandb_id": None}
    start = time.perf_counter() - carried["wall_s"]  # the wall clock continues across a resume
    sink = MetricsSink(run_dir, recipe.logging, to_dict(recipe), wandb_id=carried["wandb_id"])
    waiting: deque[tuple[int, dict, object]] = deque()  # (step, metrics, evaluation or None), in step order
    evals: list[dict] = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in prior if "eval/accuracy" in r]
    generated = carried["generated"]

    def request_eval(step: int) -> Future:
        evaluation = eval_fn(step)
        if not isinstance(evaluation, Future):  # evaluated in place: already done
            done, evaluation = evaluation, Future()
            evaluation.set_result(done)
        # stamp when the result is in, not when it is logged
        evaluation.add_done_callback(lambda f: setattr(f, "wall_s", time.perf_counter() - start))
        return evaluation

    def flush(view, block: bool) -> None:
        while waiting and (block or waiting[0][2] is None or waiting[0][2].done()):
            step, metrics, evaluation = waiting.popleft()
            if evaluation is not None:
                result = _result(evaluation)  # done() can come a moment before the stamping callback
                wall = getattr(evaluation, "wall_s", time.perf_counter() - start)
                evals.append({**result, "eval/wall_s": wall})
                metrics.update(evals[-1])
            sink.log(step, metrics)
            if step == 0:
                console.print(f"initial held-out accuracy {metrics['eval/accuracy']:.3f}")
            else:
                view.step(step, metrics)

    def checkpoint(view, step: int, wait: bool) -> None:
        if session.busy() and recipe.checkpoint.on_busy == "skip" and not wait:
            session.skip(step)  # the previous one is still being written
            return
        if wait or recipe.checkpoint.on_busy == "wait":
            flush(view, block=True)  # a pending checkpoint may wait for these rows
        state, extras = loop.capture()
        state["drive"] = {"generated": generated, "wall_s": time.perf_counter() - start, "wandb_id": sink.wandb_id}
        session.save(step, state, [*extras, sink.on_disk(step)], wait=wait)

    try:
        with RunView(last_step, recipe.logging.progress_bar, recipe.logging.console_every) as view:
            if restored is None:
                waiting.append((0, {"time/wall_s": 0.0}, request_eval(0)))
            else:
                console.print(f"resumed from step {restored.step} ({restored.path})")
            flush(view, block=False)
            for step, groups, metrics in loop:
                metrics.update(group_metrics(groups))
                metrics.update(session.metrics())
                metrics["version"] = step
                metrics["data/group_ids"] = [g.group_id for g in groups]  # nothing lost or trained twice, across resumes
                metrics["data/sample_ids"] = [g.prompt_index for g in groups]
                generated += sum(len(t.completion_ids) for g in groups for t in g.trajectories)
                metrics["time/wall_s"] = time.perf_counter() - start
                due = step % recipe.run.eval_every == 0 or step == last_step
                waiting.append((step, metrics, request_eval(step) if due else None))
                flush(view, block=False)
                if session.preempt:
                    checkpoint(view, step, wait=True)
                    raise Preempted(step, str(session.path_of(step)))
                if session.due(step, last_step):
                    checkpoint(view, step, wait=False)
                if recipe.checkpoint.export_every and step % recipe.checkpoint.export_every == 0:
                    session.export(run_dir / "exports" / f"step_{step}")
            flush(view, block=True)
        session.export(run_dir / "model")
        session.close()
    finally:
        sink.close()
    summary = {
        "eval_accuracy_initial": evals[0]["eval/accuracy"],
        "eval_accuracy_final": evals[-1]["eval/accuracy"],
        "steps": last_step,
        "resumed_from_step": restored.step if restored else None,
        "loop_seconds": time.perf_counter() - start,  # first evaluation to the last step, across resumes
        "generated_tokens": generated,
        "mode": recipe.run.mode,
        "backend": recipe.rollout.backend,
        "model_dir": str(run_dir / "model"),
        **session.summary(),
        **(extra_summary() if extra_summary else {}),
    }
    write_report(read_metrics(run_dir / "metrics.jsonl"), run_dir / "report.png", title=run_dir.name)
    return summary


def _result(evaluation: Future, timeout_s: float = 600.0) -> dict:
    try:
        return evaluation.result(timeout=timeout_s)
    except TimeoutError:
        raise TimeoutError(f"no held-out evaluation result within {timeout_s:.0f} s (rollout workers stuck?)") from None


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def open_session(s: Setup, engine: TrainEngine) -> tuple[CheckpointSession, Restored | None]:
    """The run's checkpoint session; on resume, the trainer's state is restored into `engine`."""
    session = CheckpointSession(s.recipe.checkpoint, s.run_dir, engine, to_dict(s.recipe), s.tokenizer)
    restored = load_checkpoint(s.checkpoint) if s.checkpoint is not None else None
    if restored is not None:
        session.restore_trainer(restored)
    return session, restored


def train_sync(recipe: Recipe, recipe_path: str | None = None) -> RunResult:
    from areal.runtime import set_threads

    threads = set_threads(recipe.run.num_threads)
    s = setup(recipe, recipe_path)
    console.print(f"[bold]areal[/bold] sync run_dir={s.run_dir} device={s.device} threads={threads} "
                  f"train={len(s.train_prompts)} test={len(s.test_prompts)} backend={recipe.rollout.backend}")
    engine = new_train_engine(s)  # from the initial weights: a KL reference copies them
    session, restored = open_session(s, engine)
    # the rollout side's own copy, of the (restored) trained weights
    backend = make_backend(recipe, copy.deepcopy(s.policy), s.tokenizer, version=engine.version)
    session.preempt.install()
    try:
        with make_reward_pool(recipe) as pool:
            worker = RolloutWorker(backend, pool, s.tokenizer, sampling_params(recipe), base_seed=recipe.run.seed)
            eval_fn = lambda _step: evaluate(backend, pool, s.tokenizer, s.test_prompts, recipe.rollout.eval_max_new_tokens)  # noqa: E731
            summary = drive(s, SyncLoop(s, worker, engine, restored), eval_fn, session, restored,
                            lambda: {"reward_failures": dict(pool.total_failures), "threads": threads})
    finally:
        session.preempt.uninstall()
    return RunResult(s.run_dir, summary)


def train(recipe: Recipe, recipe_path: str | None = None) -> RunResult:
    """Run a recipe in its mode, write summary.json and print the held-out accuracy before and after."""
    start = time.perf_counter()
    if recipe.run.mode == "sync":
        result = train_sync(recipe, recipe_path)
    else:
        from areal.controller import train_async

        result = train_async(recipe, recipe_path)
    sm = result.summary
    sm["wall_seconds"] = time.perf_counter() - start  # everything: loading, processes, evaluation
    (result.run_dir / "summary.json").write_text(json.dumps(sm, indent=2))
    console.print(
        f"[bold]held-out accuracy {sm['eval_accuracy_initial']:.3f} -> {sm['eval_accuracy_final']:.3f}[/bold] "
        f"in {sm['wall_seconds']:.0f} s ({sm['steps']} steps, {sm['mode']}); run_dir={result.run_dir}"
    )
    return result
