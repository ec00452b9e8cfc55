"""Desired Kubernetes objects for one peer group's lookup service and P2P ports (pure).

Every object is owned by the group's KVMeshPeerGroup, so deleting that object (after the
last member left and the grace period passed) lets Kubernetes garbage collection remove the
whole lookup service.

redis mode: a Redis Deployment + Service. The Service's port targets the port Redis really
listens on (the seed chart targeted 8080 while Redis listened on 6379), no persistence (the
index is only hints), `maxmemory` with LRU so it cannot grow without bound, keyspace
notifications for the controller's reverse index.

controller mode: `lmcache_controller` as a one-replica StatefulSet started with flags (its
env settings are overridden by argparse defaults), heartbeat port on, health check on, the
image the policy names (`controllerImage`, default names.LMCACHE_CONTROLLER_IMAGE); bound to its stable DNS name so the heartbeat URL it hands
out survives a reschedule.

mp mode: `lmcache coordinator` (LMCache's multiprocess generation, docs/mp-mode.md §2) as a
Deployment with exactly one replica and `strategy: Recreate` (two coordinators behind one
Service would split the membership), `--chunk-size` and `--hash-algorithm` equal to the
servers', a 1 s health sweep and a 10 s instance timeout (the backstop for deaths the controller
does not see), readiness and liveness on `GET /healthz`.

NetworkPolicies (both Ingress only): `kvmesh-lookup-<gid>` lets only the group's pods (and
kvmesh) reach the lookup service. `kvmesh-peers-<gid>` selects the group's vLLM pods and lets
only the group's pods reach their P2P ports (`kvm-*` containerPorts), and in controller mode the
group's `lmcache_controller` reach their worker ports (control RPCs, health checks). A policy
can only allow, and selecting a pod isolates it, so while no user policy selects the group's
pods it also allows every other TCP port (as ranges) and all UDP and SCTP from anywhere: only
the P2P ports become fenced. Once a user policy selects any member, kvmesh drops that rule and
only adds the P2P allowances, so it never widens what the user's policies allow; members that
no user policy selects are then reachable on their P2P ports only (the mesh logs a warning).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable, Optional

from pydantic import ValidationError

from kvmesh.core import contract, hashseed, mp, names
from kvmesh.core.groups import PeerGroupId
from kvmesh.core.policy import LabelSelector, PolicyDefaults

# Pods kvmesh creates run as this non-root user, under PodSecurity `restricted`.
LOOKUP_UID = 65532

REDIS_IMAGE = "redis:7.2-alpine"
REDIS_MAXMEMORY_MB = 1024
# Keyspace events for the controller's reverse index: keyevent notifications of string
# commands (SET). The controller also sets this itself on connect.
REDIS_NOTIFY = names.REDIS_NOTIFY_FLAGS
# A burst of chunk stores must not drop the controller's subscription (default hard limit
# 32 MB); a drop costs a full reconciliation.
REDIS_PUBSUB_BUFFER = "pubsub 256mb 64mb 60"
# Redis's protected mode (on by default in upstream and Debian builds; the official image
# patches it off) refuses every client outside loopback with -DENIED while the default user
# has no password, which LMCache's pods need (below). Who may connect is the lookup
# NetworkPolicy's job and what they may do the ACLs'; so it is off for any image.
REDIS_PROTECTED_MODE_OFF = ("--protected-mode", "no")
# Redis ACLs of a group's lookup Redis.
# Pods (LMCache) are Redis's `default` user: LMCache 0.3.6's RedisLookupServer connects with
# `redis.Redis(host=..., port=..., decode_responses=True)` and no credentials
# (lmcache/v1/lookup_server/redis_server.py:30-32; lookup_url is split as "host:port" at :26,
# so there is no place for a user or password). It runs GET (:41), SET (:55, :66) and DEL
# (:73, :82), on keys CacheEngineKey.to_string names "<fmt>@..." with fmt "vllm"
# (lmcache/utils.py:149-156; lmcache/integration/vllm/vllm_v1_adapter.py:473, utils.py:154).
# So the default user gets exactly those commands (and PING, for the liveness probe) on
# `vllm@*` keys: no CONFIG, REPLICAOF, FLUSH*, DEBUG, SCRIPT/EVAL, KEYS, SCAN, SUBSCRIBE, and
# no access to kvmesh's own `kvmesh:*` index. kvmesh's controller is user `kvmesh` with a
# password (only its SHA-256 is in the pod spec; the Secret holds it for the controller).
REDIS_POD_COMMANDS = ("get", "set", "del", "ping")
REDIS_POD_KEYS = "vllm@*"
REDIS_KVMESH_USER = "kvmesh"
# kvmesh's user: everything but the dangerous class, plus the CONFIG subcommands it uses to
# turn keyevent notifications on (a restarted Redis forgets them).
REDIS_KVMESH_RULES = ("~*", "&*", "+@all", "-@dangerous", "+config|get", "+config|set",
                      "+info")


def redis_password(master_key: bytes, namespace: str, group: str) -> str:
    """kvmesh's password for one group's Redis: derived from the master key in kvmesh-system's
    Secret (names.REDIS_AUTH_SECRET), so a restarted or new leader knows it without storing
    one per group, and no tenant namespace holds anything that opens another's Redis."""
    return hmac.new(master_key, f"{namespace}/{group}".encode(), hashlib.sha256).hexdigest()


