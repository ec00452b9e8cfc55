"""What both kvmesh processes need from the operating system and share: nothing of Kubernetes,
LMCache or HTTP, so the webhook and the controller can use it without importing each other."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

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


async def watch_loop_lag(lag_histogram: Any, worst_gauge: Any, period: float) -> None:
    """How late the event loop runs a timer (CPU starvation or blocking work): every admission,
    watch event and lease renewal waits that long. Observed into `lag_histogram`; the worst
    since start set on `worst_gauge`."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    while True:
        t0 = loop.time()
        await asyncio.sleep(period)
        lag = max(0.0, loop.time() - t0 - period)
        lag_histogram.observe(lag)
        if lag > worst:
            worst = lag
            worst_gauge.set(lag)
