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
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from kvmesh.kube import connect as kube

from kvmesh.core import names
from kvmesh.certs import store
from kvmesh.kube.leader import LeaderElector

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
        self.purges = Counter("kvmesh_controller_purges_total", "Lookup-state purges of "
                              "departed peers", ["mode", "reason"], registry=r)
        self.purged = Counter("kvmesh_controller_purged_total", "Redis keys (redis mode) or "
                              "worker ranks (controller mode) removed", ["mode"], registry=r)
        self.purge_seconds = Histogram("kvmesh_controller_purge_duration_seconds",
                                       "Time to purge one departed peer", ["mode"],
                                       buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1,
                                                2.5, 5, 10), registry=r)
        self.reconcile_seconds = Histogram("kvmesh_controller_reconcile_duration_seconds",
                                           "Time of one pass over peer groups (all of them "
                                           "every resync, else those that changed)",
                                           registry=r)
        self.members = Gauge("kvmesh_controller_members", "Injected pods known", registry=r)
        self.peers = Gauge("kvmesh_controller_ready_peers", "Running, Ready injected pods "
                           "with an IP", registry=r)
        self.uninjected = Counter("kvmesh_controller_uninjected_pods_total",
                                  "Opted-in pods admitted without injection (webhook down "
                                  "with failurePolicy Ignore)", registry=r)
        self.optin = Counter("kvmesh_controller_optin_actions_total", "Workload opt-in "
                             "actions", ["action"], registry=r)


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


async def optin_loop(api, metrics: Metrics) -> None:
    """Workload opt-in by annotation, for Deployments and StatefulSets."""
    from kubernetes_asyncio import client
    from kvmesh.controller import optin
    from kvmesh.kube.informer import Informer
    apps = client.AppsV1Api(api)
    user_owned: set[str] = set()  # uids already reported, so a rollout's updates stay quiet

    def handler(kind):
        async def on(type_, obj, old):
            meta = obj["metadata"]
            if type_ == "DELETED":
                user_owned.discard(meta.get("uid"))
                return
            obj.setdefault("kind", kind)
            obj.setdefault("apiVersion", "apps/v1")
            try:
                did = await optin.reconcile(apps, obj)
            except Exception as e:
                metrics.errors.labels("optin").inc()
                log.error("opt-in of %s %s/%s failed: %s", kind, meta.get("namespace"),
                          meta.get("name"), e)
                return
            if did == optin.USER_OWNED:
                if meta.get("uid") not in user_owned:
                    user_owned.add(meta.get("uid"))
                    metrics.optin.labels(did).inc()
                    log.warning("%s %s/%s: the user set the pod template's %s label "
                                "themselves; kvmesh leaves it as it is", kind,
                                meta["namespace"], meta["name"], names.LABEL_INJECT)
                return
            user_owned.discard(meta.get("uid"))
            if did != "in-sync":
                metrics.optin.labels(did).inc()
                log.info("opt-in: %s %s/%s %s", kind, meta["namespace"], meta["name"], did)
        return on

    infs = [Informer(apps.list_deployment_for_all_namespaces, handlers=[handler("Deployment")],
                     name="deployments"),
            Informer(apps.list_stateful_set_for_all_namespaces,
                     handlers=[handler("StatefulSet")], name="statefulsets")]
    await asyncio.gather(*(i.run() for i in infs))


