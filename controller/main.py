"""`kvmesh controller`: leader election, then the leader's reconcile loops.

Loops run only on the leader; every replica serves /healthz and /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import uuid
from typing import Optional

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from kvmesh.certs import authority, store
from kvmesh.controller import optin, policies
from kvmesh.runtime import exit_watchdog
from kvmesh.controller.mesh import Mesh
from kvmesh.core import names
from kvmesh.core.policy import PolicyDefaults
from kvmesh.kube import connect
from kvmesh.kube.api import Kube
from kvmesh.kube.facade import MeshClient
from kvmesh.kube.leader import LeaderElector

log = logging.getLogger("kvmesh.controller")

# After SIGTERM: this long to give the Lease up (one API round trip, skipped if the API server
# does not answer), the rest to close; past SHUTDOWN_HARD_SECONDS the process exits whatever is
# still running (a blocked thread, a task ignoring cancellation). Kubernetes' default grace
# period is 30 s; a stuck controller must not hold the rollout that long.
RELEASE_SECONDS = 4.0
CLOSE_SECONDS = 2.0
SHUTDOWN_HARD_SECONDS = 9.0


async def _bounded(what: str, aw, seconds: float) -> None:
    try:
        await asyncio.wait_for(aw, seconds)
    except asyncio.TimeoutError:
        log.warning("shutdown: %s did not finish within %.1fs; going on without it", what,
                    seconds)
    except (asyncio.CancelledError, Exception):
        pass


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.leader = Gauge("kvmesh_controller_leader", "1 while this replica leads",
                            registry=r)
        self.cert_actions = Counter("kvmesh_controller_cert_actions_total",
                                    "Certificate reconcile actions", ["action"], registry=r)
        self.errors = Counter("kvmesh_controller_errors_total", "Reconcile errors by loop",
                              ["loop"], registry=r)
        self.purges = Counter("kvmesh_controller_purges_total", "Lookup-state purges of "
                              "departed peers", ["mode", "reason"], registry=r)
        self.purged = Counter("kvmesh_controller_purged_total", "Redis keys (redis mode), "
                              "worker ranks (controller mode) or coordinator registrations "
                              "(mp mode) removed", ["mode"], registry=r)
        self.purge_seconds = Histogram("kvmesh_controller_purge_duration_seconds",
                                       "Time to purge one departed peer", ["mode"],
                                       buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1,
                                                2.5, 5, 10), registry=r)
        self.reconcile_seconds = Histogram("kvmesh_controller_reconcile_duration_seconds",
                                           "Time to reconcile one peer group (its objects "
                                           "and status)", registry=r)
        self.queued_groups = Gauge("kvmesh_controller_queued_groups", "Peer groups waiting "
                                   "to be reconciled, by priority (event: a pod changed; "
                                   "resync: the periodic full pass)", ["priority"], registry=r)
        self.members = Gauge("kvmesh_controller_members", "Injected pods known", registry=r)
        self.peers = Gauge("kvmesh_controller_ready_peers", "Running, Ready injected pods "
                           "with an IP", registry=r)
        self.uninjected = Counter("kvmesh_controller_uninjected_pods_total",
                                  "Opted-in pods admitted without injection (webhook down "
                                  "with failurePolicy Ignore)", registry=r)
        self.coordinator_deletes = Counter(
            "kvmesh_controller_coordinator_deletes_total", "mp mode: DELETE /instances/{id} "
            "of dead server incarnations, by result (confirmed: gone from GET /instances; "
            "alive: it re-registered, so its server still runs; failed: coordinator "
            "unreachable or wrong answer, retried)", ["result"], registry=r)
        self.optin = Counter("kvmesh_controller_optin_actions_total", "Workload opt-in "
                             "actions", ["action"], registry=r)


async def cert_loop(kube: Kube, metrics: Metrics, interval: float, ca_validity) -> None:
    while True:
        try:
            did = await store.reconcile(kube, validity=ca_validity)
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
              ca_validity=None, policy=None, grace_seconds: float = 300.0,
              resync_seconds: float = 15.0, webhook_url: Optional[str] = None,
              peer_network_policy: bool = True) -> None:
    ca_validity = ca_validity or authority.CA_VALIDITY
    kube = await connect.api_client(kubeconfig)
    metrics = Metrics()
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    elector = LeaderElector(kube, os.environ.get("POD_NAMESPACE", names.SYSTEM_NAMESPACE),
                            names.LEADER_LEASE, identity)
    elector.on_change = lambda leading: metrics.leader.set(1 if leading else 0)

    async def lead() -> None:
        mesh = Mesh(MeshClient(kube), policy or PolicyDefaults(), metrics,
                    grace_seconds=grace_seconds, resync_seconds=resync_seconds,
                    peer_policy=peer_network_policy)
        loops = [mesh.run(), optin.run(kube, metrics), optin.watch_uninjected(kube, metrics),
                 policies.run(kube, mesh, webhook_url,
                              on_error=metrics.errors.labels("policies").inc)]
        if manage_certs:
            loops.append(cert_loop(kube, metrics, cert_interval, ca_validity))
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
    watchdog: list[threading.Timer] = []

    def on_signal() -> None:
        if not watchdog:
            watchdog.append(exit_watchdog(SHUTDOWN_HARD_SECONDS))
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    campaign = asyncio.create_task(elector.run(lead))
    log.info("kvmesh controller %s campaigning for lease %s", identity, names.LEADER_LEASE)
    if started:
        started.set()
    try:
        await stop.wait()
    finally:
        log.info("stopping: releasing lease %s if leading (up to %.0fs)", names.LEADER_LEASE,
                 RELEASE_SECONDS)
        campaign.cancel()  # its finally releases the Lease
        await _bounded("lease release", campaign, RELEASE_SECONDS)
        await _bounded("metrics server shutdown", runner.cleanup(), CLOSE_SECONDS)
        await _bounded("API client close", kube.close(), CLOSE_SECONDS)
        log.info("stopped")
