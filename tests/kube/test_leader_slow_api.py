"""Leader election against the real API server behind a loopback proxy that answers the Lease
requests slowly or with 429/5xx, as an overloaded API server does: one slow renewal and a burst
of errors within the renew deadline do not lose the lease; an API server that stops answering
makes the leader step down before another replica may take the lease."""

from __future__ import annotations

import asyncio

from kvmesh.kube import connect, leader as L
from support import ApiProxy


class LeaseFaults:
    """Fault plan for the Lease's renewals (PUTs), armed once the lease is held: each entry is
    ("slow", seconds) then forwarded, or an HTTP code answered instead; after the plan, or with
    hang=True, requests wait until released."""

    def __init__(self, plan=(), hang=False):
        self.plan, self.hang, self.armed = list(plan), hang, False
        self.release = asyncio.Event()
        self.seen: list[str] = []

    async def __call__(self, req):
        if not self.armed or "/leases/" not in req.path or req.method != "PUT":
            return None
        if self.hang:
            self.seen.append("hang")
            await asyncio.wait_for(self.release.wait(), 60)
            return ApiProxy.status(503, "ServiceUnavailable")
        if not self.plan:
            return None
        step = self.plan.pop(0)
        self.seen.append(str(step))
        if isinstance(step, tuple):
            await asyncio.sleep(step[1])
            return None
        return ApiProxy.status(step, {429: "TooManyRequests", 500: "InternalError",
                                      503: "ServiceUnavailable"}[step])


async def leading(el: L.LeaderElector, started: list) -> None:
    started.append(asyncio.get_running_loop().time())
    await asyncio.Event().wait()  # the leader's work: runs until cancelled


async def test_one_slow_renewal_and_a_burst_of_429_5xx_do_not_lose_the_lease(devcluster,
                                                                            namespace):
    kube = await connect.api_client(devcluster.kubeconfig)
    # A slow renewal longer than the retry period (the old elector cut each attempt there),
    # then 429, 503, 500, then a slow success: all within the renew deadline.
    faults = LeaseFaults([("slow", 3.0), 429, 503, 500, ("slow", 1.0)])
    try:
        async with ApiProxy(kube, faults) as proxy:
            kube.api.configuration.host = proxy.url
            # A generous deadline: the real API server itself may take seconds on a busy
            # machine, on top of the faults.
            el = L.LeaderElector(kube, namespace, "lease", "a", lease_seconds=30,
                                 renew_deadline=20.0, retry_seconds=1.0)
            renewals: list[tuple[float, int]] = []
            el.on_renew = lambda s, n: renewals.append((s, n))
            started: list[float] = []
            run = asyncio.create_task(el.run(lambda: leading(el, started)))
            for _ in range(200):
                if el.is_leader:
                    break
                await asyncio.sleep(0.1)
            assert el.is_leader, "never acquired the lease"
            faults.armed = True
            for _ in range(300):
                if not faults.plan and len(renewals) >= 4:
                    break
                await asyncio.sleep(0.1)
            assert not faults.plan, f"the faults were not all hit: {faults.seen}"
            assert el.is_leader and el.transitions == 1 and len(started) == 1, \
                f"leadership was lost: transitions {el.transitions}, lead() ran {len(started)}x"
            assert any(n >= 4 for _, n in renewals), renewals  # one renewal retried 3 errors
            assert max(s for s, _ in renewals) >= 2.5, renewals  # and one took the slow call
            lease = await kube.get(L.LEASE_API, "Lease", "lease", namespace)
            assert lease["spec"]["holderIdentity"] == "a"
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            lease = await kube.get(L.LEASE_API, "Lease", "lease", namespace)
            assert not lease["spec"].get("holderIdentity"), "not released at shutdown"
    finally:
        await kube.close()


async def test_an_unanswering_api_server_makes_the_leader_step_down_before_the_lease_expires(
        devcluster, namespace):
    a_kube = await connect.api_client(devcluster.kubeconfig)
    b_kube = await connect.api_client(devcluster.kubeconfig)
    faults = LeaseFaults(hang=True)
    loop = asyncio.get_running_loop()
    lost_at: list[float] = []
    try:
        async with ApiProxy(a_kube, faults) as proxy:
            a_kube.api.configuration.host = proxy.url
            a = L.LeaderElector(a_kube, namespace, "lease", "a", lease_seconds=8,
                                renew_deadline=5.0, retry_seconds=1.0)
            a.on_change = lambda leading: None if leading else lost_at.append(loop.time())
            a_started: list[float] = []
            a_run = asyncio.create_task(a.run(lambda: leading(a, a_started)))
            for _ in range(200):
                if a.is_leader:
                    break
                await asyncio.sleep(0.1)
            assert a.is_leader
            faults.armed = True
            armed_at = loop.time()
            b = L.LeaderElector(b_kube, namespace, "lease", "b", lease_seconds=8,
                                renew_deadline=5.0, retry_seconds=1.0)
            b_started: list[float] = []
            b_run = asyncio.create_task(b.run(lambda: leading(b, b_started)))
            for _ in range(300):
                if b.is_leader:
                    break
                await asyncio.sleep(0.1)
            assert b.is_leader, "the standby never took over"
            assert lost_at, "the old leader never stepped down"
            # a stepped down within its renew deadline (+ slack for a busy machine) of the
            # last renewal it could have made, and before b took over: never two leaders.
            assert lost_at[0] - armed_at <= 5.0 + 1.0 + 2.0, lost_at[0] - armed_at
            assert lost_at[0] < b_started[0], (lost_at[0], b_started[0])
            assert b_started[0] - lost_at[0] >= 8 - 5 - 1.5, "no margin left between leaders"
            faults.release.set()
            for t in (a_run, b_run):
                t.cancel()
            await asyncio.gather(a_run, b_run, return_exceptions=True)
    finally:
        faults.release.set()
        await a_kube.close()
        await b_kube.close()