def password_sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def redis_acl_args(kvmesh_password_sha256: str) -> list[str]:
    """redis-server arguments that set both users (see REDIS_POD_COMMANDS)."""
    if len(kvmesh_password_sha256) != 64 or any(c not in "0123456789abcdef"
                                                for c in kvmesh_password_sha256):
        raise ValueError("kvmesh's Redis password must be given as 64 lowercase hex (SHA-256)")
    return ["--user", "default", "on", "nopass", "resetkeys", "resetchannels",
            f"~{REDIS_POD_KEYS}", "-@all", *(f"+{c}" for c in REDIS_POD_COMMANDS),
            "--user", REDIS_KVMESH_USER, "on", f"#{kvmesh_password_sha256}",
            *REDIS_KVMESH_RULES]


CONTROLLER_HTTP_PORT = 9000
CONTROLLER_HEARTBEAT_PORT = 8500
HEALTH_CHECK_SECONDS = 5
# Marks every object the controller generates; how it tells its NetworkPolicies from users'.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kvmesh-controller"
NETWORK_POLICY_API = "networking.k8s.io/v1"
MAX_PORT = 65535


def owner_ref(group_obj: dict) -> dict:
    return {"apiVersion": f"{names.API_GROUP}/{names.API_VERSION}",
            "kind": names.PEER_GROUP_KIND, "name": group_obj["metadata"]["name"],
            "uid": group_obj["metadata"]["uid"], "controller": True,
            "blockOwnerDeletion": True}


def _meta(name: str, namespace: str, gid: PeerGroupId, owner: dict, component: str) -> dict:
    return {"name": name, "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "kvmesh",
                       "app.kubernetes.io/component": component,
                       MANAGED_BY_LABEL: MANAGED_BY,
                       names.LABEL_LOOKUP_FOR: gid.label},
            "ownerReferences": [owner]}


def _restricted() -> dict:
    """A container securityContext the PodSecurity `restricted` level admits."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True, "runAsUser": LOOKUP_UID, "runAsGroup": LOOKUP_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_spec(container: dict) -> dict:
    """Pod spec for a lookup service: `restricted` at pod level too, no API token (neither
    Redis nor lmcache_controller talks to the API server), a writable emptyDir for /tmp since
    the image's own directories belong to another user."""
    return {"automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": LOOKUP_UID,
                                "runAsGroup": LOOKUP_UID, "fsGroup": LOOKUP_UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{**container,
                            "env": [*container.get("env", []),
                                    {"name": "HOME", "value": "/tmp"}],
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                            "securityContext": _restricted()}],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]}


def peer_group(namespace: str, gid: PeerGroupId) -> dict:
    return {"apiVersion": f"{names.API_GROUP}/{names.API_VERSION}",
            "kind": names.PEER_GROUP_KIND,
            "metadata": {"name": gid.label, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "kvmesh"}},
            "spec": {"mode": gid.mode, "group": gid.group}}


def group_of(group_obj: dict) -> PeerGroupId:
    """The peer group a KVMeshPeerGroup object stands for."""
    return PeerGroupId(group_obj["spec"]["mode"], group_obj["spec"]["group"])


