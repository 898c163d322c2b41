"""Roles as Ray actors: the same role specs, placed by Ray on the nodes of a Ray cluster.

    python -m areal.train recipe=math.yaml launcher.type=ray [launcher.ray.address=auto]

The controller (this process, the Ray driver) joins the cluster (`launcher.ray.address`) or starts
a private Ray on this machine, and binds its hub on this node's Ray address. Each role is one
`RoleActor` whose `run` method runs the role (`areal.role.run_role`) in the actor's own process:

  - resources per role come from the recipe (`launcher.trainer` / `launcher.rollout`: cpus, gpus,
    Ray custom resources). Trainer ranks share one placement group packed onto as few nodes as
    possible (they all-reduce every step); rollout workers share one spread over the nodes.
    A worker restarted by the controller takes its predecessor's bundle;
  - a role binds its own listeners (weight store, trainer group) on its node's address;
  - a role that fails sends its traceback over the channel (the controller prints it); Ray also
    forwards every actor's output to the driver, prefixed with the actor and its node;
  - a signal reaches a role through a one-off task on the role's node (pre-emption: SIGUSR1 to
    trainer0); ending a role is `ray.kill`;
  - Ctrl-C in the driver stops every role (the controller), then the placement groups go, and a
    private Ray is shut down.

Code and files reach the nodes either through a shared filesystem (the default: areal installed in
the same environment on every node, the recipe's paths valid everywhere; roles start in the
driver's working directory) or through Ray's runtime_env (`launcher.ray.working_dir`, `.pip`).
"""

from __future__ import annotations

import os
import time

from areal.config import ConfigError
from areal.console import console
from areal.launchers import Launcher, RoleHandle
from areal.role import SECRET_ENV, RoleSpec

PLACEMENT_TIMEOUT_S = 120.0
FORWARDED_ENV = ("AREAL_", "WANDB_", "HF_")


