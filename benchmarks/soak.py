"""Soak: the default recipe for an hour, watching every process of the run for leaks and slow-downs.

    python benchmarks/soak.py                          # 60 minutes, 2 rollout workers
    python benchmarks/soak.py --minutes 10             # a shorter shake-out (warm-up: 2 minutes)
    python benchmarks/soak.py --minutes 30 rollout.num_workers=1 checkpoint.every_steps=25

The run is `python -m areal.train recipe=math.yaml` (local launcher, async mode) with checkpoints and
held-out evaluation on, at settings a user would pick: a checkpoint every --checkpoint-every steps
(keep_last --keep-last), an evaluation every --eval-every steps, --rollout-workers rollout workers
(the recipe has 1; 2 exercise the weight group and the per-worker paths). It must last the whole wall
duration, so `trainer.steps` is 10^9 (the data repeats by epochs; the training loop is a lazy range;
a cosine over 10^9 steps would be flat, so the schedule is set constant). At --minutes the controller
gets SIGTERM, a pre-emption: trainer0 commits a checkpoint and the run exits 75. Extra key=value
arguments are recipe overrides.

After the warm-up (--warmup-minutes, default 10% of the duration and at least 2 minutes; counted from
the launch, and never before the first training step is logged), every --interval seconds the whole
process tree of the run is sampled: the controller, trainer0, each rollout worker, their reward
workers and anything else they start (wandb's service). Per process: RSS, open descriptors, threads
and shared-memory segments (distinct /dev/shm files it maps or holds open, from /proc/PID/maps and
/proc/PID/fd); machine-wide: /dev/shm entries and SysV segments. A process is matched across samples
by its role, not its pid (a restarted rollout worker keeps its role): areal roles by the spec file in
their command line (`trainer0.0.json` is trainer0, incarnation 0), the others by their parent's role
and their own program (`rollout1/reward0`, `trainer0/wandb-core`). Every sample goes to samples.jsonl.

Figures compare the first and the last window after the warm-up (--window, a fraction of the sampled
span; 20% by default). Each window's MINIMUM is compared, so a transient (a descriptor or a buffer a
checkpoint holds for a moment, an evaluation's batch) does not count as growth while a leak, which
raises the floor, does. Throughput is steps/s and trained tokens/s (`train/num_valid_tokens`) from
metrics.jsonl over the same windows of the run's own clock (`time/wall_s`).

Targets (each a boolean in the JSON):
  rss          RSS of every process and of the whole tree grows < 10%
  fds          no process holds more descriptors at the end than at the start
  threads      no process has more threads (wandb-core, a Go runtime, is shown but not judged: NOT_JUDGED)
  shm          no process maps more /dev/shm segments, and /dev/shm and SysV hold no more entries
  throughput   steps/s at the end is no more than 10% below the start (faster is not a failure)
  throughput_per_cpu_s  the same for steps per CPU second of the whole tree, which other jobs on a shared
               machine do not move (they do move steps/s)
  clean_stop   the run exited 75 with its checkpoint committed, and no process of its tree outlived it
The last line of stdout is one JSON object with the figures; exit code 0 when every target is met,
1 when one is missed or the run failed, 2 for bad arguments. Local launcher only: Ray actors and
Slurm tasks are not children of the controller. A shared machine makes throughput noisy: keep it idle.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
HUGE_STEPS = 10**9
PREEMPTED_EXIT_CODE = 75  # areal.checkpoint.session.PREEMPTED_EXIT_CODE (not imported: that pulls torch in)
RSS_GROWTH_LIMIT_PCT = 10.0
THROUGHPUT_DROP_LIMIT_PCT = 10.0
COUNTS = ("fds", "threads", "shm")
# Third-party helpers a run starts, shown in the table but not judged: wandb-core is a Go runtime, which
# adds an OS thread whenever a syscall blocks and never ends it; that is its growth, not areal's.
NOT_JUDGED = ("wandb-core",)


def judged(role: str) -> bool:
    return role.rsplit("/", 1)[-1] not in NOT_JUDGED


# ------------------------------------------------------------------ roles (pure)

@dataclass
class ProcInfo:
    pid: int
    ppid: int
    cmdline: list[str]
    create_time: float


def own_name(cmdline: list[str]) -> tuple[str, bool]:
    """(name, is_areal_role) of one process from its command line: an areal role's name from its spec
    file (`.../rollout1.2.json` -> rollout1), a reward worker 'reward', else the program's name."""
    if "areal.role" in cmdline and cmdline[-1].endswith(".json"):
        return Path(cmdline[-1]).stem.rsplit(".", 1)[0], True
    if any("areal.rewards._worker" in arg for arg in cmdline):
        return "reward", False
    if "-m" in cmdline[:-1]:
        return cmdline[cmdline.index("-m") + 1], False
    return (Path(cmdline[0]).name if cmdline else "?"), False


