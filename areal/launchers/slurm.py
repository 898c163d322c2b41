"""Slurm: `launcher.type=slurm` submits a batch job that runs the recipe; its roles start with `srun`.

On the login node (`python -m areal.train ... launcher.type=slurm`, which calls `submit`):
  1. the run folder is fixed now (`run.run_dir`, else the folder `checkpoint.resume` picks: a new
     runs/<recipe>-<time>, or an unfinished run to continue), so a requeued job resumes the same run;
  2. the resolved recipe goes to <log_dir>/recipe.yaml and the script to <log_dir>/job.sbatch
     (log_dir: `launcher.slurm.log_dir`, else <run_dir>/slurm); `--dry-run` only prints the script;
  3. `sbatch` submits it; the job id, log and run_dir are printed; then the job is followed (its log
     streamed) until it ends, unless `launcher.slurm.wait=false`. Ctrl-C detaches, the job runs on.
     A failed job ends the command with the failing role's error (<log_dir>/error.txt).

In the allocation, the batch script runs `python -m areal.launchers.slurm RECIPE.yaml` (`main`) on
the first node: the controller (areal/controller.py), whose hub binds that node's address. Roles
are placed on the nodes by `place_roles` (trainer ranks packed from the first node, rollout workers
spread) and each starts as one `srun` step running `python -m areal.role SPEC.json`.

Pre-emption and the time limit: Slurm sends SIGUSR1 to the batch shell `signal_before_s` before the
limit (SIGTERM on pre-emption); the script passes it to the controller, trainer0 commits a
checkpoint, areal exits with PREEMPTED_EXIT_CODE and the script requeues the job, which resumes the
run from that checkpoint (`checkpoint.resume=auto` in the same run_dir).

Every node must see run_dir, log_dir and the Python environment at the same paths (a shared filesystem).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from areal.config import ConfigError, to_yaml
from areal.launchers import Launcher, role_needs
from areal.launchers.local import LocalHandle
from areal.role import SECRET_ENV, RoleSpec

POLL_S = 2.0
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


# ------------------------------------------------------------------ pure parts: placement, time, script
def place_roles(needs: list[tuple[str, int, int]], nodes: int, cpus_per_node: int, gpus_per_node: int) -> dict[str, int]:
    """Node index of every role. Trainer ranks go first-fit from node 0 (packed: their collectives stay
    on as few nodes as possible); rollout workers go round-robin over the nodes with room, starting after
    the last trainer's node. cpus_per_node=0 means no CPU limit (the job then takes what the busiest
    node needs). A role that fits nowhere is a ConfigError naming it and the numbers."""
    cpu_cap = cpus_per_node or float("inf")
    used = [[0, 0] for _ in range(nodes)]
    placed: dict[str, int] = {}
    cursor = 0
    for name, cpus, gpus in needs:
        fits = [n for n in range(nodes) if used[n][0] + cpus <= cpu_cap and used[n][1] + gpus <= gpus_per_node]
        if not fits:
            key = "launcher.trainer" if name.startswith("trainer") else "launcher.rollout"
            free = ", ".join(f"node {n} {cpu_cap - c if cpus_per_node else 'any'} CPUs/{gpus_per_node - g} GPUs"
                             for n, (c, g) in enumerate(used))
            raise ConfigError(f"{key}: {name} needs {_count(cpus, 'CPU')} and {_count(gpus, 'GPU')} but no node "
                              f"has that left (launcher.slurm.nodes={nodes}, cpus_per_node={cpus_per_node or 'as needed'}, "
                              f"gpus_per_node={gpus_per_node}; free: {free})")
        # a trainer rank: the first node with room (packed); a worker: the next one after the last placed (spread)
        node = fits[0] if name.startswith("trainer") else min(fits, key=lambda n: (n - cursor) % nodes)
        cursor = (node + 1) % nodes
        used[node][0] += cpus
        used[node][1] += gpus
        placed[name] = node
    return placed


def node_cpus(needs: list[tuple[str, int, int]], placed: dict[str, int]) -> int:
    """CPUs the busiest node's roles need together."""
    per_node: dict[int, int] = {}
    for name, cpus, _ in needs:
        per_node[placed[name]] = per_node.get(placed[name], 0) + cpus
    return max(per_node.values(), default=1)


