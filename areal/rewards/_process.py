"""Parent-side handle of one reward worker process: start it, read its progress, stop it."""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from multiprocessing.connection import Connection

from areal.rewards._worker import BOOTSTRAP, PROGRESS


class WorkerProcess:
    """One worker process, its pipe end and the items it has been sent but not answered."""

    def __init__(self, spawner: concurrent.futures.Executor, spec: str):
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
                    [sys.executable, "-c", BOOTSTRAP, str(child_fd), str(progress_fd)],
                    pass_fds=(child_fd, progress_fd),
                    stdin=subprocess.DEVNULL,
                ).result()
            finally:
                os.close(child_fd)  # only the child holds its end now, so its death reads as EOF here
        try:
            self.conn.send((spec, list(sys.path), os.getpid()))
        except OSError:  # died at once: the pool sees EOF and counts a failed start
            pass
        self.started_at = time.monotonic()
        self.ready = False
        self.pending: deque[tuple[int, bytes]] = deque()  # (index, pickled sample), in send order
        self.pending_bytes = 0
        self.reported = 0  # results received so far: pending[0] is item number reported + 1

    def read_progress(self) -> tuple[int, int, float]:
        """(started, finished, start time of the last started item) as the worker wrote them."""
        return PROGRESS.unpack_from(self.progress)

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """Close the pipe and terminate without waiting (see join_or_kill)."""
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        """Terminate and wait, leaving the pipe open so already-sent results can be read."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.join_or_kill()

    def join_or_kill(self, grace_s: float = 0.5) -> None:
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:  # SIGTERM handled or ignored by the reward code
            self.proc.kill()
            self.proc.wait()
