"""Children that die with their parent: `kvmesh demo` (and the test stack) start etcd, the API
server, KWOK and kvmesh's own processes in sessions of their own, so a SIGKILL of the parent,
which runs no cleanup, would leave them all running. Linux's parent-death signal ends each of
them instead."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Resolved before any fork: the preexec function must do as little as possible in the child.
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def die_with_parent() -> None:
    """subprocess preexec_fn: SIGKILL this child when the thread that forked it exits. Fork
    from the main thread (or one that lives as long as the children)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
