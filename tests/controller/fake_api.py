"""A stand-in for kvmesh.kube.facade.MeshClient: what Mesh asked of the API, answered from
plain lists, recorded for the test to check."""

from __future__ import annotations

from typing import Optional

from kvmesh.kube.informer import Informer


class FakeMeshClient:
    def __init__(self) -> None:
        self.network_policies_listed: list[dict] | Exception = []  # or what listing raises
        self.lookup: list[dict] = []  # lookup-service pods
        self.groups: list[dict] = []  # KVMeshPeerGroups
        self.replica_sets: dict[tuple[str, str], dict] = {}
        self.applied: list[dict] = []
        self.status_applied: list[dict] = []
        self.deleted: list[tuple[str, str, str]] = []
        self.events: list[tuple[dict, str, str, str]] = []

    def peer_pods(self, handler) -> Informer:
        async def never(**kw):
            raise AssertionError("the fake API has no pod watch; feed Mesh._on_pod directly")
        return Informer(never, handlers=[handler], name="fake peer pods")

    async def lookup_pods(self, namespace: str, group_label: str) -> list[dict]:
        return [p for p in self.lookup if p["metadata"]["namespace"] == namespace]

    async def replica_set(self, namespace: str, name: str) -> Optional[dict]:
        return self.replica_sets.get((namespace, name))

    async def network_policies(self, namespace: str) -> list[dict]:
        if isinstance(self.network_policies_listed, Exception):
            raise self.network_policies_listed
        return list(self.network_policies_listed)

    async def peer_groups(self) -> list[dict]:
        return list(self.groups)

    async def apply(self, obj: dict, subresource: Optional[str] = None) -> dict:
        (self.status_applied if subresource == "status" else self.applied).append(obj)
        meta = obj["metadata"]
        return {**obj, "metadata": {**meta, "uid": f"uid-{meta['name']}"}}

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        self.deleted.append((kind, namespace, name))
        return True

    async def hash_seed_key(self) -> bytes:
        return b"s" * 32

    async def redis_master_key(self) -> bytes:
        return b"k" * 32

    async def event(self, involved: dict, reason: str, message: str,
                    type_: str = "Normal") -> None:
        self.events.append((involved, reason, message, type_))
