"""What a run needs before its first step, and the factories every process builds its parts with.

`check_inputs()` validates every input but the weights (hub names, reward function, device, data rows,
prompt lengths); `setup()` runs it, loads the policy and chooses the run folder; the builders make the
rollout backend, the reward pool, the train engine and the checkpoint session from a recipe. The sync
loop and each role of an async run call these (an async run's controller calls `check_inputs()` before
it starts any role); nothing here runs a loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from areal.checkpoint.resume import place_run
from areal.checkpoint.session import CheckpointSession, Restored, load_checkpoint
from areal.config import ConfigError, to_dict, to_yaml
from areal.data import DataError, check_data_path, encode_prompt, load_rows, row_source
from areal.hub import check_hub_names
from areal.model import check_model_path, check_model_weights, load_model, load_model_config, load_tokenizer
from areal.recipe import Recipe
from areal.rewards import RewardPool, load_reward_fn
from areal.rollout.messages import Prompt
from areal.rollout.types import SamplingParams
from areal.rollout.worker import reward_fields
from areal.runtime import pick_device, seed_everything
from areal.trainer.engine import TrainEngine


def prepare_prompts(rows, recipe: Recipe, tokenizer, context_len: int | None, split: str) -> list[Prompt]:
    """Encode every row up front, so a bad row fails before any training, naming it."""
    budget = recipe.data.max_prompt_tokens
    if context_len:
        budget = min(budget, context_len - recipe.rollout.max_new_tokens)
    prompts = []
    for i, row in enumerate(rows):
        try:
            text, ids = encode_prompt(row, i, recipe.data, tokenizer)
        except DataError as e:
            raise DataError(f"{split} row {i} ({row_source(recipe.data, split, i)}): {e}") from None
        if len(ids) > budget:
            raise DataError(
                f"{split} row {i}: prompt of {len(ids)} tokens does not fit the context "
                f"({context_len} positions, {recipe.rollout.max_new_tokens} reserved for the completion): "
                f"{text[:120]!r} ({row_source(recipe.data, split, i)})"
            )
        prompts.append(Prompt(i, text, ids, reward_fields(row, recipe.data.prompt_key, recipe.data.answer_key)))
    return prompts


def check_reward_fn(recipe: Recipe) -> None:
    """The reward function imports and is callable; else one line naming reward.fn."""
    try:
        load_reward_fn(recipe.reward.fn)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"reward.fn: {e}") from None
    except ValueError as e:  # the loader's errors name the spec and what exists instead
        raise ConfigError(f"reward.fn: {e}") from None


@dataclass
class Inputs:
    """A recipe's inputs, each checked: what `check_inputs` returns."""

    tokenizer: object
    train_prompts: list[Prompt]
    test_prompts: list[Prompt]


def check_inputs(recipe: Recipe) -> Inputs:
    """Every input but the weights, checked before anything is started, loaded or written: hub names
    (reachable, or in the local cache: areal/hub.py), the reward function, the device, the model folder,
    the data files and every row (areal/data.py), each prompt's length against data.max_prompt_tokens and
    the model's context, the KV pool. Each failure is one ConfigError, DataError or FileNotFoundError
    naming its key (and file and row)."""
    data = recipe.data
    check_hub_names({"model.path": (recipe.model.path, False), "data.train_path": (data.train_path, True),
                     "data.test_path": (data.test_path, True)})
    check_reward_fn(recipe)
    pick_device(recipe.run.device)
    check_model_path(recipe.model.path)
    check_model_weights(recipe.model.path)
    for which in ("train", "test"):
        check_data_path(getattr(data, f"{which}_path"), f"{which}_path")
    tokenizer = load_tokenizer(recipe.model)
    context = getattr(load_model_config(recipe.model), "max_position_embeddings", None)
    longest = max(recipe.rollout.max_new_tokens, recipe.rollout.eval_max_new_tokens)
    if context and longest >= context:
        key = "rollout.max_new_tokens" if recipe.rollout.max_new_tokens == longest else "rollout.eval_max_new_tokens"
        raise ConfigError(f"{key}: {longest} leaves no room for a prompt in the model's context of {context} positions")
    train_prompts = prepare_prompts(load_rows(data, "train"), recipe, tokenizer, context, "train")
    test_prompts = prepare_prompts(load_rows(data, "test"), recipe, tokenizer, context, "test")
    check_kv_pool(recipe, max(len(p.token_ids) for p in train_prompts + test_prompts))
    return Inputs(tokenizer, train_prompts, test_prompts)


