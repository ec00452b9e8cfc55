"""kvmesh's NetworkPolicies enforced on the real node (kube-router's policy controller).

The shipped manifests as in test_manifests_real.py, on a node started with
`network_policy=True`: kube-router (network policy controller only) programs iptables and ipsets
in the node's namespace. A redis-generation peer group gets the controller's
`kvmesh-lookup-<group>` (its Redis Deployment) and `kvmesh-peers-<group>` (its vLLM pods'
P2P port) policies; both must reject a pod outside the group and admit a member.

Test-only arrangement: the vLLM pods are the pause stand-in (they listen on nothing), so the
peers policy is probed at a listener pod that carries the group's label (a redis-server on the
P2P port the policy names): the policy selects pods by that label, as it does the vLLM pods.
Clients are redis-cli pods, with and without the group's label.
Skipped unless cluster/kube-router-build.sh has built kube-router and ipset is installed
(fails instead under KVMESH_REQUIRE_NETPOL=1, KVMESH_REQUIRE_CLUSTER=1 or KVMESH_REQUIRE_NODE=1).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from kvmesh.core import names
from kvmesh.local import node as realnode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import wait_for as wait  # noqa: E402
from test_manifests_real import STANDIN_REF, deploy_manifests, tenant_namespace  # noqa: E402
from test_real_node import require  # noqa: E402

NS = "np"


@pytest.fixture(scope="module")
def cluster(request):
    require(("kvmesh", "redis"))
    missing = realnode.network_policy_missing()
    if missing:
        msg = "NetworkPolicy enforcement not available, missing: " + "; ".join(missing)
        # `make test` builds kube-router wherever it builds the node: missing is a failure there.
        if "1" in (os.environ.get(v) for v in ("KVMESH_REQUIRE_NETPOL", "KVMESH_REQUIRE_CLUSTER",
                                                  "KVMESH_REQUIRE_NODE")):
            pytest.fail(msg)
        pytest.skip(msg)
    c = realnode.RealNodeCluster(images=("kvmesh", "redis"), network_policy=True, verbose=True)
    c.start()
    failed = request.session.testsfailed
    try:
        deploy_manifests(c)
        yield c
    finally:
        if request.session.testsfailed > failed:
            c.mark_failed()
        c.stop()


def pod_ready(c, name: str) -> dict | None:
    p = c.api("GET", f"/api/v1/namespaces/{NS}/pods/{name}")
    ok = any(x.get("type") == "Ready" and x.get("status") == "True" for x in p.get("status", {}).get("conditions", []))
    return p if ok else None


def redis_pod(c, name: str, labels: dict, command: list[str], args: list[str], restart: str) -> None:
    c.api("POST", f"/api/v1/namespaces/{NS}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
        "spec": {"restartPolicy": restart, "nodeSelector": {"kvmesh.dev/real-node": "true"},
                 "containers": [{"name": "c", "image": c.image_refs["redis"], "imagePullPolicy": "Never",
                                 "command": command, "args": args}]}})


def ping_from_pod(c, name: str, labels: dict, host: str, port: int) -> str:
    """redis-cli PING from a new pod on the bridge: PONG, or the last of 8 attempts' error. A
    member retries because kube-router adds a new pod's IP to the allowed sources only once the
    kubelet has reported it, which may be after the container's first connect; an outsider is
    rejected by every attempt (a single PONG ends the loop and fails the test)."""
    script = (f"for i in 1 2 3 4 5 6 7 8; do out=$(timeout 5 redis-cli -h {host} -p {port} ping 2>&1); "
              f'[ "$out" = PONG ] && break; sleep 1; done; echo "$out"')
    redis_pod(c, name, labels, ["sh", "-c"], [script], "Never")
    wait(f"client pod {name} done", lambda: c.api("GET", f"/api/v1/namespaces/{NS}/pods/{name}")
         .get("status", {}).get("phase") in ("Succeeded", "Failed"), timeout=90)
    return c.kubectl("-n", NS, "logs", name).stdout.strip()


def rules_for(c, pod: str) -> bool:
    """kube-router has programmed this pod's ingress firewall chain."""
    out = c.ns_run("iptables-save", "-t", "filter", check=False).stdout
    return f"POD name:{pod} namespace: {NS}" in out


