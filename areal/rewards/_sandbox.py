"""What contains a reward worker: resource limits, a scrubbed environment, its whole process tree.

Stdlib only: the worker imports this before the reward fn (see _worker.py). Everything below
works on Linux; elsewhere only the scrubbed environment, the CPU limit and the process-group
kill apply (the rest needs /proc and prctl).

Memory (reward.memory_mb): RLIMIT_AS, set once the reward fn is loaded, at the worker's address
    space then plus memory_mb. An allocation past it fails inside the reward code (MemoryError),
    so the call is blamed exactly and the worker survives to report it.
CPU (reward.cpu_seconds): RLIMIT_CPU counts a process's whole life, so before a call the worker
    makes sure the soft limit lies between (CPU used so far) + cpu_seconds and one second more,
    moving it when it does not; the hard limit is left alone, since an unprivileged process could
    never raise it again for the next call. At the soft limit SIGXCPU raises CpuTimeExceeded (a
    BaseException: `except Exception` in reward code does not swallow it) inside the call. Code
    stuck in C that holds the GIL never lets that handler run, so the pool also reads the
    worker's CPU time from /proc while a call runs and kills it CPU_GRACE_S past the soft limit.
Processes (reward.max_processes): RLIMIT_NPROC is not used. A fork under it fails once the *user*
    has that many processes and threads in all (the run's own, other jobs on the node), so no one
    value works: small, it breaks innocent rewards on a busy node; large, it stops a bomb only
    after thousands of pids; and root is exempt. Instead a worker is two processes: a small
    guardian, session leader (everything the reward starts shares its process group) and child
    subreaper (orphans of the reward's processes are re-parented to it, not to init, so they
    stay in the worker's tree, and it reaps them), and below it the scorer that loads the reward
    fn and runs the calls (split_off_scorer). The pool counts the tree's live processes while a
    call runs, the scorer after each call, and a worker is always killed with its whole tree:
    the group is stopped (SIGSTOP, so nothing in it can fork meanwhile), every descendant is
    stopped too (those that started their own session), then all are SIGKILLed.
Environment (reward.env_allow): workers get the parent's environment without the variables that
    look like secrets (SECRET_PATTERNS, and the run's channel secret), unless allowed by name or
    glob. Reward code that goes looking for secrets elsewhere (/proc/<parent>/environ, files under
    $HOME) is not stopped: run untrusted code in a container as well.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import signal
import sys
from fnmatch import fnmatchcase

LINUX = sys.platform.startswith("linux")
# Environment variables a worker does not inherit (matched case-insensitively), besides the run's
# channel secret (areal.role.SECRET_ENV), unless reward.env_allow names them.
SECRET_PATTERNS = ("*_TOKEN", "*_KEY", "*_SECRET", "*_PASSWORD", "*_CREDENTIALS", "AWS_*")
CPU_GRACE_S = 1.0  # past the soft limit, when the pool kills a worker whose SIGXCPU handler never ran
# Failure kinds after which a worker is not trusted with another call: it reports, then waits to be killed.
TAINTING_KINDS = ("memory", "cpu", "processes")


# --------------------------------------------------------------------------- environment


def worker_environment(environ: dict[str, str], allow: tuple[str, ...] | list[str],
                       channel_secret_env: str) -> dict[str, str]:
    """`environ` without secret-looking variables (SECRET_PATTERNS, any case, and the variable named
    `channel_secret_env`), except those matching a name or glob in `allow` (case-sensitive)."""

    def hidden(name: str) -> bool:
        if any(fnmatchcase(name, pattern) for pattern in allow):
            return False
        return name == channel_secret_env or any(fnmatchcase(name.upper(), p) for p in SECRET_PATTERNS)

    return {name: value for name, value in environ.items() if not hidden(name)}


# --------------------------------------------------------------------------- worker side


class CpuTimeExceeded(BaseException):
    """Raised in a reward call that used up reward.cpu_seconds (see CpuBudget)."""


def cpu_soft_limit(cpu_at_call_start: float, seconds: float) -> int:
    """RLIMIT_CPU's soft limit for a call: whole seconds of the process's CPU time."""
    return math.ceil(cpu_at_call_start + seconds)


class CpuBudget:
    """Per-call CPU time limit over the cumulative RLIMIT_CPU: `arm()` before each call.

    A call gets between `seconds` and `seconds` + 1 of CPU time. The limit is moved only when
    the one in place would give less (about once per CPU second of the worker): setrlimit on
    RLIMIT_CPU re-arms a kernel timer and costs ~15 us, more than a fast reward call.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.in_call = False  # SIGXCPU raises only inside the reward call, never in the worker's own code
        self.exceeded = False  # set even when the reward code swallowed the exception
        self._hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        self._soft = -math.inf
        if seconds:
            signal.signal(signal.SIGXCPU, self._on_sigxcpu)

    def arm(self, cpu_now: float) -> None:
        self.exceeded = False
        if not self.seconds or self._soft >= cpu_now + self.seconds:
            return  # the limit in place gives this call at least `seconds` and at most `seconds` + 1
        soft = cpu_soft_limit(cpu_now, self.seconds)
        if self._hard != resource.RLIM_INFINITY:
            soft = min(soft, self._hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, self._hard))
        self._soft = soft

    def _on_sigxcpu(self, signum, frame) -> None:
        self.exceeded = True
        if self.in_call:  # the kernel repeats SIGXCPU every CPU second past the limit: so do we
            raise CpuTimeExceeded(f"the call used more than {self.seconds:g} s of CPU time (reward.cpu_seconds)")