def slurm_seconds(text: str) -> float:
    """A Slurm --time value in seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; infinite: inf."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return float("inf")
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"launcher.slurm.time: {text!r} is not a Slurm time (MM, HH:MM:SS, D-HH:MM, ...)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)  # MM or MM:SS


def job_layout(recipe) -> tuple[list[tuple[str, int, int]], dict[str, int], int]:
    """(role needs, node of each role, CPUs per node) of the job; ConfigError for what Slurm could not run."""
    sl = recipe.launcher.slurm
    if slurm_seconds(sl.time) <= sl.signal_before_s:
        raise ConfigError(f"launcher.slurm.signal_before_s={sl.signal_before_s} must be shorter than "
                          f"launcher.slurm.time={sl.time}")
    if sl.nodes < 1:
        raise ConfigError(f"launcher.slurm.nodes: must be >= 1, got {sl.nodes}")
    needs = role_needs(recipe)
    if recipe.run.mode == "sync":  # one process, the batch step itself: it needs what a trainer rank does
        needs = needs[:1]
    placed = place_roles(needs, sl.nodes, sl.cpus_per_node, sl.gpus_per_node)
    return needs, placed, sl.cpus_per_node or node_cpus(needs, placed)


def job_script(recipe, recipe_file: Path, log_dir: Path, workdir: Path, python: str) -> str:
    """The sbatch script (module docstring); the recipe is the resolved one, its run_dir fixed."""
    from areal.checkpoint.session import PREEMPTED_EXIT_CODE

    sl = recipe.launcher.slurm
    needs, placed, cpus = job_layout(recipe)
    options = [f"--job-name={sl.job_name}", f"--nodes={sl.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}"]
    options += [f"--gpus-per-node={sl.gpus_per_node}"] if sl.gpus_per_node > 0 else []
    options += [f"--partition={sl.partition}"] if sl.partition else []
    options += [f"--account={sl.account}"] if sl.account else []
    options += [f"--time={sl.time}", f"--chdir={workdir}", f"--output={log_dir}/job-%j.log", "--open-mode=append",
                f"--signal=B:USR1@{sl.signal_before_s}"]
    options += ["--requeue"] if sl.requeue else ["--no-requeue"]
    lines = ["#!/bin/bash"] + [f"#SBATCH {o}" for o in options + list(sl.sbatch)]
    lines += [f"# areal: run_dir {recipe.run.run_dir}, recipe {recipe_file}"]
    if recipe.run.mode == "sync":
        lines += ["# run.mode=sync: the whole run is this job's batch step, on node 0"]
    else:
        lines += ["# roles (one srun step each, started by the controller on node 0):"]
        lines += [f"#   node {n}: " + ", ".join(f"{name} ({_count(c, 'CPU')}" + (f", {_count(g, 'GPU')})" if g else ")")
                                          for name, c, g in needs if placed[name] == n)
                  for n in sorted(set(placed.values()))]
    lines += ["", *sl.setup, ""] if sl.setup else [""]
    lines += [
        "export COLUMNS=${COLUMNS:-160}  # the log is no terminal: console lines would wrap at 80",
        'echo "areal: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, $(date)"',
        f"{shlex.quote(python)} -m areal.launchers.slurm {shlex.quote(str(recipe_file))} &",
        "areal=$!",
        "# USR1: Slurm's warning before the time limit (to the batch shell only); TERM: scancel or pre-emption",
        "warned=",
        "trap 'warned=1; kill -USR1 $areal' USR1",
        "trap 'kill -TERM $areal' TERM",
        "# a trapped signal interrupts `wait`: wait again until areal itself has exited",
        "while wait $areal; code=$?; kill -0 $areal 2>/dev/null; do :; done",
    ]
    if sl.requeue:
        # after TERM Slurm decides: scancel ends the job, a pre-emption requeues it (PreemptMode=REQUEUE)
        lines += [f"if [ $code -eq {PREEMPTED_EXIT_CODE} ] && [ -n \"$warned\" ]; then  # checkpoint committed: resume it",
                  '  echo "areal: requeueing job $SLURM_JOB_ID to resume the run"',
                  "  scontrol requeue $SLURM_JOB_ID",
                  "fi"]
    lines += ["exit $code"]
    return "\n".join(lines) + "\n"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("s" if n != 1 else "")


# ------------------------------------------------------------------ login node: submit and follow
def _run_dir(recipe, recipe_path: str | None, dry_run: bool) -> Path:
    """The run folder, fixed at submit time. A dry run only names it (and writes nothing)."""
    if dry_run:
        name = Path(recipe_path).stem if recipe_path else "default"
        return Path(recipe.run.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    from areal.checkpoint.resume import place_run
    from areal.config import to_dict

    return place_run(to_dict(recipe), recipe.run.run_dir, recipe_path, recipe.checkpoint.resume).run_dir.resolve()


def submit(recipe, recipe_path: str | None, dry_run: bool) -> int:
    """Write the job's recipe and script, submit it and follow it (module docstring). Returns the exit code."""
    if not dry_run and shutil.which("sbatch") is None:
        print("error: launcher.type=slurm: sbatch not found on PATH (submit from a Slurm login node, or "
              "`bash scripts/slurm_local.sh up` for a local test cluster; --dry-run prints the job script)",
              file=sys.stderr)
        return 2
    try:
        job_layout(recipe)  # before the run folder is made
        recipe = copy.deepcopy(recipe)
        recipe.run.run_dir = str(_run_dir(recipe, recipe_path, dry_run))
        sl = recipe.launcher.slurm
        log_dir = Path(sl.log_dir).resolve() if sl.log_dir else Path(recipe.run.run_dir) / "slurm"
        sl.log_dir = str(log_dir)
        script = job_script(recipe, log_dir / "recipe.yaml", log_dir, Path.cwd(), sys.executable)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dry_run:
        print(script, end="")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "recipe.yaml").write_text(to_yaml(recipe))
    (log_dir / "job.sbatch").write_text(script)
    (log_dir / "error.txt").unlink(missing_ok=True)
    out = subprocess.run(["sbatch", "--parsable", str(log_dir / "job.sbatch")], capture_output=True, text=True)
    if out.returncode != 0:
        reason = " ".join(out.stderr.split()) or f"exit code {out.returncode}"
        print(f"error: sbatch {log_dir / 'job.sbatch'} failed: {reason}", file=sys.stderr)
        return 1
    job_id = out.stdout.strip().split(";")[0]  # "ID" or "ID;CLUSTER"
    log = log_dir / f"job-{job_id}.log"
    print(f"submitted job {job_id}\n  log:     {log}\n  run_dir: {recipe.run.run_dir}", flush=True)
    if not sl.wait:
        return 0
    return follow(job_id, log, log_dir / "error.txt", Path(recipe.run.run_dir))


