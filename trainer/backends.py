"""Where the policy's parameters, gradients and optimizer state live: torch or DeepSpeed.

Both backends expose the same small surface to the engine:
    module            the model to call forward on (DDP / DeepSpeed wrapper or the plain module)
    backward(loss, last)   accumulate gradients; `last` marks the micro-batch that ends an update
                      (DDP / ZeRO reduce gradients across ranks there)
    step() -> grad norm    clip, optimizer step, scheduler step, zero grads
    full_weights()    (name, full tensor) pairs, gathered when ZeRO-3 partitions them
    lr                current learning rate
    before_step       None or a callable run right before the optimizer changes parameters or
                      optimizer state (a lazy checkpoint finishes copying the live tensors there)
    checkpoint_state(prefix) / load_checkpoint_state(tensors, meta, prefix)
                      this rank's resumable state: LIVE tensors under "<prefix>model/<param name>"
                      and "<prefix>optim/...", plus a JSON-able meta dict (optimizer skeleton, LR
                      schedule, DeepSpeed counters)

* `torch`: one process; with an initialised process group of several ranks the model is
  wrapped in DistributedDataParallel (gloo on CPU). No extra dependency. bf16/fp16 parameters
  get fp32 master copies that AdamW steps (TorchBackend); the parameters stay the working copy.
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
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

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
    if port is None and "MASTER_PORT" not in os.environ and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        # alone: a file store, no port to race other processes for between picking and binding it
        import tempfile

        store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="areal-pg-"), "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
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


def _load_params(named, tensors: dict[str, Tensor], prefix: str) -> None:
    """Copy "<prefix>model/<name>" into the tensor of every (name, tensor) of `named`; shapes must match."""
    missing = [f"{prefix}model/{name}" for name, _ in named if f"{prefix}model/{name}" not in tensors]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
    with torch.no_grad():
        for name, p in named:
            dst, src = p, tensors[f"{prefix}model/{name}"]
            if dst.shape != src.shape:
                raise ValueError(f"{prefix}model/{name}: checkpoint shape {tuple(src.shape)}, "
                                 f"engine {tuple(dst.shape)}")
            dst.copy_(src)


def _owned(obj):
    """The nested state with every tensor cloned: torch's Optimizer.load_state_dict keeps (does not copy) state
    tensors that already have the parameter's dtype and device, and the caller's tensors must not alias ours."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _owned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_owned(v) for v in obj)
    return obj


def _flat_scheduler(scheduler, prefix: str):
    from areal.checkpoint.nested import flatten_state

    return flatten_state(scheduler.state_dict(), f"{prefix}sched")


LOW_PRECISION = (torch.bfloat16, torch.float16)


