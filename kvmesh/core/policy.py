"""Policy defaults: the knobs a cluster operator sets once (pure, no I/O).

Field defaults here are the single source of every default port, size and timing kvmesh uses.
The same model is the `spec.defaults` of a KVMeshPolicy and the `--policy` file of the CLI.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kvmesh.core import groups, names

_HOSTPORT = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?:([0-9]{1,5})$")
_GROUP = groups.GROUP_NAME
# An image reference: [registry[:port]/]path[:tag][@digest], nothing a shell or YAML would split.
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:-]{0,254}(@sha256:[0-9a-f]{64})?\Z")


class PolicyDefaults(BaseModel):
    """Defaults applied to every injected pod unless a pod annotation or env overrides them."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )

    # Forces a mode for every pod this policy covers; None lets the image tag decide.
    mode: Optional[Literal["redis", "controller", "mp"]] = None
    # Used when neither annotation, policy mode, the pod's own config nor the image tag says
    # which generation runs. The in-process generation (0.3.7+) is the safer guess for new
    # images (mp needs native sidecars; docs/mp-mode.md).
    default_mode: Literal["redis", "controller", "mp"] = names.MODE_CONTROLLER
    group: str = names.DEFAULT_GROUP
    # LMCache's own default is 5 GB; P2P serves only from this CPU tier.
    cpu_cache_gb: float = Field(default=5.0, gt=0, le=4096)
    chunk_size: int = Field(default=256, ge=1, le=1_048_576)
    # Maintainers' advice (LMCache#1799): one fixed PYTHONHASHSEED for every sharing pod.
    hash_seed: int = Field(default=0, ge=0, le=4294967295)
    # Worker heartbeats must beat the controller's reaper timeout, or healthy workers vanish
    # (LMCache PR #4808).
    heartbeat_seconds: int = Field(default=10, ge=1, le=3600)
    worker_timeout_seconds: int = Field(default=30, ge=2, le=86400)
    distributed_port: int = Field(default=8200, ge=1, le=65535)
    p2p_init_port: int = Field(default=8200, ge=1, le=65535)
    p2p_lookup_port: int = Field(default=8210, ge=1, le=65535)
    worker_port: int = Field(default=8500, ge=1, le=65535)
    redis_port: int = Field(default=6379, ge=1, le=65535)
    controller_pull_port: int = Field(default=8300, ge=1, le=65535)
    controller_reply_port: int = Field(default=8400, ge=1, le=65535)
    # mp mode: the `lmcache server` sidecar's request port (peers send lookups there), its NIXL
    # handshake port and its loopback-only HTTP port; each moved up past ports the pod uses.
    mp_rpc_port: int = Field(default=5555, ge=1, le=65535)
    mp_p2p_port: int = Field(default=8200, ge=1, le=65535)
    mp_http_port: int = Field(default=8080, ge=1, le=65535)
    # mp mode: "all" gives the server sidecar every GPU of the node through
    # NVIDIA_VISIBLE_DEVICES (zero-copy CUDA IPC where the runtime honours it); "none" keeps
    # it GPU-less (engine-driven transfer) unless the vLLM container's GPUs come from a DRA
    # claim the sidecar can share (docs/mp-mode.md §3).
    mp_gpu_visibility: Literal["none", "all"] = "none"
    # An external Redis (host:port) instead of the group's own; the controller then purges there.
    redis_address: Optional[str] = None
    # The image of a controller-mode group's lookup service (lmcache_controller). Unset: LMCache's
    # published image of the group's LMCache version (lookup.controller_image); never a member's
    # image, since any pod of the namespace could otherwise pick what kvmesh runs.
    controller_image: Optional[str] = None

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        if not _GROUP.match(v):
            raise ValueError(
                "group must be 1-32 lowercase letters, digits or '-', starting and ending "
                "with a letter or digit"
            )
        return v

    @field_validator("controller_image")
    @classmethod
    def _controller_image(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _IMAGE.match(v):
            raise ValueError(f"controllerImage {v[:80]!r} is not an image reference "
                             "(e.g. lmcache/vllm-openai:v0.3.9 or name@sha256:<64 hex>)")
        return v

    @field_validator("redis_address")
    @classmethod
    def _redis_address(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        m = _HOSTPORT.match(v)
        # LMCache splits the URL on ':' and has no scheme, auth or IPv6 support
        # (docs/lmcache-contract.md, redis mode).
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(
                f"redisAddress {v!r} must be host:port without scheme (LMCache splits on ':')"
            )
        return v

    @model_validator(mode="after")
    def _heartbeat_below_timeout(self) -> "PolicyDefaults":
        if self.heartbeat_seconds >= self.worker_timeout_seconds:
            raise ValueError(
                f"heartbeatSeconds ({self.heartbeat_seconds}) must be below "
                f"workerTimeoutSeconds ({self.worker_timeout_seconds}), or the LMCache "
                "controller reaps healthy workers"
            )
        return self


def load_defaults(data: dict | None) -> PolicyDefaults:
    """Accepts either bare defaults or a KVMeshPolicy object (uses spec.defaults)."""
    if not data:
        return PolicyDefaults()
    if isinstance(data, dict) and data.get("kind") == "KVMeshPolicy":
        data = (data.get("spec") or {}).get("defaults") or {}
    return PolicyDefaults.model_validate(data)


# --- cluster policies (KVMeshPolicy objects) -------------------------------------------------


class LabelSelectorRequirement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


class LabelSelector(BaseModel):
    """metav1.LabelSelector. An empty selector matches everything (Kubernetes semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel,
                              populate_by_name=True)
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: tuple[LabelSelectorRequirement, ...] = ()

    def matches(self, labels: dict) -> bool:
        labels = labels or {}
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for r in self.match_expressions:
            has = r.key in labels
            if r.operator == "In" and not (has and labels[r.key] in r.values):
                return False
            if r.operator == "NotIn" and has and labels[r.key] in r.values:
                return False
            if r.operator == "Exists" and not has:
                return False
            if r.operator == "DoesNotExist" and has:
                return False
        return True

    def to_api(self) -> dict:
        out: dict = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [
                {"key": r.key, "operator": r.operator, **({"values": list(r.values)}
                                                          if r.values else {})}
                for r in self.match_expressions]
        return out


class Policy(BaseModel):
    """A KVMeshPolicy: which pods it enables (without touching them) and their defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel,
                              populate_by_name=True)
    name: str
    namespace_selector: LabelSelector = Field(default_factory=LabelSelector)
    pod_selector: LabelSelector = Field(default_factory=LabelSelector)
    failure_policy: Literal["Ignore", "Fail"] = "Ignore"
    defaults: PolicyDefaults = Field(default_factory=PolicyDefaults)

    def selects(self, namespace_labels: dict, pod_labels: dict) -> bool:
        return self.namespace_selector.matches(namespace_labels) and \
            self.pod_selector.matches(pod_labels)


def describe(e: ValidationError) -> str:
    """A pydantic error as one line naming each bad field (for users, logs and status)."""
    return "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())


def policy_from_object(obj: dict) -> Policy:
    """KVMeshPolicy object -> Policy; raises pydantic.ValidationError on a bad spec."""
    spec = obj.get("spec") or {}
    return Policy.model_validate({"name": obj["metadata"]["name"], **spec})


def select_policy(policies: list[Policy], namespace_labels: dict, pod_labels: dict
                  ) -> Optional[Policy]:
    """The policy governing a pod: the first, by name, whose selectors match it.

    Precedence of settings for a pod: its kvmesh.dev/* annotations > this policy's defaults >
    the installation's defaults (the webhook's --policy file, else built-in)."""
    for p in sorted(policies, key=lambda p: p.name):
        if p.selects(namespace_labels, pod_labels):
            return p
    return None
