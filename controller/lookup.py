"""Desired Kubernetes objects for one peer group's lookup service (pure).

Every object is owned by the group's KVMeshPeerGroup, so deleting that object (after the
last member left and the grace period passed) lets Kubernetes garbage collection remove the
whole lookup service.

redis mode: a Redis Deployment + Service. The Service's port targets the port Redis really
listens on (the seed chart targeted 8080 while Redis listened on 6379), no persistence (the
index is only hints), `maxmemory` with LRU so it cannot grow without bound, keyspace
notifications for the controller's reverse index.

controller mode: `lmcache_controller` as a one-replica StatefulSet started with flags (its
env settings are overridden by argparse defaults), heartbeat port on, health check on, same
image as the group's vLLM pods; bound to its stable DNS name so the heartbeat URL it hands
out survives a reschedule.
"""

from __future__ import annotations

from kvmesh import names
from kvmesh.webhook.policy import PolicyDefaults

REDIS_IMAGE = "redis:7.2-alpine"
REDIS_MAXMEMORY_MB = 1024
# Keyspace events for the controller's reverse index: keyevent notifications of string
# commands (SET). The controller also sets this itself on connect.
REDIS_NOTIFY = "E$"
# A burst of chunk stores must not drop the controller's subscription (default hard limit
# 32 MB); a drop costs a full reconciliation.
REDIS_PUBSUB_BUFFER = "pubsub 256mb 64mb 60"
CONTROLLER_HTTP_PORT = 9000
CONTROLLER_HEARTBEAT_PORT = 8500
HEALTH_CHECK_SECONDS = 5


def owner_ref(group_obj: dict) -> dict:
    return {"apiVersion": f"{names.API_GROUP}/{names.API_VERSION}",
            "kind": names.PEER_GROUP_KIND, "name": group_obj["metadata"]["name"],
            "uid": group_obj["metadata"]["uid"], "controller": True,
            "blockOwnerDeletion": True}


def _meta(name: str, namespace: str, gid: str, owner: dict, component: str) -> dict:
    return {"name": name, "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "kvmesh",
                       "app.kubernetes.io/component": component,
                       "app.kubernetes.io/managed-by": "kvmesh-controller",
                       "kvmesh.dev/lookup-for": gid},
            "ownerReferences": [owner]}


def _restricted() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}}


def peer_group(namespace: str, mode: str, group: str) -> dict:
    return {"apiVersion": f"{names.API_GROUP}/{names.API_VERSION}",
            "kind": names.PEER_GROUP_KIND,
            "metadata": {"name": names.group_id(mode, group), "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "kvmesh"}},
            "spec": {"mode": mode, "group": group}}


def desired(group_obj: dict, policy: PolicyDefaults, image: str) -> list[dict]:
    ns = group_obj["metadata"]["namespace"]
    mode, group = group_obj["spec"]["mode"], group_obj["spec"]["group"]
    gid = names.group_id(mode, group)
    owner = owner_ref(group_obj)
    svc = names.lookup_service_name(mode, group)
    selector = {"kvmesh.dev/lookup-for": gid}
    objs: list[dict] = []
    if mode == names.MODE_REDIS:
        if policy.redis_address:
            return [network_policy(ns, gid, owner, lookup_ports=[])]  # external Redis
        port = policy.redis_port
        objs.append({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(svc, ns, gid, owner, "lookup-redis"),
            "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": {**selector,
                                                          "app.kubernetes.io/part-of": "kvmesh"}},
                                  "spec": {"containers": [{
                                      "name": "redis", "image": REDIS_IMAGE,
                                      "args": ["--port", str(port), "--save", "",
                                               "--appendonly", "no",
                                               "--maxmemory", f"{REDIS_MAXMEMORY_MB}mb",
                                               "--maxmemory-policy", "allkeys-lru",
                                               "--notify-keyspace-events", REDIS_NOTIFY,
                                               "--client-output-buffer-limit",
                                               REDIS_PUBSUB_BUFFER],
                                      "ports": [{"name": "redis", "containerPort": port}],
                                      "readinessProbe": {"tcpSocket": {"port": "redis"},
                                                         "periodSeconds": 5},
                                      "livenessProbe": {"exec": {"command": [
                                          "redis-cli", "-p", str(port), "ping"]},
                                          "periodSeconds": 10},
                                      "resources": {"requests": {"cpu": "100m",
                                                                 "memory": "256Mi"},
                                                    "limits": {"memory":
                                                               f"{REDIS_MAXMEMORY_MB + 256}Mi"}},
                                      "securityContext": _restricted()}]}}}})
        objs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": _meta(svc, ns, gid, owner, "lookup-redis"),
                     "spec": {"selector": selector,
                              "ports": [{"name": "redis", "port": port,
                                         "targetPort": "redis"}]}})
        objs.append(network_policy(ns, gid, owner, lookup_ports=[port]))
        return objs
    headless = f"{svc}-hl"
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
                              "spec": {"containers": [{
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
                                          {"name": "PYTHONHASHSEED",
                                           "value": str(policy.hash_seed)},
                                          {"name": "LMCACHE_TRACK_USAGE", "value": "false"}],
                                  "ports": ports,
                                  "readinessProbe": {"tcpSocket": {"port": "pull"},
                                                     "periodSeconds": 5},
                                  "livenessProbe": {"httpGet": {"path": "/metrics",
                                                                "port": "http"},
                                                    "periodSeconds": 15,
                                                    "failureThreshold": 4},
                                  "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}},
                              }]}}}})
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


def network_policy(ns: str, gid: str, owner: dict, lookup_ports: list[int]) -> dict:
    """Only the group's pods (and kvmesh's controller) reach the lookup service.

    The group's vLLM pods are not selected: a policy selecting them would deny every port
    not listed, including the traffic that serves requests."""
    peers = {"podSelector": {"matchLabels": {names.LABEL_PEER_GROUP: gid}}}
    kvmesh = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": names.SYSTEM_NAMESPACE}}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(f"kvmesh-lookup-{gid}", ns, gid, owner, "lookup-policy"),
            "spec": {"podSelector": {"matchLabels": {"kvmesh.dev/lookup-for": gid}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [peers, kvmesh],
                                  "ports": [{"port": p, "protocol": "TCP"}
                                            for p in lookup_ports]}] if lookup_ports else []}}