def test_lookup_and_peer_policies_reject_outsiders_and_admit_members(cluster):
    c = cluster
    c._ctr("images", "tag", "--force", c.image_refs["redis"], "docker.io/library/redis:7.2-alpine")
    c._ctr("images", "tag", "--force", STANDIN_REF, "docker.io/lmcache/vllm-openai:v0.3.6")
    tenant_namespace(c, NS)
    deploy = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "old", "namespace": NS},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "old"}},
                 "template": {"metadata": {"labels": {"app": "old", "kvmesh.dev/inject": "enabled"}},
                              "spec": {"containers": [{
                                  "name": "vllm", "image": "lmcache/vllm-openai:v0.3.6",
                                  "command": ["vllm", "serve"], "args": ["Qwen/Qwen2.5-0.5B-Instruct"]}]}}}}
    c.kubectl("apply", "-f", "-", input=json.dumps(deploy))
    c.kubectl("-n", NS, "rollout", "status", "deployment/old", "--timeout=120s", timeout=130)
    group = c.kubectl_json("-n", NS, "get", "pods", "-l", "app=old")["items"][0]["metadata"]["labels"][
        names.LABEL_PEER_GROUP]
    member = {names.LABEL_PEER_GROUP: group}
    wait("the lookup Deployment", lambda: c.kubectl("-n", NS, "get", "deployment", "kvmesh-redis-default",
                                                     check=False).returncode == 0, timeout=60)
    c.kubectl("-n", NS, "rollout", "status", "deployment/kvmesh-redis-default", "--timeout=120s", timeout=130)
    policies = {p["metadata"]["name"]: p for p in c.kubectl_json("-n", NS, "get", "networkpolicies")["items"]}
    lookup_policy = policies[names.LOOKUP_POLICY_PREFIX + group]
    peers_policy = policies[names.PEER_POLICY_PREFIX + group]

    # The lookup tier: the controller's Redis, by its Service name (kube-proxy DNATs to the pod
    # before kube-router's rules see the packet).
    (lookup_pod,) = [p["metadata"]["name"] for p in c.kubectl_json("-n", NS, "get", "pods")["items"]
                     if p["metadata"]["name"].startswith("kvmesh-redis-default-")]
    wait(f"kube-router's rules for {lookup_pod}", lambda: rules_for(c, lookup_pod), timeout=60)
    port = lookup_policy["spec"]["ingress"][0]["ports"][0]["port"]
    outsider = ping_from_pod(c, "lookup-outsider", {"app": "curious"}, "kvmesh-redis-default", port)
    insider = ping_from_pod(c, "lookup-member", member, "kvmesh-redis-default", port)

    # The peers policy: the group's P2P port, at a listener that carries the group's label.
    p2p_port = peers_policy["spec"]["ingress"][0]["ports"][0]["port"]
    redis_pod(c, "p2p-listener", member, ["redis-server"],
              ["--port", str(p2p_port), "--protected-mode", "no", "--save", ""], "Always")
    listener = wait("listener Ready", lambda: pod_ready(c, "p2p-listener"), timeout=90)
    wait("kube-router's rules for p2p-listener", lambda: rules_for(c, "p2p-listener"), timeout=60)
    ip = listener["status"]["podIP"]
    p2p_outsider = ping_from_pod(c, "p2p-outsider", {"app": "curious"}, ip, p2p_port)
    p2p_insider = ping_from_pod(c, "p2p-member", member, ip, p2p_port)
    print(f"\nNetworkPolicy (kube-router): {lookup_policy['metadata']['name']} port {port}: outsider "
          f"{outsider!r}, member {insider!r}; {peers_policy['metadata']['name']} port {p2p_port}: outsider "
          f"{p2p_outsider!r}, member {p2p_insider!r}", file=sys.stderr)
    assert insider == "PONG" and p2p_insider == "PONG"
    assert "PONG" not in outsider and "refused" in outsider.lower(), outsider
    assert "PONG" not in p2p_outsider and "refused" in p2p_outsider.lower(), p2p_outsider
    # The rest of the vLLM pods' ports stay open to everyone (the policy's last rule): the same
    # outsider reaches the listener on another port.
    p2p_ports = {p["port"] for p in peers_policy["spec"]["ingress"][0]["ports"]}
    other_port = next(p for p in range(7000, 7100) if p not in p2p_ports)
    redis_pod(c, "other-port", member, ["redis-server"],
              ["--port", str(other_port), "--protected-mode", "no", "--save", ""], "Always")
    other = wait("other-port Ready", lambda: pod_ready(c, "other-port"), timeout=90)
    wait("kube-router's rules for other-port", lambda: rules_for(c, "other-port"), timeout=60)
    assert ping_from_pod(c, "other-outsider", {"app": "curious"}, other["status"]["podIP"], other_port) == "PONG"
