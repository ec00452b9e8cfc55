"""Server-side apply, get and delete for the handful of kinds the controller manages, over the
kubernetes-asyncio ApiClient (one code path instead of a typed method per kind)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Optional

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kvmesh.core import names

log = logging.getLogger("kvmesh.events")

_PLURALS = {
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("v1", "Service"): "services",
    ("v1", "Event"): "events",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    (f"{names.API_GROUP}/{names.API_VERSION}", names.PEER_GROUP_KIND): "kvmeshpeergroups",
}


def path(api_version: str, kind: str, namespace: str, name: Optional[str] = None,
         subresource: Optional[str] = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    out = f"{base}/namespaces/{namespace}/{_PLURALS[(api_version, kind)]}"
    if name:
        out += f"/{name}"
    if subresource:
        out += f"/{subresource}"
    return out


async def _call(api: client.ApiClient, method: str, url: str, body=None,
                content_type: str = "application/json", query=None) -> dict:
    resp = await api.call_api(
        url, method, query_params=query or [], body=body,
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        auth_settings=["BearerToken"], _preload_content=False, _request_timeout=30)
    data = await resp[0].read() if isinstance(resp, tuple) else await resp.read()
    return json.loads(data) if data else {}


async def apply(api: client.ApiClient, obj: dict, manager: str = names.FIELD_MANAGER,
                subresource: Optional[str] = None, force: bool = True) -> dict:
    meta = obj["metadata"]
    q = [("fieldManager", manager)] + ([("force", "true")] if force else [])
    return await _call(api, "PATCH", path(obj["apiVersion"], obj["kind"], meta["namespace"],
                                          meta["name"], subresource),
                       body=obj, content_type="application/apply-patch+yaml", query=q)


async def get(api: client.ApiClient, api_version: str, kind: str, namespace: str,
              name: str) -> Optional[dict]:
    try:
        return await _call(api, "GET", path(api_version, kind, namespace, name))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


async def delete(api: client.ApiClient, api_version: str, kind: str, namespace: str,
                 name: str) -> bool:
    try:
        await _call(api, "DELETE", path(api_version, kind, namespace, name),
                    body={"propagationPolicy": "Background"})
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


async def create(api: client.ApiClient, obj: dict) -> dict:
    return await _call(api, "POST", path(obj["apiVersion"], obj["kind"],
                                         obj["metadata"]["namespace"]), body=obj)


async def event(api: client.ApiClient, involved: dict, reason: str, message: str,
                type_: str = "Normal") -> None:
    """Record a core/v1 Event on `involved` (apiVersion, kind, name, namespace, uid).

    Events are best effort: a failure is logged, never raised into a reconcile loop."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.kvmesh.",
                         "namespace": involved["namespace"]},
            "involvedObject": involved, "reason": reason, "message": message[:1000],
            "type": type_, "source": {"component": "kvmesh-controller"},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": "kvmesh-controller", "reportingInstance": "kvmesh-controller"}
    try:
        await create(api, body)
    except Exception as e:
        log.warning("could not record Event %s on %s %s/%s: %s", reason, involved["kind"],
                    involved["namespace"], involved["name"], e)