def role_keys(procs: dict[int, ProcInfo], root: int) -> dict[int, str]:
    """pid -> role key for the tree under `root` (the controller). Siblings of one kind are numbered by
    age; reward workers always ("rollout0/reward0"), others only from the second on."""
    keys = {root: "controller"}
    children: dict[int, list[ProcInfo]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p)
    todo = [root]
    while todo:
        parent = todo.pop()
        seen: dict[str, int] = {}
        for child in sorted(children.get(parent, []), key=lambda c: (c.create_time, c.pid)):
            name, is_role = own_name(child.cmdline)
            index = seen.get(name, 0)
            seen[name] = index + 1
            name = name if is_role else f"{keys[parent]}/{name}{index if (index or name == 'reward') else ''}"
            keys[child.pid] = name
            todo.append(child.pid)
    return keys


# ------------------------------------------------------------------ figures (pure)

def windows(samples: list[dict], fraction: float) -> tuple[list[dict], list[dict], float]:
    """The first and last samples within `fraction` of the sampled span (at least one sample each)."""
    t0, t1 = samples[0]["t"], samples[-1]["t"]
    width = (t1 - t0) * fraction
    first = [s for s in samples if s["t"] <= t0 + width] or samples[:1]
    last = [s for s in samples if s["t"] >= t1 - width] or samples[-1:]
    return first, last, width


def floor(window: list[dict], role: str, field: str) -> float | None:
    """The smallest value of `field` of `role` over a window's samples (None: the role was never there)."""
    values = [s["procs"][role][field] for s in window if role in s["procs"]]
    return min(values) if values else None


