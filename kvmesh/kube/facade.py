"""What the processes need of the API, named for what it is: the controller Mesh's facade and
the KVMeshPolicy informer both processes keep (the controller for status, every webhook
replica for admission)."""

from __future__ import annotations

from typing import Iterable, Optional

from kvmesh.core import groups, names
from kvmesh.kube.api import CRD_API, Kube
from kvmesh.kube.informer import Handler, Informer


def policy_informer(kube: Kube, handlers: Iterable[Handler]) -> Informer:
    """The cluster's KVMeshPolicies, list-then-watch."""
    return kube.informer(CRD_API, "KVMeshPolicy", handlers=handlers, name="kvmeshpolicies")


class MeshClient:
    """The few API operations the controller's Mesh performs, plain dicts in and out.

    Tests give Mesh a fake with these methods instead of an API server."""

    def __init__(self, kube: Kube):
        self.kube = kube

    def peer_pods(self, handler: Handler) -> Informer:
        """Every pod kvmesh injected (they carry the peer-group label), in all namespaces,
        each stored as the compact record the controller reads (groups.compact_pod)."""
        return self.kube.informer("v1", "Pod", label_selector=names.LABEL_PEER_GROUP,
                                  handlers=[handler], name="kvmesh peer pods",
                                  transform=groups.compact_pod)

    async def lookup_pods(self, namespace: str, group_label: str) -> list[dict]:
        """The pods of one peer group's lookup service."""
        return await self.kube.list("v1", "Pod", namespace,
                                    label_selector=f"{names.LABEL_LOOKUP_FOR}={group_label}")

    async def replica_set(self, namespace: str, name: str) -> Optional[dict]:
        return await self.kube.get("apps/v1", "ReplicaSet", name, namespace)

    async def network_policies(self, namespace: str) -> list[dict]:
        return await self.kube.list("networking.k8s.io/v1", "NetworkPolicy", namespace)

    async def peer_groups(self) -> list[dict]:
        """Every KVMeshPeerGroup, in all namespaces."""
        return await self.kube.list(CRD_API, names.PEER_GROUP_KIND)

    async def apply(self, obj: dict, subresource: Optional[str] = None) -> dict:
        return await self.kube.apply(obj, subresource=subresource)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        return await self.kube.delete(api_version, kind, name, namespace)

    async def redis_master_key(self) -> bytes:
        """The master key of the group Redis passwords (Secret names.REDIS_AUTH_SECRET in
        kvmesh-system), created on first use; a concurrent creator's key wins."""
        return await self._system_key(names.REDIS_AUTH_SECRET, "master-key")

    async def hash_seed_key(self) -> bytes:
        """The key of the per-group PYTHONHASHSEEDs (Secret names.HASH_SEED_SECRET in
        kvmesh-system, core.hashseed), created on first use; the webhook reads it."""
        from kvmesh.core import hashseed
        return await self._system_key(names.HASH_SEED_SECRET, hashseed.KEY_FIELD)

    async def _system_key(self, secret: str, field: str) -> bytes:
        """32 random bytes kept in `secret` (kvmesh-system) under `field`: read, or created
        when absent (create is atomic: of two concurrent creators one gets 409 and reads)."""
        import base64
        import os
        from kvmesh.kube.api import ApiError
        for _ in range(3):
            got = await self.kube.get("v1", "Secret", secret, names.SYSTEM_NAMESPACE)
            if got is not None:
                return base64.b64decode((got.get("data") or {})[field])
            try:
                await self.kube.create({
                    "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": secret, "namespace": names.SYSTEM_NAMESPACE,
                                 "labels": {"app.kubernetes.io/part-of": "kvmesh"}},
                    "data": {field: base64.b64encode(os.urandom(32)).decode()}})
            except ApiError as e:
                if e.status != 409:
                    raise
        raise RuntimeError(f"Secret {names.SYSTEM_NAMESPACE}/{secret} "
                           "neither readable nor creatable")

    async def event(self, involved: dict, reason: str, message: str,
                    type_: str = "Normal") -> None:
        await self.kube.event(involved, reason, message, type_)
