"""The recipe schema: one typed section per component, composed here.

Each section's dataclass lives beside its component; this file only gathers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from areal.buffer.config import BufferConfig
from areal.checkpoint.config import CheckpointConfig
from areal.data import DataConfig
from areal.launchers.config import LauncherConfig
from areal.metrics import LoggingConfig
from areal.model import ModelConfig
from areal.options import option
from areal.rewards.config import RewardConfig
from areal.rollout.config import RolloutConfig
from areal.trainer.config import TrainerConfig


@dataclass
class RunConfig:
    run_dir: str = option("", "Output folder; empty = runs/<recipe name>-<timestamp>.")
    seed: int = option(1, "Seed for sampling, data order and initialisation.")
    mode: str = option(
        "async",
        "async: rollout workers and the trainer run as separate processes, bounded by "
        "rollout.max_staleness. sync: one process alternating generation and training.",
        choices=("async", "sync"),
    )
    num_threads: int = option(
        0, "sync mode: torch threads (0 = all cores). On small CPUs thread counts dominate speed."
    )
    trainer_threads: int = option(1, "async mode: torch threads of the trainer process.")
    device: str = option("auto", "auto = cuda when available, else cpu.", choices=("auto", "cpu", "cuda"))
    role_timeout_s: float = option(
        120.0, "async mode: a role not heard from for this long (every role sends a heartbeat each second) is "
        "named in an error; a silent rollout worker is killed and replaced instead.")
    eval_every: int = option(20, "Evaluate held-out greedy accuracy every N steps (and at start and end).")


@dataclass
class Recipe:
    model: ModelConfig = option(ModelConfig(), "Policy model.")
    data: DataConfig = option(DataConfig(), "Prompt data.")
    rollout: RolloutConfig = option(RolloutConfig(), "Generation.")
    reward: RewardConfig = option(RewardConfig(), "Reward function.")
    buffer: BufferConfig = option(BufferConfig(), "Trajectory buffer between rollout and trainer (async mode).")
    trainer: TrainerConfig = option(TrainerConfig(), "Policy optimisation.")
    checkpoint: CheckpointConfig = option(CheckpointConfig(), "Checkpoints, resume and model export.")
    logging: LoggingConfig = option(LoggingConfig(), "Metrics and console.")
    run: RunConfig = option(RunConfig(), "Run-wide settings.")
    launcher: LauncherConfig = option(LauncherConfig(), "Where the roles run: this machine, Ray or Slurm.")

    def validate(self) -> None:
        """Ranges and cross-field checks that single-field types cannot express; each error names its key."""
        from areal.config import ConfigError

        for key, problem in recipe_problems(self):
            raise ConfigError(f"{key}: {problem}")


# The least value of each numeric key that means something (the help of each key says what 0 means where
# 0 is allowed). Keys missing here take any value of their type.
AT_LEAST: dict[str, int] = {
    "data.max_prompt_tokens": 1, "data.eval_size": 0,
    "rollout.group_size": 1, "rollout.top_k": 0, "rollout.max_new_tokens": 1, "rollout.eval_max_new_tokens": 1,
    "rollout.batch_size": 1, "rollout.max_staleness": 0, "rollout.max_concurrent": 1, "rollout.num_workers": 1,
    "rollout.threads_per_worker": 1, "rollout.max_restarts": 0, "rollout.kv_blocks": 1, "rollout.kv_block_size": 1,
    "reward.num_workers": 1, "reward.max_logged_failures": 0,
    "reward.cpu_seconds": 0, "reward.memory_mb": 0, "reward.max_processes": 0,
    "buffer.capacity_groups": 1,
    "trainer.steps": 0, "trainer.batch_size": 1, "trainer.minibatches": 1, "trainer.weight_decay": 0,
    "trainer.warmup_steps": 0, "trainer.grad_clip": 0, "trainer.eps_clip_low": 0, "trainer.eps_clip_high": 0,
    "trainer.behaviour_weight_cap": 0, "trainer.kl_coef": 0, "trainer.overlong_buffer": 0,
    "trainer.overlong_penalty": 0, "trainer.gae_gamma": 0, "trainer.gae_lambda": 0, "trainer.critic_lr": 0,
    "trainer.value_clip": 0, "trainer.max_tokens_per_microbatch": 1, "trainer.world_size": 1,
    "checkpoint.every_steps": 0, "checkpoint.every_seconds": 0, "checkpoint.keep_last": 1,
    "checkpoint.export_every": 0, "logging.console_every": 0,
    "run.seed": 0, "run.num_threads": 0, "run.trainer_threads": 1, "run.eval_every": 1,
    "launcher.trainer.cpus": 1, "launcher.trainer.gpus": 0, "launcher.rollout.cpus": 1, "launcher.rollout.gpus": 0,
    "launcher.slurm.nodes": 1, "launcher.slurm.cpus_per_node": 0, "launcher.slurm.gpus_per_node": 0,
    "launcher.slurm.signal_before_s": 0,
}
ABOVE_ZERO = ("rollout.temperature", "rollout.top_p", "trainer.lr", "reward.timeout_s", "run.role_timeout_s")
AT_MOST_ONE = ("rollout.top_p", "trainer.gae_gamma", "trainer.gae_lambda")
NOT_EMPTY = ("model.path", "data.train_path", "data.test_path", "data.prompt_key", "data.answer_key", "reward.fn")
INT64_MAX = 2**63 - 1  # seeds, counts and sizes travel as 64-bit integers (torch, msgpack)


def get_key(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def recipe_problems(r: Recipe):
    """(key, what is wrong) for each bad value of recipe `r`: single keys first, then conflicts."""
    import math

    from areal.config import all_keys, leaf_type
    from areal.data import template_problem
    from areal.trainer.advantages import GROUP_METHODS

    for key in all_keys(Recipe):
        value, tp = get_key(r, key), leaf_type(Recipe, key)
        if tp is float and not math.isfinite(value):
            yield key, f"must be a finite number, got {value}"
        if tp is int and not -INT64_MAX <= value <= INT64_MAX:
            yield key, f"{value} does not fit a 64-bit integer"
    for key, least in AT_LEAST.items():
        if get_key(r, key) < least:
            yield key, f"must be >= {least}, got {get_key(r, key)}"
    for key in ABOVE_ZERO:
        if not get_key(r, key) > 0:
            yield key, f"must be > 0, got {get_key(r, key)}"
    for key in AT_MOST_ONE:
        if get_key(r, key) > 1:
            yield key, f"must be <= 1, got {get_key(r, key)}"
    for key in NOT_EMPTY:
        if not get_key(r, key).strip():
            yield key, "must not be empty"

    ro, tr, data = r.rollout, r.trainer, r.data
    if ro.group_size == 1 and tr.advantage in GROUP_METHODS:
        yield "rollout.group_size", (
            f"1 sample per prompt gives trainer.advantage={tr.advantage} no signal (group-relative advantages need "
            ">= 2 samples); raise it, or use trainer.advantage=reinforce_pp or ppo_gae")
    for i, stop in enumerate(ro.stop):
        if not stop:
            yield f"rollout.stop[{i}]", "an empty stop string would end every completion at once"
    longest_key, longest = max(("rollout.max_new_tokens", ro.max_new_tokens),
                               ("rollout.eval_max_new_tokens", ro.eval_max_new_tokens), key=lambda kv: kv[1])
    if ro.backend == "engine" and 0 < ro.kv_blocks * ro.kv_block_size <= longest:
        yield "rollout.kv_blocks", (f"{ro.kv_blocks} blocks x rollout.kv_block_size={ro.kv_block_size} tokens cannot "
                                    f"hold one prompt and a completion of {longest_key}={longest} tokens")
    if tr.minibatches > tr.batch_size >= 1:
        yield "trainer.minibatches", (f"{tr.minibatches} minibatches of trainer.batch_size={tr.batch_size} groups: "
                                      "each minibatch needs a group at least (minibatches <= batch_size)")
    elif tr.minibatches >= 1 and tr.batch_size % tr.minibatches:
        yield "trainer.minibatches", f"{tr.minibatches} must divide trainer.batch_size={tr.batch_size}"
    if len(tr.betas) != 2 or not all(0 <= b < 1 for b in tr.betas):
        yield "trainer.betas", f"must be two numbers in [0, 1) (AdamW's beta1, beta2), got {tr.betas}"
    if tr.eps_clip_low >= 1:
        yield "trainer.eps_clip_low", f"must be < 1 (the ratio floor is 1 - eps_clip_low), got {tr.eps_clip_low}"
    if tr.dual_clip != 0 and not tr.dual_clip > 1:
        yield "trainer.dual_clip", f"must be 0 (off) or > 1, got {tr.dual_clip}"
    if 0 < tr.behaviour_weight_cap < 1:
        yield "trainer.behaviour_weight_cap", (
            f"must be 0 (no cap) or >= 1 (a cap below 1 drops on-policy tokens), got {tr.behaviour_weight_cap}")
    if tr.overlong_buffer > ro.max_new_tokens >= 1:
        yield "trainer.overlong_buffer", (
            f"{tr.overlong_buffer} tokens is longer than rollout.max_new_tokens={ro.max_new_tokens} (the penalty "
            "ramps over the last overlong_buffer tokens)")
    if r.buffer.capacity_groups < tr.batch_size:
        yield "buffer.capacity_groups", (f"{r.buffer.capacity_groups} cannot hold one step's trainer.batch_size="
                                         f"{tr.batch_size} groups")
    if (problem := template_problem(data.prompt_template)) is not None:
        yield "data.prompt_template", problem
    if tr.world_size > 1 and r.run.mode != "async":
        yield "trainer.world_size", "several trainer ranks need run.mode=async"
    if tr.world_size > 1 and tr.backend == "deepspeed" and tr.zero_stage == 3:
        yield "trainer.world_size", (f"{tr.world_size} ranks with ZeRO stage 3 is not supported yet (stages 1-2 and "
                                     "trainer.backend=torch are)")
    if r.launcher.type == "ray" and r.run.mode != "async":
        yield "launcher.type", "'ray' runs the roles as Ray actors, which needs run.mode=async"
    if r.launcher.type == "ray" and r.launcher.ray.working_dir and not Path(r.run.run_dir).is_absolute():
        yield "launcher.ray.working_dir", (
            "set run.run_dir to an absolute path on storage this machine and the trainer's node share (a run folder "
            "inside the uploaded copy would vanish with it)")
