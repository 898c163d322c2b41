"""Launchers place roles (trainer, rollout workers) in processes; only they and the controller
know about processes. `LocalLauncher` runs each role as a local process; Ray and Slurm launchers
implement the same two methods.

A role is a picklable `RoleSpec`: an importable `module:function` target plus keyword arguments.
Whatever a role raises travels back, with its traceback, through the launcher's error queue, so
a crashed worker's error surfaces in the main process instead of hanging silently.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import signal
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class RoleFailed(RuntimeError):
    """A role died; the message carries its name and its traceback (or exit code)."""


@dataclass
class RoleSpec:
    name: str
    target: str  # "package.module:function"
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    num_threads: int = 1


def _run_role(spec: RoleSpec, errors) -> None:
    """Child entry point: set the environment and threads, run the target, report any failure."""
    os.environ.update(spec.env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when roles stop
    try:
        import torch

        torch.set_num_threads(max(1, spec.num_threads))
        module, fn = spec.target.split(":")
        getattr(importlib.import_module(module), fn)(**spec.kwargs)
    except BaseException:  # noqa: BLE001 - every failure must reach the controller
        errors.put((spec.name, traceback.format_exc()))
        raise SystemExit(1)


class RoleHandle(ABC):
    name: str

    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    def exitcode(self) -> int | None: ...

    @abstractmethod
    def stop(self, timeout: float = 10.0) -> None: ...

    @abstractmethod
    def send_signal(self, sig: int) -> None:
        """Deliver a signal to the role's process (pre-emption reaches the trainer this way)."""


class Launcher(ABC):
    """Starts roles and reports their failures; `errors()` yields (role name, traceback) pairs."""

    @abstractmethod
    def start(self, spec: RoleSpec) -> RoleHandle: ...

    @abstractmethod
    def failures(self) -> list[tuple[str, str]]: ...

    @abstractmethod
    def queue(self):
        """A queue that every role of this launcher can share."""


class _LocalHandle(RoleHandle):
    def __init__(self, name: str, process):
        self.name, self.process = name, process

    def alive(self) -> bool:
        return self.process.is_alive()

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class LocalLauncher(Launcher):
    """One local process per role ("spawn": no torch state is inherited)."""

    def __init__(self):
        self.ctx = mp.get_context("spawn")
        self._errors = self.ctx.Queue()

    def start(self, spec: RoleSpec) -> RoleHandle:
        process = self.ctx.Process(target=_run_role, args=(spec, self._errors), name=f"areal-{spec.name}", daemon=True)
        process.start()
        return _LocalHandle(spec.name, process)

    def failures(self) -> list[tuple[str, str]]:
        out = []
        while True:
            try:
                out.append(self._errors.get_nowait())
            except queue.Empty:
                return out

    def queue(self):
        return self.ctx.Queue()
