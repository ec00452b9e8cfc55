"""A new leader's recovery step (Mesh.recover) against the real API server behind a loopback
proxy that answers 429 Too Many Requests to the first listings of KVMeshPeerGroups, as the API
server's priority and fairness does under load: the listing is retried with backoff, and the
peers the previous leader recorded that are gone now are purged from a real redis-server."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from kvmesh.controller.mesh import Mesh
from kvmesh.core import lookup, names
from kvmesh.core.groups import PeerGroupId
from kvmesh.core.policy import PolicyDefaults
from kvmesh.kube import connect, retry
from kvmesh.kube.facade import MeshClient
from kvmesh.kube.informer import Backoff
from support import ApiProxy, RedisServer, wait_for

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def throttle(match: str, n: int):
    """A fault for support.ApiProxy: 429 to the first `n` requests whose path has `match`."""
    left = [n]

    async def fault(req):
        if match in req.path and left[0] > 0:
            left[0] -= 1
            return ApiProxy.status(429, "TooManyRequests")
        return None
    return fault


@pytest.fixture
def peer_group_crd(devcluster):
    devcluster.kubectl("apply", "-f", str(MANIFESTS / "11-crd-kvmeshpeergroup.yaml"))
    devcluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                       "crd/kvmeshpeergroups.kvmesh.dev")


async def test_recover_retries_429_then_purges_what_died_unwatched(
        devcluster, namespace, peer_group_crd, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(retry, "DEFAULT_BACKOFF", Backoff(initial=0.05, maximum=0.2))
    redis = RedisServer(tmp_path).start()
    direct = await connect.api_client(devcluster.kubeconfig)
    proxied = await connect.api_client(devcluster.kubeconfig)
    mesh = None
    try:
        gid = PeerGroupId(names.MODE_REDIS, "default")
        await direct.apply(lookup.peer_group(namespace, gid))
        dead, alive = "127.77.0.1:8200", "127.77.0.2:8200"
        await direct.apply({**lookup.peer_group(namespace, gid), "status": {
            "members": 2, "readyPeers": 2, "peers": [f"a={dead}", f"b={alive}"]}},
            subresource="status")
        # Named as LMCache 0.3.x names its entries (fmt@model@world@worker@hash): kvmesh
        # deletes nothing else.
        for i in range(5):
            redis.client.set(f"vllm@m@1@0@{i:x}", dead)
        async with ApiProxy(proxied, throttle("kvmeshpeergroups", 3)) as proxy:
            proxied.api.configuration.host = proxy.url
            # Pod b is alive (the view has it); pod a left while no controller was leading.
            mesh = Mesh(MeshClient(proxied), PolicyDefaults(
                redis_address=f"127.0.0.1:{redis.port}"))
            mesh.pods.has_synced.set()
            from kvmesh.core import groups
            b = groups.Member(namespace=namespace, name="b", uid="ub", peer_group=gid,
                              ip="127.77.0.2", ready=True, terminating=False, restarts=0,
                              address=alive)
            mesh.members[b.key] = b
            mesh.groups[b.group_key] = groups.Group(namespace, gid, {"b": b})
            with caplog.at_level(logging.WARNING, logger="kvmesh.retry"):
                await asyncio.wait_for(mesh.recover(), 60)
            assert proxy.faulted == 3
            assert caplog.text.count("HTTP 429") == 3, caplog.text
            assert "list KVMeshPeerGroups to recover departures failed" in caplog.text
            wait_for("the dead peer's keys purged",
                     lambda: not redis.client.keys("vllm@m@*"), 10, 0.05)
            assert mesh.last_purge[(namespace, gid)].what == dead
            assert not mesh.pending
            await asyncio.gather(*mesh._background, return_exceptions=True)
    finally:
        if mesh is not None:
            for idx in mesh.redis.values():
                await idx.stop()
        await proxied.close()
        await direct.close()
        redis.stop()


async def test_a_non_transient_error_is_not_retried():
    calls = 0

    async def forbidden():
        nonlocal calls
        calls += 1
        from kubernetes_asyncio.client.exceptions import ApiException
        raise ApiException(status=403, reason="Forbidden")
    with pytest.raises(Exception, match="Forbidden"):
        await retry.call("list things", forbidden)
    assert calls == 1
