"""Leader election on a coordination.k8s.io/v1 Lease (the client-go algorithm, simplified).

Only the leader reconciles. A replica takes the lease when it is free or its holder has not
renewed within leaseDurationSeconds; every write carries the resourceVersion it read, so two
candidates can never both win. A leader that cannot renew before its own deadline steps down
first (its tasks are cancelled), so two leaders never act at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Awaitable, Callable, Optional

from kvmesh.kube.api import ApiError, Kube

log = logging.getLogger("kvmesh.leader")

LEASE_API = "coordination.k8s.io/v1"


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


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str,
                 lease_seconds: int = 15, renew_seconds: float = 5.0, retry_seconds: float = 2.0):
        self.kube = kube
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_seconds, self.retry_seconds = \
            lease_seconds, renew_seconds, retry_seconds
        self.is_leader = False
        self.transitions = 0
        self.on_change: Callable[[bool], None] = lambda leading: None

    async def _read(self) -> Optional[dict]:
        return await self.kube.get(LEASE_API, "Lease", self.name, self.namespace)

    async def try_acquire_or_renew(self) -> bool:
        now = _now()
        lease = await self._read()
        prev = (lease or {}).get("spec") or {}
        if lease is not None and not lease_free(prev, self.identity, now):
            return False
        held = prev.get("holderIdentity") == self.identity
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "renewTime": _micro_time(now),
                "acquireTime": prev.get("acquireTime") if held else _micro_time(now),
                "leaseTransitions": (prev.get("leaseTransitions") or 0) + (0 if held else 1)}
        try:
            if lease is None:
                await self.kube.create({
                    "apiVersion": LEASE_API, "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": spec})
            else:
                # replace carries the resourceVersion read above: a concurrent writer wins.
                await self.kube.replace({**lease, "apiVersion": LEASE_API, "kind": "Lease",
                                         "spec": spec})
        except ApiError as e:
            if e.status in (409, 422):  # someone else wrote first
                return False
            raise
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
        self._set(False)

    def _set(self, leading: bool) -> None:
        if leading != self.is_leader:
            self.is_leader = leading
            self.transitions += 1
            log.info("%s leadership of lease %s/%s", "acquired" if leading else "lost",
                     self.namespace, self.name)
            self.on_change(leading)

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Campaign forever; run `lead()` while leading, cancel it the moment we are not."""
        task: Optional[asyncio.Task] = None
        last_renew = 0.0
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    ok = await asyncio.wait_for(self.try_acquire_or_renew(),
                                                timeout=self.renew_seconds)
                except Exception as e:
                    log.warning("lease %s/%s: %s", self.namespace, self.name, e)
                    ok = False
                now = loop.time()
                if ok:
                    last_renew = now
                    if not self.is_leader:
                        self._set(True)
                        task = asyncio.create_task(lead())
                elif self.is_leader and now - last_renew > self.lease_seconds - \
                        self.renew_seconds:
                    # Step down before anyone else may legally take the lease.
                    self._set(False)
                if not self.is_leader and task is not None:
                    task.cancel()
                    task = None
                if task is not None and task.done() and not task.cancelled():
                    exc = task.exception()
                    log.error("leader tasks stopped: %r; restarting them", exc)
                    task = asyncio.create_task(lead())
                await asyncio.sleep(self.renew_seconds if self.is_leader else self.retry_seconds)
        finally:
            if task is not None:
                task.cancel()
            await self.release()