def sampling_params(recipe: Recipe) -> SamplingParams:
    ro = recipe.rollout
    return SamplingParams(n=ro.group_size, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                          top_p=ro.top_p, top_k=ro.top_k, stop=list(ro.stop))


def make_eval_engine(recipe: Recipe, model, tokenizer):
    """The second engine a rollout worker evaluates on (rollout.eval_engine). Its steps are smaller than
    the training engine's, so a training batch admitted during an evaluation waits less for one to end,
    and its KV pool is at most a quarter of the training engine's (at least one longest sequence): an
    evaluation only has the steps training leaves, and more sequences than fit just wait their turn."""
    from areal.rollout import Engine

    ro = recipe.rollout
    max_num_seqs = max(1, ro.batch_size // 2)
    per_sequence = -(-(recipe.data.max_prompt_tokens + ro.eval_max_new_tokens) // ro.kv_block_size)
    num_blocks = max(per_sequence, min(ro.kv_blocks // 4, per_sequence * max_num_seqs))
    return Engine(model, tokenizer=tokenizer, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
                  version=-1, num_blocks=num_blocks, block_size=ro.kv_block_size)


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
    return RewardPool.from_config(recipe.reward)


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
    """Everything a run needs before its first step; built once, by the process that trains (rank 0)."""

    recipe: Recipe
    run_dir: Path
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module
    train_prompts: list[Prompt]
    test_prompts: list[Prompt]
    checkpoint: Path | None = None  # the checkpoint this run resumes from


def place(recipe: Recipe, recipe_path: str | None) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (areal/checkpoint/resume.py); writes config.yaml."""
    where = place_run(to_dict(recipe), recipe.run.run_dir, recipe_path, recipe.checkpoint.resume)
    (where.run_dir / "config.yaml").write_text(to_yaml(recipe))
    return where.run_dir, where.checkpoint


def setup(recipe: Recipe, recipe_path: str | None = None, run_dir: Path | None = None,
          checkpoint: Path | None = None) -> Setup:
    """Validate every input (`check_inputs`) before the weights load or anything is written, load the
    policy, and place the run (`place`) unless the controller already did (`run_dir`, `checkpoint`)."""
    inputs = check_inputs(recipe)
    seed_everything(recipe.run.seed)
    device = pick_device(recipe.run.device)
    policy = load_model(recipe.model, device)
    if run_dir is None:
        run_dir, checkpoint = place(recipe, recipe_path)
    return Setup(recipe, run_dir, device, inputs.tokenizer, policy, inputs.train_prompts, inputs.test_prompts,
                 checkpoint)


def build_train_engine(recipe: Recipe, policy: torch.nn.Module) -> TrainEngine:
    return TrainEngine(policy, recipe.trainer, temperature=recipe.rollout.temperature,
                       gradient_checkpointing=recipe.model.gradient_checkpointing,
                       max_new_tokens=recipe.rollout.max_new_tokens)


def new_train_engine(s: Setup) -> TrainEngine:
    return build_train_engine(s.recipe, s.policy)


def shards_per_checkpoint(recipe: Recipe) -> int:
    """Trainer ranks that write a shard of each checkpoint: all of them under ZeRO (each holds a partition),
    else rank 0 alone (DDP: every rank holds the whole state)."""
    tr = recipe.trainer
    return tr.world_size if tr.backend == "deepspeed" and tr.zero_stage >= 1 else 1


def open_session(s: Setup, engine: TrainEngine) -> tuple[CheckpointSession, Restored | None]:
    """The run's checkpoint session; on resume, the trainer's state is restored into `engine`."""
    session = CheckpointSession(s.recipe.checkpoint, s.run_dir, engine, to_dict(s.recipe), s.tokenizer,
                                world_size=shards_per_checkpoint(s.recipe))
    restored = load_checkpoint(s.checkpoint) if s.checkpoint is not None else None
    if restored is not None:
        session.restore_trainer(restored)
    return session, restored


