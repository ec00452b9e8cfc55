"""A new leader's recovery step (Mesh.recover) against the real API server behind a loopback
proxy that answers 429 Too Many Requests to the first listings of KVMeshPeerGroups, as the API
server's priority and fairness does under load: the listing is retried with backoff, and the
peers the previous leader recorded that are gone now are purged from a real redis-server."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from kvmesh.controller.mesh import Mesh
from kvmesh.core import lookup, names
from kvmesh.core.groups import PeerGroupId
from kvmesh.core.policy import PolicyDefaults
from kvmesh.kube import connect, retry
from kvmesh.kube.facade import MeshClient
from kvmesh.kube.informer import Backoff
from support import RedisServer, wait_for

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


class Throttling:
    """http://127.0.0.1:port -> the API server (TLS, admin credentials); the first `n`
    requests whose path contains `match` get 429 instead."""

    def __init__(self, kube, match: str, n: int):
        cfg = kube.api.configuration
        self.target = cfg.host
        self.ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        self.ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        self.match, self.left, self.rejected, self.passed = match, n, 0, 0

    async def handle(self, req: web.Request) -> web.StreamResponse:
        if self.match in req.path and self.left > 0:
            self.left -= 1
            self.rejected += 1
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 429,
                 "reason": "TooManyRequests", "message": "too many requests, please try again "
                 "later"}, status=429, headers={"Retry-After": "1"})
        self.passed += 1
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host",
                                                                             "authorization")}
        async with self.session.request(req.method, self.target + req.path_qs,
                                        data=await req.read(), headers=headers,
                                        ssl=self.ctx) as up:
            return web.Response(body=await up.read(), status=up.status,
                                content_type=up.content_type)

    async def __aenter__(self):
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()
        await self.session.close()


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
        async with Throttling(proxied, "kvmeshpeergroups", 3) as proxy:
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
            assert proxy.rejected == 3 and proxy.left == 0
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
