"""Where the policy's parameters, gradients and optimizer state live: torch or DeepSpeed.

Both backends expose the same small surface to the engine:
    module            the model to call forward on (DDP / DeepSpeed wrapper or the plain module)
    backward(loss, last)   accumulate gradients; `last` marks the micro-batch that ends an update
                      (DDP / ZeRO reduce gradients across ranks there)
    step() -> grad norm    clip, optimizer step, scheduler step, zero grads
    full_weights()    (name, full tensor) pairs, gathered when ZeRO-3 partitions them
    lr                current learning rate

* `torch`: one process; with an initialised process group of several ranks the model is
  wrapped in DistributedDataParallel (gloo on CPU). No extra dependency.
* `deepspeed`: ZeRO stage 0-3 (`trainer.zero_stage`), optional optimizer CPU offload. It
  is imported only here, only when selected. A torch AdamW is handed to DeepSpeed (its
  own fused/CPU Adam would compile C++ for minutes), and its shared-memory allreduce op
  is disabled (it compiles for 60-75 s on first use; gloo is used instead).
With one process and no process group, DeepSpeed gets a world-size-1 gloo group on
127.0.0.1 (set up by `init_process_group`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict

import torch
import torch.distributed as dist

from areal.trainer.config import TrainerConfig


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


def make_optimizer(params, cfg: TrainerConfig, lr: float | None = None):
    optimizer = torch.optim.AdamW(params, lr=cfg.lr if lr is None else lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    total_updates = max(1, cfg.steps * cfg.minibatches)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_updates))


def init_process_group(port: int | None = None) -> None:
    """A gloo group on loopback: world size / rank from the env (torchrun), else 1 / 0."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if port is None and "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:  # a free port, so concurrent runs never collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TorchBackend:
    def __init__(self, module: torch.nn.Module, cfg: TrainerConfig, lr: float | None = None):
        self.cfg = cfg
        self.inner = module
        _, size = world()
        self.module = torch.nn.parallel.DistributedDataParallel(module) if size > 1 else module
        self.optimizer, self.scheduler = make_optimizer(module.parameters(), cfg, lr)

    def sync_context(self, last: bool):
        """DDP reduces gradients only on the last micro-batch of an update."""
        if isinstance(self.module, torch.nn.parallel.DistributedDataParallel) and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.inner.parameters(), clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_weights(self):
        for name, p in self.inner.named_parameters():
            yield name, p.detach()


def _quiet_deepspeed_ops() -> None:
    """Tell DeepSpeed no C++ op is buildable: it then never JIT-compiles (shm allreduce, CPU Adam)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = defaultdict(bool)  # read via .get(name, False) before any build


def deepspeed_config(cfg: TrainerConfig, dtype: torch.dtype) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,  # micro-batches are packed by the engine, not by DeepSpeed
        "gradient_accumulation_steps": 1,  # the engine marks the update boundary itself
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        # offload with the torch AdamW (DeepSpeedCPUAdam would JIT-compile C++ for minutes)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    def __init__(self, module: torch.nn.Module, cfg: TrainerConfig):
        _quiet_deepspeed_ops()
        import deepspeed

        init_process_group()
        rank, size = world()
        for key, value in (("RANK", rank), ("WORLD_SIZE", size), ("LOCAL_RANK", rank)):  # DeepSpeed checks these
            os.environ.setdefault(key, str(value))
        self.cfg = cfg
        dtype = next(module.parameters()).dtype
        optimizer, scheduler = make_optimizer(module.parameters(), cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, dtype), dist_init_required=False,
        )
        self.module = self.engine
        self.inner = module
        self._deepspeed = deepspeed

    def sync_context(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # a no-op off the boundary; keeps DeepSpeed's micro-step count right

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_weights(self):
        params = list(self.inner.named_parameters())
        if self.cfg.zero_stage == 3:  # parameters are partitioned: gather each one to yield it whole
            for name, p in params:
                with self._deepspeed.zero.GatheredParameters([p]):
                    yield name, p.detach().clone()
        else:
            for name, p in params:
                yield name, p.detach()


def make_backend(module: torch.nn.Module, cfg: TrainerConfig):
    if cfg.backend == "deepspeed":
        return DeepSpeedBackend(module, cfg)
    return TorchBackend(module, cfg)
