"""One local process per role: `python -m areal.role SPEC.json`, listeners on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from areal.launchers import Launcher, RoleHandle
from areal.parent import PARENT_ENV
from areal.role import SECRET_ENV, RoleSpec

SPEC_DIR_PREFIX = "areal-roles-"  # + the controller's pid + "-": where its roles' specs are written


class LocalHandle(RoleHandle):
    def __init__(self, name: str, process: subprocess.Popen):
        self.name, self.process = name, process

    def alive(self) -> bool:
        return self.process.poll() is None

    def exitcode(self) -> int | None:
        return self.process.poll()

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        for ask in (None, self.process.terminate, self.process.kill):
            if ask is not None and self.alive():
                ask()
            try:
                self.process.wait(timeout if ask is None else 5)
                return
            except subprocess.TimeoutExpired:
                continue


class LocalLauncher(Launcher):
    """Roles as child processes of the controller. Specs are written to a private temporary folder
    (named after the controller's pid); the run secret goes through the environment, never into the
    file. Restarts are allowed. A role dies with the controller: killed with it (kill -9 included), it
    would otherwise live on, cut off from the run, holding its memory and its files."""

    bind_host = "127.0.0.1"
    can_restart = True

    def __init__(self, devices: dict[str, str] | None = None):
        self.devices = devices or {}  # role name -> CUDA_VISIBLE_DEVICES (areal.launchers.assign_devices)
        self.spec_dir = Path(tempfile.mkdtemp(prefix=f"{SPEC_DIR_PREFIX}{os.getpid()}-"))

    def start(self, spec: RoleSpec) -> LocalHandle:
        secret, spec.secret = spec.secret, ""
        path = spec.write(self.spec_dir / f"{spec.name}.{spec.incarnation}.json")
        env = {**os.environ, SECRET_ENV: secret, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
               PARENT_ENV: str(os.getpid())}
        if spec.name in self.devices:
            env["CUDA_VISIBLE_DEVICES"] = self.devices[spec.name]
        process = subprocess.Popen([sys.executable, "-m", "areal.role", str(path)], env=env)
        spec.secret = secret
        return LocalHandle(spec.name, process)

    def close(self) -> None:
        """The roles are stopped: their specs go (one folder per run was left in /tmp before)."""
        shutil.rmtree(self.spec_dir, ignore_errors=True)


def role_pids(controller_pid: int, name: str) -> list[int]:
    """Live processes of the local run whose controller is `controller_pid` that play `name`: a role
    ("rollout1", every incarnation) or one process of it ("rollout1.0"). Read from /proc (Linux)."""
    pids, folder = [], f"{SPEC_DIR_PREFIX}{controller_pid}-".encode()
    pattern = f"/{name}.json" if "." in name else f"/{name}."
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(folder in a and pattern.encode() in a and a.endswith(b".json") for a in args):
            pids.append(int(cmdline.parent.name))
    return pids
