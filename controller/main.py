"""`kvmesh controller`: leader election, then the leader's reconcile loops.

Loops run only on the leader; every replica serves /healthz and /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid
from typing import Optional

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from kvmesh import kube, names
from kvmesh.certs import store
from kvmesh.controller.leader import LeaderElector

log = logging.getLogger("kvmesh.controller")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.leader = Gauge("kvmesh_controller_leader", "1 while this replica leads",
                            registry=r)
        self.cert_actions = Counter("kvmesh_controller_cert_actions_total",
                                    "Certificate reconcile actions", ["action"], registry=r)
        self.errors = Counter("kvmesh_controller_errors_total", "Reconcile errors by loop",
                              ["loop"], registry=r)


async def cert_loop(api, metrics: Metrics, interval: float, ca_validity) -> None:
    from kubernetes_asyncio import client
    core, adm = client.CoreV1Api(api), client.AdmissionregistrationV1Api(api)
    while True:
        try:
            did = await store.reconcile(core, adm, validity=ca_validity)
            if did != "in-sync":
                log.info("certificates: %s", did)
            for a in did.split(","):
                metrics.cert_actions.labels(a).inc()
        except Exception as e:
            metrics.errors.labels("certs").inc()
            log.error("certificate reconcile failed: %s; retrying in %.0fs", e, interval)
        await asyncio.sleep(interval)


async def run(kubeconfig: Optional[str], metrics_port: int, cert_interval: float = 5.0,
              manage_certs: bool = True, started: Optional[asyncio.Event] = None,
              ca_validity=None) -> None:
    from kvmesh.certs import authority
    ca_validity = ca_validity or authority.CA_VALIDITY
    api = await kube.api_client(kubeconfig)
    metrics = Metrics()
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    elector = LeaderElector(api, os.environ.get("POD_NAMESPACE", names.SYSTEM_NAMESPACE),
                            names.LEADER_LEASE, identity)
    elector.on_change = lambda leading: metrics.leader.set(1 if leading else 0)

    async def lead() -> None:
        loops = []
        if manage_certs:
            loops.append(cert_loop(api, metrics, cert_interval, ca_validity))
        await asyncio.gather(*loops)

    app = web.Application()
    app.router.add_get("/healthz", lambda r: web.Response(text="ok"))
    app.router.add_get("/metrics", lambda r: web.Response(
        body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0" if os.environ.get("KUBERNETES_SERVICE_HOST")
                      else "127.0.0.1", metrics_port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    campaign = asyncio.create_task(elector.run(lead))
    log.info("kvmesh controller %s campaigning for lease %s", identity, names.LEADER_LEASE)
    if started:
        started.set()
    try:
        await stop.wait()
    finally:
        campaign.cancel()
        try:
            await campaign
        except (asyncio.CancelledError, Exception):
            pass
        await runner.cleanup()
        await api.close()