def job_state(job_id: str) -> tuple[str, int, int] | None:
    """(state, exit code, restarts) of a job, or None when Slurm no longer knows it."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    fields = dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}
    if "JobState" not in fields:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"], capture_output=True,
                             text=True)  # finished long ago: the accounting database, where there is one
        rows = out.stdout.split() if out.returncode == 0 else []
        if not rows:
            return None
        state, _, code = rows[-1].partition("|")
        return state.split()[0], int(code.split(":")[0] or 0), 0
    return fields["JobState"], int(fields.get("ExitCode", "0:0").split(":")[0]), int(fields.get("Restarts", 0))


def follow(job_id: str, log: Path, error_file: Path, run_dir: Path) -> int:
    """Stream the job's log until the job ends. Ctrl-C detaches; the job keeps running."""
    offset, restarts = 0, 0
    try:
        while True:
            got = job_state(job_id)
            offset = _print_new(log, offset)
            if got is None or got[0] in ENDED:
                break
            if got[2] > restarts:
                restarts = got[2]
                print(f"[job {job_id} requeued (restart {restarts}): it resumes from its checkpoint]", flush=True)
            time.sleep(POLL_S)
        time.sleep(0.5)  # the last lines may reach the shared filesystem after the state changed
        _print_new(log, offset, final=True)
    except KeyboardInterrupt:
        print(f"\ndetached: job {job_id} keeps running. Follow it: tail -f {log}   Cancel it: scancel {job_id}",
              file=sys.stderr)
        return 0
    state, code, _ = got if got is not None else ("UNKNOWN", 1, 0)
    if state == "COMPLETED" or (got is None and (run_dir / "summary.json").is_file()):
        print(f"job {job_id} completed; summary: {run_dir / 'summary.json'}")
        return 0
    written = error_file.read_text().strip() if error_file.is_file() else ""  # the job's main() wrote it
    error = written.splitlines()[0] if written else f"job {job_id} ended {state} (exit code {code}); see {log}"
    print(f"error: {error}", file=sys.stderr)
    return code or 1


