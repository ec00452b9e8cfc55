"""KVMeshPolicy -> webhook entries, and the policies' status.

A policy enables injection for pods it selects without touching them: the controller writes
one entry per valid policy into the kvmesh MutatingWebhookConfiguration (server-side apply,
its own field manager, so the whole set is declared at once and a deleted policy's entry
disappears), with the policy's selectors, its failure policy, and a CEL condition that only
vLLM-looking pods pass. A webhook outage therefore only ever affects pods kvmesh would inject.
Pods carrying the kvmesh.dev/inject label go through the label entry instead (never twice).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Optional

from pydantic import ValidationError

from kvmesh.core import names
from kvmesh.core.policy import Policy, describe, policy_from_object
from kvmesh.kube.api import ADMISSION_API, CRD_API, Kube
from kvmesh.kube.facade import policy_informer

log = logging.getLogger("kvmesh.policies")

LOOKS_LIKE_VLLM = (
    "object.spec.containers.exists(c, "
    "(has(c.image) && c.image.contains('vllm')) || "
    "(has(c.command) && c.command.exists(w, w.contains('vllm'))) || "
    "(has(c.args) && c.args.exists(w, w.contains('vllm'))))")
EXCLUDED_NAMESPACES = ["kube-system", names.SYSTEM_NAMESPACE]


def entry_name(policy: str) -> str:
    return policy + names.POLICY_ENTRY_SUFFIX


def client_config(url_base: Optional[str], ca_bundle: str) -> dict:
    cfg: dict = ({"url": f"{url_base.rstrip('/')}/mutate/policy"} if url_base else
                 {"service": {"name": names.WEBHOOK_SERVICE, "namespace": names.SYSTEM_NAMESPACE,
                              "path": "/mutate/policy", "port": 443}})
    if ca_bundle:
        cfg["caBundle"] = ca_bundle
    return cfg


def entry(p: Policy, url_base: Optional[str], ca_bundle: str) -> dict:
    """The webhook entry for one policy (pure)."""
    ns_sel = p.namespace_selector.to_api()
    ns_sel["matchExpressions"] = ns_sel.get("matchExpressions", []) + [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
         "values": EXCLUDED_NAMESPACES}]
    obj_sel = p.pod_selector.to_api()
    obj_sel["matchExpressions"] = obj_sel.get("matchExpressions", []) + [
        {"key": names.LABEL_INJECT, "operator": "DoesNotExist"}]
    return {"name": entry_name(p.name), "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": p.failure_policy,
            "reinvocationPolicy": "IfNeeded", "timeoutSeconds": 3,
            "matchPolicy": "Equivalent", "clientConfig": client_config(url_base, ca_bundle),
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": ns_sel, "objectSelector": obj_sel,
            "matchConditions": [{"name": "looks-like-vllm", "expression": LOOKS_LIKE_VLLM}]}


def parse_all(objs: list[dict]) -> tuple[list[Policy], dict[str, str]]:
    """(valid policies, {invalid policy name: why})."""
    valid, invalid = [], {}
    for o in objs:
        try:
            valid.append(policy_from_object(o))
        except ValidationError as e:
            invalid[o["metadata"]["name"]] = describe(e)
    return valid, invalid


def condition(ok: bool, reason: str, message: str, generation: Optional[int],
              current: Optional[list] = None) -> dict:
    """The Ready condition. lastTransitionTime moves only when the status flips: a fresh
    timestamp on every pass would make every status write a change, i.e. a watch event for
    the controller and every webhook replica, every pass."""
    status = "True" if ok else "False"
    prev = next((c for c in current or [] if c.get("type") == "Ready"), None)
    since = prev.get("lastTransitionTime") if prev and prev.get("status") == status else None
    return {"type": "Ready", "status": status, "reason": reason, "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": since or dt.datetime.now(dt.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ")}


def status_changed(obj: dict, status: dict) -> bool:
    """Whether writing `status` would change the object's (skips a no-op API call)."""
    have = obj.get("status") or {}
    return any(have.get(k) != v for k, v in status.items())


def status(obj: dict, invalid: dict[str, str], members) -> dict:
    """The status a policy should have (pure): Ready or InvalidSpec, and its pods among the
    mesh's members (groups.Member)."""
    name = obj["metadata"]["name"]
    gen = obj["metadata"].get("generation")
    current = (obj.get("status") or {}).get("conditions")
    if name in invalid:
        cond = condition(False, "InvalidSpec", invalid[name], gen, current)
    else:
        cond = condition(True, "EntryWritten",
                         f"webhook entry {entry_name(name)} selects this policy's pods", gen,
                         current)
    pods = [m for m in members if m.policy == name]
    return {"conditions": [cond], "observedGeneration": gen, "injectedPods": len(pods),
            "readyPeers": sum(1 for m in pods if m.is_peer)}


async def apply_entries(kube: Kube, policies: list[Policy], url_base: Optional[str]) -> None:
    mwc = await kube.get(ADMISSION_API, "MutatingWebhookConfiguration",
                         names.WEBHOOK_CONFIGURATION)
    if mwc is None:
        raise LookupError(f"MutatingWebhookConfiguration {names.WEBHOOK_CONFIGURATION} "
                          "not found")
    bundle = next((w["clientConfig"]["caBundle"] for w in mwc.get("webhooks") or []
                   if (w.get("clientConfig") or {}).get("caBundle")), "")
    await kube.apply({
        "apiVersion": ADMISSION_API, "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": names.WEBHOOK_CONFIGURATION},
        "webhooks": [entry(p, url_base, bundle) for p in sorted(policies, key=lambda p: p.name)]},
        manager=names.FIELD_MANAGER_POLICIES)


async def write_status(kube: Kube, obj: dict, status: dict) -> None:
    await kube.apply({"apiVersion": CRD_API, "kind": "KVMeshPolicy",
                      "metadata": {"name": obj["metadata"]["name"]}, "status": status},
                     manager=names.FIELD_MANAGER_POLICIES, subresource="status")


async def reconcile(kube: Kube, objs: list[dict], mesh, webhook_url: Optional[str]) -> None:
    """One pass: the webhook entries of the valid policies, `mesh.policies`, and every
    policy's status."""
    valid, invalid = parse_all(objs)
    await apply_entries(kube, valid, webhook_url)
    mesh.policies.clear()
    mesh.policies.update({p.name: p for p in valid})
    members = list(mesh.members.values())
    for o in objs:
        want = status(o, invalid, members)
        if status_changed(o, want):
            await write_status(kube, o, want)


async def run(kube: Kube, mesh, webhook_url: Optional[str], on_error=lambda: None,
              resync_seconds: float = 15.0) -> None:
    """KVMeshPolicies -> webhook entries + status, on every change and every resync_seconds;
    keeps mesh.policies current."""
    wake = asyncio.Event()
    inf = policy_informer(kube, [lambda t, o, old: wake.set()])
    runner = asyncio.create_task(inf.run())
    try:
        await inf.has_synced.wait()
        while True:
            try:
                await reconcile(kube, inf.items(), mesh, webhook_url)
            except Exception as e:
                on_error()
                log.error("reconciling KVMeshPolicies failed: %s; retrying", e)
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), resync_seconds)
            except asyncio.TimeoutError:
                pass
    finally:
        runner.cancel()
        inf.stop()