async def policy_loop(api, metrics: Metrics, mesh, webhook_url: Optional[str]) -> None:
    """KVMeshPolicies -> webhook entries + status; keeps mesh.policies current."""
    import functools
    from kubernetes_asyncio import client
    from kvmesh.controller import policies
    from kvmesh.kube.informer import Informer
    custom = client.CustomObjectsApi(api)
    wake = asyncio.Event()
    inf = Informer(functools.partial(custom.list_cluster_custom_object, names.API_GROUP,
                                     names.API_VERSION, "kvmeshpolicies"),
                   handlers=[lambda t, o, old: wake.set()], name="kvmeshpolicies")
    runner = asyncio.create_task(inf.run())
    try:
        await inf.has_synced.wait()
        while True:
            objs = inf.items()
            valid, invalid = policies.parse_all(objs)
            try:
                await policies.apply_entries(api, valid, webhook_url)
                mesh.policies.clear()
                mesh.policies.update({p.name: p for p in valid})
                for o in objs:
                    name = o["metadata"]["name"]
                    gen = o["metadata"].get("generation")
                    current = (o.get("status") or {}).get("conditions")
                    if name in invalid:
                        cond = policies.condition(False, "InvalidSpec", invalid[name], gen,
                                                  current)
                    else:
                        cond = policies.condition(True, "EntryWritten",
                                                  f"webhook entry {policies.entry_name(name)} "
                                                  "selects this policy's pods", gen, current)
                    pods = [m for m in mesh.members.values() if m.policy == name]
                    status = {"conditions": [cond], "observedGeneration": gen,
                              "injectedPods": len(pods),
                              "readyPeers": sum(1 for m in pods if m.is_peer)}
                    if policies.status_changed(o, status):
                        await policies.write_status(api, o, status)
            except Exception as e:
                metrics.errors.labels("policies").inc()
                log.error("reconciling KVMeshPolicies failed: %s; retrying", e)
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), 15)
            except asyncio.TimeoutError:
                pass
    finally:
        runner.cancel()
        inf.stop()


async def uninjected_loop(api, metrics: Metrics) -> None:
    """Opted-in pods that were admitted without kvmesh's status annotation: the webhook was
    unreachable under failurePolicy Ignore. Made visible as a metric and an Event."""
    from kubernetes_asyncio import client
    from kvmesh.kube.informer import Informer
    from kvmesh.kube import apply as kapply
    core = client.CoreV1Api(api)

    async def on(type_, obj, old):
        # The informer reports ADDED once per pod (relists only report what changed).
        meta = obj.get("metadata") or {}
        if type_ != "ADDED" or names.ANN_STATUS in (meta.get("annotations") or {}):
            return
        metrics.uninjected.inc()
        log.warning("pod %s/%s is opted in but was admitted without LMCache P2P injection "
                    "(was the kvmesh webhook down?); recreate it to inject",
                    meta.get("namespace"), meta.get("name"))
        await kapply.event(
            api, {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                  "namespace": meta["namespace"], "uid": meta.get("uid")},
            "NotInjected", "opted in to kvmesh but admitted without LMCache P2P injection "
            "(the webhook was unreachable and failurePolicy is Ignore); delete the pod to "
            "have it recreated with injection", "Warning")

    await Informer(core.list_pod_for_all_namespaces,
                   label_selector=f"{names.LABEL_INJECT}={names.INJECT_ENABLED}",
                   handlers=[on], name="opted-in pods").run()


async def run(kubeconfig: Optional[str], metrics_port: int, cert_interval: float = 5.0,
              manage_certs: bool = True, started: Optional[asyncio.Event] = None,
              ca_validity=None, policy=None, grace_seconds: float = 300.0,
              resync_seconds: float = 15.0, webhook_url: Optional[str] = None,
              peer_network_policy: bool = True) -> None:
    from kvmesh.certs import authority
    ca_validity = ca_validity or authority.CA_VALIDITY
    api = await kube.api_client(kubeconfig)
    metrics = Metrics()
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    elector = LeaderElector(api, os.environ.get("POD_NAMESPACE", names.SYSTEM_NAMESPACE),
                            names.LEADER_LEASE, identity)
    elector.on_change = lambda leading: metrics.leader.set(1 if leading else 0)

    async def lead() -> None:
        from kvmesh.controller.mesh import Mesh
        from kvmesh.core.policy import PolicyDefaults
        mesh = Mesh(api, policy or PolicyDefaults(), metrics, grace_seconds=grace_seconds,
                    resync_seconds=resync_seconds, peer_policy=peer_network_policy)
        loops = [mesh.run(), optin_loop(api, metrics), uninjected_loop(api, metrics),
                 policy_loop(api, metrics, mesh, webhook_url)]
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
