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
    """A Lease store as the API server keeps one: every write gets a new resourceVersion, and
    a replace carrying another than the current one is a 409."""

    def __init__(self, lease=None, conflict=False):
        self.lease, self.conflict, self.writes, self.rv = lease, conflict, [], 0

    async def get(self, api_version, kind, name, namespace=None):
        return self.lease

    async def _write(self, verb, obj):
        current = ((self.lease or {}).get("metadata") or {}).get("resourceVersion")
        if self.conflict or (verb == "replace" and obj["metadata"].get("resourceVersion")
                             != current):
            raise ApiError(status=409, reason="Conflict")
        self.writes.append((verb, obj))
        self.rv += 1
        self.lease = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        return self.lease

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
    assert await el.try_acquire_or_renew()
    verb, renewed = kube.writes[1]
    assert verb == "replace" and renewed["metadata"]["resourceVersion"] == "1"
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


def test_timing_must_leave_a_margin():
    import pytest
    for lease, deadline, retry_ in ((15, 15, 2), (15, 10, 10), (10, 12, 2), (15, 10, 0)):
        with pytest.raises(ValueError, match="renew deadline"):
            L.LeaderElector(FakeKube(), "sys", "lease", "me", lease, deadline, retry_)


async def test_a_renewal_is_one_request_and_a_conflict_reads_again():
    kube = FakeKube()
    reads = []
    get = kube.get

    async def counting_get(*a, **kw):
        reads.append(a)
        return await get(*a, **kw)
    kube.get = counting_get
    el = L.LeaderElector(kube, "sys", "lease", "me")
    assert await el.try_acquire_or_renew() and len(reads) == 1
    for _ in range(3):
        assert await el.try_acquire_or_renew()
    assert len(reads) == 1 and [v for v, _ in kube.writes] == ["create"] + ["replace"] * 3
    kube.lease = {**kube.lease, "metadata": {**kube.lease["metadata"], "resourceVersion": "99"}}
    assert await el.try_acquire_or_renew() and len(reads) == 2  # 409: read again, still ours
    assert kube.writes[-1][1]["metadata"]["resourceVersion"] == "99"
    kube.conflict = True  # another writer got in: read, then lose the race
    assert not await el.try_acquire_or_renew() and len(reads) == 3


async def test_a_hung_renewal_is_abandoned_and_retried_within_the_deadline():
    import asyncio
    kube = FakeKube()
    el = L.LeaderElector(kube, "sys", "lease", "me", lease_seconds=4, renew_deadline=2.0,
                         retry_seconds=0.2)
    assert await el.try_acquire_or_renew()
    replace = kube.replace
    hung = []

    async def hangs_once(obj):
        if not hung:
            hung.append(obj)
            await asyncio.Event().wait()  # no answer, ever (as a stuck request)
        return await replace(obj)
    kube.replace = hangs_once
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    got = await el.renew(t0)
    assert got is not None and hung, "the lease was lost to one hung request"
    assert loop.time() - t0 < 2.0 and el.attempt_seconds == 0.5