class RoleActor:
    """One role's process. `run` blocks for the whole role, on the actor's main thread (signal
    handlers can only be installed there)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:  # Ray prefixes the actor's output with this: (trainer0 pid=..., ip=...)
        return self.name

    def where(self) -> tuple[str, str, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def run(self, spec_json: str, secret: str, cwd: str | None, env: dict[str, str]) -> int:
        import ray

        from areal.role import run_role

        os.environ.update(env)
        if cwd and os.path.isdir(cwd):  # shared filesystem: relative recipe paths mean what they meant to the driver
            os.chdir(cwd)
        spec = RoleSpec.from_json(spec_json)
        spec.secret, spec.bind_host = secret, ray.util.get_node_ip_address()
        return run_role(spec)


def _signal_process(pid: int, sig: int) -> None:
    os.kill(pid, sig)


class RayHandle(RoleHandle):
    def __init__(self, name: str, actor, run_ref, node_id: str, pid: int):
        import ray

        self._ray, self.name, self.actor, self.run_ref, self.node_id, self.pid = ray, name, actor, run_ref, node_id, pid
        self._exitcode: int | None = None

    def alive(self) -> bool:
        return self.exitcode() is None

    def exitcode(self) -> int | None:
        if self._exitcode is None:
            ready, _ = self._ray.wait([self.run_ref], timeout=0)
            if ready:
                try:
                    self._exitcode = int(self._ray.get(ready[0]))
                except self._ray.exceptions.RayActorError:  # the process died (killed, OOM, node lost)
                    self._exitcode = -9
                except self._ray.exceptions.RayError:
                    self._exitcode = 1
        return self._exitcode

    def send_signal(self, sig: int) -> None:
        if not self.alive():
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = self._ray.remote(num_cpus=0)(_signal_process).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False))
        try:
            self._ray.get(task.remote(self.pid, int(sig)), timeout=30)
        except (self._ray.exceptions.RayError, ProcessLookupError):
            pass  # it exited meanwhile

    def kill(self) -> None:
        self._ray.kill(self.actor, no_restart=True)
        try:
            self._ray.wait([self.run_ref], timeout=10)
        finally:
            if self._exitcode is None:
                self._exitcode = -9

    def stop(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.alive():
            self.kill()


class RayLauncher(Launcher):
    can_restart = True

    def __init__(self, recipe):
        try:
            import ray
        except ImportError:
            raise ConfigError("launcher.type=ray needs Ray on this machine and every node: pip install 'areal[ray]'") from None
        from ray.util.placement_group import placement_group

        cfg = recipe.launcher
        runtime_env = {k: v for k, v in (("working_dir", cfg.ray.working_dir), ("pip", list(cfg.ray.pip)),
                                         ("env_vars", dict(cfg.ray.env_vars))) if v}
        self.private = not cfg.ray.address
        if ray.is_initialized():  # a driver that already joined a cluster (a notebook, a test)
            self.private = False
        elif self.private:  # room for every role even on a small machine: oversubscribing is the user's choice
            needed = recipe.trainer.world_size * cfg.trainer.cpus + recipe.rollout.num_workers * cfg.rollout.cpus
            ray.init(address="local",  # a new Ray even where `ray start` left one running on this machine
                     num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False, runtime_env=runtime_env or None,
                     configure_logging=False)
        else:
            _check_reachable(cfg.ray.address)
            try:
                ray.init(address=cfg.ray.address, runtime_env=runtime_env or None, configure_logging=False)
            except ConnectionError as e:
                raise ConfigError(f"launcher.ray.address={cfg.ray.address}: no Ray cluster to join there ({e})") from None
        self._ray = ray
        self.bind_host = ray.util.get_node_ip_address()
        self.cwd = None if cfg.ray.working_dir else os.getcwd()
        self.resources = {"trainer": cfg.trainer, "rollout": cfg.rollout}
        self.groups = {
            "trainer": placement_group([_bundle(cfg.trainer)] * recipe.trainer.world_size, strategy="PACK"),
            "rollout": placement_group([_bundle(cfg.rollout)] * recipe.rollout.num_workers, strategy="SPREAD"),
        }
        for role, group in self.groups.items():
            ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
            if not ready:
                self.close()
                count = recipe.trainer.world_size if role == "trainer" else recipe.rollout.num_workers
                raise ConfigError(
                    f"launcher.{role}: Ray cannot place {count} {role} process(es) needing {_bundle(self.resources[role])} "
                    f"each within {PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {ray.cluster_resources()}")
        self.actor_class = ray.remote(RoleActor)
        self.nodes: dict[str, str] = {}  # role name -> Ray node id (where it runs now)

    def start(self, spec: RoleSpec) -> RayHandle:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        res = self.resources[spec.role]
        secret, spec.secret = spec.secret, ""
        spec_json = spec.to_json()
        spec.secret = secret
        actor = self.actor_class.options(
            name=None, num_cpus=res.cpus, num_gpus=res.gpus, resources=dict(res.ray_resources) or None,
            max_restarts=0,  # the controller restarts rollout workers itself, as under every launcher
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.groups[spec.role],
                                                                 placement_group_bundle_index=spec.rank),
        ).remote(f"{spec.name}.{spec.incarnation}" if spec.incarnation else spec.name)
        node_id, ip, pid = self._ray.get(actor.where.remote())
        self.nodes[spec.name] = node_id
        console.print(f"{spec.name} on Ray node {node_id[:8]} ({ip}), pid {pid}", highlight=False)
        run = actor.run.remote(spec_json, secret, self.cwd, forwarded_env())
        return RayHandle(spec.name, actor, run, node_id, pid)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for group in getattr(self, "groups", {}).values():
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001 - the cluster may already be gone
                pass
        if self.private:
            ray.shutdown()


def forwarded_env() -> dict[str, str]:
    """The driver's AREAL_*, WANDB_* and HF_* variables: an actor's environment comes from its raylet, not
    from the driver, and these must mean the same to every role as under the local launcher."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) and k != SECRET_ENV}


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, not minutes, on a head that does not answer (ray.init retries for long)."""
    import socket

    host, _, port = address.rpartition(":")
    if address == "auto" or not port.isdigit():
        return  # 'auto' and ray:// addresses are Ray's to resolve
    try:
        socket.create_connection((host.removeprefix("ray://"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"launcher.ray.address={address}: no Ray head answers there ({e})") from None


def _bundle(res) -> dict[str, float]:
    bundle = {"CPU": float(res.cpus), **{k: float(v) for k, v in res.ray_resources.items()}}
    if res.gpus:
        bundle["GPU"] = float(res.gpus)
    return bundle
