"""A many-rank launch dies with the process that launched it, however that process ends (even ``kill -9``).

The chain: the launcher (the pytest case) → torchrun → the ranks. torchrun starts each rank in a session of its
own, so no process group holds them all; instead each link asks the kernel to kill it when its parent exits
(Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``): torchrun in :func:`torchrun_preexec` (run between fork and exec),
each rank in :func:`tie_rank_to_launch`, first thing in the worker. A parent that is gone already when the link
is made is caught by checking who the parent is afterwards: the launcher's pid travels in ``DPMEM_RANKS_LAUNCHER``.
Where ``prctl`` does not exist (not Linux) the ties are skipped and the launch's own timeout still applies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

LAUNCHER_ENV = "DPMEM_RANKS_LAUNCHER"  # the launcher's pid, in torchrun's and every rank's environment
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # resolved here, not in a forked child


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits; False where that cannot be asked."""
    return _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def torchrun_preexec() -> Callable[[], None]:
    """The ``preexec_fn`` of torchrun's Popen: dies with this (the launcher's) process, or exits at once if this
    process is gone before the tie was made."""
    launcher = os.getpid()

    def tie() -> None:  # in the child, between fork and exec: no imports, no allocation beyond the call
        if die_with_parent() and os.getppid() != launcher:
            os._exit(1)

    return tie


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after ``pid (comm)`` (state, ppid, ...); None without them."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # comm may hold spaces and parentheses


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid``; None when it has exited or /proc cannot tell."""
    fields = _stat(pid)
    return int(fields[1]) if fields is not None and fields[0] not in ("Z", "X") else None


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    fields = _stat(pid)
    return fields is None or fields[0] not in ("Z", "X")  # no /proc: os.kill found it


def tie_rank_to_launch() -> str | None:
    """Make this rank die with its torchrun; None, or why the launch it belongs to is gone already.

    torchrun is this process' parent; it is the launch's when its own parent is the launcher named in the
    environment. A rank started by hand (no launcher in the environment) is only tied to its parent."""
    agent = os.getppid()
    if not die_with_parent():
        return None
    if os.getppid() != agent:  # torchrun exited before the tie was made
        return "torchrun exited before this rank started"
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is not None and parent_of(agent) not in (int(launcher), None):
        return f"the launcher (pid {launcher}) exited before this rank started"
    return None
