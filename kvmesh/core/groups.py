"""Peer groups and membership (pure: pods in, members and departures out).

A peer is a Running, Ready pod with an IP whose vLLM container kvmesh injected. The moment a
peer stops being one (deleted, terminating, not ready, new IP, restarted container), its
lookup state must go: its Redis keys (redis mode) or its LMCache controller registration
(controller mode). `departure` decides that from two consecutive views of one pod.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from kvmesh.core import names
from kvmesh.core import contract

# A peer group's name (policy defaults and the pod annotation): it ends up in object names.
GROUP_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?\Z")
# Worker ports read from a pod (one per rank); more is not a pod kvmesh injected.
MAX_RANKS = 1024


@dataclass(frozen=True, order=True)
class PeerGroupId:
    """Which peer group: its lookup mode and its name. Its `label` ("<mode>-<group>") is the
    pods' peer-group label value and the name of its KVMeshPeerGroup and lookup objects."""

    mode: str
    group: str

    @property
    def label(self) -> str:
        return names.group_id(self.mode, self.group)

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Member:
    namespace: str
    name: str
    uid: str
    peer_group: PeerGroupId
    ip: Optional[str]
    ready: bool
    terminating: bool
    restarts: int
    # redis mode: the address its keys carry; controller mode: instance id, ranks, ports
    address: Optional[str] = None
    instance_id: Optional[str] = None
    worker_ports: tuple[int, ...] = ()
    image: str = ""
    policy: Optional[str] = None  # the KVMeshPolicy whose defaults the webhook used
    # Its kvm-* containerPorts (what peers connect to) and the pod's labels (which
    # NetworkPolicies select it), sorted.
    p2p_ports: tuple[int, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    # What must be equal across a group for its chunk keys to match (core.health).
    hash_seed: Optional[str] = None
    chunk_size: Optional[str] = None
    # mp mode: the server sidecar has stopped for good (terminated, or the pod Failed/Succeeded)
    server_stopped: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def mode(self) -> str:
        return self.peer_group.mode

    @property
    def group(self) -> str:
        return self.peer_group.group

    @property
    def group_key(self) -> tuple[str, PeerGroupId]:
        return self.namespace, self.peer_group

    @property
    def is_peer(self) -> bool:
        return bool(self.ip) and self.ready and not self.terminating

    @property
    def token(self) -> Optional[str]:
        """What identifies its lookup state: the Redis value, or the LMCache instance id."""
        return self.address if self.mode == names.MODE_REDIS else self.instance_id


@dataclass(frozen=True)
class Departure:
    member: Member  # the incarnation whose lookup state must go
    reason: str  # deleted | terminating | not-ready | ip-changed | restarted

    @property
    def what(self) -> str:
        m = self.member
        if m.mode == names.MODE_MP:
            return f"coordinator registration {m.instance_id}"
        return (f"{m.address}" if m.mode == names.MODE_REDIS
                else f"instance {m.instance_id} ({len(m.worker_ports)} ranks)")


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}


def _mp_sidecar(pod: dict) -> tuple[Optional[dict], dict]:
    """mp mode: the `lmcache server` native sidecar (initContainers[MP_SIDECAR]) and its
    status (initContainerStatuses; {} when none is reported yet)."""
    spec = next((c for c in (pod.get("spec") or {}).get("initContainers") or []
                 if isinstance(c, dict) and c.get("name") == names.MP_SIDECAR), None)
    st = next((cs for cs in (pod.get("status") or {}).get("initContainerStatuses") or []
               if isinstance(cs, dict) and cs.get("name") == names.MP_SIDECAR), None)
    return spec, st or {}


def _kvm_ports(container: dict) -> list[dict]:
    return [{"name": p.get("name"), "containerPort": p.get("containerPort")}
            for p in container.get("ports") or [] if isinstance(p, dict)
            and str(p.get("name", "")).startswith(names.PORT_NAME_PREFIX)]


# The env of the injected container that member_from_pod reads; nothing else of it is kept.
MEMBER_ENV = ("LMCACHE_DISTRIBUTED_URL", "LMCACHE_LMCACHE_INSTANCE_ID",
              "LMCACHE_LMCACHE_WORKER_PORTS", "PYTHONHASHSEED", "LMCACHE_CHUNK_SIZE")


