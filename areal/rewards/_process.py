"""Parent-side handle of one reward worker process: start it, read its progress, kill it with all it started."""

from __future__ import annotations

import concurrent.futures
import json
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from multiprocessing.connection import Connection

from areal.rewards._sandbox import kill_tree
from areal.rewards._worker import BOOTSTRAP, PROGRESS
from areal.rewards.protocol import Limits, Start, pack


class WorkerProcess:
    """One worker process, its pipe end and the items it has been sent but not answered."""

    def __init__(self, spawner: concurrent.futures.Executor, spec: str, limits: Limits, env: dict[str, str]):
        """`limits`: the worker's resource limits per call; `env`: its environment, already scrubbed."""
        import_path = [entry for entry in sys.path if isinstance(entry, str)]  # what imports use of it
        parent_sock, child_sock = socket.socketpair()
        self.conn = Connection(parent_sock.detach())
        child_fd = child_sock.detach()
        with tempfile.TemporaryFile() as progress_file:
            progress_file.truncate(PROGRESS.size)
            self.progress = mmap.mmap(progress_file.fileno(), PROGRESS.size)
            progress_fd = progress_file.fileno()
            try:
                # Started from the pool's one long-lived thread: the worker's PDEATHSIG fires
                # when the thread that forked it exits, so that thread must live as long as the pool.
                self.proc = spawner.submit(
                    subprocess.Popen,
                    [sys.executable, "-c", BOOTSTRAP, str(child_fd), str(progress_fd), json.dumps(import_path)],
                    pass_fds=(child_fd, progress_fd),
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # its process group holds whatever the reward code starts
                ).result()
            finally:
                os.close(child_fd)  # only the child holds its end now, so its death reads as EOF here
        try:
            self.conn.send_bytes(pack(Start(spec, os.getpid(), limits)))
        except OSError:  # died at once: the pool sees EOF and counts a failed start
            pass
        self.started_at = time.monotonic()
        self.ready = False
        self.scorer_pid: int | None = None  # the process below this one that runs the calls ("ready" says)
        self.pending: deque[tuple[int, bytes]] = deque()  # (index, packed Item), in send order
        self.pending_bytes = 0
        self.reported = 0  # results received so far: pending[0] is item number reported + 1
        self.tainted = False  # it reported hitting a limit (memory, cpu, processes): replace it
        self.next_watch_at = 0.0  # when the pool next reads its processes and CPU time

    def read_progress(self) -> tuple[int, int, float, float]:
        """(started, finished, start time and process CPU time at the start of the last started
        item) as the worker wrote them."""
        return PROGRESS.unpack_from(self.progress)

    @property
    def pid(self) -> int:
        """The worker's guardian (see _sandbox.split_off_scorer): its process group, the root of its tree."""
        return self.proc.pid

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """Kill the worker and everything it started, then close the pipe; no waiting (see join_or_kill)."""
        self._kill_tree()
        self.conn.close()

    def kill(self, grace_s: float = 0.0) -> None:
        """Kill the worker and everything it started (after `grace_s` to exit by itself) and wait,
        leaving the pipe open so already-sent results can be read."""
        if grace_s > 0:
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._kill_tree()
        self.join_or_kill()

    def _kill_tree(self) -> None:
        # Before the worker is reaped (Popen.poll/wait): only then is its pid, and the tree below
        # it, still its own. Its pid is also its process group's id (start_new_session).
        kill_tree(self.proc.pid, walk=self.proc.returncode is None)

    def join_or_kill(self, grace_s: float = 0.5) -> None:
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:  # not killed yet (stop() is the only way here): kill
            self.proc.kill()
            self.proc.wait()
