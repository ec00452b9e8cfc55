"""kvmesh.kube.leader over a fake Kube: when a lease may be taken, and what is written."""

import datetime as dt

from kvmesh.kube import leader as L
from kvmesh.kube.api import ApiError

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def spec(holder, renewed_seconds_ago, duration=15):
    return {"holderIdentity": holder, "leaseDurationSeconds": duration,
            "renewTime": L._micro_time(NOW - dt.timedelta(seconds=renewed_seconds_ago))}


def test_lease_free_when_absent_ours_released_or_expired():
    assert L.lease_free(None, "me", NOW)
    assert L.lease_free({}, "me", NOW)
    assert L.lease_free(spec("me", 1), "me", NOW)
    assert not L.lease_free(spec("other", 5), "me", NOW)
    assert L.lease_free(spec("other", 16), "me", NOW)
    assert L.lease_free({"holderIdentity": "other"}, "me", NOW)  # never renewed


class FakeKube:
    def __init__(self, lease=None, conflict=False):
        self.lease, self.conflict, self.writes = lease, conflict, []

    async def get(self, api_version, kind, name, namespace=None):
        return self.lease

    async def _write(self, verb, obj):
        if self.conflict:
            raise ApiError(status=409, reason="Conflict")
        self.writes.append((verb, obj))
        self.lease = obj
        return obj

    async def create(self, obj):
        return await self._write("create", obj)

    async def replace(self, obj):
        return await self._write("replace", obj)


async def test_acquire_creates_then_renews_keeping_acquire_time_and_resource_version():
    kube = FakeKube()
    el = L.LeaderElector(kube, "sys", "lease", "me")
    assert await el.try_acquire_or_renew()
    verb, created = kube.writes[0]
    assert verb == "create" and created["metadata"] == {"name": "lease", "namespace": "sys"}
    assert created["spec"]["holderIdentity"] == "me" and created["spec"]["leaseTransitions"] == 1
    kube.lease = {**created, "metadata": {**created["metadata"], "resourceVersion": "7"}}
    assert await el.try_acquire_or_renew()
    verb, renewed = kube.writes[1]
    assert verb == "replace" and renewed["metadata"]["resourceVersion"] == "7"
    assert renewed["spec"]["acquireTime"] == created["spec"]["acquireTime"]
    assert renewed["spec"]["leaseTransitions"] == 1


async def test_a_live_holder_or_a_lost_race_means_not_leading():
    held = {"apiVersion": L.LEASE_API, "kind": "Lease", "metadata": {"name": "lease"},
            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15,
                     "renewTime": L._micro_time(L._now())}}
    assert not await L.LeaderElector(FakeKube(held), "sys", "lease", "me").try_acquire_or_renew()
    assert not await L.LeaderElector(FakeKube(conflict=True), "sys", "lease",
                                     "me").try_acquire_or_renew()


async def test_release_clears_the_holder():
    kube = FakeKube()
    el = L.LeaderElector(kube, "sys", "lease", "me")
    assert await el.try_acquire_or_renew()
    el.is_leader = True
    await el.release()
    assert "holderIdentity" not in kube.lease["spec"] and not el.is_leader
