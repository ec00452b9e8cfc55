"""KVMeshPolicy -> webhook entries, and the policies' status.

A policy enables injection for pods it selects without touching them: the controller writes
one entry per valid policy into the kvmesh MutatingWebhookConfiguration (server-side apply,
its own field manager, so the whole set is declared at once and a deleted policy's entry
disappears), with the policy's selectors, its failure policy, and a CEL condition that only
vLLM-looking pods pass. A webhook outage therefore only ever affects pods kvmesh would inject.
Pods carrying the kvmesh.dev/inject label go through the label entry instead (never twice).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from typing import Optional

from kubernetes_asyncio import client
from pydantic import ValidationError

from kvmesh.core import names
from kvmesh.core.policy import Policy, describe, policy_from_object

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


async def apply_entries(api: client.ApiClient, policies: list[Policy],
                        url_base: Optional[str]) -> None:
    adm = client.AdmissionregistrationV1Api(api)
    mwc = await adm.read_mutating_webhook_configuration(names.WEBHOOK_CONFIGURATION)
    bundle = next((w.client_config.ca_bundle for w in mwc.webhooks or []
                   if w.client_config.ca_bundle), "") or ""
    if isinstance(bundle, bytes):
        bundle = base64.b64encode(bundle).decode()
    body = {"apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": names.WEBHOOK_CONFIGURATION},
            "webhooks": [entry(p, url_base, bundle) for p in sorted(policies,
                                                                     key=lambda p: p.name)]}
    await adm.patch_mutating_webhook_configuration(
        names.WEBHOOK_CONFIGURATION, body, field_manager=names.FIELD_MANAGER_POLICIES,
        force=True, _content_type="application/apply-patch+yaml")


async def write_status(api: client.ApiClient, obj: dict, status: dict) -> None:
    custom = client.CustomObjectsApi(api)
    await custom.patch_cluster_custom_object_status(
        names.API_GROUP, names.API_VERSION, "kvmeshpolicies", obj["metadata"]["name"],
        {"apiVersion": f"{names.API_GROUP}/{names.API_VERSION}", "kind": "KVMeshPolicy",
         "metadata": {"name": obj["metadata"]["name"]}, "status": status},
        field_manager=names.FIELD_MANAGER_POLICIES, force=True,
        _content_type="application/apply-patch+yaml")
