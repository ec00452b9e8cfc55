"""The one way kvmesh talks to the Kubernetes API: plain dicts in and out, over the
kubernetes-asyncio ApiClient's transport (auth, TLS, timeouts), never its typed models.

    kube = await connect.api_client(kubeconfig)
    await kube.apply(obj)                                  # server-side apply
    await kube.apply(obj_with_status, subresource="status")
    cm = await kube.get("v1", "Secret", "name", "namespace")   # None when absent
    pods = kube.informer("v1", "Pod", label_selector="a=b", handlers=[on_pod], name="pods")

Every URL comes from one table of the kinds kvmesh touches (`RESOURCES`), so namespaced and
cluster-scoped objects, and their status subresource, go through the same code. Any answer
other than 2xx raises `ApiError` (its `.status` is the HTTP code).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Optional

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException as ApiError

from kvmesh.core import names
from kvmesh.kube.informer import Handler, Informer, api_error

__all__ = ["ApiError", "Kube", "RESOURCES", "path"]

log = logging.getLogger("kvmesh.events")

CRD_API = f"{names.API_GROUP}/{names.API_VERSION}"
ADMISSION_API = "admissionregistration.k8s.io/v1"
# Server-side apply: the body is the caller's whole intent for the fields its manager owns.
APPLY_PATCH = "application/apply-patch+yaml"
EVENT_SOURCE = "kvmesh-controller"  # source.component of the Events kvmesh records

# (apiVersion, kind) -> (plural, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "Pod"): ("pods", True),
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Service"): ("services", True),
    ("v1", "Event"): ("events", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("apps/v1", "StatefulSet"): ("statefulsets", True),
    ("apps/v1", "ReplicaSet"): ("replicasets", True),
    ("batch/v1", "Job"): ("jobs", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("networkpolicies", True),
    ("coordination.k8s.io/v1", "Lease"): ("leases", True),
    (ADMISSION_API, "MutatingWebhookConfiguration"): ("mutatingwebhookconfigurations", False),
    (CRD_API, names.PEER_GROUP_KIND): ("kvmeshpeergroups", True),
    (CRD_API, "KVMeshPolicy"): ("kvmeshpolicies", False),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): ("customresourcedefinitions", False),
}


def path(api_version: str, kind: str, namespace: Optional[str] = None,
         name: Optional[str] = None, subresource: Optional[str] = None) -> str:
    """The URL path of a collection (no name) or an object; a namespaced kind without a
    namespace is the collection across all namespaces."""
    plural, namespaced = RESOURCES[(api_version, kind)]
    out = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespaced and namespace:
        out += f"/namespaces/{namespace}"
    out += f"/{plural}"
    if name:
        out += f"/{name}"
    if subresource:
        out += f"/{subresource}"
    return out


def _resource_of(url: str) -> str:
    """The resource (and subresource) a request path names, for metrics: bounded values."""
    parts = url.split("?", 1)[0].strip("/").split("/")
    parts = parts[2:] if parts[:1] == ["api"] else parts[3:]  # drop /api/v1, /apis/g/v
    if parts[:1] == ["namespaces"] and len(parts) > 2:
        parts = parts[2:]
    return "/".join(parts[:1] + parts[2:3]) if parts else "other"


def _where(obj: dict) -> dict:
    meta = obj["metadata"]
    return {"api_version": obj["apiVersion"], "kind": obj["kind"],
            "namespace": meta.get("namespace"), "name": meta.get("name")}


# The informer's keyword arguments (those of kubernetes-asyncio's list methods) as query
# parameters of a raw list/watch request.
_QUERY = {"label_selector": "labelSelector", "field_selector": "fieldSelector",
          "limit": "limit", "_continue": "continue", "watch": "watch",
          "resource_version": "resourceVersion", "allow_watch_bookmarks": "allowWatchBookmarks",
          "timeout_seconds": "timeoutSeconds"}


def _query_value(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


class Kube:
    """A kubernetes-asyncio ApiClient seen as plain JSON objects."""

    def __init__(self, api: client.ApiClient):
        self.api = api
        # Called after every request but watches as (verb, resource, HTTP status or 0 for no
        # answer, seconds): the controller's API latency and request metrics.
        self.observe: Optional[Callable[[str, str, int, float], None]] = None

    async def close(self) -> None:
        await self.api.close()

    async def _raw(self, method: str, url: str, *, query: Iterable[tuple[str, str]] = (),
                   body: Any = None, content_type: str = "application/json",
                   timeout: Any = 30):
        """The aiohttp response, unread (the informer streams watches from it)."""
        query = list(query)
        t0, status = time.perf_counter(), 0
        try:
            resp = await self.api.call_api(
                url, method, query_params=query, body=body,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=timeout)
            status = resp.status
            return resp
        finally:
            if self.observe is not None and ("watch", "true") not in query:
                self.observe(method, _resource_of(url), status, time.perf_counter() - t0)

    async def _call(self, method: str, url: str, **kw) -> dict:
        resp = await self._raw(method, url, **kw)
        try:
            if not 200 <= resp.status < 300:
                raise await api_error(resp)
            data = await resp.read()
        finally:
            resp.release()
        return json.loads(data) if data else {}

    # --- reads ---------------------------------------------------------------------------------

    async def server_version(self) -> dict:
        """The API server's /version (major, minor, gitVersion, ...)."""
        return await self._call("GET", "/version", timeout=10)

    async def get(self, api_version: str, kind: str, name: str,
                  namespace: Optional[str] = None) -> Optional[dict]:
        """The object, or None when it does not exist."""
        try:
            return await self._call("GET", path(api_version, kind, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: Optional[str] = None,
                   label_selector: Optional[str] = None,
                   field_selector: Optional[str] = None) -> list[dict]:
        """All objects (every page), across namespaces when `namespace` is None."""
        items: list[dict] = []
        cont = None
        while True:
            q = [("limit", "500")]
            if label_selector:
                q.append(("labelSelector", label_selector))
            if field_selector:
                q.append(("fieldSelector", field_selector))
            if cont:
                q.append(("continue", cont))
            body = await self._call("GET", path(api_version, kind, namespace), query=q)
            items += body.get("items") or []
            cont = (body.get("metadata") or {}).get("continue")
            if not cont:
                return items

    def informer(self, api_version: str, kind: str, *, namespace: Optional[str] = None,
                 label_selector: Optional[str] = None, handlers: Iterable[Handler] = (),
                 name: Optional[str] = None, **options) -> Informer:
        """A list-then-watch cache of one kind (see kvmesh.kube.informer)."""
        return Informer(self.lister(api_version, kind), namespace=namespace,
                        label_selector=label_selector, handlers=handlers,
                        name=name or f"{kind} informer", **options)

    def lister(self, api_version: str, kind: str) -> Callable[..., Awaitable[Any]]:
        """The list/watch request an Informer makes (keyword arguments as kubernetes-asyncio's
        list methods take them), answering the unread response."""
        return functools.partial(self._list_or_watch, api_version, kind)

    async def _list_or_watch(self, api_version: str, kind: str, *,
                             namespace: Optional[str] = None, _preload_content: bool = False,
                             _request_timeout: Any = None, **kw):
        q = [(_QUERY[k], _query_value(v)) for k, v in kw.items() if v is not None]
        return await self._raw("GET", path(api_version, kind, namespace), query=q,
                               timeout=_request_timeout)

    # --- writes --------------------------------------------------------------------------------

    async def apply(self, obj: dict, manager: str = names.FIELD_MANAGER,
                    subresource: Optional[str] = None, force: bool = True) -> dict:
        """Server-side apply of `obj` (namespaced or cluster-scoped; `subresource="status"` for
        the status) under field manager `manager`. The only server-side-apply call in kvmesh."""
        q = [("fieldManager", manager)] + ([("force", "true")] if force else [])
        return await self._call("PATCH", path(**_where(obj), subresource=subresource),
                                body=obj, content_type=APPLY_PATCH, query=q)

    async def create(self, obj: dict, dry_run: bool = False) -> dict:
        """POST; `dry_run`: the API server runs admission (webhooks included) and validation,
        answers the object it would store, and stores nothing."""
        w = _where(obj)
        return await self._call("POST", path(w["api_version"], w["kind"], w["namespace"]),
                                body=obj, query=[("dryRun", "All")] if dry_run else ())

    async def replace(self, obj: dict) -> dict:
        """PUT: fails with 409 when metadata.resourceVersion is no longer current."""
        return await self._call("PUT", path(**_where(obj)), body=obj)

    async def delete(self, api_version: str, kind: str, name: str,
                     namespace: Optional[str] = None) -> bool:
        """True when deleted, False when it did not exist."""
        try:
            await self._call("DELETE", path(api_version, kind, namespace, name),
                             body={"propagationPolicy": "Background"})
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    async def event(self, involved: dict, reason: str, message: str,
                    type_: str = "Normal") -> None:
        """Record a core/v1 Event on `involved` (apiVersion, kind, name, namespace, uid).

        Events are best effort: a failure is logged, never raised into a reconcile loop."""
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{involved['name']}.kvmesh.",
                             "namespace": involved["namespace"]},
                "involvedObject": involved, "reason": reason, "message": message[:1000],
                "type": type_, "source": {"component": EVENT_SOURCE},
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                "reportingComponent": EVENT_SOURCE,
                "reportingInstance": EVENT_SOURCE}
        try:
            await self.create(body)
        except Exception as e:
            log.warning("could not record Event %s on %s %s/%s: %s", reason, involved["kind"],
                        involved["namespace"], involved["name"], e)
