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
from kvmesh.controller import optin, policies, workload_events
from kvmesh.runtime import exit_watchdog, watch_loop_lag
from kvmesh.controller.mesh import Mesh
from kvmesh.core import names
from kvmesh.core.policy import PolicyDefaults
from kvmesh.kube import connect
from kvmesh.kube.api import Kube
from kvmesh.kube.facade import MeshClient
from kvmesh.kube import leader

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
        self.queue_wait = Histogram("kvmesh_controller_queue_wait_seconds", "Time a peer "
                                    "group waited in the work queue, by priority",
                                    ["priority"], buckets=LATENCY_BUCKETS, registry=r)
        self.api_seconds = Histogram("kvmesh_controller_api_request_duration_seconds",
                                     "API server requests (watches excluded) by verb and "
                                     "resource", ["verb", "resource"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.api_requests = Counter("kvmesh_controller_api_requests_total", "API server "
                                    "requests (watches excluded) by verb, resource and HTTP "
                                    "code (0: no answer)", ["verb", "resource", "code"],
                                    registry=r)
        self.loop_lag = Histogram("kvmesh_controller_event_loop_lag_seconds", "How late the "
                                  "event loop ran a timer (CPU starvation or blocking work)",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.loop_lag_max = Gauge("kvmesh_controller_event_loop_lag_max_seconds",
                                  "Worst event-loop lag since start", registry=r)
        self.lease_renew_seconds = Histogram(
            "kvmesh_controller_lease_renew_duration_seconds", "Time to renew the leader "
            "Lease, retries included", buckets=LATENCY_BUCKETS, registry=r)
        self.lease_renew_errors = Counter(
            "kvmesh_controller_lease_renew_errors_total", "Failed attempts to renew the "
            "leader Lease (retried until the renew deadline; then leadership is lost)",
            registry=r)
        self.workload_events = Counter(
            "kvmesh_controller_workload_events_total", "Events recorded on workloads about "
            "kvmesh's decisions for their pods, by kind (skipped, reduced, warned, denied) and "
            "reason", ["kind", "reason"], registry=r)
        self.workload_events_dropped = Counter(
            "kvmesh_controller_workload_events_dropped_total", "Workload Events not recorded "
            "because of the rate limit (recorded when a later pod shows the same)", registry=r)

    def observe_api(self, verb: str, resource: str, code: int, seconds: float) -> None:
        self.api_seconds.labels(verb, resource).observe(seconds)
        self.api_requests.labels(verb, resource, str(code)).inc()


LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)



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
              peer_network_policy: bool = True, lease_seconds: int = leader.LEASE_SECONDS,
              renew_deadline: float = leader.RENEW_DEADLINE_SECONDS,
              retry_seconds: float = leader.RETRY_SECONDS) -> None:
    ca_validity = ca_validity or authority.CA_VALIDITY
    kube = await connect.api_client(kubeconfig)
    metrics = Metrics()
    kube.observe = metrics.observe_api
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    elector = leader.LeaderElector(
        kube, os.environ.get("POD_NAMESPACE", names.SYSTEM_NAMESPACE), names.LEADER_LEASE,
        identity, lease_seconds=lease_seconds, renew_deadline=renew_deadline,
        retry_seconds=retry_seconds)
    elector.on_change = lambda leading: metrics.leader.set(1 if leading else 0)
    elector.on_renew = lambda seconds, attempts: metrics.lease_renew_seconds.observe(seconds)
    elector.on_renew_error = lambda e: metrics.lease_renew_errors.inc()

    # Outside lead(): what was said survives losing and regaining the Lease in this process.
    events = workload_events.WorkloadEvents(kube, metrics)

    async def lead() -> None:
        mesh = Mesh(MeshClient(kube), policy or PolicyDefaults(), metrics,
                    grace_seconds=grace_seconds, resync_seconds=resync_seconds,
                    peer_policy=peer_network_policy)
        mesh.pods.add_handler(events.on_pod)  # injected pods: reductions and warnings
        loops = [mesh.run(), optin.run(kube, metrics),
                 optin.watch_uninjected(kube, metrics, events),
                 workload_events.run_skipped(kube, events),  # any opt-in path
                 workload_events.run_denials(kube, events),
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
    lag = asyncio.create_task(watch_loop_lag(metrics.loop_lag, metrics.loop_lag_max, 0.1))
    campaign = asyncio.create_task(elector.run(lead))
    log.info("kvmesh controller %s campaigning for lease %s", identity, names.LEADER_LEASE)
    if started:
        started.set()
    try:
        await stop.wait()
    finally:
        log.info("stopping: releasing lease %s if leading (up to %.0fs)", names.LEADER_LEASE,
                 RELEASE_SECONDS)
        lag.cancel()
        campaign.cancel()  # its finally releases the Lease
        await _bounded("lease release", campaign, RELEASE_SECONDS)
        await _bounded("metrics server shutdown", runner.cleanup(), CLOSE_SECONDS)
        await _bounded("API client close", kube.close(), CLOSE_SECONDS)
        log.info("stopped")