def desired(group_obj: dict, policy: PolicyDefaults,
            redis_password_sha256: Optional[str] = None,
            member_images: Iterable[str] = (),
            hash_seed_key: Optional[bytes] = None) -> list[dict]:
    """The lookup service of the group `group_obj` (its KVMeshPeerGroup) stands for. Its
    image is kvmesh's choice (controller_image), never a member's. With
    `redis_password_sha256`, the group's Redis enforces the ACLs of redis_acl_args. The
    lmcache_controller hashes tokens like its workers, so it gets the group's seed
    (hash_seed_key: the key of kvmesh.core.hashseed)."""
    ns = group_obj["metadata"]["namespace"]
    gid = group_of(group_obj)
    owner = owner_ref(group_obj)
    if gid.mode == names.MODE_REDIS:
        if policy.redis_address:
            return [network_policy(ns, gid, owner, lookup_ports=[])]  # external Redis
        return _redis(ns, gid, owner, policy, redis_password_sha256)
    if gid.mode == names.MODE_MP:  # blake3 chunk hashes: no seed
        return _mp_coordinator(ns, gid, owner, policy, mp_image(policy, member_images))
    seed = hashseed.for_group(policy.hash_seed, hash_seed_key, ns, gid.label)
    return _lmcache_controller(ns, gid, owner, policy, controller_image(policy, member_images),
                               seed)


def _published_image(policy: PolicyDefaults, member_images: Iterable[str], usable,
                     default: str) -> str:
    if policy.controller_image:
        return policy.controller_image
    versions = [v for v in map(contract.lmcache_version_from_image, member_images)
                if v is not None and usable(v)]
    if not versions:
        return default
    return f"{names.LMCACHE_IMAGE_REPO}:v{contract.fmt_version(max(versions))}"


def controller_image(policy: PolicyDefaults, member_images: Iterable[str]) -> str:
    """The policy's controllerImage; else LMCache's published image of the newest LMCache
    version the members' image tags name (lmcache_controller must speak its workers' protocol,
    whose messages change between releases, so a fixed image would break other versions'
    groups); else names.LMCACHE_CONTROLLER_IMAGE. A member can choose at most which release of
    the official image runs, never another image."""
    return _published_image(
        policy, member_images,
        lambda v: contract.mode_for_version(v) == names.MODE_CONTROLLER,
        names.LMCACHE_CONTROLLER_IMAGE)


def mp_image(policy: PolicyDefaults, member_images: Iterable[str]) -> str:
    """The coordinator's image, chosen like controller_image: the policy's controllerImage, else
    LMCache's published image of the newest member version that has MP P2P
    (mp.MIN_VERSION), else names.LMCACHE_MP_IMAGE."""
    return _published_image(policy, member_images, lambda v: v >= mp.MIN_VERSION,
                            names.LMCACHE_MP_IMAGE)


def _redis(ns: str, gid: PeerGroupId, owner: dict, policy: PolicyDefaults,
           password_sha256: Optional[str] = None) -> list[dict]:
    svc = names.lookup_service_name(gid.mode, gid.group)
    selector = {names.LABEL_LOOKUP_FOR: gid.label}
    objs: list[dict] = []
    port = policy.redis_port
    objs.append({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(svc, ns, gid, owner, "lookup-redis"),
        "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                 "template": {"metadata": {"labels": {**selector,
                                                      "app.kubernetes.io/part-of": "kvmesh"}},
                              "spec": _pod_spec({
                                  "name": "redis", "image": REDIS_IMAGE,
                                  "args": ["--port", str(port), "--save", "",
                                           *REDIS_PROTECTED_MODE_OFF,
                                           "--appendonly", "no",
                                           "--maxmemory", f"{REDIS_MAXMEMORY_MB}mb",
                                           "--maxmemory-policy", "allkeys-lru",
                                           "--notify-keyspace-events", REDIS_NOTIFY,
                                           "--client-output-buffer-limit",
                                           REDIS_PUBSUB_BUFFER,
                                           *(redis_acl_args(password_sha256)
                                             if password_sha256 else [])],
                                  "ports": [{"name": "redis", "containerPort": port}],
                                  "readinessProbe": {"tcpSocket": {"port": "redis"},
                                                     "periodSeconds": 5},
                                  "livenessProbe": {"exec": {"command": [
                                      "redis-cli", "-p", str(port), "ping"]},
                                      "periodSeconds": 10},
                                  "resources": {"requests": {"cpu": "100m",
                                                             "memory": "256Mi"},
                                                "limits": {"cpu": "1", "memory":
                                                           f"{REDIS_MAXMEMORY_MB + 256}Mi"}}})}}})
    objs.append({"apiVersion": "v1", "kind": "Service",
                 "metadata": _meta(svc, ns, gid, owner, "lookup-redis"),
                 "spec": {"selector": selector,
                          "ports": [{"name": "redis", "port": port,
                                     "targetPort": "redis"}]}})
    objs.append(network_policy(ns, gid, owner, lookup_ports=[port]))
    return objs


