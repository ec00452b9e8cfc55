"""Workload opt-in by annotation: `kubectl annotate deployment NAME kvmesh.dev/inject=enabled`.

The controller owns exactly one field, the pod template's `kvmesh.dev/inject` label, through
server-side apply under its own field manager. Adding the annotation applies the label (the
template changes, so the workload rolls its pods into the mesh); removing it applies an empty
configuration, which drops the label only if kvmesh is its sole owner. Apply is never forced:
if the user set the label to something else themselves, kvmesh leaves the user's value alone
(seen from the object itself, so a conflicting workload costs no API call per update; the API
server's conflict answer is the backstop) and the loop logs it once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from kvmesh.controller import workload_events
from kvmesh.core import names
from kvmesh.kube.api import ApiError, Kube

log = logging.getLogger("kvmesh.optin")

FIELD_MANAGER = names.FIELD_MANAGER_OPTIN
USER_OWNED = "conflict-user-owned"


def wanted_label(workload: dict) -> Optional[str]:
    """The template label kvmesh should own for this workload (pure); None = own nothing."""
    value = ((workload.get("metadata") or {}).get("annotations") or {}).get(names.ANN_INJECT)
    return value if value in (names.INJECT_ENABLED, names.INJECT_DISABLED) else None


def owns_label(workload: dict) -> bool:
    """Whether kvmesh's field manager currently owns the template label (pure)."""
    key = f"f:{names.LABEL_INJECT}"
    for mf in (workload.get("metadata") or {}).get("managedFields") or []:
        if mf.get("manager") != FIELD_MANAGER:
            continue
        labels = (((mf.get("fieldsV1") or {}).get("f:spec") or {}).get("f:template") or {}) \
            .get("f:metadata", {}).get("f:labels", {})
        if key in labels:
            return True
    return False


def state(workload: dict) -> str:
    """What opt-in needs (pure): "apply", "in-sync", or "user-owned" (the user set the
    template label to another value themselves: theirs wins, nothing to send)."""
    want = wanted_label(workload)
    have = ((((workload.get("spec") or {}).get("template") or {}).get("metadata") or {})
            .get("labels") or {}).get(names.LABEL_INJECT)
    owned = owns_label(workload)
    if want is None:
        return "apply" if owned else "in-sync"  # release what we own
    if owned and have == want:
        return "in-sync"
    if have is not None and have != want and not owned:
        return USER_OWNED
    return "apply"


def apply_body(workload: dict) -> dict:
    meta = workload["metadata"]
    body = {"apiVersion": workload.get("apiVersion", "apps/v1"), "kind": workload["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]}}
    want = wanted_label(workload)
    if want is not None:
        body["spec"] = {"template": {"metadata": {"labels": {names.LABEL_INJECT: want}}}}
    return body


async def reconcile(kube: Kube, workload: dict) -> str:
    """Apply the template label if needed. Returns what happened (for metrics and logs)."""
    st = state(workload)
    if st != "apply":
        return st
    body = apply_body(workload)
    try:
        await kube.apply(body, manager=FIELD_MANAGER, force=False)
    except ApiError as e:
        if e.status == 409:  # the user set it between our read and this apply
            return USER_OWNED
        raise
    return "labelled" if "spec" in body else "released"


async def run(kube: Kube, metrics) -> None:
    """Opt-in for every Deployment and StatefulSet, on each change."""
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
                did = await reconcile(kube, obj)
            except Exception as e:
                metrics.errors.labels("optin").inc()
                if getattr(e, "status", None) == 403:
                    log.warning("opt-in of %s %s/%s: kvmesh may not change workloads in "
                                "namespace %s (403 Forbidden). An admin allows it with: %s",
                                kind, meta.get("namespace"), meta.get("name"),
                                meta.get("namespace"), names.grant_command(meta["namespace"]))
                    return
                log.error("opt-in of %s %s/%s failed: %s", kind, meta.get("namespace"),
                          meta.get("name"), e)
                return
            if did == USER_OWNED:
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

    infs = [kube.informer("apps/v1", "Deployment", handlers=[handler("Deployment")],
                          name="deployments"),
            kube.informer("apps/v1", "StatefulSet", handlers=[handler("StatefulSet")],
                          name="statefulsets")]
    await asyncio.gather(*(i.run() for i in infs))


async def watch_uninjected(kube: Kube, metrics, events=None) -> None:
    """Opted-in pods that were admitted without kvmesh's status annotation: the webhook was
    unreachable under failurePolicy Ignore. Made visible as a metric and an Event. Skipped
    pods are workload_events.run_skipped's (by their kvmesh.dev/skipped label); one here with
    a status was skipped by an older webhook, and `events` tells its workload all the same."""

    async def on(type_, obj, old):
        # The informer reports ADDED once per pod (relists only report what changed).
        meta = obj.get("metadata") or {}
        if type_ != "ADDED":
            return
        if names.ANN_STATUS in (meta.get("annotations") or {}):
            if events is not None:
                await events.on_pod(type_, obj, old)
            return
        metrics.uninjected.inc()
        log.warning("pod %s/%s is opted in but was admitted without LMCache P2P injection "
                    "(was the kvmesh webhook down?); recreate it to inject",
                    meta.get("namespace"), meta.get("name"))
        await kube.event(
            {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
             "namespace": meta["namespace"], "uid": meta.get("uid")},
            "NotInjected", "opted in to kvmesh but admitted without LMCache P2P injection "
            "(the webhook was unreachable and failurePolicy is Ignore); delete the pod to "
            "have it recreated with injection", "Warning")

    # Injected pods carry the peer-group label and are the membership watch's, skipped ones
    # the skip label and workload_events.run_skipped's: excluding both keeps one cached copy
    # of each pod in the controller, and this watch holds only the (normally no) pods the
    # webhook missed, as a stub of their metadata (plus skipped pods admitted by a webhook
    # older than the skip label, which still have their status reported from here).
    await kube.informer("v1", "Pod",
                        label_selector=f"{names.LABEL_INJECT}={names.INJECT_ENABLED},"
                                       f"!{names.LABEL_PEER_GROUP},!{names.LABEL_SKIPPED}",
                        handlers=[on], name="opted-in pods not injected",
                        transform=workload_events.pod_stub).run()
