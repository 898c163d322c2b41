"""The controller of an asynchronous run: place it, start its roles, watch them, stop them.

It binds the hub (areal/channel.py) on the launcher's interface, writes one plain-data spec per
role (areal/role.py) and has the launcher start them: `trainer.world_size` trainer ranks and
`rollout.num_workers` rollout workers. Then it watches:
  - trainer0's `RunFinished` ends the run; a `RoleError` from any role ends it with that error
    (bad input as one line, anything else with the role's traceback);
  - a rollout worker that dies is reported to trainer0 (`RoleLost`: it re-issues that worker's
    prompts and re-forms the weight group) and restarted while `rollout.max_restarts` allows;
  - a role not heard from for `run.role_timeout_s` is named: a trainer rank in the error that
    ends the run, a rollout worker by being killed and replaced. A run never hangs silently.
Ctrl-C stops every role; SIGTERM / SIGUSR1 are forwarded to trainer0, which checkpoints and stops.
"""

from __future__ import annotations

import queue
import signal
import time
from pathlib import Path

from areal.channel import Hub, new_secret
from areal.checkpoint.session import Preempted
from areal.config import ConfigError, to_dict
from areal.console import console
from areal.data import DataError
from areal.driver import RunResult
from areal.launchers import Launcher, RoleHandle, make_launcher
from areal.messages import RoleError, RoleLost, RunFinished, RunPlaced, Stop
from areal.recipe import Recipe
from areal.role import RoleSpec

STARTUP_TIMEOUT_S = 900.0  # from process start to its first message (imports, CUDA init)
BAD_INPUT = {"ConfigError": ConfigError, "DataError": DataError, "FileNotFoundError": FileNotFoundError}


class RoleFailed(RuntimeError):
    """A role died, failed or stopped answering; the message names it (with its traceback if any)."""


def role_specs(recipe: Recipe, recipe_path: str | None, hub_address: str, secret: str, bind_host: str) -> list[RoleSpec]:
    """One spec per role. The run folder is left to trainer0: it places the run once every input is valid."""
    common = dict(recipe=to_dict(recipe), run_dir="", hub=hub_address, secret=secret, bind_host=bind_host,
                  recipe_path=recipe_path)
    trainers = [RoleSpec("trainer", r, num_threads=recipe.run.trainer_threads, **common)
                for r in range(recipe.trainer.world_size)]
    workers = [RoleSpec("rollout", r, num_threads=recipe.rollout.threads_per_worker, **common)
               for r in range(recipe.rollout.num_workers)]
    return trainers + workers


