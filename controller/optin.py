"""Workload opt-in by annotation: `kubectl annotate deployment NAME kvmesh.dev/inject=enabled`.

The controller owns exactly one field, the pod template's `kvmesh.dev/inject` label, through
server-side apply under its own field manager. Adding the annotation applies the label (the
template changes, so the workload rolls its pods into the mesh); removing it applies an empty
configuration, which drops the label only if kvmesh is its sole owner. Apply is never forced:
if the user set the label to something else themselves, the API server reports a conflict and
kvmesh leaves the user's value alone (and says so in an Event).
"""

from __future__ import annotations

import logging
from typing import Optional

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kvmesh import names

log = logging.getLogger("kvmesh.optin")

FIELD_MANAGER = names.FIELD_MANAGER_OPTIN
KINDS = {"Deployment": "deployments", "StatefulSet": "statefulsets"}


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


def needs_apply(workload: dict) -> bool:
    want = wanted_label(workload)
    have = ((((workload.get("spec") or {}).get("template") or {}).get("metadata") or {})
            .get("labels") or {}).get(names.LABEL_INJECT)
    if want is None:
        return owns_label(workload)  # release what we own
    return not (owns_label(workload) and have == want)


def apply_body(workload: dict) -> dict:
    meta = workload["metadata"]
    body = {"apiVersion": workload.get("apiVersion", "apps/v1"), "kind": workload["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]}}
    want = wanted_label(workload)
    if want is not None:
        body["spec"] = {"template": {"metadata": {"labels": {names.LABEL_INJECT: want}}}}
    return body


async def reconcile(apps: client.AppsV1Api, workload: dict) -> str:
    """Apply the template label if needed. Returns what happened (for Events and logs)."""
    if not needs_apply(workload):
        return "in-sync"
    body = apply_body(workload)
    meta = workload["metadata"]
    patch = getattr(apps, f"patch_namespaced_{workload['kind'].lower().replace('statefulset', 'stateful_set')}")
    try:
        await patch(meta["name"], meta["namespace"], body, field_manager=FIELD_MANAGER,
                    _content_type="application/apply-patch+yaml")
    except ApiException as e:
        if e.status == 409:
            log.warning("%s %s/%s: the user manages the %s label of the pod template; "
                        "kvmesh leaves it as the user set it", workload["kind"],
                        meta["namespace"], meta["name"], names.LABEL_INJECT)
            return "conflict-user-owned"
        raise
    return "labelled" if "spec" in body else "released"