class TorchBackend:
    """The module's own parameters, stepped by a torch AdamW (under DDP when several ranks run).

    Mixed precision, when the parameters are bf16 or fp16 (model.dtype): they stay the working copy that
    forward and backward run on, the weights rollout workers receive and the export holds, while AdamW
    steps fp32 master copies, and its state is fp32 too:
        g_master = fp32(g)   clip(g_master)   master <- AdamW(master, g_master)   param <- round(master)
    Stepping the bf16 parameters themselves loses every update under half an ulp: at lr 1e-6 Adam moves
    a weight of 0.02 by ~1e-6 a step, its bf16 ulp is 1.2e-4, so the weight never moves. A working copy
    rather than fp32 parameters under autocast: trainer and rollout then compute in the same dtype (the
    trainer's log-probs match the rollout's behaviour log-probs as closely as before), activations
    stay bf16, and whoever holds the model object (the sync loop's rollout copy, the export) sees the
    configured dtype without casting. Gradients stay in the working dtype until the step (DDP reduces
    them there), as in pure-bf16 training. The checkpoint holds the masters, so resume is exact.
    """

    before_step: Callable[[], None] | None = None

    def __init__(self, module: torch.nn.Module, cfg: TrainerConfig, lr: float | None = None):
        self.cfg = cfg
        self.inner = module
        _, size = world()
        self.module = torch.nn.parallel.DistributedDataParallel(module) if size > 1 else module
        self._params = list(module.named_parameters())
        mixed = any(p.dtype in LOW_PRECISION for _, p in self._params)
        # None: AdamW steps the parameters themselves
        self.masters = [p.detach().to(torch.float32, copy=True) for _, p in self._params] if mixed else None
        stepped = self.masters if mixed else [p for _, p in self._params]
        self.optimizer, self.scheduler = make_optimizer(stepped, cfg, lr)

    def _stepped(self) -> list[tuple[str, Tensor]]:
        """(name, tensor AdamW steps): the fp32 masters under mixed precision, else the parameters."""
        if self.masters is None:
            return self._params
        return [(name, m) for (name, _), m in zip(self._params, self.masters)]

    def sync_context(self, last: bool):
        """DDP reduces gradients only on the last micro-batch of an update."""
        if isinstance(self.module, torch.nn.parallel.DistributedDataParallel) and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        if self.before_step is not None:
            self.before_step()
        if self.masters is not None:  # the working copy's gradients move to the masters, in fp32
            for (_, p), m in zip(self._params, self.masters):
                m.grad = None if p.grad is None else p.grad.to(torch.float32)
                p.grad = None
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_([t for _, t in self._stepped()], clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._round_to_working_copy()
        return float(norm)

    def _round_to_working_copy(self) -> None:
        if self.masters is not None:
            with torch.no_grad():
                for (_, p), m in zip(self._params, self.masters):
                    p.copy_(m)  # round to nearest even, as autocast and .to(bfloat16) round

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_weights(self):
        for name, p in self.inner.named_parameters():
            yield name, p.detach()

    def checkpoint_state(self, prefix: str = "") -> tuple[dict[str, Tensor], dict]:
        """Parameters (the fp32 masters under mixed precision), AdamW state and LR schedule: the full state
        (under DDP every rank holds the same)."""
        from areal.checkpoint.nested import flatten_state

        tensors = {f"{prefix}model/{name}": t.detach() for name, t in self._stepped()}
        optim, optim_skeleton = flatten_state(self.optimizer.state_dict(), f"{prefix}optim")
        sched, sched_skeleton = _flat_scheduler(self.scheduler, prefix)
        tensors.update(optim)
        tensors.update(sched)
        return tensors, {"optimizer": optim_skeleton, "scheduler": sched_skeleton}

    def load_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str = "") -> None:
        from areal.checkpoint.nested import unflatten_state

        _load_params(self._stepped(), tensors, prefix)  # a checkpoint of another dtype is cast on copy
        self._round_to_working_copy()
        self.optimizer.load_state_dict(_owned(unflatten_state(meta["optimizer"], tensors)))
        self.scheduler.load_state_dict(unflatten_state(meta["scheduler"], tensors))


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


# DeepSpeed engine counters that a DeepSpeed checkpoint restores too
_DS_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


