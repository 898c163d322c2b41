"""The train engine: token log-probs of the policy and decoupled-PPO updates.

One process, one device. Log-probs come from the final hidden states through the
chunked kernel, so the full [tokens x vocab] float32 logits never exist at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch

from areal.kernels.logprob import logprobs_and_entropy
from areal.trainer.batch import TrainBatch
from areal.trainer.config import TrainerConfig
from areal.trainer.loss import decoupled_ppo_loss


def lr_lambda(cfg: TrainerConfig, total_updates: int):
    """Linear warm-up, then constant or cosine decay to 10% of the peak."""

    def schedule(update: int) -> float:
        if update < cfg.warmup_steps:
            return (update + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (update - cfg.warmup_steps) / max(1, total_updates - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


class TrainEngine:
    def __init__(self, model, cfg: TrainerConfig, *, temperature: float, gradient_checkpointing: bool = False):
        self.model, self.cfg, self.temperature = model, cfg, temperature
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        total_updates = max(1, cfg.steps * cfg.minibatches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_updates))
        self.version = 0  # completed policy updates (training steps)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_logprobs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(label) and entropy at every target position ([S, T-1]); zero off the mask."""
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        select = batch.loss_mask.bool()
        head = self.model.get_output_embeddings()
        logp, entropy = logprobs_and_entropy(
            hidden[:, :-1][select],
            head.weight,
            batch.labels[select],
            temperature=self.temperature,
            lm_head_bias=getattr(head, "bias", None),
        )
        full_logp = torch.zeros(batch.labels.shape, dtype=logp.dtype, device=logp.device)
        full_ent = torch.zeros_like(full_logp)
        return full_logp.masked_scatter(select, logp), full_ent.masked_scatter(select, entropy.detach())

    @torch.no_grad()
    def proximal_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        self.model.eval()
        return self.token_logprobs(batch)[0]

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One policy update: pi_prox once, then `minibatches` PPO updates; bumps the version."""
        cfg = self.cfg
        batch = batch.to(self.device)
        t0 = time.perf_counter()
        proximal = self.proximal_logprobs(batch) if cfg.decoupled else batch.behaviour_logprobs
        t1 = time.perf_counter()
        self.model.train()
        order = torch.randperm(batch.num_sequences, device=self.device)
        stats: dict[str, float] = {}
        for part in order.chunk(cfg.minibatches):
            mb = batch.select(part)
            logp, entropy = self.token_logprobs(mb)
            loss, loss_stats = decoupled_ppo_loss(
                logp,
                proximal[part],
                mb.behaviour_logprobs,
                mb.advantages,
                mb.loss_mask,
                eps_clip_low=cfg.eps_clip_low,
                eps_clip_high=cfg.eps_clip_high,
                behaviour_weight_cap=cfg.behaviour_weight_cap or None,
                behaviour_weight_mode="truncate" if cfg.behaviour_weight_mode == "truncate" else "mask",
                dual_clip=cfg.dual_clip or None,
                aggregation=cfg.aggregation,
                max_tokens_norm=float(mb.loss_mask.shape[1]),
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            self.optimizer.step()
            self.scheduler.step()
            tokens = mb.loss_mask.sum().clamp(min=1)
            update = {
                "train/loss": loss.item(),
                "train/grad_norm": grad_norm.item(),
                "train/entropy": (entropy * mb.loss_mask).sum().item() / tokens.item(),
                **{f"train/{k}": float(v) for k, v in loss_stats.items()},
            }
            for k, v in update.items():  # average over minibatches
                stats[k] = stats.get(k, 0.0) + v / cfg.minibatches
        t2 = time.perf_counter()
        self.version += 1
        trained = batch.attention_mask.sum().item()
        stats.update({
            "train/lr": self.scheduler.get_last_lr()[0],
            "time/proximal_s": t1 - t0,
            "time/train_s": t2 - t1,
            "train/tokens_per_s": trained / max(t2 - t0, 1e-9),
        })
        return stats

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What rollout workers receive after each step (detached, same names as the HF model)."""
        for name, param in self.model.named_parameters():
            yield name, param.detach()
