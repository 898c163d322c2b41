"""The train engine: token log-probs of the policy and decoupled-PPO / GSPO updates.

A step's sequences run in micro-batches under `trainer.max_tokens_per_microbatch`, packed
without padding (trainer/packing.py); gradients accumulate across micro-batches and the
loss equals the one-big-batch loss: each micro-batch's aggregated loss is scaled by
    count_microbatch / count_global      (x world size under DDP / ZeRO gradient averaging)
where count is valid tokens (token-mean) or sequences with a valid token (sequence means),
counted after behaviour-weight masking, over every rank. Log-probs come from the final
hidden states through the chunked kernel, so [tokens x vocab] logits never exist at once.

Optional parts, built only when configured: a frozen reference policy (kl_coef != 0: a
deepcopy of the policy at construction, i.e. the initial weights, in eval mode) and a
critic (advantage=ppo_gae, trainer/critic.py).

Resumable state (checkpoint_state / load_checkpoint_state): this rank's LIVE tensors under flat
names plus a JSON-able meta dict; set_before_step installs the hook a lazy checkpointer needs
(it runs right before any optimizer step changes those tensors).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from areal.kernels.logprob import logprobs_and_entropy
from areal.trainer import advantages as adv_fns
from areal.trainer.backends import TorchBackend, lr_lambda, make_backend, world  # noqa: F401 (lr_lambda re-exported)
from areal.trainer.batch import TrainBatch
from areal.trainer.config import TrainerConfig
from areal.trainer.critic import ValueModel, clipped_value_loss
from areal.trainer.loss import (_behaviour_weight, aggregate, decoupled_ppo_loss, entropy_bonus, gspo_loss, kl_penalty,
                                loglinear_proximal)
from areal.trainer.packing import (MicroBatch, layout_argument, make_microbatches, register_varlen_attention,
                                  split_balanced)

ENGINE_SIDE_ADVANTAGES = ("reinforce_pp", "ppo_gae")
STATE_FORMAT = "areal-train-state/1"
_POLICY_PARAMS = "model/policy."  # PolicyLogprobs names the HF model's parameters "policy.<name>"


def _renamed(tensors: dict[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
    return {new + k[len(old):] if k.startswith(old) else k: v for k, v in tensors.items()}


class PolicyLogprobs(nn.Module):
    """What DDP / DeepSpeed wrap: log pi(label) and entropy [n] at a micro-batch's targets."""

    def __init__(self, policy: nn.Module, temperature: float, materialize_logits: bool = False):
        super().__init__()
        self.policy, self.temperature = policy, temperature
        self.materialize_logits = materialize_logits  # ZeRO-3: the head must run as a module to be gathered

    def forward(self, input_ids, position_ids, attention_mask, hidden_index, labels, **attn_kwargs):
        hidden = self.policy.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                           attention_mask=attention_mask, use_cache=False, **attn_kwargs).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1])[hidden_index]
        head = self.policy.get_output_embeddings()
        if self.materialize_logits:
            logp_all = torch.log_softmax(head(selected).float() / self.temperature, dim=-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            return logp_all.gather(-1, labels[:, None]).squeeze(-1), entropy
        return logprobs_and_entropy(selected, head.weight, labels, temperature=self.temperature,
                                    lm_head_bias=getattr(head, "bias", None))


def _model_inputs(mb: MicroBatch, labels: Tensor | None = None) -> dict:
    inputs = dict(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=mb.attention_mask,
                  hidden_index=mb.hidden_index)
    if labels is not None:
        inputs["labels"] = mb.gather(labels)
    if mb.attention is not None:  # a packed row's blocks: only the varlen attention reads these
        inputs["attention_mask"] = layout_argument(mb.attention)
    elif mb.cu_seqlens is not None:  # packed, the model's own attention: flash-attn kernels read the boundaries
        longest = int((mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).max())
        inputs.update(cu_seq_lens_q=mb.cu_seqlens, cu_seq_lens_k=mb.cu_seqlens, max_length_q=longest, max_length_k=longest)
    return inputs


def _all_reduce(t: Tensor, op=None) -> Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


class TrainEngine:
    def __init__(self, model, cfg: TrainerConfig, *, temperature: float, gradient_checkpointing: bool = False,
                 max_new_tokens: int | None = None):
        self.model, self.cfg, self.temperature = model, cfg, temperature
        self.max_new_tokens = max_new_tokens  # overlong penalty and Dr.GRPO's constant normaliser
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.packing and cfg.packed_attention == "varlen":
            model.set_attn_implementation(register_varlen_attention())
        # the reference is the initial policy: copied before any update (and before ZeRO partitions it)
        self.ref_model = self._frozen_copy(model) if cfg.kl_coef != 0 else None
        self.critic = self.critic_backend = None
        if cfg.advantage == "ppo_gae":
            self.critic = ValueModel(model)
            self.critic_backend = TorchBackend(self.critic, cfg, lr=cfg.critic_lr or cfg.lr)
        zero3 = cfg.backend == "deepspeed" and cfg.zero_stage == 3
        self.backend = make_backend(PolicyLogprobs(model, temperature, materialize_logits=zero3), cfg)
        self.rank, self.world_size = world()
        self.version = 0  # completed policy updates (training steps)

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return ref

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- forward passes over micro-batches ------------------------------------------------
    def _microbatches(self, batch: TrainBatch, rows: Tensor) -> list[MicroBatch]:
        # rows of one group in a micro-batch share their prompt; that layout needs the varlen attention
        shared = self.cfg.share_prompts and self.cfg.packing and self.cfg.packed_attention == "varlen"
        groups = batch.group_index if shared else None
        return make_microbatches(batch.input_ids, batch.attention_mask, batch.loss_mask, rows,
                                 self.cfg.max_tokens_per_microbatch, packed=self.cfg.packing, group_index=groups,
                                 blocked_attention=self.cfg.packed_attention == "varlen")

    def _per_target(self, batch: TrainBatch, rows: Tensor, fn) -> Tensor:
        """[S, T-1] tensor of fn(micro-batch) -> flat values, for `rows` (zero elsewhere). Every rank runs the
        same number of forwards (zero-weight repeats pad the short ones): a ZeRO-3 forward all-gathers each
        partitioned parameter, a collective every rank must join."""
        out = torch.zeros(batch.labels.shape, device=self.device)
        for mb, counts in self._equalised(self._microbatches(batch, rows), batch):
            values = fn(mb).float()
            if counts:
                out = out.index_put((mb.target_row, mb.target_col), values)
        return out

    def token_logprobs(self, batch: TrainBatch) -> tuple[Tensor, Tensor]:
        """log pi(label) and entropy at every target position ([S, T-1]); zero off the mask."""
        batch = batch.to(self.device)
        module = PolicyLogprobs(self.model, self.temperature)
        rows = torch.arange(batch.num_sequences, device=self.device)
        logp = torch.zeros(batch.labels.shape, device=self.device)
        ent = torch.zeros_like(logp)
        for mb in self._microbatches(batch, rows):
            lp, e = module(**_model_inputs(mb, batch.labels))
            logp = logp.index_put((mb.target_row, mb.target_col), lp)
            ent = ent.index_put((mb.target_row, mb.target_col), e.detach())
        return logp, ent

    @torch.no_grad()
    def proximal_logprobs(self, batch: TrainBatch) -> Tensor:
        self.model.eval()
        return self.token_logprobs(batch)[0]

    @torch.no_grad()
    def _gathered(self, batch: TrainBatch, local_rows: Tensor, fn) -> Tensor:
        """fn over this rank's rows, summed over ranks so every rank holds the whole [S, T-1]."""
        return _all_reduce(self._per_target(batch, local_rows, fn))

    # ---- advantages -----------------------------------------------------------------------
    def _advantages(self, batch: TrainBatch, proximal: Tensor, ref: Tensor | None, values: Tensor | None):
        """(advantages [S, T-1], returns [S, T-1] or None) per `trainer.advantage` (module docs)."""
        cfg, mask = self.cfg, batch.loss_mask
        engine_side = cfg.advantage in ENGINE_SIDE_ADVANTAGES or cfg.overlong_buffer > 0 or (
            cfg.kl_coef != 0 and cfg.kl_mode == "reward")
        if batch.advantages is not None:
            if engine_side:
                raise ValueError(f"advantage={cfg.advantage!r} / KL-in-reward / overlong penalty are computed by the "
                                 "engine: build the batch with advantages=None")
            return batch.advantages, None
        rewards = batch.rewards.to(self.device).float()
        if cfg.overlong_buffer > 0:
            max_len = self.max_new_tokens or int(mask.sum(1).max())
            rewards = rewards + adv_fns.overlong_penalty(mask.sum(1), max_len, cfg.overlong_buffer, cfg.overlong_penalty)
        kl = None
        if ref is not None and cfg.kl_mode == "reward":
            kl = kl_penalty(proximal, ref, cfg.kl_estimator) * mask
        if cfg.advantage in adv_fns.GROUP_METHODS:
            if kl is not None:
                rewards = rewards - cfg.kl_coef * kl.sum(1)
            a = adv_fns.grouped_advantages(rewards, batch.group_index.to(self.device), cfg.advantage)
            return adv_fns.broadcast_to_tokens(a, mask), None
        if cfg.advantage == "reinforce_pp":
            return adv_fns.reinforce_plus_plus_advantages(rewards, mask, kl=kl, kl_coef=cfg.kl_coef), None
        # ppo_gae: sequence reward on the last completion token, minus per-token KL
        token_rewards = torch.zeros_like(mask)
        last = (mask * torch.arange(mask.shape[1], device=self.device)).argmax(1)
        token_rewards[torch.arange(mask.shape[0], device=self.device), last] = rewards
        if kl is not None:
            token_rewards = token_rewards - cfg.kl_coef * kl
        a, returns = adv_fns.gae_advantages(token_rewards, values, mask, cfg.gae_gamma, cfg.gae_lambda)
        n = mask.sum().clamp(min=1)  # whiten over the batch's valid tokens, as PPO implementations do
        mean = (a * mask).sum() / n
        std = (((a - mean) * mask).square().sum() / n).sqrt()
        return (a - mean) / (std + 1e-6) * mask, returns

    # ---- the update -----------------------------------------------------------------------
    def _minibatch_shares(self, batch: TrainBatch) -> list[Tensor]:
        """This rank's rows of each PPO minibatch. The minibatches are drawn from the whole batch (the same
        on every rank, seeded by the version), then each is split over the ranks, balanced by token count:
        so an update is the same whatever the number of ranks."""
        gen = torch.Generator().manual_seed(self.version)
        minibatches = torch.randperm(batch.num_sequences, generator=gen).chunk(self.cfg.minibatches)
        if self.world_size == 1:
            return [mb.to(self.device) for mb in minibatches]
        tokens = batch.attention_mask.sum(1)
        shares = []
        for mb in minibatches:
            mine = split_balanced(tokens[mb].tolist(), self.world_size)[self.rank]
            shares.append(mb[torch.tensor(mine, dtype=torch.long)].to(self.device))
        return shares

    def _count(self, eff_mask: Tensor, rows: Tensor) -> Tensor:
        """Tokens (token-mean) or sequences with a token (sequence means) among `rows`."""
        m = eff_mask[rows]
        return m.sum() if self.cfg.aggregation == "token-mean" else (m.sum(1) > 0).sum().float()

    def _equalised(self, mbs: list[MicroBatch], batch: TrainBatch) -> list[tuple[MicroBatch, bool]]:
        """Same micro-batch count on every rank (DDP / ZeRO reduce once per backward): pad with
        zero-weight repeats. Returns (micro-batch, counts) pairs."""
        if self.world_size == 1:
            return [(mb, True) for mb in mbs]
        most = int(_all_reduce(torch.tensor(len(mbs)), dist.ReduceOp.MAX))
        filler = mbs[0] if mbs else self._microbatches(batch, torch.zeros(1, dtype=torch.long))[0]
        return [(mb, True) for mb in mbs] + [(filler, False)] * (most - len(mbs))

    def _policy_loss(self, mb: MicroBatch, batch, proximal, advantages, ref, max_norm):
        cfg = self.cfg
        logp, entropy = self.backend.module(**_model_inputs(mb, batch.labels))
        seq = mb.target_row
        mask = torch.ones_like(logp)
        loss_fn = gspo_loss if cfg.policy_loss == "gspo" else decoupled_ppo_loss
        behaviour = mb.gather(batch.behaviour_logprobs)
        if proximal is None:  # A-3PO: interpolated from this forward pass, no pass of its own
            prox = loglinear_proximal(behaviour, logp, mb.gather(batch.versions), self.version)
        else:
            prox = mb.gather(proximal)
        loss, stats = loss_fn(
            logp, prox, behaviour, mb.gather(advantages), mask,
            eps_clip_low=cfg.eps_clip_low, eps_clip_high=cfg.eps_clip_high,
            behaviour_weight_cap=cfg.behaviour_weight_cap or None, behaviour_weight_mode=cfg.behaviour_weight_mode,
            dual_clip=cfg.dual_clip or None, aggregation=cfg.aggregation, sequence_ids=seq, max_tokens_norm=max_norm,
        )
        eff = mb.gather(self._eff_mask)
        agg = dict(aggregation=cfg.aggregation, sequence_ids=seq, max_tokens_norm=max_norm)
        if ref is not None and cfg.kl_mode == "loss":
            kl = aggregate(kl_penalty(logp, mb.gather(ref), cfg.kl_estimator), eff, **agg)
            loss = loss + cfg.kl_coef * kl
            stats["kl_ref"] = kl.detach()
        if cfg.entropy_coef:
            loss = loss + entropy_bonus(entropy, eff, cfg.entropy_coef, **agg)
        stats["entropy"] = aggregate(entropy.detach(), eff)
        return loss, stats

    def train_step(self, batch: TrainBatch, after_update: Callable[[int], None] | None = None) -> dict[str, float]:
        """One policy update: pi_prox once (or per micro-batch, A-3PO), then `minibatches` PPO updates; bumps the version.
        `after_update(k)` runs after the k-th optimizer update of every one but the last (in-step weight updates)."""
        cfg = self.cfg
        batch = batch.to(self.device)
        parts = self._minibatch_shares(batch)
        local = torch.cat(parts)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        self.model.eval()
        fwd = lambda net: lambda mb: net(**_model_inputs(mb, batch.labels))[0]  # noqa: E731
        if not cfg.decoupled:
            proximal = batch.behaviour_logprobs  # naive PPO
        elif cfg.proximal == "loglinear":
            proximal = None  # each micro-batch interpolates its own (_policy_loss)
        else:
            proximal = self._gathered(batch, local, fwd(self.backend.inner))
        t1 = time.perf_counter()
        ref = values = None
        if self.ref_model is not None:
            ref = self._gathered(batch, local, fwd(PolicyLogprobs(self.ref_model, self.temperature)))
        if self.critic is not None:
            self.critic.eval()
            values = self._gathered(batch, local, lambda mb: self.critic(**_model_inputs(mb)))
        # KL-in-reward needs pi_prox before the update: the behaviour log-probs stand in for A-3PO's
        known = batch.behaviour_logprobs if proximal is None else proximal
        advantages, returns = self._advantages(batch, known, ref, values)
        t2 = time.perf_counter()
        # behaviour-weight masking is known before the update: the global counts use it
        # (A-3PO's weights are known only inside each micro-batch: its normaliser counts every token)
        _, eff, _ = _behaviour_weight(known, batch.behaviour_logprobs, batch.loss_mask.bool(),
                                      cfg.behaviour_weight_cap or None, cfg.behaviour_weight_mode)
        self._eff_mask = eff.float()
        max_norm = float(self.max_new_tokens or batch.loss_mask.sum(1).max().clamp(min=1))
        self.model.train()
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        losses, grad_norms = [], []
        for part in parts:
            global_count = _all_reduce(self._count(self._eff_mask, part).clone()).clamp(min=1)
            mbs = self._equalised(self._microbatches(batch, part), batch)
            total = 0.0
            for i, (mb, counts) in enumerate(mbs):
                last = i == len(mbs) - 1
                with self.backend.sync_context(last):
                    loss, stats = self._policy_loss(mb, batch, proximal, advantages, ref, max_norm)
                    scale = (self._count(self._eff_mask, mb.rows) / global_count * self.world_size) if counts else 0.0
                    self.backend.backward(loss * scale, last)
                total += float(loss.detach()) * float(scale) / self.world_size
                n = float(stats["num_valid_tokens"]) if counts else 0.0
                for k, v in stats.items():
                    sums[f"train/{k}"] = sums.get(f"train/{k}", 0.0) + float(v) * n
                    weights[f"train/{k}"] = weights.get(f"train/{k}", 0.0) + n
            grad_norms.append(self.backend.step())
            losses.append(total)
            if after_update is not None and len(grad_norms) < len(parts):
                after_update(len(grad_norms))
        if self.world_size > 1:  # every rank reports the global figures
            keys = sorted(sums)
            packed = _all_reduce(torch.tensor([sums[k] for k in keys] + [weights[k] for k in keys] + losses,
                                              dtype=torch.float64))
            sums = dict(zip(keys, packed[: len(keys)].tolist()))
            weights = dict(zip(keys, packed[len(keys): 2 * len(keys)].tolist()))
            losses = packed[2 * len(keys):].tolist()
        # token-weighted means of the loss stats; the loss and grad norm averaged over minibatches
        out = {k: v / max(weights[k], 1e-12) for k, v in sums.items()}
        out["train/num_valid_tokens"] = weights.get("train/num_valid_tokens", 0.0)
        out["train/loss"] = sum(losses) / len(losses)
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        t3 = time.perf_counter()
        if self.critic is not None:
            out.update(self._critic_update(batch, parts, values, returns))
        t4 = time.perf_counter()
        self.version += 1
        trained = batch.attention_mask[local].sum().item()
        out.update({
            "train/lr": self.backend.lr,
            "train/advantage_mean": float((advantages * batch.loss_mask).sum() / batch.loss_mask.sum().clamp(min=1)),
            "time/proximal_s": t1 - t0,
            "time/advantage_s": t2 - t1,
            "time/train_s": t3 - t2,
            "time/critic_s": t4 - t3,
            "time/train_step_cpu_s": time.thread_time() - cpu0,
            "train/tokens_per_s": trained / max(t4 - t0, 1e-9),
        })
        return out

    def _critic_update(self, batch: TrainBatch, parts: list[Tensor], old_values: Tensor, returns: Tensor) -> dict[str, float]:
        """Clipped value regression on the returns, token-mean over each minibatch."""
        self.critic.train()
        mask, losses = batch.loss_mask, []
        for part in parts:
            count = _all_reduce(mask[part].sum().clone()).clamp(min=1)
            mbs = self._equalised(self._microbatches(batch, part), batch)
            for i, (mb, counts) in enumerate(mbs):
                last = i == len(mbs) - 1
                with self.critic_backend.sync_context(last):
                    v = self.critic_backend.module(**_model_inputs(mb))
                    per_token = clipped_value_loss(v, mb.gather(old_values), mb.gather(returns), self.cfg.value_clip)
                    loss = per_token.sum() / count * self.world_size * (1.0 if counts else 0.0)
                    loss.backward()
                losses.append(float(loss.detach()) / self.world_size)
            self.critic_backend.step()
        return {"train/value_loss": sum(losses) / max(self.cfg.minibatches, 1)}

    # ---- resumable state ------------------------------------------------------------------
    def set_before_step(self, fn: Callable[[], None] | None) -> None:
        """Run `fn` right before every optimizer step of the policy and of the critic (None removes it)."""
        self.backend.before_step = fn
        if self.critic_backend is not None:
            self.critic_backend.before_step = fn

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        """LIVE references (no copies) to this rank's tensors an exact resume needs, keyed by flat names:
            model/<name>           policy parameters (HF names; under ZeRO-3 this rank's flat partition;
                                   the fp32 masters when the torch backend runs bf16/fp16 parameters)
            optim/...              the policy optimizer's state_dict (ZeRO: this rank's partition, fp32 master)
            sched/...              LR schedule tensors, if any
            critic/model/<name>, critic/optim/..., critic/sched/...   with a critic
        plus a JSON-able meta dict: format, version, backend, zero_stage, world_size, rank, and per model the
        optimizer and scheduler skeletons (checkpoint.nested.flatten_state) and DeepSpeed's step counters. Valid until the
        next optimizer step (see set_before_step). Every rank returns its own state; under the torch backend
        (one process or DDP) that is the full state, the same on every rank."""
        tensors, policy = self.backend.checkpoint_state()
        tensors = _renamed(tensors, _POLICY_PARAMS, "model/")
        meta = {"format": STATE_FORMAT, "version": self.version, "backend": self.cfg.backend,
                "zero_stage": self.cfg.zero_stage if self.cfg.backend == "deepspeed" else None,
                "world_size": self.world_size, "rank": self.rank, "policy": policy, "critic": None}
        if self.critic_backend is not None:
            critic_tensors, meta["critic"] = self.critic_backend.checkpoint_state("critic/")
            tensors.update(critic_tensors)
        return tensors, meta

    def load_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore checkpoint_state() into an engine built from the same recipe (the frozen KL reference stays
        the initial weights). Tensors are copied, so the caller's dict stays untouched. The torch backend's state
        loads on any world size; a ZeRO (stage >= 1) shard only on the rank (and world size) that saved it."""
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"not a train-engine state: format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        if meta["backend"] != self.cfg.backend:
            raise ValueError(f"checkpoint was made by the {meta['backend']!r} backend, this engine uses "
                             f"{self.cfg.backend!r}")
        if (meta["critic"] is None) != (self.critic_backend is None):
            raise ValueError("checkpoint and engine disagree on having a critic (trainer.advantage)")
        self.backend.load_checkpoint_state(_renamed(tensors, "model/", _POLICY_PARAMS), meta["policy"])
        if self.critic_backend is not None:
            self.critic_backend.load_checkpoint_state(tensors, meta["critic"], "critic/")
        self.version = int(meta["version"])

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """What rollout workers receive after each step and the export holds (detached, same names as the HF
        model, in model.dtype: the working copy when fp32 masters are stepped)."""
        prefix = "policy."
        for name, tensor in self.backend.full_weights():
            yield name[len(prefix):] if name.startswith(prefix) else name, tensor
