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

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("kvmesh.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def lease_free(spec: Optional[client.V1LeaseSpec], identity: str, now: dt.datetime) -> bool:
    """Pure: may `identity` take (or keep) this lease now?"""
    if spec is None or not spec.holder_identity or spec.holder_identity == identity:
        return True
    renewed = spec.renew_time or spec.acquire_time
    if renewed is None:
        return True
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=dt.timezone.utc)
    return now > renewed + dt.timedelta(seconds=spec.lease_duration_seconds or 15)


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str,
                 lease_seconds: int = 15, renew_seconds: float = 5.0, retry_seconds: float = 2.0):
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_seconds, self.retry_seconds = \
            lease_seconds, renew_seconds, retry_seconds
        self.is_leader = False
        self.transitions = 0
        self.on_change: Callable[[bool], None] = lambda leading: None

    async def try_acquire_or_renew(self) -> bool:
        now = _now()
        try:
            lease = await self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            lease = None
        if lease is not None and not lease_free(lease.spec, self.identity, now):
            return False
        prev = lease.spec if lease is not None else None
        held = prev is not None and prev.holder_identity == self.identity
        spec = client.V1LeaseSpec(
            holder_identity=self.identity, lease_duration_seconds=self.lease_seconds,
            renew_time=now, acquire_time=prev.acquire_time if held else now,
            lease_transitions=((prev.lease_transitions or 0) if prev else 0) + (0 if held else 1))
        try:
            if lease is None:
                await self.coord.create_namespaced_lease(self.namespace, client.V1Lease(
                    metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                    spec=spec))
            else:
                lease.spec = spec
                await self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as e:
            if e.status in (409, 422):  # someone else wrote first
                return False
            raise
        return True

    async def release(self) -> None:
        """Give the lease up at shutdown so a standby takes over at once."""
        if not self.is_leader:
            return
        try:
            lease = await self.coord.read_namespaced_lease(self.name, self.namespace)
            if lease.spec and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                await self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
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
