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
    lr: float = option(1e-5, "AdamW learning rate (peak, after warm-up).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    betas: list[float] = option([0.9, 0.999], "AdamW betas.")
    warmup_steps: int = option(0, "Linear learning-rate warm-up, in optimizer updates.")
    lr_schedule: str = option("constant", "Schedule after warm-up.", choices=("constant", "cosine"))
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0 = off).")
    advantage: str = option(
        "grpo",
        "Advantage estimator: grpo (group mean/std), dr_grpo (group mean only), rloo (leave-one-out), "
        "reinforce_pp (REINFORCE++: token returns normalised over the batch), ppo_gae (PPO with a "
        "critic and GAE; builds a value model, a copy of the policy's decoder with a scalar head).",
        choices=("grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo_gae"),
    )
    policy_loss: str = option(
        "ppo",
        "ppo: per-token decoupled PPO ratio; gspo: one length-normalised ratio per sequence (GSPO; use "
        "small clips such as eps_clip_low=3e-4, eps_clip_high=4e-4).",
        choices=("ppo", "gspo"),
    )
    publish_every: str = option(
        "minibatch",
        "Async mode: when trainer0 publishes weights to the rollout workers. step: once per version; "
        "minibatch: also after every PPO minibatch (in-step updates), so the next batch is generated "
        "with weights at most one optimizer update old. In-step weights carry the last whole version "
        "they contain, so the staleness bound stays conservative. No effect at eta=0 or in sync mode.",
        choices=("step", "minibatch"),
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
    proximal: str = option(
        "recompute",
        "How decoupled PPO gets pi_prox: recompute (a forward pass over the batch before the update) or "
        "loglinear (A-3PO: interpolate the behaviour and current log-probs by each token's version; no "
        "extra pass).",
        choices=("recompute", "loglinear"),
    )
    aggregation: str = option(
        "token-mean",
        "Loss aggregation: token-mean over the batch, seq-mean-token-mean, or seq-mean-token-sum-norm (Dr.GRPO).",
        choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    )
    kl_coef: float = option(
        0.0, "KL(pi_theta || pi_ref) coefficient. 0 = off, and no reference model is built. Non-zero: the "
        "engine keeps a frozen copy of the initial policy (deepcopy at construction, eval mode) as pi_ref."
    )
    kl_estimator: str = option("k3", "Per-token KL estimator (Schulman): k1, k2 or k3.", choices=("k1", "k2", "k3"))
    kl_mode: str = option(
        "loss",
        "loss: add kl_coef * aggregate(KL) to the loss; reward: subtract kl_coef * KL from the reward "
        "(per token for reinforce_pp/ppo_gae, summed per sequence for the group estimators).",
        choices=("loss", "reward"),
    )
    entropy_coef: float = option(0.0, "Entropy bonus coefficient (loss -= coef * entropy); 0 = off.")
    overlong_buffer: int = option(
        0, "DAPO soft overlong penalty: the last this-many tokens before max_new_tokens ramp the reward "
        "penalty from 0 to -overlong_penalty (0 = off)."
    )
    overlong_penalty: float = option(1.0, "Largest overlong penalty (at max_new_tokens).")
    gae_gamma: float = option(1.0, "GAE discount (ppo_gae).")
    gae_lambda: float = option(1.0, "GAE lambda (ppo_gae).")
    critic_lr: float = option(0.0, "Critic AdamW learning rate (ppo_gae); 0 = same as lr.")
    value_clip: float = option(0.2, "Clip of the value update around the old value, in reward units (0 = off).")
    max_tokens_per_microbatch: int = option(
        8192,
        "Token budget of one packed micro-batch (forward/backward). Sequences are bin-packed into "
        "balanced micro-batches under it and gradients accumulate; the loss is the same as one big batch.",
    )
    packing: bool = option(
        True,
        "Pack sequences into rows without padding (position ids restart per sequence, attention stays "
        "per sequence). False = pad every sequence to the batch's longest (the baseline).",
    )
    share_prompts: bool = option(
        True,
        "Packed micro-batches store a prompt once for all of its group's sequences they hold: "
        "[prompt, completion_1, ..., completion_k], each completion attending to the prompt and itself. "
        "Exact (same log-probs, loss and gradients) on fewer tokens. Applies with packing=true and "
        "packed_attention=varlen.",
    )
    packed_attention: str = option(
        "varlen",
        "Attention over packed rows: varlen (causal SDPA per sequence, a shared prompt's completions each over "
        "the prompt and themselves, batched by shape: sum L_i^2 work) or model (the "
        "model's own attention with a block-diagonal mask from the position ids: N^2 work).",
        choices=("varlen", "model"),
    )
    backend: str = option(
        "torch",
        "torch: one process (DistributedDataParallel over gloo when launched with several ranks); "
        "deepspeed: DeepSpeed ZeRO (pip install deepspeed), a gloo group on 127.0.0.1 if none exists.",
        choices=("torch", "deepspeed"),
    )
    zero_stage: int = option(2, "DeepSpeed ZeRO stage 0-3 (backend=deepspeed).", choices=(0, 1, 2, 3))
    world_size: int = option(
        1, "Trainer ranks (async mode), data-parallel under `backend` (DDP or ZeRO; gloo on CPU, NCCL on GPU). "
        "Rank 0 owns admission and the buffer and hands every rank the step's groups; rank 0 publishes weights.")
    offload_optimizer: bool = option(False, "DeepSpeed: keep optimizer state on the CPU (ZeRO-Offload).")