def _print_new(path: Path, offset: int, final: bool = False) -> int:
    """Print what the file gained since `offset` (whole lines only, unless `final`); the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    end = len(data) if final else data.rfind(b"\n") + 1
    if end:
        sys.stdout.write(data[:end].decode(errors="replace"))
        sys.stdout.flush()
    return offset + end


# ------------------------------------------------------------------ in the allocation: srun one step per role
class SrunHandle(LocalHandle):
    """One role as one srun step. srun forwards SIGTERM/SIGUSR1/SIGINT to the task; a kill goes to the
    step through Slurm (SIGKILL to srun alone would leave the task running until Slurm notices)."""

    def __init__(self, name: str, step_name: str, process: subprocess.Popen):
        super().__init__(name, process)
        self.step_name = step_name

    def kill(self) -> None:
        if not self.alive():
            return
        job = os.environ.get("SLURM_JOB_ID", "")
        steps = subprocess.run(["squeue", "-s", "-j", job, "-h", "-o", "%i %j"], capture_output=True, text=True).stdout
        for step_id, _, step_name in (line.partition(" ") for line in steps.splitlines()):
            if step_name == self.step_name:
                subprocess.run(["scancel", "--quiet", "--signal=KILL", step_id], capture_output=True)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # the step was not created yet (srun waiting for resources)
            self.process.kill()
            self.process.wait(10)


class SrunLauncher(Launcher):
    """Roles as srun steps of the current job, each on the node `place_roles` gives it; listeners bind that
    node's address. Specs are written under <log_dir>/roles/ readable by their owner only, the run secret
    goes through the environment. Restarts are allowed (a new step)."""

    can_restart = True

    def __init__(self, recipe):
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            raise ConfigError("launcher.type=slurm: roles start inside a Slurm job ($SLURM_JOB_ID is not set); "
                              "submit the recipe with `python -m areal.train ... launcher.type=slurm`")
        sl = recipe.launcher.slurm
        self.nodes = _scontrol(["show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", "")]).split()
        self.addresses = [_node_address(n) for n in self.nodes]
        self.bind_host = sl.head_address or self.addresses[0]
        self.needs = {name: (cpus, gpus) for name, cpus, gpus in role_needs(recipe)}
        self.placed = place_roles(role_needs(recipe), len(self.nodes), sl.cpus_per_node, sl.gpus_per_node)
        log_dir = Path(sl.log_dir) if sl.log_dir else Path(recipe.run.run_dir or f"slurm-{job}") / "slurm"
        self.spec_dir = log_dir / "roles"
        print("areal: " + ", ".join(f"{name} on {self.nodes[n]}" for name, n in self.placed.items()), flush=True)

    def start(self, spec: RoleSpec) -> SrunHandle:
        node = self.placed[spec.name]
        cpus, gpus = self.needs[spec.name]
        spec.bind_host = self.addresses[node]
        secret, spec.secret = spec.secret, ""
        path = spec.write(self.spec_dir / f"{spec.name}.{spec.incarnation}.json")
        spec.secret = secret
        step_name = f"{spec.name}.{spec.incarnation}"
        env = {**os.environ, SECRET_ENV: secret}
        if gpus == 0:  # else srun would take the job's --gpus-per-node from the environment for this step too
            for key in ("SLURM_GPUS_PER_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK"):
                env.pop(key, None)
        # --exact: the step gets only its own CPUs, so steps run side by side; --mem=0: every step may use
        # the node's memory of the job without reserving it (else the first step holds it all, others wait)
        command = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={self.nodes[node]}", f"--cpus-per-task={cpus}",
                   *([f"--gpus-per-node={gpus}"] if gpus else []), "--exact", "--mem=0", f"--job-name={step_name}",
                   "--kill-on-bad-exit=1", sys.executable, "-m", "areal.role", str(path)]
        return SrunHandle(spec.name, step_name, subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))

    def close(self) -> None:
        """Nothing to release: steps end with their roles, and all of them with the job."""


def _scontrol(args: list[str]) -> str:
    out = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"scontrol {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def _node_address(node: str) -> str:
    """The node's NodeAddr: the address Slurm itself reaches it on."""
    found = re.search(r"NodeAddr=(\S+)", _scontrol(["show", "node", "-o", node]))
    return found.group(1) if found else node


