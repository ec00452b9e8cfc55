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

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kvmesh.core import names
from kvmesh.certs import authority

log = logging.getLogger("kvmesh.certs")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


async def read_ca(core: client.CoreV1Api, namespace: str = names.SYSTEM_NAMESPACE
                  ) -> tuple[Optional[authority.CAState], Optional[str]]:
    """(state, resourceVersion); (None, None) when the Secret does not exist yet."""
    try:
        s = await core.read_namespaced_secret(names.CA_SECRET, namespace)
    except ApiException as e:
        if e.status == 404:
            return None, None
        raise
    data = {k: base64.b64decode(v) for k, v in (s.data or {}).items()}
    if not data.get("ca.crt") or not data.get("ca.key"):
        log.error("Secret %s/%s has no ca.crt/ca.key; it will be replaced", namespace,
                  names.CA_SECRET)
        return None, s.metadata.resource_version
    return authority.CAState.from_secret_data(data), s.metadata.resource_version


async def write_ca(core: client.CoreV1Api, state: authority.CAState,
                   resource_version: Optional[str],
                   namespace: str = names.SYSTEM_NAMESPACE) -> None:
    """Create or replace the CA Secret; a concurrent writer makes this raise 409 (retry)."""
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=names.CA_SECRET, namespace=namespace, resource_version=resource_version,
            labels={"app.kubernetes.io/part-of": "kvmesh",
                    "app.kubernetes.io/component": "webhook-ca"}),
        type="Opaque",
        data={k: base64.b64encode(v).decode() for k, v in state.to_secret_data().items()})
    if resource_version is None:
        await core.create_namespaced_secret(namespace, body)
    else:
        await core.replace_namespaced_secret(names.CA_SECRET, namespace, body)


async def live_bundle(adm: client.AdmissionregistrationV1Api) -> tuple[bytes, bool]:
    """(the caBundle every kvmesh webhook entry carries, whether all entries agree).

    A bundle is only "live" if every entry has it: the API server calls each entry with its
    own bundle."""
    try:
        mwc = await adm.read_mutating_webhook_configuration(names.WEBHOOK_CONFIGURATION)
    except ApiException as e:
        if e.status == 404:
            return b"", False
        raise
    bundles = [base64.b64decode(w.client_config.ca_bundle or "") for w in mwc.webhooks or []]
    if not bundles:
        return b"", False
    return bundles[0], all(b == bundles[0] for b in bundles)


async def apply_bundle(adm: client.AdmissionregistrationV1Api, bundle_pem: bytes) -> None:
    """Server-side apply of clientConfig.caBundle on every kvmesh webhook entry."""
    mwc = await adm.read_mutating_webhook_configuration(names.WEBHOOK_CONFIGURATION)
    encoded = base64.b64encode(bundle_pem).decode()
    patch = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": names.WEBHOOK_CONFIGURATION},
        "webhooks": [{"name": w.name, "clientConfig": {"caBundle": encoded}}
                     for w in mwc.webhooks or []],
    }
    await adm.patch_mutating_webhook_configuration(
        names.WEBHOOK_CONFIGURATION, patch, field_manager=names.FIELD_MANAGER_CERTS, force=True,
        _content_type="application/apply-patch+yaml")


async def reconcile(core: client.CoreV1Api, adm: client.AdmissionregistrationV1Api,
                    now: Optional[dt.datetime] = None,
                    validity: dt.timedelta = authority.CA_VALIDITY) -> str:
    """One pass of the leader's certificate loop. Returns what it did (for logs/tests)."""
    now = now or _now()
    state, rv = await read_ca(core)
    live, consistent = await live_bundle(adm)
    desired = authority.plan_ca(state, live if consistent else b"", now, validity)
    actions = []
    if desired != state:
        await write_ca(core, desired, rv)
        actions.append("ca-secret-written" if state else "ca-created")
        if state and desired.current != state.current:
            actions.append("ca-promoted")
    if not consistent or live != desired.bundle_pem:
        try:
            await apply_bundle(adm, desired.bundle_pem)
            actions.append("bundle-repaired" if live else "bundle-applied")
        except ApiException as e:
            if e.status != 404:
                raise
            actions.append("no-webhook-configuration")
    return ",".join(actions) or "in-sync"
