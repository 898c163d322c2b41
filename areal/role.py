"""A role is a process anyone can start: `python -m areal.role SPEC.json`.

The spec is plain data (JSON): which role and rank, the resolved recipe, the run folder and
checkpoint to resume from, the hub address to reach and the run secret. It holds no live
objects and no prompts: a role loads what it needs itself and receives the rest as messages
(areal/messages.py). The local launcher starts roles this way, and so can an `srun` task or a
Ray actor; what a role does (areal/roles.py) does not depend on who placed it.

The secret may be left out of the file and given as AREAL_RUN_SECRET in the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

SECRET_ENV = "AREAL_RUN_SECRET"
ROLES = ("trainer", "rollout")


@dataclass
class RoleSpec:
    role: str  # "trainer" | "rollout"
    rank: int
    recipe: dict  # areal.config.to_dict(Recipe), already validated by the controller
    run_dir: str  # "": trainer0 validates the inputs, then places the run (folder, checkpoint) itself
    hub: str  # tcp://HOST:PORT of the controller's hub (areal.channel.Hub.address)
    secret: str = ""  # empty: read from $AREAL_RUN_SECRET
    checkpoint: str | None = None  # the checkpoint the run resumes from
    bind_host: str = "127.0.0.1"  # the interface this role's own listeners bind (weight store, trainer group)
    incarnation: int = 0  # 0 for the first process of this role, +1 per restart
    num_threads: int = 1
    recipe_path: str | None = None  # names the run folder (runs/<recipe>-<time>) and finds runs to resume

    @property
    def name(self) -> str:
        return f"{self.role}{self.rank}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "role spec") -> "RoleSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known or not {"role", "rank", "recipe", "run_dir", "hub"} <= set(data):
            raise ValueError(f"{source}: expected an object with keys {sorted(known)}")
        spec = cls(**data)
        if spec.role not in ROLES:
            raise ValueError(f"{source}: role must be one of {ROLES}, got {spec.role!r}")
        return spec

    def write(self, path: Path) -> Path:
        """Write the spec readable by its owner only (it may hold the run secret)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        return path


def run_role(spec: RoleSpec) -> int:
    """Connect to the hub and run the role; any failure is reported to the controller, then exit 1."""
    from areal.channel import CONTROLLER, Endpoint
    from areal.messages import RoleError
    from areal.parent import PARENT_ENV, die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the controller's: it stops every role
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # before torch loads: OpenMP sizes its pool once (a Ray actor would otherwise keep the raylet's value)
    os.environ["OMP_NUM_THREADS"] = str(max(1, spec.num_threads))
    # a weight group left behind (a worker died) makes the C++ store client print stack traces as warnings
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ["AREAL_ROLE"] = f"{spec.name}.{spec.incarnation}"  # areal.faults can target one role's process
    parent = os.environ.pop(PARENT_ENV, "")  # the local launcher's controller: never outlive it
    if parent.isdigit():
        die_with_parent(int(parent))
    from areal.transport import loopback_env

    loopback_env(spec.bind_host)  # the groups torch builds from the environment listen on lo too (gloo, NCCL)
    import torch

    torch.set_num_threads(max(1, spec.num_threads))
    secret = spec.secret or os.environ.get(SECRET_ENV, "")
    endpoint = Endpoint(spec.name, spec.hub, secret)
    try:
        from areal import roles

        getattr(roles, f"{spec.role}_main")(spec, endpoint)
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the controller
        if isinstance(e, SystemExit) and not e.code:  # a rollout worker leaves this way on Stop
            return 0
        endpoint.send(CONTROLLER, RoleError(spec.name, type(e).__name__, str(e), traceback.format_exc()))
        time.sleep(0.5)  # let the IO thread put it on the wire
        return 1
    finally:
        endpoint.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m areal.role SPEC.json", file=sys.stderr)
        return 2
    try:
        spec = RoleSpec.from_json(Path(argv[0]).read_text(), source=argv[0])
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_role(spec)


def exit_now(code: int) -> None:
    """End the process once its role is over: atexit handlers run (reward pools, wandb) and output is
    flushed, but the interpreter's teardown of torch and its modules is skipped. It took about a second
    per role, and every run's end waits for its slowest role. Files are closed by then (checkpoints,
    metrics, the exported model)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