def train_async(recipe: Recipe, recipe_path: str | None = None, launcher: Launcher | None = None) -> RunResult:
    launcher = launcher or make_launcher(recipe)
    secret = new_secret()
    hub = Hub(secret, launcher.bind_host)
    specs = {s.name: s for s in role_specs(recipe, recipe_path, hub.address, secret, launcher.bind_host)}
    console.print(f"[bold]areal[/bold] async eta={recipe.rollout.max_staleness} "
                  f"trainer ranks={recipe.trainer.world_size} rollout workers={recipe.rollout.num_workers} "
                  f"backend={recipe.rollout.backend} hub={hub.address}")
    watch = Watch(hub, launcher, specs, recipe)
    # pre-emption: trainer0 checkpoints at the end of its step, then the run stops (Preempted)
    previous = {sig: signal.signal(sig, watch.forward_preemption) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        watch.start_all()
        summary = watch.run()
        if "preempted_step" in summary:
            raise Preempted(summary["preempted_step"], summary["checkpoint"])
    except KeyboardInterrupt:
        console.print("[red]interrupted: stopping every role[/red]")
        raise
    finally:
        watch.stop_all()
        hub.close()
        launcher.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return RunResult(watch.run_dir, summary)


class Watch:
    """Starts the roles and follows them until trainer0's summary arrives (module docstring)."""

    def __init__(self, hub: Hub, launcher: Launcher, specs: dict[str, RoleSpec], recipe: Recipe):
        self.hub, self.launcher, self.specs, self.recipe = hub, launcher, specs, recipe
        self.handles: dict[str, RoleHandle] = {}
        self.started_at: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        self.run_dir: Path | None = None  # trainer0 says where (RunPlaced)

    def forward_preemption(self, *_) -> None:
        if "trainer0" in self.handles:
            self.handles["trainer0"].send_signal(signal.SIGUSR1)

    def start_all(self) -> None:
        for name in self.specs:
            self._start(name)

    def _start(self, name: str) -> None:
        self.handles[name] = self.launcher.start(self.specs[name])
        self.started_at[name] = time.monotonic()

    def run(self) -> dict:
        while True:
            try:
                got = self.hub.recv(timeout=0.2)
            except queue.Empty:
                got = None
            try:
                if got is not None:
                    self._on_message(got.msg)
                for name, handle in list(self.handles.items()):
                    if not handle.alive():
                        self._died(name, f"exited with code {handle.exitcode()}")
                    else:
                        self._check_silence(name, handle)
            except _Finished as done:
                return done.summary

    def _on_message(self, msg) -> None:
        if isinstance(msg, RunFinished):
            raise _Finished(msg.summary)
        if isinstance(msg, RoleError):
            raise _failure(msg)
        if isinstance(msg, RunPlaced):
            self.run_dir = Path(msg.run_dir)
            console.print(f"run_dir={self.run_dir}" + (f" (resuming from {msg.checkpoint})" if msg.checkpoint else ""))

    def _died(self, name: str, reason: str) -> None:
        deadline = time.monotonic() + 1.0  # its own error report, or the summary, may still be on its way
        while time.monotonic() < deadline:
            try:
                self._on_message(self.hub.recv(timeout=0.1).msg)
            except queue.Empty:
                continue
        if not name.startswith("rollout"):
            raise RoleFailed(f"role '{name}' {reason} before the run finished")
        self.hub.forget(name)
        used = self.restarts.get(name, 0)
        restarting = self.launcher.can_restart and used < self.recipe.rollout.max_restarts
        console.print(f"[yellow]rollout worker '{name}' {reason}: its prompts go to the others"
                      f"{'; restarting it' if restarting else ''}[/yellow]")
        self.hub.send("trainer0", RoleLost(name, reason, restarting))
        del self.handles[name]
        if restarting:
            self.restarts[name] = used + 1
            self.specs[name].incarnation += 1
            self._start(name)
        elif not any(n.startswith("rollout") for n in self.handles):
            raise RoleFailed(f"every rollout worker is gone (last: '{name}' {reason}; rollout.max_restarts="
                             f"{self.recipe.rollout.max_restarts} used up)")

    def _check_silence(self, name: str, handle: RoleHandle) -> None:
        silent = self.hub.silent_for(name)
        if silent is None:  # not connected yet
            waited = time.monotonic() - self.started_at[name]
            if waited > STARTUP_TIMEOUT_S:
                raise RoleFailed(f"role '{name}' started {waited:.0f} s ago and never connected to the hub")
            return
        if silent <= self.recipe.run.role_timeout_s:
            return
        reason = f"stopped answering (nothing heard for {silent:.0f} s, run.role_timeout_s={self.recipe.run.role_timeout_s:g})"
        if not name.startswith("rollout"):
            handle.kill()  # it cannot stop by itself: it is not even answering
            raise RoleFailed(f"role '{name}' {reason}")
        handle.kill()  # replaced like a worker that died
        self._died(name, reason)

    def stop_all(self, grace_s: float = 10.0) -> None:
        """Tell every role to stop; whatever has not exited within `grace_s` (all together) is killed:
        a role stuck in a collective with a dead peer, or one that stopped answering, never exits by itself."""
        for name in self.handles:
            self.hub.send(name, Stop("run over"))
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(h.alive() for h in self.handles.values()):
            time.sleep(0.05)
        for handle in self.handles.values():
            handle.kill()


class _Finished(Exception):
    def __init__(self, summary: dict):
        self.summary = summary


def _failure(err: RoleError) -> Exception:
    if err.kind in BAD_INPUT:  # bad input: one clear line, as in a single-process run
        return BAD_INPUT[err.kind](err.message)
    return RoleFailed(f"role '{err.role}' failed:\n{err.traceback}")