def _lmcache_controller(ns: str, gid: PeerGroupId, owner: dict, policy: PolicyDefaults,
                        image: str, hash_seed: Optional[int]) -> list[dict]:
    svc = names.lookup_service_name(gid.mode, gid.group)
    selector = {names.LABEL_LOOKUP_FOR: gid.label}
    objs: list[dict] = []
    headless = f"{svc}-hl"
    metrics = {"httpGet": {"path": "/metrics", "port": "http"}}
    monitor = ('{"pull":%d,"reply":%d,"heartbeat":%d}'
               % (policy.controller_pull_port, policy.controller_reply_port,
                  CONTROLLER_HEARTBEAT_PORT))
    ports = [{"name": "pull", "containerPort": policy.controller_pull_port},
             {"name": "reply", "containerPort": policy.controller_reply_port},
             {"name": "heartbeat", "containerPort": CONTROLLER_HEARTBEAT_PORT},
             {"name": "http", "containerPort": CONTROLLER_HTTP_PORT}]
    objs.append({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _meta(svc, ns, gid, owner, "lookup-lmcache-controller"),
        "spec": {"replicas": 1, "serviceName": headless, "selector": {"matchLabels": selector},
                 "template": {"metadata": {"labels": {**selector,
                                                      "app.kubernetes.io/part-of": "kvmesh"}},
                              "spec": _pod_spec({
                                  "name": "lmcache-controller", "image": image,
                                  "command": ["lmcache_controller"],
                                  # Bound to its stable per-pod DNS name: the heartbeat URL
                                  # handed to workers stays valid after a reschedule.
                                  "args": ["--host", f"$(POD_NAME).{headless}",
                                           "--port", str(CONTROLLER_HTTP_PORT),
                                           "--monitor-ports", monitor,
                                           "--health-check-interval", str(HEALTH_CHECK_SECONDS),
                                           "--lmcache-worker-timeout",
                                           str(policy.worker_timeout_seconds)],
                                  "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {
                                              "fieldPath": "metadata.name"}}},
                                          *([] if hash_seed is None else [
                                              {"name": "PYTHONHASHSEED",
                                               "value": str(hash_seed)}]),
                                          {"name": "LMCACHE_TRACK_USAGE", "value": "false"}],
                                  "ports": ports,
                                  # Starting is one Python import of LMCache with torch
                                  # and transformers: 85 s cold on a 2-core node
                                  # (docs/images.md), and on the real node under load it
                                  # outlasted the liveness budget (60 s) again and again
                                  # (tests/node/test_p2p_ctrl_real.py). Liveness waits for
                                  # the HTTP API (up to 5 min); then 5 s per answer.
                                  "startupProbe": {**metrics, "periodSeconds": 2,
                                                   "timeoutSeconds": 5,
                                                   "failureThreshold": 150},
                                  "readinessProbe": {"tcpSocket": {"port": "pull"},
                                                     "periodSeconds": 5},
                                  "livenessProbe": {**metrics, "periodSeconds": 15,
                                                    "timeoutSeconds": 5,
                                                    "failureThreshold": 4},
                                  "resources": {"requests": {"cpu": "250m", "memory": "1Gi"},
                                                "limits": {"cpu": "2", "memory": "4Gi"}},
                              })}}})
    svc_ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]}
                 for p in ports]
    objs.append({"apiVersion": "v1", "kind": "Service",
                 "metadata": _meta(headless, ns, gid, owner, "lookup-lmcache-controller"),
                 "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                          "selector": selector, "ports": svc_ports}})
    objs.append({"apiVersion": "v1", "kind": "Service",
                 "metadata": _meta(svc, ns, gid, owner, "lookup-lmcache-controller"),
                 "spec": {"selector": selector, "ports": svc_ports}})
    objs.append(network_policy(ns, gid, owner, lookup_ports=[p["containerPort"]
                                                              for p in ports]))
    return objs


# The coordinator's eviction backstop (docs/mp-mode.md §2): a server silent for this long is
# dropped from GET /instances (deaths the controller cannot see, e.g. a partitioned node). It
# must stay well above the servers' 1 s heartbeat; the sweep runs every second.
COORDINATOR_INSTANCE_TIMEOUT = 10
COORDINATOR_HEALTH_CHECK = 1


def coordinator_args(chunk_size: int) -> list[str]:
    """`lmcache coordinator`'s flags (lmcache 0.5.6 reads no environment for them,
    cli/commands/coordinator.py:248-335)."""
    return ["--host", "0.0.0.0", "--port", str(names.COORDINATOR_PORT),
            "--chunk-size", str(chunk_size), "--hash-algorithm", mp.HASH_ALGORITHM,  # the servers' (pin/blend keys)
            "--instance-timeout", str(COORDINATOR_INSTANCE_TIMEOUT),
            "--health-check-interval", str(COORDINATOR_HEALTH_CHECK)]


def _mp_coordinator(ns: str, gid: PeerGroupId, owner: dict, policy: PolicyDefaults,
                    image: str) -> list[dict]:
    svc = names.lookup_service_name(gid.mode, gid.group)
    selector = {names.LABEL_LOOKUP_FOR: gid.label}
    comp = "lookup-lmcache-coordinator"
    healthz = {"httpGet": {"path": "/healthz", "port": "http"}}
    container = {
        "name": "coordinator", "image": image, "command": ["lmcache", "coordinator"],
        "args": coordinator_args(policy.chunk_size),
        "env": [{"name": "LMCACHE_TRACK_USAGE", "value": "false"},
                {"name": "DO_NOT_TRACK", "value": "1"}],
        "ports": [{"name": "http", "containerPort": names.COORDINATOR_PORT}],
        # The registry is in memory; a start on a loaded node takes seconds (python imports).
        "startupProbe": {**healthz, "periodSeconds": 2, "failureThreshold": 60},
        "readinessProbe": {**healthz, "periodSeconds": 2},
        "livenessProbe": {**healthz, "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": 3},
        # ~650 MB RSS measured idle (shared/docs/research/lmcache-mp-on-cpu.md §2).
        "resources": {"requests": {"cpu": "100m", "memory": "768Mi"},
                      "limits": {"cpu": "1", "memory": "2Gi"}}}
    return [{"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": _meta(svc, ns, gid, owner, comp),
             # One replica, never two at once: a second coordinator splits the membership.
             "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                      "selector": {"matchLabels": selector},
                      "template": {"metadata": {"labels": {
                          **selector, "app.kubernetes.io/part-of": "kvmesh"}},
                          "spec": _pod_spec(container)}}},
            {"apiVersion": "v1", "kind": "Service",
             "metadata": _meta(svc, ns, gid, owner, comp),
             "spec": {"selector": selector,
                      "ports": [{"name": "http", "port": names.COORDINATOR_PORT,
                                 "targetPort": "http"}]}},
            network_policy(ns, gid, owner, lookup_ports=[names.COORDINATOR_PORT])]


def network_policy(ns: str, gid: PeerGroupId, owner: dict, lookup_ports: list[int]) -> dict:
    """Only the group's pods (and kvmesh's controller) reach the lookup service."""
    peers = {"podSelector": {"matchLabels": {names.LABEL_PEER_GROUP: gid.label}}}
    kvmesh = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": names.SYSTEM_NAMESPACE}}}
    return {"apiVersion": NETWORK_POLICY_API, "kind": "NetworkPolicy",
            "metadata": _meta(names.LOOKUP_POLICY_PREFIX + gid.label, ns, gid, owner,
                              "lookup-policy"),
            "spec": {"podSelector": {"matchLabels": {names.LABEL_LOOKUP_FOR: gid.label}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [peers, kvmesh],
                                  "ports": [{"port": p, "protocol": "TCP"}
                                            for p in lookup_ports]}] if lookup_ports else []}}


