"""Fault injection: does a run survive crashes, hangs, bad rewards and bad disks without losing or
duplicating data?

    python benchmarks/faults.py --out runs/faults                      # every fault, 5 injections each
    python benchmarks/faults.py --faults rollout_kill,reward --injections 1 --steps 16

Every run is the default recipe (recipes/math.yaml: async, eta 1) in a subprocess, `python -m areal.train`,
with 2 rollout workers and a checkpoint every few steps. Fault-free runs at 3 seeds come first; then each
fault is injected `--injections` times at seeded moments (a step of the run, a little into it), in one run
or in a chain of runs where the fault ends the run and the same command is rerun:

    rollout_kill   kill -9 of a rollout worker (alternating 0 and 1), one run: the controller replaces it
    rollout_stop   SIGSTOP of a rollout worker for longer than run.role_timeout_s: named, killed, replaced
    trainer_kill   kill -9 of trainer0: the run fails (exit 1); the rerun resumes from the last checkpoint
    driver_kill    kill -9 of the driver (the controller): its roles die with it; the rerun resumes
    driver_term    SIGTERM of the driver (pre-emption): checkpoint, exit 75; the rerun resumes from it
    reward         the reward fn (benchmarks/fault_reward.py) hangs, raises, returns NaN, returns 1e30, calls
                   os._exit, each `--injections` times, at seeded call counts, in one run: each must be
                   scored 0 and counted by the pool (timeout, error, nan, out_of_range, error)
    kv_exhaustion  a KV pool of 4 blocks per worker (rollout.kv_blocks): the engine preempts and requeues;
                   an injection is a step in which it had to
    ckpt_enospc    checkpoint writes fail with ENOSPC (AREAL_FAULT=trainer0/ckpt.write@N:enospc), one run:
                   the failed checkpoint is dropped, training goes on, the next one commits
    ckpt_eio       the same with EIO (a read-only or failing disk; the harness runs as root, where chmod
                   does not stop a write)
    ckpt_corrupt   kill -9 of the driver, then the newest checkpoint's shard or state is corrupted or cut
                   short; the rerun must skip it by name and resume from the one before

After each fault its finished run is checked against the fault-free ones:
  - every step has exactly one metrics row, across the reruns;
  - duplicated: group ids consumed more than once (data/group_ids of every row);
  - lost: admitted groups neither consumed, nor held in the buffer, nor still generating at the end
    (the summary's "groups" ledger names the held and running ids; admitted = consumed + filtered + held +
    running must hold). With eta > 0, timing decides which groups a step takes and a few are always left
    over at the end: only a group in none of those places is lost;
  - the final held-out accuracy within the fault-free range, widened by --margin on each side (async
    runs are not bit-reproducible: the fault-free seeds show how far they spread).
An injection survives when its fault was handled as designed (the exit code, the replacement, the
resume, the counter) and its run passes every check. The last line is one JSON object.
Extra wall seconds are against the fault-free run of the same seed and include every rerun's start-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fault_reward  # noqa: E402  (beside this file)

from areal.launchers.local import role_pids  # noqa: E402
from areal.metrics import read_metrics  # noqa: E402

FAULTS = ("rollout_kill", "rollout_stop", "trainer_kill", "driver_kill", "driver_term", "reward", "kv_exhaustion",
          "ckpt_enospc", "ckpt_eio", "ckpt_corrupt")
ROLE_TIMEOUT_S = 4  # rollout_stop: a stopped worker is named after this long
RUN_TIMEOUT_S = 600  # one process of a run; past it the run is killed and counts as hung
KV_BLOCKS = 4  # per worker: one group of 8 samples needs 8 or more


@dataclass
class Setting:
    steps: int = 30
    every: int = 3  # checkpoint.every_steps
    seed: int = 1
    out: Path = ROOT / "runs" / "faults"
    margin: float = 0.05

    def command(self, run_dir: Path, seed: int, extra: list[str]) -> list[str]:
        return [sys.executable, "-m", "areal.train", "recipe=recipes/math.yaml", f"trainer.steps={self.steps}",
                "rollout.num_workers=2", f"checkpoint.every_steps={self.every}", "checkpoint.keep_last=2",
                f"run.eval_every={self.steps}", "logging.wandb.mode=disabled", "logging.progress_bar=false",
                f"run.seed={seed}", f"run.run_dir={run_dir}", *extra]


@dataclass
class Baseline:
    """The fault-free runs: the accuracy range and the wall time of the seed the faults use."""

    accuracy: list[float]
    wall_s: float
    margin: float

    def accuracy_ok(self, value: float) -> bool:
        return min(self.accuracy) - self.margin <= value <= max(self.accuracy) + self.margin


@dataclass
class Outcome:
    fault: str
    injections: int = 0
    handled: int = 0  # injections whose fault was handled as designed
    survived: int = 0
    lost: int = 0
    duplicated: int = 0
    extra_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return {"injections": self.injections, "survived": self.survived, "lost": self.lost,
                "duplicated": self.duplicated, "extra_wall_s": round(self.extra_s, 1), "notes": self.notes}


# ------------------------------------------------------------------------------------------------- processes


class Run:
    """One `python -m areal.train` process of a run; its output goes to <run_dir>.log (appended)."""

    def __init__(self, setting: Setting, run_dir: Path, extra: list[str] = (), env: dict | None = None,
                 seed: int | None = None):
        faults = ("AREAL_FAULT", "WANDB_MODE", fault_reward.SPECS_ENV, fault_reward.DIR_ENV)  # only those asked for
        env = {**{k: v for k, v in os.environ.items() if k not in faults}, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = run_dir.with_name(run_dir.name + ".log")
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        self.metrics = run_dir / "metrics.jsonl"
        self.started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(setting.command(run_dir, setting.seed if seed is None else seed, list(extra)),
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # hung: a finding, never a stuck harness
            for name in ("trainer0", "rollout0", "rollout1"):
                _signal_all(role_pids(self.proc.pid, name), signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self.started

    def output(self) -> str:
        """What this process printed, on one line (the console wraps long lines)."""
        with open(self.log, "rb") as f:
            f.seek(self.log_start)
            return " ".join(f.read().decode("utf-8", "replace").split())

    def last_row(self) -> dict | None:
        """The newest complete metrics row (the file may be mid-write or being truncated by a resume)."""
        try:
            lines = self.metrics.read_text().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return None

    def wait_for_step(self, step: int, timeout: float = RUN_TIMEOUT_S) -> dict | None:
        """The first row at or past `step`, or None if the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            row = self.last_row()
            if row and row["step"] >= step:
                return row
            time.sleep(0.05)
        return None


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def moments(rng: random.Random, n: int, low: int, high: int, gap: int) -> list[int]:
    """n seeded steps in [low, high), increasing, at least `gap` apart (as many as fit)."""
    n = max(1, min(n, (high - low) // gap))
    width = (high - low) // n
    return [low + i * width + rng.randint(0, max(width - gap, 0)) for i in range(n)]


def fresh_dir(out: Path, name: str) -> Path:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.with_name(name + ".log").unlink(missing_ok=True)
    return run_dir


# ------------------------------------------------------------------------------------------------- checks


def check_run(run_dir: Path, steps: int, baseline: Baseline | None) -> tuple[int, int, list[str]]:
    """(lost, duplicated, problems) of a finished run, from its metrics rows and summary."""
    problems: list[str] = []
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        return 0, 0, ["the run did not finish (no summary.json)"]
    summary = json.loads(summary_path.read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    if [r["step"] for r in rows] != list(range(steps + 1)):
        problems.append("a metrics row is missing or doubled")
    consumed = [g for r in rows[1:] for g in r["data/group_ids"]]
    duplicated = len(consumed) - len(set(consumed))
    ledger = summary["groups"]
    if ledger["admitted"] != ledger["consumed"] + ledger["filtered"] + ledger["held"] + ledger["running"]:
        problems.append(f"ledger does not hold: {ledger}")
    if ledger["consumed"] != len(consumed):
        problems.append(f"the buffer counted {ledger['consumed']} groups consumed, the metrics rows {len(consumed)}")
    waiting = set(ledger["held_ids"]) | set(ledger["running_ids"])
    unaccounted = set(range(ledger["admitted"])) - set(consumed) - waiting
    lost = max(len(unaccounted) - ledger["filtered"], 0)  # filtered groups are dropped by design, by count
    if set(consumed) & waiting:
        problems.append(f"groups both consumed and still held/running: {sorted(set(consumed) & waiting)[:10]}")
    if any(g >= ledger["admitted"] for g in consumed):
        problems.append("a consumed group id was never admitted")
    for r in rows[1:]:
        if not (math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"])):
            problems.append(f"step {r['step']}: loss or grad norm not finite")
            break
        if not -1e3 <= r["reward/mean"] <= 1e3:
            problems.append(f"step {r['step']}: reward/mean {r['reward/mean']:g} (a bad reward got through)")
            break
    if baseline is not None and not baseline.accuracy_ok(summary["eval_accuracy_final"]):
        problems.append(f"final accuracy {summary['eval_accuracy_final']:.3f} outside the fault-free range "
                        f"{min(baseline.accuracy):.3f}-{max(baseline.accuracy):.3f} ± {baseline.margin}")
    return lost, duplicated, problems


def finish(out: Outcome, run_dir: Path, setting: Setting, baseline: Baseline | None, wall_s: float) -> Outcome:
    lost, duplicated, problems = check_run(run_dir, setting.steps, baseline)
    out.lost, out.duplicated = lost, duplicated
    out.notes += problems
    out.survived = out.handled if not problems and not lost and not duplicated else 0
    out.extra_s = wall_s - baseline.wall_s if baseline else 0.0
    return out


# ------------------------------------------------------------------------------------------------- faults


def fault_free(setting: Setting, seeds: list[int], reuse: bool = False) -> Baseline:
    """The fault-free runs (`reuse`: those already finished in setting.out, of the same --steps and --every)."""
    accuracy, wall = [], {}
    for seed in seeds:
        run_dir = setting.out / f"fault_free-seed{seed}"
        wall_file = run_dir.with_name(run_dir.name + ".wall_s")
        if reuse and wall_file.exists() and (run_dir / "summary.json").exists():
            accuracy.append(json.loads((run_dir / "summary.json").read_text())["eval_accuracy_final"])
            wall[seed] = float(wall_file.read_text())
            continue
        run_dir = fresh_dir(setting.out, run_dir.name)
        run = Run(setting, run_dir, seed=seed)
        rc = run.wait()
        wall[seed] = run.wall_s
        if rc != 0:
            raise RuntimeError(f"the fault-free run at seed {seed} failed (exit {rc}); see {run.log}")
        lost, duplicated, problems = check_run(run_dir, setting.steps, None)
        if lost or duplicated or problems:
            raise RuntimeError(f"the fault-free run at seed {seed} fails its own checks: {problems}, lost {lost}, "
                               f"duplicated {duplicated}")
        accuracy.append(json.loads((run_dir / "summary.json").read_text())["eval_accuracy_final"])
        wall_file.write_text(f"{wall[seed]:.1f}")
    return Baseline(accuracy, wall.get(setting.seed, statistics.mean(wall.values())), setting.margin)


def rollout_kill(setting, baseline, n, rng) -> Outcome:
    """kill -9 of rollout worker 0, then 1, then 0, ... at n seeded steps of one run, whatever it is doing
    (generating, evaluating, or still starting as the replacement of the last one killed)."""
    out, run_dir = Outcome("rollout_kill"), fresh_dir(setting.out, "rollout_kill")
    run = Run(setting, run_dir, [f"rollout.max_restarts={n}"])
    for i, step in enumerate(moments(rng, n, 2, setting.steps - 2, 2)):
        if run.wait_for_step(step) is None:
            out.notes.append(f"the run ended before step {step}")
            break
        time.sleep(rng.uniform(0.0, 0.3))
        pids = role_pids(run.proc.pid, f"rollout{i % 2}")
        _signal_all(pids, signal.SIGKILL)
        out.injections += bool(pids)
    rc = run.wait()
    replaced = len(re.findall(r"rollout worker 'rollout\d' exited with code -9: its prompts go to the others; "
                              r"restarting it", run.output()))
    out.handled = min(out.injections, replaced) if rc == 0 else 0
    if rc != 0:
        out.notes.append(f"exit code {rc}")
    elif replaced != out.injections:
        out.notes.append(f"{out.injections} workers killed, {replaced} replaced")
    return finish(out, run_dir, setting, baseline, run.wall_s)


def rollout_stop(setting, baseline, n, rng) -> Outcome:
    """SIGSTOP of a serving rollout worker (AREAL_FAULT's stop action at a seeded generation step of each
    incarnation in turn: rollout0.0, rollout1.0, rollout0.1, ...): silent for longer than run.role_timeout_s,
    it must be named, killed and replaced."""
    out, run_dir = Outcome("rollout_stop"), fresh_dir(setting.out, "rollout_stop")
    fault = ",".join(f"rollout{i % 2}.{i // 2}/rollout.step@{rng.randint(5, 30)}:stop" for i in range(n))
    run = Run(setting, run_dir, [f"rollout.max_restarts={n}", f"run.role_timeout_s={ROLE_TIMEOUT_S}"],
              env={"AREAL_FAULT": fault})
    rc = run.wait()
    named = len(re.findall(r"rollout worker 'rollout\d' stopped answering", run.output()))
    out.injections = named  # a stop that fired and was never named would show as a hang (RUN_TIMEOUT_S)
    out.handled = named if rc == 0 else 0
    if rc != 0:
        out.notes.append(f"exit code {rc}")
    if named < n:
        out.notes.append(f"{named} of {n} planned stops fired")
    return finish(out, run_dir, setting, baseline, run.wall_s)


def _committed(run_dir: Path) -> list[Path]:
    """The run's committed checkpoints, oldest first (a .tmp is a write that never committed)."""
    ckpt = run_dir / "ckpt"
    return sorted(p for p in ckpt.glob("step_*") if not p.name.endswith(".tmp")) if ckpt.is_dir() else []


def _resumed_from(text: str) -> int | None:
    found = re.findall(r"resumed from step (\d+)", text)
    return int(found[-1]) if found else None


def _chain(name: str, setting: Setting, baseline, n: int, rng, inject, expect_rc: int, damage=None) -> Outcome:
    """Run; at a seeded step inject a fault that ends the run; check its exit code and that no role outlived
    it; `damage` the run's files if asked; rerun the same command, which must resume from the newest
    checkpoint left whole. n times; the last rerun runs to the end."""
    out, run_dir, wall = Outcome(name), fresh_dir(setting.out, name), 0.0
    low = 2 * setting.every + 2  # two checkpoints committed before the first injection
    expected: tuple[bool, int | None, str] | None = None  # (handled so far, resume step, damaged name) of the last
    for step in [*moments(rng, n, low, setting.steps - 1, 3), None]:
        run = Run(setting, run_dir)
        ended_early = step is None or run.wait_for_step(step) is None
        if expected is not None:  # this process shows whether the previous injection was survived
            handled, resume_step, damaged = expected
            shown = _resumed_from(run.output()) if not ended_early else None
            if ended_early:
                run.wait()
                shown = _resumed_from(run.output())
            if shown != resume_step:
                out.notes.append(f"rerun resumed from step {shown}, expected {resume_step}")
                handled = False
            if damaged and damaged not in run.output():
                out.notes.append(f"rerun did not name the damaged checkpoint {damaged}")
                handled = False
            out.handled += handled
        if ended_early:
            rc = run.wait()
            wall += run.wall_s
            if step is not None:
                out.notes.append(f"the run ended (exit {rc}) before step {step}")
            elif rc != 0:
                out.notes.append(f"the last rerun exited {rc}")
            break
        time.sleep(rng.uniform(0.0, 0.3))
        inject(run)
        out.injections += 1
        rc = run.wait()
        wall += run.wall_s
        handled = rc == expect_rc
        if not handled:
            out.notes.append(f"injection at step {step}: exit code {rc}, expected {expect_rc}")
        time.sleep(0.5)  # PDEATHSIG is immediate; give the kernel a moment before looking
        orphans = [p for role in ("trainer0", "rollout0", "rollout1") for p in role_pids(run.proc.pid, role)]
        if orphans:
            out.notes.append(f"injection at step {step}: {len(orphans)} role processes outlived the driver")
            _signal_all(orphans, signal.SIGKILL)
            handled = False
        committed, damaged = _committed(run_dir), ""
        if damage is not None and len(committed) >= 2:
            damaged = damage(committed[-1], out.injections)
            committed = committed[:-1]
        elif damage is not None:
            out.notes.append(f"injection at step {step}: fewer than 2 checkpoints to damage")
            handled = False
        expected = (handled, int(committed[-1].name.split("_")[1]) if committed else None, damaged)
    return finish(out, run_dir, setting, baseline, wall)


def trainer_kill(setting, baseline, n, rng) -> Outcome:
    return _chain("trainer_kill", setting, baseline, n, rng,
                  lambda run: _signal_all(role_pids(run.proc.pid, "trainer0"), signal.SIGKILL), 1)


def driver_kill(setting, baseline, n, rng) -> Outcome:
    return _chain("driver_kill", setting, baseline, n, rng, lambda run: run.proc.send_signal(signal.SIGKILL), -9)


def driver_term(setting, baseline, n, rng) -> Outcome:
    return _chain("driver_term", setting, baseline, n, rng, lambda run: run.proc.send_signal(signal.SIGTERM), 75)


def damage_checkpoint(path: Path, i: int) -> str:
    """Corrupt or cut short a file of the checkpoint `path` (a different way for each i); returns the name
    the rerun must give for refusing it."""
    shard = next(path.glob("*.safetensors"))
    how = i % 4
    if how == 0:  # one flipped byte in a tensor
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == 1:  # a shard cut short (a disk that filled, a copy that stopped)
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif how == 2:  # the state cut short
        state = path / "state.json"
        state.write_bytes(state.read_bytes()[:100])
        return path.name
    else:  # the shard's header garbled
        data = bytearray(shard.read_bytes())
        data[8:16] = b"garbage!"
        shard.write_bytes(bytes(data))
    return path.name


def ckpt_corrupt(setting, baseline, n, rng) -> Outcome:
    return _chain("ckpt_corrupt", setting, baseline, n, rng, lambda run: run.proc.send_signal(signal.SIGKILL), -9,
                  damage=damage_checkpoint)


def _failed_writes(name: str, action: str, setting: Setting, baseline, n: int, rng) -> Outcome:
    """n checkpoint writes of one run fail (4 writes a checkpoint: shard, rank entry, state, manifest; a failed
    one ends its checkpoint): each failed checkpoint is counted and dropped, and the run goes on."""
    out, run_dir = Outcome(name), fresh_dir(setting.out, name)
    writes = 4 * (setting.steps // setting.every - n)  # enough hits to reach even if every failure is a first write
    hits = sorted(rng.sample(range(1, max(writes, n + 1)), n))
    fault = ",".join(f"trainer0/ckpt.write@{h}:{action}" for h in hits)
    # on_busy=wait: a checkpoint is never skipped for the previous one, so every planned hit comes
    run = Run(setting, run_dir, ["checkpoint.on_busy=wait"], env={"AREAL_FAULT": fault})
    rc = run.wait()
    out.injections = n
    if rc != 0:
        out.notes.append(f"exit code {rc}")
        return finish(out, run_dir, setting, baseline, run.wall_s)
    summary = json.loads((run_dir / "summary.json").read_text())
    failures = summary["checkpoint_failures"]
    message = "No space left on device" if action == "enospc" else "Input/output error"
    out.handled = min(n, failures) if message in run.output() else 0
    if failures != n:
        out.notes.append(f"{n} writes failed, {failures} checkpoints counted as failed")
    if not _committed(run_dir):
        out.notes.append("no checkpoint left committed")
        out.handled = 0
    return finish(out, run_dir, setting, baseline, run.wall_s)


def ckpt_enospc(setting, baseline, n, rng) -> Outcome:
    return _failed_writes("ckpt_enospc", "enospc", setting, baseline, n, rng)


def ckpt_eio(setting, baseline, n, rng) -> Outcome:
    return _failed_writes("ckpt_eio", "eio", setting, baseline, n, rng)


# the pool's counter each misbehaviour must land in
REWARD_COUNTER = {"hang": "timeout", "raise": "error", "nan": "nan", "huge": "out_of_range", "exit": "error"}


def spaced_calls(count: int, first: int, last: int, rng) -> list[int]:
    """`count` seeded call numbers in [first, last), evenly spaced with jitter: no two misbehaviours share a
    worker's batch in flight. (A hang or os._exit kills its worker; a NaN scored in the same batch but not yet
    sent back would be lost with it and its sample scored again, cleanly, so the NaN would go uncounted.)"""
    gap = (last - first) // count
    return [first + i * gap + rng.randrange(gap // 4, 3 * gap // 4 + 1) for i in range(count)]


def reward(setting, baseline, n, rng) -> Outcome:
    """Every misbehaviour of fault_reward.py n times, at seeded call counts of one run (calls are ~128 a step,
    16 groups x 8, and ~500 for each evaluation; the counts fall before the run's last steps). Each must be
    scored 0 and counted by the rollout workers' pools (the summary's reward_failures, evaluation's too)."""
    out, run_dir = Outcome("reward"), fresh_dir(setting.out, "reward")
    folder = setting.out / "reward.markers"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    calls = spaced_calls(n * len(fault_reward.KINDS), 50, 100 * setting.steps, rng)
    kinds = [k for k in fault_reward.KINDS for _ in range(n)]
    rng.shuffle(kinds)
    specs = ",".join(f"{k}@{c}" for k, c in zip(kinds, calls))
    run = Run(setting, run_dir, [f"reward.fn={ROOT / 'benchmarks' / 'fault_reward.py'}:faulty_math_reward",
                                 "reward.timeout_s=2"],
              env={fault_reward.SPECS_ENV: specs, fault_reward.DIR_ENV: str(folder)})
    rc = run.wait()
    fired = fault_reward.fired(str(folder))
    out.injections = sum(fired.values())
    if out.injections < len(calls):
        out.notes.append(f"only {out.injections} of {len(calls)} reward faults fired")
    if rc != 0:
        out.notes.append(f"exit code {rc}")
        return finish(out, run_dir, setting, baseline, run.wall_s)
    counted = json.loads((run_dir / "summary.json").read_text())["reward_failures"]
    expected: dict[str, int] = {}
    for kind, count in fired.items():
        expected[REWARD_COUNTER[kind]] = expected.get(REWARD_COUNTER[kind], 0) + count
    out.handled = out.injections
    for counter, count in expected.items():
        if counted.get(counter, 0) != count:
            out.notes.append(f"pool counted {counted.get(counter, 0)} {counter}, {count} injected")
            out.handled = 0
    out.notes.append("fired " + ", ".join(f"{k} {v}" for k, v in fired.items()))
    return finish(out, run_dir, setting, baseline, run.wall_s)


def kv_exhaustion(setting, baseline, n, rng) -> Outcome:
    """A KV pool of KV_BLOCKS blocks per worker: an injection is a step in which an engine ran dry and
    preempted; the run must neither crash nor deadlock."""
    out, run_dir = Outcome("kv_exhaustion"), fresh_dir(setting.out, "kv_exhaustion")
    run = Run(setting, run_dir, [f"rollout.kv_blocks={KV_BLOCKS}"])
    rc = run.wait()
    if rc != 0:
        out.notes.append(f"exit code {rc}")
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    preemptions = [r.get("rollout/preemptions", 0) for r in rows[1:]]
    out.injections = sum(b > a for a, b in zip([0, *preemptions], preemptions))
    out.handled = out.injections if rc == 0 else 0
    out.notes.append(f"{max(preemptions, default=0)} preemptions")
    if out.injections < n:
        out.notes.append(f"preemptions in only {out.injections} steps, wanted {n}")
    return finish(out, run_dir, setting, baseline, run.wall_s)


# ------------------------------------------------------------------------------------------------- main


def run_faults(setting: Setting, faults: list[str], injections: int, baseline: Baseline) -> list[Outcome]:
    """Each fault with its own seeded moments (the same for a given --seed, whatever the subset)."""
    outcomes = []
    for name in faults:
        rng = random.Random(f"{setting.seed}-{name}")
        t0 = time.monotonic()
        outcome = globals()[name](setting, baseline, injections, rng)
        print(f"{name}: {outcome.survived}/{outcome.injections} survived, lost {outcome.lost}, duplicated "
              f"{outcome.duplicated}, {time.monotonic() - t0:.0f} s; {'; '.join(outcome.notes)}", flush=True)
        outcomes.append(outcome)
    return outcomes


def report(outcomes: list[Outcome], baseline: Baseline) -> dict:
    header = f"{'fault':<14} {'injections':>10} {'survived':>8} {'lost':>5} {'duplicated':>10} {'extra wall s':>12}"
    print(header)
    print("-" * len(header))
    for o in outcomes:
        print(f"{o.fault:<14} {o.injections:>10} {o.survived:>8} {o.lost:>5} {o.duplicated:>10} {o.extra_s:>12.1f}")
    print(f"fault-free final accuracy {', '.join(f'{a:.3f}' for a in baseline.accuracy)} (range widened by "
          f"±{baseline.margin}); fault-free wall {baseline.wall_s:.1f} s")
    return {"injections": sum(o.injections for o in outcomes), "survived": sum(o.survived for o in outcomes),
            "lost": sum(o.lost for o in outcomes), "duplicated": sum(o.duplicated for o in outcomes),
            "fault_free_accuracy": baseline.accuracy, "by_fault": {o.fault: o.row() for o in outcomes}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    parser.add_argument("--injections", type=int, default=5, help="injections of each fault (default 5)")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each run (default 30)")
    parser.add_argument("--every", type=int, default=3, help="checkpoint.every_steps (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "faults", help="where the runs go")
    parser.add_argument("--seed", type=int, default=1, help="run.seed of the fault runs and the moments' seed")
    parser.add_argument("--baseline-seeds", type=int, default=3, help="fault-free runs (seeds seed, seed+1, ...)")
    parser.add_argument("--margin", type=float, default=0.05, help="accuracy margin beyond the fault-free range")
    parser.add_argument("--reuse-fault-free", action="store_true",
                        help="reuse the fault-free runs already finished in --out (same --steps and --every)")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or args.injections < 1 or args.steps < 10 or args.every < 1 or args.baseline_seeds < 1:
        print(f"error: --faults must name some of {','.join(FAULTS)} (unknown: {unknown}); --injections >= 1, "
              f"--steps >= 10, --every >= 1, --baseline-seeds >= 1", file=sys.stderr)
        return 2
    setting = Setting(args.steps, args.every, args.seed, args.out.resolve(), args.margin)
    setting.out.mkdir(parents=True, exist_ok=True)
    baseline = fault_free(setting, [args.seed + i for i in range(args.baseline_seeds)], args.reuse_fault_free)
    print(f"fault-free: accuracy {baseline.accuracy}, wall {baseline.wall_s:.1f} s", flush=True)
    outcomes = run_faults(setting, faults, args.injections, baseline)
    print(json.dumps(report(outcomes, baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
