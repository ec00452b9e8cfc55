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

import logging
from typing import Optional

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kvmesh.core import names

log = logging.getLogger("kvmesh.optin")

FIELD_MANAGER = names.FIELD_MANAGER_OPTIN
KINDS = {"Deployment": "deployments", "StatefulSet": "statefulsets"}
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


def needs_apply(workload: dict) -> bool:
    return state(workload) == "apply"


def apply_body(workload: dict) -> dict:
    meta = workload["metadata"]
    body = {"apiVersion": workload.get("apiVersion", "apps/v1"), "kind": workload["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]}}
    want = wanted_label(workload)
    if want is not None:
        body["spec"] = {"template": {"metadata": {"labels": {names.LABEL_INJECT: want}}}}
    return body


async def reconcile(apps: client.AppsV1Api, workload: dict) -> str:
    """Apply the template label if needed. Returns what happened (for metrics and logs)."""
    st = state(workload)
    if st != "apply":
        return st
    body = apply_body(workload)
    meta = workload["metadata"]
    patch = getattr(apps, f"patch_namespaced_{workload['kind'].lower().replace('statefulset', 'stateful_set')}")
    try:
        await patch(meta["name"], meta["namespace"], body, field_manager=FIELD_MANAGER,
                    _content_type="application/apply-patch+yaml")
    except ApiException as e:
        if e.status == 409:  # the user set it between our read and this apply
            return USER_OWNED
        raise
    return "labelled" if "spec" in body else "released"