def limit_address_space(extra_mb: int) -> None:
    """RLIMIT_AS (soft and hard) at this process's address space now plus `extra_mb` MiB."""
    if not extra_mb or not LINUX:
        return
    with open("/proc/self/status") as status:
        size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = size_kb * 1024 + extra_mb * 1024 * 1024
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failed: Python's MemoryError, ENOMEM from the OS, or torch's CPU allocator."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def split_off_scorer(parent_pid: int) -> None:
    """Tie this worker to the pool's process `parent_pid` (it dies with it), then (Linux) fork: the
    child returns (it loads the reward fn and scores), this process never does.

    It stays above the scorer as a child subreaper: orphans of the reward's processes are
    re-parented to it, so they stay in the worker's tree (counted, and killed with it), and it
    reaps them, so none is left a zombie (the scorer's own children stay the scorer's to wait
    for). When the scorer exits it kills whatever is left below and exits the same way. Called
    first thing in a worker (BOOTSTRAP): no other thread runs yet, and the less is imported, the
    less memory the guardian keeps (its pages turn private as the scorer writes to its copies).
    """
    from areal.parent import die_with_parent

    die_with_parent(parent_pid)  # the pool starts workers from a thread that lives as long as it
    if not LINUX:
        return
    import ctypes

    pr_set_child_subreaper = 36
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1)
    guardian = os.getpid()
    scorer = os.fork()
    if scorer == 0:
        die_with_parent(guardian)
        return
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the pipe above all: the scorer's exit must read as EOF
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # cannot happen while the scorer lives
            os._exit(1)
        if pid == scorer:
            break
    stopped: set[int] = set()
    try:
        _stop_descendants(guardian, stopped)
    finally:
        for pid in stopped:
            _signal(pid, signal.SIGKILL)
    if os.WIFSIGNALED(status):  # die as the scorer did: the pool reports its exit code
        try:
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL's cannot be changed
            pass
        os.kill(guardian, os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def excess_processes(limit: int) -> int:
    """The worker's live processes below the scorer's guardian, when more than `limit` (0: no
    limit), else 0. Run by the scorer after each call: one syscall when it has no children, the
    common case (orphans already adopted by the guardian are then left to the pool's watch).
    """
    if not limit or not LINUX:
        return 0
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # reaps nothing
    except ChildProcessError:
        return 0
    count = count_reward_processes(os.getppid())
    return count if count > limit else 0


# --------------------------------------------------------------------------- /proc, both sides


def _children(pid: int) -> list[int]:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # gone
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids += map(int, f.read().split())
        except OSError:
            pass
    return kids


def descendants(root: int) -> list[int]:
    """Pids below `root` in the process tree (exited but unreaped ones too); [] if it is gone."""
    if not LINUX:
        return []
    found: list[int] = []
    frontier = [root]
    while frontier:
        kids = _children(frontier.pop())
        found += kids
        frontier += kids
    return found


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def count_reward_processes(guardian: int) -> int:
    """Processes a worker's reward code has running: the live descendants of the worker's
    guardian but the scorer (zombies waiting to be reaped do not count)."""
    count = 0
    for pid in descendants(guardian):
        fields = _stat_fields(pid)
        count += fields is not None and fields[0] not in (b"Z", b"X")
    return max(0, count - 1)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if LINUX else 100


def cpu_seconds_used(pid: int) -> float | None:
    """User + system CPU time of process `pid` (all its threads), or None if unknown."""
    fields = _stat_fields(pid) if LINUX else None
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14 and 15


# --------------------------------------------------------------------------- parent side


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_descendants(root: int, stopped: set[int]) -> None:
    """SIGSTOP every descendant of `root`, adding each to `stopped`, until none is left running."""
    for _ in range(100):  # each round stops what the last found; a frozen tree ends it at once
        found = set(descendants(root)) - stopped
        if not found:
            return
        for pid in found:
            _signal(pid, signal.SIGSTOP)
        stopped |= found


def kill_tree(leader: int, walk: bool) -> None:
    """SIGKILL session leader `leader` with its process group and (if `walk`) every descendant.

    `walk` only while `leader` is not yet reaped: its pid, and so the tree below it, is still its
    own. The group is stopped first so nothing in it can fork while the tree is read; descendants
    that left the group (their own session) are stopped as they are found.
    """
    if leader <= 1 or leader == os.getpid() or leader == os.getpgrp():
        raise ValueError(f"refusing to kill process tree {leader}: not a reward worker")
    stopped: set[int] = set()
    try:
        _signal(leader, signal.SIGSTOP, group=True)
        if walk:
            _stop_descendants(leader, stopped)
    finally:
        _signal(leader, signal.SIGKILL, group=True)
        for pid in stopped:
            _signal(pid, signal.SIGKILL)