def main(argv: list[str] | None = None) -> int:
    """`python -m areal.launchers.slurm RECIPE.yaml`: run the recipe in this job (the batch script's command)."""
    import logging

    import yaml

    from areal.checkpoint.session import PREEMPTED_EXIT_CODE, Preempted
    from areal.config import from_dict
    from areal.data import DataError
    from areal.recipe import Recipe
    from areal.train import train

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m areal.launchers.slurm RECIPE.yaml (the job script's command)", file=sys.stderr)
        return 2
    path = Path(argv[0])
    error_file = path.parent / "error.txt"
    error_file.unlink(missing_ok=True)  # a requeued job starts clean
    # the file is the resolved recipe written by `submit`: plain YAML, no interpolation to redo
    try:
        recipe = from_dict(Recipe, yaml.safe_load(path.read_text()), source=str(path))
        recipe.validate()
        logging.basicConfig(level=recipe.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        train(recipe, str(path), launcher=SrunLauncher(recipe) if recipe.run.mode == "async" else None)
        return 0
    except (ConfigError, DataError, FileNotFoundError) as e:  # bad input: one clear line
        return _fail(error_file, str(e), 2)
    except Preempted as e:  # the batch script requeues the job (launcher.slurm.requeue)
        return _fail(error_file, str(e), PREEMPTED_EXIT_CODE, prefix="areal: ")
    except KeyboardInterrupt:
        return _fail(error_file, "interrupted", 130)
    except Exception as e:  # noqa: BLE001 - a role's failure: its one-line summary first, the details in the log
        import traceback

        traceback.print_exc()
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        headline = f"{lines[0]} {lines[-1].strip()}" if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        return _fail(error_file, headline, 1, details=str(e))


def _fail(error_file: Path, line: str, code: int, details: str = "", prefix: str = "error: ") -> int:
    print(f"{prefix}{line}", file=sys.stderr, flush=True)
    error_file.write_text(line + "\n" + (details + "\n" if details else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
