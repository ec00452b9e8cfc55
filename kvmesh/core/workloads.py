"""Run the injection core over Kubernetes documents (pure): Pods and the workloads that carry a
pod template. Shared by `kvmesh inject`, `kvmesh explain` and the tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from kvmesh.core import inject
from kvmesh.core.policy import PolicyDefaults

# kind -> path to the pod template inside the document
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass
class DocResult:
    doc: object  # the output document (unchanged when not a workload, skipped or denied)
    kind: str
    name: str
    namespace: str
    result: Optional[inject.Result]  # None: not a kind kvmesh handles


def _get(doc: dict, path: tuple[str, ...]) -> Optional[dict]:
    cur = doc
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur if isinstance(cur, dict) else None


def process(doc: object, policy: PolicyDefaults, namespace: str = "default",
            selected: bool = False) -> DocResult:
    if not isinstance(doc, dict) or doc.get("kind") not in TEMPLATE_PATHS:
        kind = doc.get("kind", "") if isinstance(doc, dict) else ""
        return DocResult(doc, str(kind), "", namespace, None)
    kind = doc["kind"]
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    ns = str(meta.get("namespace") or namespace)
    name = str(meta.get("name") or meta.get("generateName") or "")
    path = TEMPLATE_PATHS[kind]
    template = _get(doc, path) if path else doc
    if template is None:
        res = inject.Result(inject.DENY, inject.R_MALFORMED,
                            f"{kind} has no pod template at {'.'.join(path)}", doc)
        return DocResult(doc, kind, name, ns, res)
    res = inject.decide(template, inject.Context(namespace=ns, policy=policy,
                                                 selected=selected, owner_kind=kind))
    out = doc
    if res.action != inject.DENY and res.pod is not template:
        out = copy.deepcopy(doc) if path else res.pod
        if path:
            parent = _get(out, path[:-1]) if len(path) > 1 else out
            parent[path[-1]] = res.pod
    return DocResult(out, kind, name, ns, res)


def pod_for(doc: dict, ordinal: int = 0, uid: str = "00000000-0000-4000-8000-000000000000"
            ) -> dict:
    """The Pod the workload's controller would submit to admission (before any webhook).

    Deployments go through a ReplicaSet (generateName, ReplicaSet owner); StatefulSets name
    pods `<name>-<ordinal>`; Jobs and CronJobs go through a Job. Used by the demo and tests to
    send the same pod through the webhook that `kvmesh inject` renders into the template.
    """
    kind = doc["kind"]
    if kind == "Pod":
        return copy.deepcopy(doc)
    meta = doc.get("metadata") or {}
    name = meta.get("name", "workload")
    template = copy.deepcopy(_get(doc, TEMPLATE_PATHS[kind]) or {})
    pmeta = template.setdefault("metadata", {})
    pmeta["namespace"] = meta.get("namespace", "default")
    owner_kind, owner_name = {
        "Deployment": ("ReplicaSet", f"{name}-5f7d9c8b6d"),
        "CronJob": ("Job", f"{name}-29100000"),
    }.get(kind, (kind, name))
    if kind == "StatefulSet":
        pmeta["name"] = f"{name}-{ordinal}"
    else:
        pmeta["generateName"] = f"{owner_name}-"
    pmeta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner_kind,
                                 "name": owner_name, "uid": uid, "controller": True,
                                 "blockOwnerDeletion": True}]
    return {"apiVersion": "v1", "kind": "Pod", **template}
