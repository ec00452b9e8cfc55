"""The webhook's watch-fed view of KVMeshPolicies and namespace labels.

Admission never calls the API: it reads this cache, which two list-then-watch informers keep
current. A policy whose spec does not validate is left out (and logged); the controller
reports it on the policy's status.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Optional

from pydantic import ValidationError

from kvmesh.core.policy import (Policy, PolicyDefaults, describe, policy_from_object,
                                select_policy)
from kvmesh.kube.api import Kube
from kvmesh.kube.facade import policy_informer

log = logging.getLogger("kvmesh.policy")


@dataclass(frozen=True)
class PolicySnapshot:
    """The cache's view at one version, picklable: what the worker process resolves with."""

    policies: tuple[Policy, ...]
    namespace_labels: dict
    fallback: PolicyDefaults

    def __call__(self, namespace: str, pod_labels: dict
                 ) -> tuple[PolicyDefaults, Optional[str]]:
        p = select_policy(list(self.policies), self.namespace_labels.get(namespace, {}),
                          pod_labels)
        return (p.defaults, p.name) if p else (self.fallback, None)


class PolicyCache:
    def __init__(self, kube: Kube, fallback: PolicyDefaults):
        self.fallback = fallback
        self.policies: dict[str, Policy] = {}
        self.namespace_labels: dict[str, dict] = {}
        self.version = 0  # bumped on every change the resolution could see
        self._policies = policy_informer(kube, [self._on_policy])
        self._namespaces = kube.informer("v1", "Namespace", handlers=[self._on_namespace],
                                         name="namespaces")

    def _on_policy(self, type_: str, obj: dict, old: Optional[dict]) -> None:
        name = obj["metadata"]["name"]
        self.version += 1
        if type_ == "DELETED":
            self.policies.pop(name, None)
            return
        if old is not None and old.get("spec") == obj.get("spec") and name in self.policies:
            # A status update: keep the parsed policy (same object, so the admission memo,
            # keyed by the defaults' identity, stays valid).
            return
        try:
            self.policies[name] = policy_from_object(obj)
        except ValidationError as e:
            self.policies.pop(name, None)
            log.error("KVMeshPolicy %s is invalid and ignored: %s", name, describe(e))

    def _on_namespace(self, type_: str, obj: dict, old: Optional[dict]) -> None:
        name = obj["metadata"]["name"]
        self.version += 1
        if type_ == "DELETED":
            self.namespace_labels.pop(name, None)
        else:
            self.namespace_labels[name] = obj["metadata"].get("labels") or {}

    def resolve(self, namespace: str, pod_labels: dict) -> tuple[PolicyDefaults, Optional[str]]:
        p = select_policy(list(self.policies.values()),
                          self.namespace_labels.get(namespace, {}), pod_labels)
        return (p.defaults, p.name) if p else (self.fallback, None)

    def snapshot(self) -> PolicySnapshot:
        return PolicySnapshot(tuple(self.policies.values()), dict(self.namespace_labels),
                              self.fallback)

    def ready(self) -> bool:
        return self._policies.has_synced.is_set() and self._namespaces.has_synced.is_set()

    async def run(self) -> None:
        await asyncio.gather(self._policies.run(), self._namespaces.run())