def growth_pct(first: float, last: float) -> float:
    return 100.0 * (last - first) / first if first else 0.0


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour (None: fewer than 3 points)."""
    if len(points) < 3:
        return None
    mt, mv = sum(t for t, _ in points) / len(points), sum(v for _, v in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return 3600.0 * sum((t - mt) * (v - mv) for t, v in points) / var if var else None


def process_figures(samples: list[dict], fraction: float) -> dict:
    """Per role and for the whole tree: first and last window floors of RSS (MB), descriptors, threads,
    shm segments; RSS growth in %; the pids each role had (more than one: it was restarted)."""
    first, last, _ = windows(samples, fraction)
    half = (samples[0]["t"] + samples[-1]["t"]) / 2
    roles: dict[str, dict] = {}
    for role in sorted({r for s in samples for r in s["procs"]}):
        pids = list(dict.fromkeys(s["procs"][role]["pid"] for s in samples if role in s["procs"]))
        row: dict = {"pids": pids, "samples": sum(role in s["procs"] for s in samples)}
        for field in ("rss_mb", *COUNTS):
            row[f"{field}_first"], row[f"{field}_last"] = floor(first, role, field), floor(last, role, field)
        if row["rss_mb_first"] is not None and row["rss_mb_last"] is not None:
            row["rss_growth_pct"] = growth_pct(row["rss_mb_first"], row["rss_mb_last"])
        # the trend over the second half: a leak keeps climbing, a cache or an allocator filling up levels off
        row["rss_mb_per_h_second_half"] = slope_per_hour(
            [(s["t"], s["procs"][role]["rss_mb"]) for s in samples if role in s["procs"] and s["t"] >= half])
        roles[role] = row
    total = {}
    for field in ("rss_mb", *COUNTS):
        total[f"{field}_first"] = min(sum(p[field] for p in s["procs"].values()) for s in first)
        total[f"{field}_last"] = min(sum(p[field] for p in s["procs"].values()) for s in last)
    total["rss_growth_pct"] = growth_pct(total["rss_mb_first"], total["rss_mb_last"])
    total["rss_mb_per_h_second_half"] = slope_per_hour(
        [(s["t"], sum(p["rss_mb"] for p in s["procs"].values())) for s in samples if s["t"] >= half])
    machine = {f"{k}_{end}": min(s[k] for s in w)
               for k in ("dev_shm", "sysv_shm") for end, w in (("first", first), ("last", last))}
    return {"roles": roles, "total": total, "cpu": cpu_throughput(first, last), **machine}


def cpu_throughput(first: list[dict], last: list[dict]) -> dict:
    """Steps per CPU second of the whole tree over each window: unlike steps per wall second, what other
    jobs on a shared machine take does not move it, while areal doing more work per step does."""
    def rate(window: list[dict]) -> float | None:
        a, b = window[0], window[-1]
        if a["step"] is None or b["step"] is None:
            return None
        shared = set(a["procs"]) & set(b["procs"])  # a role restarted in between has a new CPU clock
        cpu = sum(b["procs"][r].get("cpu_s", 0.0) - a["procs"][r].get("cpu_s", 0.0) for r in shared
                  if b["procs"][r]["pid"] == a["procs"][r]["pid"])
        return (b["step"] - a["step"]) / cpu if cpu > 0 else None

    out = {"steps_per_cpu_s_first": rate(first), "steps_per_cpu_s_last": rate(last), "change_pct": None}
    if out["steps_per_cpu_s_first"] and out["steps_per_cpu_s_last"] is not None:
        out["change_pct"] = growth_pct(out["steps_per_cpu_s_first"], out["steps_per_cpu_s_last"])
    return out


def window_rate(rows: list[dict]) -> tuple[float | None, float | None]:
    """(steps/s, trained tokens/s) over consecutive metric rows: the steps after the first row, over the
    run-clock seconds between the first and the last row."""
    if len(rows) < 2 or rows[-1]["time/wall_s"] <= rows[0]["time/wall_s"]:
        return None, None
    seconds = rows[-1]["time/wall_s"] - rows[0]["time/wall_s"]
    tokens = sum(r.get("train/num_valid_tokens") or 0.0 for r in rows[1:])
    return (rows[-1]["step"] - rows[0]["step"]) / seconds, tokens / seconds


def throughput(rows: list[dict], after_step: int, fraction: float) -> dict:
    """steps/s and tokens/s over the first and the last `fraction` of the run clock after `after_step`."""
    rows = [r for r in rows if r["step"] > after_step and r.get("time/wall_s") is not None]
    out = {"steps_per_s_first": None, "steps_per_s_last": None, "tokens_per_s_first": None,
           "tokens_per_s_last": None, "change_pct": None, "window_run_s": None}
    if len(rows) < 2:
        return out
    w0, w1 = rows[0]["time/wall_s"], rows[-1]["time/wall_s"]
    width = (w1 - w0) * fraction
    out["window_run_s"] = width
    out["steps_per_s_first"], out["tokens_per_s_first"] = window_rate([r for r in rows if r["time/wall_s"] <= w0 + width])
    out["steps_per_s_last"], out["tokens_per_s_last"] = window_rate([r for r in rows if r["time/wall_s"] >= w1 - width])
    if out["steps_per_s_first"] and out["steps_per_s_last"] is not None:
        out["change_pct"] = growth_pct(out["steps_per_s_first"], out["steps_per_s_last"])
    return out


def misses(figures: dict) -> dict[str, list[str]]:
    """The roles behind each missed per-process target (a Go runtime such as wandb-core's adds an OS thread
    when a syscall blocks and never ends it: that is its growth, not areal's)."""
    roles = {k: r for k, r in figures["roles"].items() if judged(k)}
    grown = {"rss": [k for k, r in roles.items() if (r.get("rss_growth_pct") or 0) >= RSS_GROWTH_LIMIT_PCT]}
    for field in COUNTS:
        grown[field] = [k for k, r in roles.items()
                        if r[f"{field}_first"] is not None and r[f"{field}_last"] is not None
                        and r[f"{field}_last"] > r[f"{field}_first"]]
    return {k: v for k, v in grown.items() if v}


def verdicts(figures: dict, rate: dict, clean_stop: bool) -> dict[str, bool]:
    roles, total = figures["roles"], figures["total"]
    both = [r for k, r in roles.items() if judged(k) and r["rss_mb_first"] is not None and r["rss_mb_last"] is not None]

    def no_growth(field: str) -> bool:
        return all(r[f"{field}_last"] <= r[f"{field}_first"] for r in both)

    return {
        "rss": all(r["rss_growth_pct"] < RSS_GROWTH_LIMIT_PCT for r in both)
               and total["rss_growth_pct"] < RSS_GROWTH_LIMIT_PCT,
        "fds": no_growth("fds"),
        "threads": no_growth("threads"),
        "shm": no_growth("shm") and figures["dev_shm_last"] <= figures["dev_shm_first"]
               and figures["sysv_shm_last"] <= figures["sysv_shm_first"],
        "throughput": rate["change_pct"] is not None and rate["change_pct"] > -THROUGHPUT_DROP_LIMIT_PCT,
        "throughput_per_cpu_s": (figures["cpu"]["change_pct"] is not None
                                 and figures["cpu"]["change_pct"] > -THROUGHPUT_DROP_LIMIT_PCT),
        "clean_stop": clean_stop,
    }


# ------------------------------------------------------------------ sampling (I/O)

def shm_files(pid: int) -> set[str]:
    """Distinct /dev/shm files the process maps or holds open (a deleted one keeps its ' (deleted)' name)."""
    found = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                    found.add(fields[5].rstrip("\n"))
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if target.startswith("/dev/shm/"):
                found.add(target)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return found


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sysv_segments() -> int:
    try:
        return max(0, len(Path("/proc/sysvipc/shm").read_text().splitlines()) - 1)
    except OSError:
        return 0


def take_sample(root: psutil.Process, t: float, step: int | None) -> dict:
    infos, stats = {}, {}
    for p in tree(root):
        try:
            with p.oneshot():
                infos[p.pid] = ProcInfo(p.pid, p.ppid(), p.cmdline(), p.create_time())
                stats[p.pid] = {"pid": p.pid, "rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds(),
                                "threads": p.num_threads(), "shm": len(shm_files(p.pid)),
                                "cpu_s": sum(p.cpu_times()[:2])}
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue  # it ended between the listing and the reading
    procs = {key: stats[pid] for pid, key in role_keys(infos, root.pid).items() if pid in stats}
    return {"t": t, "step": step, "dev_shm": len(os.listdir("/dev/shm")), "sysv_shm": sysv_segments(), "procs": procs}


def last_row(metrics: Path) -> dict | None:
    """The last complete row of metrics.jsonl, reading only its tail."""
    try:
        with metrics.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:  # the line being written, or the cut start of the tail
            continue
    return None


def stop_run(proc: subprocess.Popen, seen: dict[int, float], timeout_s: float) -> tuple[int, list[str]]:
    """SIGTERM the controller (a pre-emption) and wait for it; then every process of its tree that is still
    alive is reported and killed. `seen` holds pid -> create_time of each process the sampler saw (a pid
    reused by an unrelated process has another create_time and is left alone)."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    time.sleep(2.0)  # reward workers (PDEATHSIG) and wandb's service follow their parent within moments
    leftover = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                leftover.append(f"{pid} {' '.join(p.cmdline())[:120]}")
                p.kill()
        except psutil.NoSuchProcess:
            continue
    if code is None:
        proc.kill()
        code = proc.wait()
    return code, leftover


# ------------------------------------------------------------------ report

def fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(figures: dict, rate: dict, targets: dict[str, bool], log) -> None:
    log(f"\n{'role':<34} {'pids':>4} {'RSS MB first':>12} {'last':>8} {'growth':>7} {'MB/h*':>7} {'fds':>9} "
        f"{'threads':>9} {'shm':>7}")
    rows = [(role, r) for role, r in figures["roles"].items()] + [("(all processes)", {**figures["total"], "pids": []})]
    for role, r in rows:
        pair = lambda f: f"{fmt(r[f + '_first'])}->{fmt(r[f + '_last'])}"  # noqa: E731
        log(f"{role:<34} {len(r['pids']) or '':>4} {fmt(r['rss_mb_first'], '.1f'):>12} {fmt(r['rss_mb_last'], '.1f'):>8} "
            f"{fmt(r.get('rss_growth_pct'), '+.1f'):>6}% {fmt(r.get('rss_mb_per_h_second_half'), '+.1f'):>7} "
            f"{pair('fds'):>9} {pair('threads'):>9} {pair('shm'):>7}")
    log("first->last: the floors (minima) of the first and last windows; *MB/h: RSS trend over the second half")
    log(f"/dev/shm entries {figures['dev_shm_first']}->{figures['dev_shm_last']}, "
        f"SysV segments {figures['sysv_shm_first']}->{figures['sysv_shm_last']}")
    log(f"steps/s {fmt(rate['steps_per_s_first'], '.3f')} -> {fmt(rate['steps_per_s_last'], '.3f')} "
        f"({fmt(rate['change_pct'], '+.1f')}%), trained tokens/s {fmt(rate['tokens_per_s_first'], '.0f')} -> "
        f"{fmt(rate['tokens_per_s_last'], '.0f')}")
    cpu = figures["cpu"]
    log(f"steps per CPU second of the tree {fmt(cpu['steps_per_cpu_s_first'], '.3f')} -> "
        f"{fmt(cpu['steps_per_cpu_s_last'], '.3f')} ({fmt(cpu['change_pct'], '+.1f')}%); not judged: {', '.join(NOT_JUDGED)}")
    log("verdicts: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------ main

def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall duration of the run (default 60)")
    ap.add_argument("--warmup-minutes", type=float, default=None,
                    help="no samples before this (default: 10%% of --minutes, at least 2)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--window", type=float, default=0.2,
                    help="first and last window, as a fraction of the sampled span (default 0.2)")
    ap.add_argument("--rollout-workers", type=int, default=2, help="rollout.num_workers (default 2)")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint.every_steps (default 50)")
    ap.add_argument("--keep-last", type=int, default=2, help="checkpoint.keep_last (default 2)")
    ap.add_argument("--eval-every", type=int, default=50, help="run.eval_every (default 50)")
    ap.add_argument("--stop-timeout", type=float, default=180.0,
                    help="seconds the run may take to checkpoint and exit after SIGTERM before it is killed")
    ap.add_argument("--out", default="", help="output folder (default runs/soak-<time>): run/, run.log, samples.jsonl")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides (key=value)")
    args = ap.parse_args(argv)
    if args.warmup_minutes is None:
        args.warmup_minutes = max(2.0, 0.1 * args.minutes)
    problems = [
        (args.minutes <= 0, f"--minutes must be > 0, got {args.minutes:g}"),
        (not 0 <= args.warmup_minutes < args.minutes,
         f"--warmup-minutes must be >= 0 and shorter than --minutes ({args.minutes:g}), got {args.warmup_minutes:g}"),
        (args.interval <= 0, f"--interval must be > 0, got {args.interval:g}"),
        (not 0 < args.window <= 0.5, f"--window must be in (0, 0.5], got {args.window:g}"),
        (args.rollout_workers < 1, f"--rollout-workers must be >= 1, got {args.rollout_workers}"),
        (args.checkpoint_every < 1, f"--checkpoint-every must be >= 1, got {args.checkpoint_every}"),
        (args.keep_last < 1, f"--keep-last must be >= 1, got {args.keep_last}"),
        (args.eval_every < 1, f"--eval-every must be >= 1, got {args.eval_every}"),
        (any("=" not in o for o in args.overrides),
         f"overrides must be key=value, got {[o for o in args.overrides if '=' not in o]}"),
    ]
    for bad, message in problems:
        if bad:
            ap.exit(2, f"error: {message}\n")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out or ROOT / "runs" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir, metrics_path = out / "run", out / "run" / "metrics.jsonl"
    if metrics_path.exists():
        print(f"error: {run_dir} already holds a run; pick another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    cmd = [sys.executable, "-m", "areal.train", "recipe=math.yaml", "run.mode=async", "launcher.type=local",
           f"trainer.steps={HUGE_STEPS}", "trainer.lr_schedule=constant", f"rollout.num_workers={args.rollout_workers}",
           f"checkpoint.every_steps={args.checkpoint_every}", f"checkpoint.keep_last={args.keep_last}",
           "checkpoint.resume=never", f"run.eval_every={args.eval_every}", f"run.run_dir={run_dir}",
           "logging.progress_bar=false", "logging.console_every=100", *args.overrides]
    log(f"soak: {args.minutes:g} min, warm-up {args.warmup_minutes:g} min, a sample every {args.interval:g} s; "
        f"cpus {os.cpu_count()}, load average {loadavg()}; out {out}")
    log("run: " + " ".join(cmd[1:]))
    dev_shm_before = len(os.listdir("/dev/shm"))
    samples_file = (out / "samples.jsonl").open("w")
    run_log = (out / "run.log").open("w")
    launched = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=run_log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    root = psutil.Process(proc.pid)
    deadline, warm_at = launched + 60 * args.minutes, launched + 60 * args.warmup_minutes
    samples: list[dict] = []
    seen: dict[int, float] = {}  # pid -> create_time of every process of the tree
    warm_step, error = None, None
    try:
        next_at = warm_at
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                error = (f"the run exited with code {proc.returncode} after {time.monotonic() - launched:.0f} s "
                         f"(see {out / 'run.log'})")
                if proc.returncode == 2:  # bad input: the run's own one-line error says which key or file
                    run_log.flush()
                    lines = (out / "run.log").read_text().splitlines()
                    error = next((line.removeprefix("error: ") for line in reversed(lines) if line.startswith("error: ")),
                                 error)
                break
            now = time.monotonic()
            if now >= next_at:
                row = last_row(metrics_path)
                step = row["step"] if row else None
                if step:  # the warm-up ends once training has begun, too
                    warm_step = step if warm_step is None else warm_step
                    sample = take_sample(root, now - launched, step)
                    samples.append(sample)
                    samples_file.write(json.dumps(sample) + "\n")
                    samples_file.flush()
                    for p in tree(root):
                        try:
                            seen.setdefault(p.pid, p.create_time())
                        except psutil.NoSuchProcess:
                            continue
                    next_at += args.interval
                    if len(samples) % max(1, int(60 / args.interval)) == 1:
                        total = sum(p["rss_mb"] for p in sample["procs"].values())
                        log(f"  {sample['t']:7.0f} s  step {step:>7}  {len(sample['procs'])} processes  "
                            f"RSS {total:.0f} MB  load {loadavg()}")
                else:
                    next_at = now + 1.0
            time.sleep(min(1.0, max(0.05, min(next_at, deadline) - time.monotonic())))  # a run that dies is seen at once
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        for p in tree(root):  # processes started since the last sample
            try:
                seen.setdefault(p.pid, p.create_time())
            except psutil.NoSuchProcess:
                continue
        seen.pop(proc.pid, None)
        ran_s = time.monotonic() - launched
        if proc.poll() is None:
            code, leftover = stop_run(proc, seen, args.stop_timeout)
        else:
            code, leftover = proc.returncode, []
        samples_file.close()
        run_log.close()
    stopped_s = time.monotonic() - launched - ran_s
    from areal.checkpoint.store import find_latest, step_dir

    last_step = (last_row(metrics_path) or {}).get("step")
    newest, _ = find_latest(run_dir / "ckpt")
    checkpoint = str(newest) if newest else None
    # pre-empted: exit code 75, and the newest complete checkpoint is of the last logged step
    clean_stop = (error is None and code == PREEMPTED_EXIT_CODE and last_step is not None
                  and newest == step_dir(run_dir / "ckpt", last_step) and not leftover)
    if error is None and len(samples) < 2:
        error = f"only {len(samples)} samples after the warm-up: run longer (--minutes) or sample more often (--interval)"
    result: dict = {
        "error": error, "minutes": args.minutes, "ran_s": round(ran_s, 1), "stop_s": round(stopped_s, 1),
        "warmup_s": 60 * args.warmup_minutes, "interval_s": args.interval, "samples": len(samples),
        "run_dir": str(run_dir), "exit_code": code, "checkpoint": checkpoint, "leftover_processes": leftover,
        "dev_shm_before": dev_shm_before, "dev_shm_after": len(os.listdir("/dev/shm")),
        "steps": last_step, "warm_step": warm_step,
        "load_average_end": loadavg(), "overrides": args.overrides,
    }
    if error is None:
        from areal.metrics import read_metrics

        figures = process_figures(samples, args.window)
        rate = throughput(read_metrics(metrics_path), warm_step, args.window)
        result["window_s"] = round(windows(samples, args.window)[2], 1)
        result.update(figures)
        result["throughput"] = rate
        result["targets"] = verdicts(figures, rate, clean_stop)
        result["missed_by"] = misses(figures)
        print_table(figures, rate, result["targets"], log)
        if result["missed_by"]:
            log("grew: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in result["missed_by"].items()))
        log(f"stop: exit code {code} ({'pre-empted, checkpoint ' + checkpoint if code == PREEMPTED_EXIT_CODE else 'not 75'})"
            f" in {stopped_s:.1f} s; processes left behind: {len(leftover)}")
    else:
        print(f"error: {error}", file=sys.stderr)
        result["targets"] = {k: False for k in ("rss", "fds", "threads", "shm", "throughput",
                                                   "throughput_per_cpu_s", "clean_stop")}
    result["ok"] = all(result["targets"].values())
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 2 if code == 2 and error else 1


if __name__ == "__main__":
    sys.exit(main())
