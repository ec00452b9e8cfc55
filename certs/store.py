"""The certificates' Kubernetes edge: the CA Secret and the webhook configuration's caBundle.

Only the controller's leader writes (the Secret with optimistic concurrency, the caBundle by
server-side apply under its own field manager, so `kubectl apply` and GitOps tools, which never
set caBundle, do not fight over it). Webhook replicas only read.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from typing import Optional

from kvmesh.core import names
from kvmesh.certs import authority
from kvmesh.kube.api import ADMISSION_API, ApiError, Kube

log = logging.getLogger("kvmesh.certs")

MWC = "MutatingWebhookConfiguration"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


async def read_ca(kube: Kube, namespace: str = names.SYSTEM_NAMESPACE
                  ) -> tuple[Optional[authority.CAState], Optional[str]]:
    """(state, resourceVersion); (None, None) when the Secret does not exist yet."""
    s = await kube.get("v1", "Secret", names.CA_SECRET, namespace)
    if s is None:
        return None, None
    rv = s["metadata"].get("resourceVersion")
    data = {k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()}
    if not data.get("ca.crt") or not data.get("ca.key"):
        log.error("Secret %s/%s has no ca.crt/ca.key; it will be replaced", namespace,
                  names.CA_SECRET)
        return None, rv
    return authority.CAState.from_secret_data(data), rv


async def write_ca(kube: Kube, state: authority.CAState, resource_version: Optional[str],
                   namespace: str = names.SYSTEM_NAMESPACE) -> None:
    """Create or replace the CA Secret; a concurrent writer makes this raise 409 (retry)."""
    meta = {"name": names.CA_SECRET, "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "kvmesh",
                       "app.kubernetes.io/component": "webhook-ca"}}
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
            "data": {k: base64.b64encode(v).decode()
                     for k, v in state.to_secret_data().items()}}
    if resource_version is None:
        await kube.create(body)
    else:
        await kube.replace(body)


async def live_bundle(kube: Kube) -> tuple[bytes, bool]:
    """(the caBundle every kvmesh webhook entry carries, whether all entries agree).

    A bundle is only "live" if every entry has it: the API server calls each entry with its
    own bundle."""
    mwc = await kube.get(ADMISSION_API, MWC, names.WEBHOOK_CONFIGURATION)
    if mwc is None:
        return b"", False
    bundles = [base64.b64decode((w.get("clientConfig") or {}).get("caBundle") or "")
               for w in mwc.get("webhooks") or []]
    if not bundles:
        return b"", False
    return bundles[0], all(b == bundles[0] for b in bundles)


async def apply_bundle(kube: Kube, bundle_pem: bytes) -> None:
    """Server-side apply of clientConfig.caBundle on every kvmesh webhook entry."""
    mwc = await kube.get(ADMISSION_API, MWC, names.WEBHOOK_CONFIGURATION)
    if mwc is None:
        raise ApiError(status=404, reason=f"{MWC} {names.WEBHOOK_CONFIGURATION} not found")
    encoded = base64.b64encode(bundle_pem).decode()
    await kube.apply({
        "apiVersion": ADMISSION_API, "kind": MWC,
        "metadata": {"name": names.WEBHOOK_CONFIGURATION},
        "webhooks": [{"name": w["name"], "clientConfig": {"caBundle": encoded}}
                     for w in mwc.get("webhooks") or []],
    }, manager=names.FIELD_MANAGER_CERTS)


async def reconcile(kube: Kube, now: Optional[dt.datetime] = None,
                    validity: dt.timedelta = authority.CA_VALIDITY) -> str:
    """One pass of the leader's certificate loop. Returns what it did (for logs/tests)."""
    now = now or _now()
    state, rv = await read_ca(kube)
    live, consistent = await live_bundle(kube)
    desired = authority.plan_ca(state, live if consistent else b"", now, validity)
    actions = []
    if desired != state:
        await write_ca(kube, desired, rv)
        actions.append("ca-secret-written" if state else "ca-created")
        if state and desired.current != state.current:
            actions.append("ca-promoted")
    if not consistent or live != desired.bundle_pem:
        try:
            await apply_bundle(kube, desired.bundle_pem)
            actions.append("bundle-repaired" if live else "bundle-applied")
        except ApiError as e:
            if e.status != 404:
                raise
            actions.append("no-webhook-configuration")
    return ",".join(actions) or "in-sync"
