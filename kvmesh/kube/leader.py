"""Leader election on a coordination.k8s.io/v1 Lease (client-go's algorithm, small).

Only the leader reconciles. A replica takes the lease when it is free or its holder has not
renewed within leaseDurationSeconds; every write carries the resourceVersion it read, so two
candidates can never both win.

Timing (client-go's meaning, longer defaults): the leader renews every `retry_seconds`; a renewal
that fails (timeout, 429, 5xx, connection error) is retried with jittered backoff until
`renew_deadline` has passed since the last successful renewal; one attempt may take a quarter
of the deadline (a slow answer completes, a hung request is retried on another connection),
so neither one slow or stuck request nor a burst of errors from an overloaded API server loses
the lease. Only when the deadline passes does the leader step down
(its tasks are cancelled), still `lease_seconds - renew_deadline` before any other replica may
take the lease, so two leaders never act at once. A renewal is one request (a PUT over the
lease as last written, its resourceVersion included); the lease is read again only when that
write conflicts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from typing import Awaitable, Callable, Optional

from kvmesh.kube import retry
from kvmesh.kube.api import ApiError, Kube
from kvmesh.kube.informer import Backoff

log = logging.getLogger("kvmesh.leader")

LEASE_API = "coordination.k8s.io/v1"
# Twice client-go's 15 s / 10 s: at 1,000-5,000 pods on a saturated 2-core machine the API
# server answered the Lease PUT in ~1 s on average but over 5 s at the tail, and a renewal left
# with 10 s minus the retry period minus the previous call lost the lease (each loss costs a
# relist and a full pass). A crashed leader is replaced within ~30 s; departures meanwhile are
# purged by the new leader's recovery step.
LEASE_SECONDS = 30
RENEW_DEADLINE_SECONDS = 20.0
RETRY_SECONDS = 2.0
# Between failed renewal attempts: short at first (a lone 429 or reset is retried at once),
# never longer than the retry period.
RENEW_BACKOFF = Backoff(initial=0.25, maximum=RETRY_SECONDS)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _micro_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Optional[str]) -> Optional[dt.datetime]:
    if not value:
        return None
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def lease_free(spec: Optional[dict], identity: str, now: dt.datetime) -> bool:
    """Pure: may `identity` take (or keep) this lease (its spec, as the API returns it) now?"""
    holder = (spec or {}).get("holderIdentity")
    if not holder or holder == identity:
        return True
    renewed = _parse_time(spec.get("renewTime") or spec.get("acquireTime"))
    if renewed is None:
        return True
    return now > renewed + dt.timedelta(seconds=spec.get("leaseDurationSeconds") or 15)


def check_timing(lease_seconds: float, renew_deadline: float, retry_seconds: float) -> None:
    """client-go's rule: retry < renew deadline < lease duration (the gap between the last two
    is the margin between this leader stepping down and another taking over)."""
    if not 0 < retry_seconds < renew_deadline < lease_seconds:
        raise ValueError(f"leader election needs 0 < retry period ({retry_seconds:g}s) < renew "
                         f"deadline ({renew_deadline:g}s) < lease duration ({lease_seconds:g}s)")


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str,
                 lease_seconds: int = LEASE_SECONDS,
                 renew_deadline: float = RENEW_DEADLINE_SECONDS,
                 retry_seconds: float = RETRY_SECONDS):
        check_timing(lease_seconds, renew_deadline, retry_seconds)
        self.kube = kube
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_deadline, self.retry_seconds = \
            int(lease_seconds), renew_deadline, retry_seconds
        # One attempt's bound: long enough for a slow answer, short enough that a request
        # which hangs (seen: single Lease PUTs stuck for 18 s+ while the median was 50 ms) is
        # retried on a fresh connection well before the deadline.
        self.attempt_seconds = max(2 * retry_seconds, renew_deadline / 4)
        self.is_leader = False
        self.transitions = 0
        self.holder: Optional[str] = None  # who holds the lease, as last read
        self._held: Optional[dict] = None  # the lease as we last wrote it
        self.on_change: Callable[[bool], None] = lambda leading: None
        # (seconds the renewal took, attempts it needed); failed attempts also call
        # on_renew_error(exception).
        self.on_renew: Callable[[float, int], None] = lambda seconds, attempts: None
        self.on_renew_error: Callable[[BaseException], None] = lambda e: None

    async def _read(self) -> Optional[dict]:
        return await self.kube.get(LEASE_API, "Lease", self.name, self.namespace)

    def _spec(self, prev: dict, now: dt.datetime) -> dict:
        held = prev.get("holderIdentity") == self.identity
        return {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "renewTime": _micro_time(now),
                "acquireTime": prev.get("acquireTime") if held else _micro_time(now),
                "leaseTransitions": (prev.get("leaseTransitions") or 0) + (0 if held else 1)}

    async def _put(self, lease: dict, spec: dict) -> dict:
        # replace carries lease's resourceVersion: a concurrent writer wins (409).
        return await self.kube.replace({**lease, "apiVersion": LEASE_API, "kind": "Lease",
                                        "spec": spec})

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: True when we hold the lease now, False when another replica holds it
        or wrote it first. API failures (timeouts, 429, 5xx) are raised."""
        now = _now()
        if self._held is not None:
            try:  # the common case, one request: renew over what we last wrote
                self._held = await self._put(self._held, self._spec(
                    self._held.get("spec") or {}, now))
                self.holder = self.identity
                return True
            except ApiError as e:
                if e.status != 409:
                    raise  # kept: the next attempt PUTs again
                self._held = None  # someone wrote since (or our last write did land): read
        lease = await self._read()
        prev = (lease or {}).get("spec") or {}
        self.holder = prev.get("holderIdentity")
        if lease is not None and not lease_free(prev, self.identity, now):
            return False
        spec = self._spec(prev, now)
        try:
            if lease is None:
                self._held = await self.kube.create({
                    "apiVersion": LEASE_API, "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": spec})
            else:
                self._held = await self._put(lease, spec)
        except ApiError as e:
            if e.status in (409, 422):  # someone else wrote first
                return False
            raise
        self.holder = self.identity
        return True

    async def release(self) -> None:
        """Give the lease up at shutdown so a standby takes over at once."""
        if not self.is_leader:
            return
        try:
            lease = await self._read()
            spec = (lease or {}).get("spec") or {}
            if spec.get("holderIdentity") == self.identity:
                spec = {k: v for k, v in spec.items() if k not in ("holderIdentity",
                                                                    "renewTime")}
                await self.kube.replace({**lease, "apiVersion": LEASE_API, "kind": "Lease",
                                         "spec": spec})
        except Exception as e:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, e)
        self._held = None
        self._set(False)

    def _set(self, leading: bool) -> None:
        if leading != self.is_leader:
            self.is_leader = leading
            self.transitions += 1
            log.info("%s leadership of lease %s/%s", "acquired" if leading else "lost",
                     self.namespace, self.name)
            self.on_change(leading)

    async def renew(self, last_renewed: float) -> Optional[float]:
        """Renew, retrying until `renew_deadline` after `last_renewed` (loop time); the loop
        time the successful attempt started, or None when the lease is lost."""
        loop = asyncio.get_running_loop()
        deadline = last_renewed + self.renew_deadline
        attempt, first = 0, loop.time()
        while True:
            left = deadline - loop.time()
            if left <= 0:
                log.error("lease %s/%s not renewed within the renew deadline (%.0fs since the "
                          "last renewal, %d attempts): stepping down before another replica "
                          "may take it; check the API server's latency and this process's "
                          "CPU", self.namespace, self.name, self.renew_deadline, attempt)
                return None
            started = loop.time()
            try:
                if await asyncio.wait_for(self.try_acquire_or_renew(),
                                          min(left, self.attempt_seconds)):
                    self.on_renew(loop.time() - first, attempt + 1)
                    return started
                if self.holder not in (None, self.identity):
                    log.error("lease %s/%s is held by %s now: stepping down", self.namespace,
                              self.name, self.holder)
                    return None
                e: BaseException = RuntimeError("lost a write race for the lease")
            except Exception as exc:
                e = exc
            attempt += 1
            self.on_renew_error(e)
            delay = min(RENEW_BACKOFF(attempt), max(0.0, deadline - loop.time()))
            detail = (f"HTTP {e.status} {e.reason}" if isinstance(e, ApiError)
                      else f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            log.warning("renewing lease %s/%s failed (%s), attempt %d; retrying in %.2fs, "
                        "%.1fs before the renew deadline", self.namespace, self.name, detail,
                        attempt, delay, deadline - loop.time())
            await asyncio.sleep(delay)

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Campaign forever; run `lead()` while leading, cancel it the moment we are not."""
        task: Optional[asyncio.Task] = None
        loop = asyncio.get_running_loop()
        renewed = 0.0
        try:
            while True:
                if not self.is_leader:
                    started = loop.time()
                    try:
                        ok = await asyncio.wait_for(self.try_acquire_or_renew(),
                                                    self.attempt_seconds)
                    except Exception as e:
                        log.warning("lease %s/%s: %s", self.namespace, self.name,
                                    f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                        ok = False
                    if ok:
                        renewed = started
                        self._set(True)
                        task = asyncio.create_task(lead())
                    else:  # client-go's jitter: candidates do not retry in lockstep
                        await asyncio.sleep(self.retry_seconds * (1 + 1.2 * random.random()))
                    continue
                await asyncio.sleep(self.retry_seconds)
                got = await self.renew(renewed)
                if got is None:
                    self._held = None
                    self._set(False)
                    if task is not None:
                        task.cancel()
                        task = None
                    continue
                renewed = got
                if task is not None and task.done() and not task.cancelled():
                    log.error("leader tasks stopped: %r; restarting them", task.exception())
                    task = asyncio.create_task(lead())
        finally:
            if task is not None:
                task.cancel()
            await self.release()
