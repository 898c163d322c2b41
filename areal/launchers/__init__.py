"""Launchers place roles in processes; only they and the controller know about processes.

Every launcher starts a role the same way: a `RoleSpec` (plain data) run by
`python -m areal.role SPEC.json` wherever the launcher puts it. A launcher says which
interface listeners bind (`bind_host`), gives each role its own device, and may restart a
role that died (`can_restart`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from areal.role import RoleSpec


class RoleHandle(ABC):
    name: str

    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    def exitcode(self) -> int | None: ...

    @abstractmethod
    def send_signal(self, sig: int) -> None:
        """Deliver a signal to the role's process (pre-emption reaches the trainer this way)."""

    @abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` for the role to exit by itself, then terminate it, then kill it."""

    @abstractmethod
    def kill(self) -> None:
        """End the role now (SIGKILL or the launcher's equivalent)."""


class Launcher(ABC):
    bind_host: str = "127.0.0.1"  # the interface the hub and every role's listeners bind
    can_restart: bool = False

    @abstractmethod
    def start(self, spec: RoleSpec) -> RoleHandle: ...

    def close(self) -> None:
        """Release what the launcher holds (placement groups, a cluster it started); roles are stopped."""


def make_launcher(recipe) -> Launcher:
    """The launcher `recipe.launcher.type` names. `slurm` here means: inside the job's allocation
    (the submitting side is `areal.launchers.slurm.submit`, called by `python -m areal.train`)."""
    kind = recipe.launcher.type
    if kind == "ray":
        from areal.launchers.ray import RayLauncher

        return RayLauncher(recipe)
    if kind == "slurm":
        from areal.launchers.slurm import SrunLauncher

        return SrunLauncher(recipe)
    import torch

    from areal.launchers.local import LocalLauncher

    names = [name for name, _, _ in role_needs(recipe)]
    gpus = torch.cuda.device_count() if recipe.run.device != "cpu" else 0
    return LocalLauncher(assign_devices(names, gpus))


def role_needs(recipe) -> list[tuple[str, int, int]]:
    """(name, cpus, gpus) of every role, trainer ranks first."""
    tr, ro = recipe.launcher.trainer, recipe.launcher.rollout
    return [(f"trainer{r}", tr.cpus, tr.gpus) for r in range(recipe.trainer.world_size)] + \
           [(f"rollout{r}", ro.cpus, ro.gpus) for r in range(recipe.rollout.num_workers)]


def assign_devices(names: list[str], num_gpus: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES per role: trainer ranks first, then rollout workers, one GPU each while
    they last, then round-robin (roles share a GPU rather than all taking cuda:0). No GPU: "".
    Roles sharing a GPU are fine for the weight broadcast: its group then runs on gloo, not NCCL
    (areal.transport.weight_group_backend)."""
    if num_gpus <= 0:
        return {name: "" for name in names}
    order = sorted(names, key=lambda n: (not n.startswith("trainer"), n))
    return {name: str(i % num_gpus) for i, name in enumerate(order)}
