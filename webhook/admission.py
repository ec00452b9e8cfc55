"""AdmissionReview (admission.k8s.io/v1) in, AdmissionReview response out (pure, no I/O).

The patch is computed by diffing the pod before and after `inject.decide`, so the webhook can
never send a patch that disagrees with what the offline CLI writes.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from kvmesh.webhook import inject
from kvmesh.webhook.policy import PolicyDefaults

API_VERSION = "admission.k8s.io/v1"
MAX_WARNINGS = 20  # the API server truncates long warning lists; keep the important first
MAX_WARNING_LEN = 480


class BadReview(ValueError):
    """The body is not an AdmissionReview request kvmesh can answer (HTTP 400)."""


@dataclass
class Outcome:
    """What happened, for metrics and logs."""

    action: str  # inject | skip | deny | ignore (not a pod CREATE)
    reason: str
    mode: Optional[str] = None
    dry_run: bool = False
    uid: str = ""
    namespace: str = ""
    name: str = ""
    patch_ops: int = 0
    message: str = ""
    warnings: list[str] = field(default_factory=list)


# (namespace, pod labels) -> (the defaults governing the pod, the KVMeshPolicy name or None)
Resolver = Callable[[str, dict], tuple[PolicyDefaults, Optional[str]]]


def review(body: Any, policy: Union[PolicyDefaults, Resolver], selected: bool = True
           ) -> tuple[dict, Outcome]:
    """Answer one AdmissionReview. Raises BadReview when there is no request to answer."""
    if not isinstance(body, dict):
        raise BadReview("body must be a JSON object (an AdmissionReview)")
    if body.get("kind") != "AdmissionReview" or body.get("apiVersion") != API_VERSION:
        raise BadReview(f"expected kind AdmissionReview, apiVersion {API_VERSION}; got kind "
                        f"{body.get('kind')!r}, apiVersion {body.get('apiVersion')!r}")
    req = body.get("request")
    if not isinstance(req, dict):
        raise BadReview("AdmissionReview has no request object")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid must be a non-empty string")

    out = Outcome("ignore", "not-a-pod-create", uid=uid, dry_run=req.get("dryRun") is True)
    kind = req.get("kind") if isinstance(req.get("kind"), dict) else {}
    op = req.get("operation")
    if (kind.get("group", "") != "" or kind.get("kind") != "Pod" or op != "CREATE"
            or req.get("subResource")):
        # Misrouted by the webhook configuration: let it through untouched, and say so.
        out.message = (f"kvmesh only mutates Pod CREATE; got {kind.get('kind')!r} {op!r}"
                       f"{' subresource ' + str(req['subResource']) if req.get('subResource') else ''}")
        return _response(uid, True, warnings=[out.message]), out

    pod = req.get("object")
    namespace = req.get("namespace") if isinstance(req.get("namespace"), str) else ""
    out.namespace = namespace
    if isinstance(pod, dict) and isinstance(pod.get("metadata"), dict):
        meta = pod["metadata"]
        out.name = str(meta.get("name") or meta.get("generateName") or "")
        namespace = namespace or str(meta.get("namespace") or "")
    if isinstance(policy, PolicyDefaults):
        defaults, policy_name = policy, None
    else:
        labels = pod.get("metadata", {}).get("labels") if isinstance(pod, dict) and \
            isinstance(pod.get("metadata"), dict) else None
        defaults, policy_name = policy(namespace, labels if isinstance(labels, dict) else {})
    result = inject.decide(pod, inject.Context(namespace=namespace, policy=defaults,
                                               selected=selected, policy_name=policy_name))
    out.action, out.reason, out.mode = result.action, result.reason, result.mode
    out.message, out.warnings = result.message, result.warnings
    if result.action == inject.DENY:
        return _response(uid, False, message=f"kvmesh: {result.message}", code=403,
                         reason=result.reason, warnings=result.warnings), out
    ops = diff(pod, result.pod)
    out.patch_ops = len(ops)
    return _response(uid, True, patch=ops, warnings=result.warnings), out


def _response(uid: str, allowed: bool, patch: Optional[list] = None, message: str = "",
              code: int = 0, reason: str = "", warnings: Optional[list[str]] = None) -> dict:
    resp: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        resp["patchType"] = "JSONPatch"
        resp["patch"] = base64.b64encode(
            json.dumps(patch, separators=(",", ":")).encode()).decode()
    if not allowed:
        resp["status"] = {"code": code, "message": message, "reason": reason}
    if warnings:
        resp["warnings"] = [("kvmesh: " + w)[:MAX_WARNING_LEN] for w in warnings[:MAX_WARNINGS]]
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": resp}


# --- JSON patch by diff -----------------------------------------------------------------------

def _ptr(token: Any) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def diff(before: Any, after: Any, path: str = "") -> list[dict]:
    """RFC 6902 operations turning `before` into `after` (objects recursed, lists by
    common prefix/suffix so an insertion is one `add`)."""
    if before is after:  # the core shares unchanged subtrees: skip them by identity
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        ops: list[dict] = []
        for k in before:
            if k not in after:
                ops.append({"op": "remove", "path": f"{path}/{_ptr(k)}"})
        for k, v in after.items():
            if k not in before:
                ops.append({"op": "add", "path": f"{path}/{_ptr(k)}", "value": v})
            else:
                ops.extend(diff(before[k], v, f"{path}/{_ptr(k)}"))
        return ops
    if isinstance(before, list) and isinstance(after, list):
        pre = 0
        while pre < len(before) and pre < len(after) and before[pre] == after[pre]:
            pre += 1
        suf = 0
        while (suf < len(before) - pre and suf < len(after) - pre
               and before[-1 - suf] == after[-1 - suf]):
            suf += 1
        old_mid = before[pre:len(before) - suf]
        new_mid = after[pre:len(after) - suf]
        ops = []
        common = min(len(old_mid), len(new_mid))
        for i in range(common):
            ops.extend(diff(old_mid[i], new_mid[i], f"{path}/{pre + i}"))
        # Removals from the back so earlier indexes stay valid.
        for i in range(len(old_mid) - 1, common - 1, -1):
            ops.append({"op": "remove", "path": f"{path}/{pre + i}"})
        for i in range(common, len(new_mid)):
            ops.append({"op": "add", "path": f"{path}/{pre + i}", "value": new_mid[i]})
        return ops
    if before == after and type(before) is type(after):
        return []
    return [{"op": "replace", "path": path, "value": after}]