def compact_pod(pod: dict) -> dict:
    """The part of an injected pod the controller reads (member_from_pod, the owner of its
    Events, the not-injected check): what its pod cache stores instead of the whole object.
    member_from_pod(compact_pod(p)) == member_from_pod(p) for every pod (tests/core)."""
    meta = pod.get("metadata") or {}
    ann = meta.get("annotations") or {}
    cmeta: dict = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                        "deletionTimestamp", "labels") if k in meta}
    if names.ANN_STATUS in ann:
        cmeta["annotations"] = {names.ANN_STATUS: ann[names.ANN_STATUS]}
    owners = [{k: o.get(k) for k in ("apiVersion", "kind", "name", "uid", "controller")}
              for o in meta.get("ownerReferences") or [] if isinstance(o, dict)
              and o.get("controller")]
    if owners:
        cmeta["ownerReferences"] = owners
    try:
        wanted = json.loads(ann.get(names.ANN_STATUS, "{}")).get("container")
    except (ValueError, AttributeError):
        wanted = None
    containers = []
    for c in (pod.get("spec") or {}).get("containers") or []:
        if not isinstance(c, dict) or c.get("name") != wanted:
            continue
        containers.append({
            "name": c.get("name"), "image": c.get("image", ""),
            "env": [e for e in c.get("env") or []
                    if isinstance(e, dict) and e.get("name") in MEMBER_ENV],
            "ports": _kvm_ports(c)})
    st = pod.get("status") or {}
    cstatus: dict = {k: st[k] for k in ("phase", "podIP") if k in st}
    cstatus["conditions"] = [{"type": c.get("type"), "status": c.get("status")}
                             for c in st.get("conditions") or []
                             if isinstance(c, dict) and c.get("type") == "Ready"]
    cstatus["containerStatuses"] = [
        {"name": cs.get("name"), "restartCount": cs.get("restartCount", 0)}
        for cs in st.get("containerStatuses") or []
        if isinstance(cs, dict) and cs.get("name") == wanted]
    spec: dict = {"containers": containers}
    sidecar, sidecar_st = _mp_sidecar(pod)
    if sidecar is not None:
        spec["initContainers"] = [{"name": names.MP_SIDECAR, "ports": _kvm_ports(sidecar)}]
    if sidecar_st:
        state = sidecar_st.get("state")
        cstatus["initContainerStatuses"] = [{
            "name": names.MP_SIDECAR, "restartCount": sidecar_st.get("restartCount", 0),
            "state": {k: {} for k in state} if isinstance(state, dict) else {}}]
    return {"apiVersion": pod.get("apiVersion", "v1"), "kind": pod.get("kind", "Pod"),
            "metadata": cmeta, "spec": spec, "status": cstatus}


def member_from_pod(pod: dict) -> Optional[Member]:
    """The member view of an injected pod, or None if kvmesh did not inject it."""
    meta = pod.get("metadata") or {}
    labelled = (meta.get("labels") or {}).get(names.LABEL_PEER_GROUP)
    try:
        status = json.loads((meta.get("annotations") or {}).get(names.ANN_STATUS, "{}"))
    except (ValueError, TypeError, RecursionError):
        return None
    if not labelled or not isinstance(status, dict) or not status.get("injected"):
        return None
    mode, group = status.get("mode"), status.get("group", names.DEFAULT_GROUP)
    # The status annotation is pod-controlled input (anyone who can create a pod can write
    # it): a group name that does not fit the derived object names makes no member.
    if (not isinstance(mode, str) or mode not in names.MODES or not isinstance(group, str)
            or not GROUP_NAME.match(group)):
        return None
    container = next((c for c in (pod.get("spec") or {}).get("containers") or []
                      if isinstance(c, dict) and c.get("name") == status.get("container")), None)
    if container is None:
        return None
    pstatus = pod.get("status") or {}
    ip = pstatus.get("podIP") or None
    conditions = {c.get("type"): c.get("status") for c in pstatus.get("conditions") or []}
    ready = pstatus.get("phase") == "Running" and conditions.get("Ready") == "True"
    restarts = sum(cs.get("restartCount", 0) for cs in pstatus.get("containerStatuses") or []
                   if cs.get("name") == container.get("name"))
    env = _env(container)
    address = instance = None
    ports: tuple[int, ...] = ()
    stopped = False
    port_sources = [container]
    if mode == names.MODE_MP:
        restarts, instance, stopped, sidecar = _mp_identity(pod)
        port_sources += [sidecar] if sidecar is not None else []
    elif mode == names.MODE_REDIS:
        url = (env.get("LMCACHE_DISTRIBUTED_URL") or {}).get("value", "")
        port = url.rsplit(":", 1)[-1] if ":" in url else ""
        address = f"{ip}:{port}" if ip and port.isdigit() else None
    else:
        ref = ((env.get("LMCACHE_LMCACHE_INSTANCE_ID") or {}).get("valueFrom") or {}) \
            .get("fieldRef", {}).get("fieldPath")
        instance = {contract.INSTANCE_FROM_NAME: meta.get("name"),
                    contract.INSTANCE_FROM_UID: meta.get("uid")}.get(ref) or \
            (env.get("LMCACHE_LMCACHE_INSTANCE_ID") or {}).get("value")
        raw = (env.get("LMCACHE_LMCACHE_WORKER_PORTS") or {}).get("value", "")
        ports = tuple(int(p) for p in raw.split(",")[:MAX_RANKS]
                      if p.strip().isdigit() and 0 < int(p) <= 65535)
    p2p = sorted({p["containerPort"] for c in port_sources for p in c.get("ports") or []
                  if isinstance(p, dict) and isinstance(p.get("containerPort"), int)
                  and str(p.get("name", "")).startswith(names.PORT_NAME_PREFIX)})
    return Member(namespace=meta.get("namespace", ""), name=meta.get("name", ""),
                  uid=meta.get("uid", ""), peer_group=PeerGroupId(mode, group), ip=ip,
                  ready=ready, terminating=bool(meta.get("deletionTimestamp")),
                  restarts=restarts, address=address, instance_id=instance,
                  worker_ports=ports, image=str(container.get("image", "")),
                  policy=status.get("policy"), p2p_ports=tuple(p2p),
                  labels=tuple(sorted((meta.get("labels") or {}).items())),
                  hash_seed=_str_value(env.get("PYTHONHASHSEED")),
                  chunk_size=_str_value(env.get("LMCACHE_CHUNK_SIZE")),
                  server_stopped=stopped)