def ports_outside(ports: Iterable[int], low: int = 1, high: int = MAX_PORT
                  ) -> list[tuple[int, int]]:
    """Inclusive (first, last) ranges covering low..high except `ports` (any order, repeats
    and out-of-range numbers ignored)."""
    out: list[tuple[int, int]] = []
    start = low
    for p in sorted({p for p in ports if low <= p <= high}):
        if p > start:
            out.append((start, p - 1))
        start = p + 1
    if start <= high:
        out.append((start, high))
    return out


def _tcp(ports: Iterable[int]) -> list[dict]:
    return [{"protocol": "TCP", "port": p} for p in sorted(set(ports))]


def peer_network_policy(ns: str, gid: PeerGroupId, owner: dict, p2p_ports: Iterable[int],
                        user_isolated: bool, controller_ports: Iterable[int] = (),
                        peers_any_port: bool = False) -> Optional[dict]:
    """The group's vLLM pods accept P2P connections only from the group's pods.

    controller_ports: the worker ports the group's lmcache_controller connects to (control
    operations and its health checks; controller mode), allowed from the lookup pods only.
    user_isolated: a user's policy already selects some of the group's pods. Then this policy
    only adds the P2P allowances. Otherwise selecting the pods here would cut every other port
    (the serving port too), so a rule without `from` keeps all non-P2P TCP ports, UDP and SCTP
    open to everyone, as they were. None when there are no P2P ports.
    peers_any_port (mp mode): the group's pods also reach each other on every port, because
    NIXL's UCX backend opens its data listeners on ephemeral ports besides the two named ones
    (docs/mp-mode.md §4.3)."""
    ports = sorted(set(p2p_ports))
    if not ports:
        return None
    ingress = [{"from": [{"podSelector": {"matchLabels": {names.LABEL_PEER_GROUP: gid.label}}}],
                "ports": _tcp(ports)}]
    lookup_pods = {"podSelector": {"matchLabels": {names.LABEL_LOOKUP_FOR: gid.label}}}
    ctrl = sorted(set(controller_ports))
    if ctrl:
        ingress.append({"from": [lookup_pods], "ports": _tcp(ctrl)})
    if peers_any_port:
        ingress.append({"from": [{"podSelector": {"matchLabels": {
            names.LABEL_PEER_GROUP: gid.label}}}]})
    if not user_isolated:
        # endPort is GA since Kubernetes 1.25; a single port needs none.
        rest = [{"protocol": "TCP", "port": a, **({"endPort": b} if b > a else {})}
                for a, b in ports_outside(ports)]
        ingress.append({"ports": rest + [{"protocol": "UDP"}, {"protocol": "SCTP"}]})
    return {"apiVersion": NETWORK_POLICY_API, "kind": "NetworkPolicy",
            "metadata": _meta(names.PEER_POLICY_PREFIX + gid.label, ns, gid, owner,
                              "peer-policy"),
            "spec": {"podSelector": {"matchLabels": {names.LABEL_PEER_GROUP: gid.label}},
                     "policyTypes": ["Ingress"], "ingress": ingress}}


def isolating_policies(policies: Iterable[dict], pods_labels: Iterable[dict]) -> list[str]:
    """Names of the NetworkPolicies (API dicts of one namespace), other than kvmesh's, that
    isolate any of these pods for ingress: their podSelector matches its labels and their
    policyTypes include Ingress (absent policyTypes mean Ingress)."""
    labels = list(pods_labels)
    out = []
    for p in policies:
        meta = p.get("metadata") or {}
        if (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY:
            continue
        spec = p.get("spec") or {}
        if "Ingress" not in (spec.get("policyTypes") or ["Ingress"]):
            continue
        try:
            selector: Optional[LabelSelector] = LabelSelector.model_validate(
                spec.get("podSelector") or {})
        except ValidationError:
            selector = None  # unreadable: count it as isolating, so kvmesh only adds
        if selector is None or any(selector.matches(lb) for lb in labels):
            out.append(meta.get("name", ""))
    return sorted(out)
