"""Retrying an API call through the failures that pass: 429 (the API server's priority and
fairness shedding load), 5xx, timeouts and connection errors, with exponential backoff and
jitter. Anything else (403, 404, 422, a bug) is raised at once: waiting does not fix it.

    groups = await retry.call("list KVMeshPeerGroups", api.peer_groups)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional, TypeVar

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from kvmesh.kube.informer import Backoff

log = logging.getLogger("kvmesh.retry")

T = TypeVar("T")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
DEFAULT_BACKOFF = Backoff(initial=0.2, maximum=10.0)


def transient(e: BaseException) -> bool:
    """Would the same request plausibly succeed later?"""
    if isinstance(e, ApiException):
        return e.status in RETRY_STATUS or e.status == 0
    return isinstance(e, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError))


async def call(what: str, fn: Callable[[], Awaitable[T]], *,
               backoff: Callable[[int], float] = DEFAULT_BACKOFF,
               max_seconds: Optional[float] = 300.0) -> T:
    """`await fn()` until it succeeds, a non-transient error is raised, or `max_seconds` of
    retrying have passed (then the last error is raised). Each retry is logged with what
    failed and when the next attempt is."""
    loop = asyncio.get_running_loop()
    start, attempt = loop.time(), 0
    while True:
        try:
            return await fn()
        except Exception as e:
            attempt += 1
            if not transient(e):
                raise
            delay = float(backoff(attempt))
            if max_seconds is not None and loop.time() - start + delay > max_seconds:
                raise
            detail = (f"HTTP {e.status} {e.reason}" if isinstance(e, ApiException)
                      else f"{type(e).__name__}: {e}")
            log.warning("%s failed (%s); attempt %d, retrying in %.2fs", what, detail,
                        attempt, delay)
            await asyncio.sleep(delay)