class DeepSpeedBackend:
    """Checkpoint state per ZeRO stage (deepspeed 0.19; see checkpoint_state):
        0   the whole state, the same on every rank: fp32 steps the torch AdamW itself; bf16 wraps it in
            FP16_UnfusedOptimizer (AdamW state + fp32 master copies of the parameters)
        1/2 DeepSpeedZeroOptimizer.state_dict(): base_optimizer_state (the torch AdamW state of this rank's
            flat fp32 partition), single_partition_of_fp32_groups (the fp32 master partition), paddings, ...
            Parameters: the module's (full, replicated) bit16 params.
        3   DeepSpeedZeroOptimizer_Stage3.state_dict(): optimizer_state_dict and fp32_flat_groups of this
            rank's partition. Parameters: each param's own partition (`ds_tensor`, flat).
    Restored with optimizer.load_state_dict(state_dict_list=[sd] * world, load_from_fp32_weights=True): the
    rigid (non-elastic, the default) path reads only this rank's entry and copies its fp32 partition as saved
    (not re-derived from the bit16 params), so resume is exact, but only on the same world size and rank.
    """

    before_step: Callable[[], None] | None = None

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
        # only this boundary step() changes parameters: off the boundary (backward above) DeepSpeedEngine.step
        # skips _take_model_step, i.e. the optimizer, for every ZeRO stage
        if self.before_step is not None:
            self.before_step()
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

    # ---- resumable state -------------------------------------------------------------------
    def _sharded(self) -> bool:
        """ZeRO 1-3 (and BF16_Optimizer): per-rank state, loaded with load_state_dict(state_dict_list=...).
        Stage 0 steps the torch AdamW itself (fp32) or wraps it whole (FP16_UnfusedOptimizer, bf16)."""
        import inspect

        return "state_dict_list" in inspect.signature(self.engine.optimizer.load_state_dict).parameters

    def _params(self) -> list[tuple[str, Tensor]]:
        """(name, tensor to save/restore): the param, or its own flat partition under ZeRO-3."""
        if self.cfg.zero_stage == 3:
            return [(name, p.ds_tensor) for name, p in self.inner.named_parameters()]
        return list(self.inner.named_parameters())

    def checkpoint_state(self, prefix: str = "") -> tuple[dict[str, Tensor], dict]:
        from areal.checkpoint.nested import CheckpointError, flatten_state

        rank, size = world()
        tensors = {f"{prefix}model/{name}": t.detach() for name, t in self._params()}
        sd = self.engine.optimizer.state_dict()
        dropped = []
        if not isinstance(self.engine.optimizer, torch.optim.Optimizer):
            # objects, not state: the loss scaler (static without fp16: the current one is reused) and
            # DeepSpeed's name -> fragment maps for universal checkpoints (rebuilt at construction)
            kept = {}
            for key, value in sd.items():
                try:
                    flatten_state(value, key)
                    kept[key] = value
                except CheckpointError:
                    dropped.append(key)
            sd = kept
        optim, optim_skeleton = flatten_state(sd, f"{prefix}optim")
        sched, sched_skeleton = _flat_scheduler(self.scheduler, prefix)
        tensors.update(optim)
        tensors.update(sched)
        meta = {"optimizer": optim_skeleton, "scheduler": sched_skeleton, "dropped": dropped,
                "zero_stage": self.cfg.zero_stage, "world_size": size, "rank": rank,
                "engine": {k: int(getattr(self.engine, k)) for k in _DS_COUNTERS}}
        if self.cfg.zero_stage == 3:
            meta["param_shapes"] = {name: list(p.ds_shape) for name, p in self.inner.named_parameters()}
        return tensors, meta

    def load_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str = "") -> None:
        from areal.checkpoint.nested import unflatten_state

        rank, size = world()
        if meta.get("zero_stage") != self.cfg.zero_stage:
            raise ValueError(f"checkpoint is of ZeRO stage {meta.get('zero_stage')}, the engine runs stage "
                             f"{self.cfg.zero_stage}")
        sharded = self._sharded()
        if sharded and (meta["world_size"], meta["rank"]) != (size, rank):
            raise ValueError(f"ZeRO checkpoint shard of rank {meta['rank']}/{meta['world_size']} cannot be loaded "
                             f"on rank {rank}/{size}: ZeRO state is partitioned by rank; resume on the same world "
                             "size, each rank from its own shard")
        optimizer = self.engine.optimizer
        zero3 = self.cfg.zero_stage == 3
        if zero3:
            optimizer.checkpoint_event_prologue()  # partition every parameter (as DeepSpeed's load_checkpoint)
        _load_params(self._params(), tensors, prefix)
        sd = _owned(unflatten_state(meta["optimizer"], tensors))
        if sharded:
            if hasattr(optimizer, "loss_scaler"):
                sd["loss_scaler"] = optimizer.loss_scaler  # stage 3 requires the key
            optimizer.load_state_dict(state_dict_list=[sd] * size, load_optimizer_states=True,
                                      load_from_fp32_weights=True)
        else:
            optimizer.load_state_dict(sd)
        if zero3:
            optimizer.checkpoint_event_epilogue()  # re-gather the persistent (small) parameters
        self.scheduler.load_state_dict(unflatten_state(meta["scheduler"], tensors))
        for key, value in meta["engine"].items():
            setattr(self.engine, key, value)


def make_backend(module: torch.nn.Module, cfg: TrainerConfig):
    if cfg.backend == "deepspeed":
        return DeepSpeedBackend(module, cfg)
    return TorchBackend(module, cfg)