def _str_value(entry: Optional[dict]) -> Optional[str]:
    """A plain env value as a short string; None for valueFrom or absent (not comparable)."""
    v = (entry or {}).get("value")
    return str(v)[:32] if v is not None else None


def _mp_identity(pod: dict) -> tuple[int, str, bool, Optional[dict]]:
    """mp mode: the registration belongs to the server sidecar, not to vLLM: its restarts
    count, and its id names the pod and the incarnation (docs/mp-mode.md §5). Returns
    (restarts, instance id, server stopped for good, the sidecar)."""
    sidecar, st = _mp_sidecar(pod)
    n = st.get("restartCount", 0)
    restarts = n if _is_count(n) else 0
    uid = (pod.get("metadata") or {}).get("uid", "")
    stopped = ((pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")
               or "terminated" in (st.get("state") or {}))
    return restarts, names.mp_instance_id(uid, restarts + 1), stopped, sidecar


def _is_count(n) -> bool:
    return type(n) is int and 0 <= n < 1 << 31


def departure(old: Optional[Member], new: Optional[Member]) -> Optional[Departure]:
    """Does this change end `old`'s life as a peer? (None when nothing to purge.)"""
    if old is None or not old.is_peer and old.ip is None:
        return None
    # Only state that was published can be stale: a pod that never became a peer may still
    # have stored chunks while starting (LMCache publishes as it stores), so any member with
    # an IP counts.
    if new is None:
        return Departure(old, "deleted")
    if new.uid != old.uid:
        return Departure(old, "deleted")
    if new.ip != old.ip and old.ip:
        return Departure(old, "ip-changed")
    if new.restarts > old.restarts:
        return Departure(old, "restarted")
    if new.server_stopped and not old.server_stopped:
        return Departure(old, "server-stopped")
    if new.terminating and not old.terminating:
        return Departure(old, "terminating")
    if old.ready and not new.ready:
        return Departure(old, "not-ready")
    return None


@dataclass
class Group:
    namespace: str
    peer_group: PeerGroupId
    members: dict[str, Member] = field(default_factory=dict)  # by pod name

    @property
    def peers(self) -> list[Member]:
        return [m for m in self.members.values() if m.is_peer]


def groups_of(members: list[Member]) -> dict[tuple[str, PeerGroupId], Group]:
    """Members by (namespace, group)."""
    out: dict[tuple[str, PeerGroupId], Group] = {}
    for m in members:
        g = out.setdefault(m.group_key, Group(m.namespace, m.peer_group))
        g.members[m.name] = m
    return out


def arrival(old: Optional[Member], new: Optional[Member]) -> Optional[Departure]:
    """A new incarnation takes an address for the first time (pod IP reused). Anything the
    lookup service holds under that address predates this pod, whose engine cannot have
    stored yet (it is not even ready), so it is stale: purge it before peers trust it."""
    if new is None or new.ready or not new.token:
        return None
    if old is not None and old.uid == new.uid and old.token == new.token:
        return None
    return Departure(new, "address-reused")


def departed_during_gap(peers_status: list[str], group: Optional[Group], gid: PeerGroupId,
                        namespace: str) -> list[Departure]:
    """Peers a previous leader recorded (`name=token`) that are gone now, or whose token now
    belongs to another pod: they died while no controller watched (leader failover)."""
    current = {m.name: m.token for m in (group.members.values() if group else [])}
    out = []
    for entry in peers_status or []:
        name, _, token = entry.partition("=")
        if not token or current.get(name) == token:
            continue
        redis = gid.mode == names.MODE_REDIS
        m = Member(namespace=namespace, name=name, uid="", peer_group=gid,
                   ip=token.rsplit(":", 1)[0] if redis else None, ready=True,
                   terminating=False, restarts=0, address=token if redis else None,
                   instance_id=None if redis else token)
        out.append(Departure(m, "departed-while-unwatched"))
    return out


def live_addresses(members: list[Member]) -> set[str]:
    """Redis values that belong to live peers (never purged by reconciliation)."""
    return {m.address for m in members if m.mode == names.MODE_REDIS and m.is_peer
            and m.address}
