"""What both kvmesh processes need from the operating system and share: nothing of Kubernetes,
LMCache or HTTP, so the webhook and the controller can use it without importing each other."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("kvmesh")


def exit_watchdog(seconds: float) -> threading.Timer:
    """Last resort after SIGTERM: if the process has not exited within `seconds` (a blocked
    loop, a hung library call), exit anyway. A thread, so it does not depend on the event loop,
    which may be what is stuck; the kubelet would SIGKILL the process later anyway."""
    def fire() -> None:
        log.error("still running %g s after SIGTERM; exiting now", seconds)
        logging.shutdown()
        os._exit(1)
    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t
