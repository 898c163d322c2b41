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
        """Cross-field checks that single-field types cannot express."""
        from areal.config import ConfigError

        positive = {
            "rollout.group_size": self.rollout.group_size,
            "rollout.max_new_tokens": self.rollout.max_new_tokens,
            "trainer.batch_size": self.trainer.batch_size,
            "trainer.minibatches": self.trainer.minibatches,
            "reward.num_workers": self.reward.num_workers,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if self.trainer.steps < 0:
            raise ConfigError(f"trainer.steps: must be >= 0, got {self.trainer.steps}")
        if self.trainer.batch_size % self.trainer.minibatches:
            raise ConfigError(
                f"trainer.minibatches: {self.trainer.minibatches} must divide trainer.batch_size={self.trainer.batch_size}"
            )
        tr = self.trainer
        if tr.world_size < 1:
            raise ConfigError(f"trainer.world_size: must be >= 1, got {tr.world_size}")
        if tr.world_size > 1 and self.run.mode != "async":
            raise ConfigError("trainer.world_size: several trainer ranks need run.mode=async")
        if tr.world_size > 1 and tr.backend == "deepspeed" and tr.zero_stage == 3:
            raise ConfigError(f"trainer.world_size={tr.world_size} with ZeRO stage 3 is not supported yet (stages 1-2 "
                              "and trainer.backend=torch are)")
        if self.launcher.type == "ray" and self.run.mode != "async":
            raise ConfigError("launcher.type=ray: roles are Ray actors, which needs run.mode=async")
        if self.launcher.type == "ray" and self.launcher.ray.working_dir and not Path(self.run.run_dir).is_absolute():
            raise ConfigError("launcher.ray.working_dir: set run.run_dir to an absolute path on storage this machine and "
                              "the trainer's node share (a run folder inside the uploaded copy would vanish with it)")
        for role in ("trainer", "rollout"):
            res = getattr(self.launcher, role)
            if res.cpus < 1 or res.gpus < 0:
                raise ConfigError(f"launcher.{role}: cpus must be >= 1 and gpus >= 0, got {res.cpus} and {res.gpus}")
        if self.reward.timeout_s <= 0:
            raise ConfigError(f"reward.timeout_s: must be > 0, got {self.reward.timeout_s}")
        for key in ("cpu_seconds", "memory_mb", "max_processes"):
            if getattr(self.reward, key) < 0:
                raise ConfigError(f"reward.{key}: must be >= 0, got {getattr(self.reward, key)}")
