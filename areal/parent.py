"""Child processes that must not outlive the process that started them (stdlib only)."""

from __future__ import annotations

import os
import signal
import sys

PARENT_ENV = "AREAL_DIE_WITH_PARENT"  # set by a launcher to its own pid: the role dies with it


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the thread that started it exits, even by SIGKILL.

    Starters call Popen from one long-lived thread (the reward pool's spawner, the controller's
    main thread), so that means "when the parent exits". Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except Exception:  # best effort
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
