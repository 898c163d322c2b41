"""Trainer settings: the objective, the optimiser and the batch shape.

Defaults follow AReaL's GRPO recipe where one exists; each is written in its help text.
"""

from __future__ import annotations

from dataclasses import dataclass

from areal.options import option


@dataclass
class TrainerConfig:
    steps: int = option(60, "Training steps (policy updates); each consumes batch_size groups.")
    batch_size: int = option(16, "Prompts (groups) per training step, B.")
    minibatches: int = option(1, "PPO minibatches per step; each is one optimizer update.")
    lr: float = option(2e-3, "AdamW learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    betas: list[float] = option([0.9, 0.999], "AdamW betas.")
    warmup_steps: int = option(0, "Linear learning-rate warm-up, in optimizer updates.")
    lr_schedule: str = option("constant", "Schedule after warm-up.", choices=("constant", "cosine"))
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0 = off).")
    advantage: str = option(
        "grpo",
        "Advantage estimator: grpo (group mean/std), dr_grpo (group mean only), rloo (leave-one-out).",
        choices=("grpo", "dr_grpo", "rloo"),
    )
    eps_clip_low: float = option(0.2, "PPO clip: ratio floor is 1 - eps_clip_low.")
    eps_clip_high: float = option(0.2, "PPO clip: ratio ceiling is 1 + eps_clip_high (DAPO clip-higher if larger).")
    dual_clip: float = option(0.0, "Dual clip constant c > 1 for negative advantages (0 = off).")
    behaviour_weight_cap: float = option(
        5.0, "Cap on the behaviour importance weight pi_prox/pi_behav (0 = no cap)."
    )
    behaviour_weight_mode: str = option(
        "mask",
        "Beyond the cap: 'mask' drops the token from the loss (AReaL's default), 'truncate' clamps the weight.",
        choices=("mask", "truncate"),
    )
    decoupled: bool = option(
        True, "Decoupled PPO: recompute pi_prox before the update. False = naive PPO (pi_prox = pi_behav)."
    )
    aggregation: str = option(
        "token-mean",
        "Loss aggregation: token-mean over the batch, seq-mean-token-mean, or seq-mean-token-sum-norm (Dr.GRPO).",
        choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    )
    filter_uniform_groups: bool = option(
        False, "Drop groups whose rewards are all equal (zero advantage) before the update."
    )
