"""kvmesh's NetworkPolicies enforced on the real node (kube-router's policy controller).

The shipped manifests as in test_manifests_real.py, on a node started with
`network_policy=True`: kube-router (network policy controller only) programs iptables and ipsets
in the node's namespace. A redis-generation peer group gets the controller's
`kvmesh-lookup-<group>` (its Redis Deployment) and `kvmesh-peers-<group>` (its vLLM pods'
P2P port) policies; both must reject a pod outside the group and admit a member. A controller-
generation group (LMCache 0.5.x) gets the same two names with other rules: the lmcache_controller's
ports open to members, and the workers' ports it connects to open to the lookup pods (and no
other P2P port).

Test-only arrangement: the vLLM pods are the pause stand-in (they listen on nothing), so the
policies are probed at listener pods that carry the labels they select by (a redis-server on the
port a rule names): the policies select pods by those labels, as they do the vLLM pods and the
lookup pod. Clients are redis-cli pods, with and without the group's (or the lookup's) label.
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


def pod_ready(c, name: str, ns: str = NS) -> dict | None:
    p = c.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
    ok = any(x.get("type") == "Ready" and x.get("status") == "True" for x in p.get("status", {}).get("conditions", []))
    return p if ok else None


def redis_pod(c, name: str, labels: dict, command: list[str], args: list[str], restart: str,
              ns: str = NS) -> None:
    c.api("POST", f"/api/v1/namespaces/{ns}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
        "spec": {"restartPolicy": restart, "nodeSelector": {"kvmesh.dev/real-node": "true"},
                 "containers": [{"name": "c", "image": c.image_refs["redis"], "imagePullPolicy": "Never",
                                 "command": command, "args": args}]}})


def ping_from_pod(c, name: str, labels: dict, host: str, port: int, ns: str = NS) -> str:
    """redis-cli PING from a new pod on the bridge: PONG, or the last of 8 attempts' error. A
    member retries because kube-router adds a new pod's IP to the allowed sources only once the
    kubelet has reported it, which may be after the container's first connect; an outsider is
    rejected by every attempt (a single PONG ends the loop and fails the test)."""
    script = (f"for i in 1 2 3 4 5 6 7 8; do out=$(timeout 5 redis-cli -h {host} -p {port} ping 2>&1); "
              f'[ "$out" = PONG ] && break; sleep 1; done; echo "$out"')
    redis_pod(c, name, labels, ["sh", "-c"], [script], "Never", ns)
    wait(f"client pod {name} done", lambda: c.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
         .get("status", {}).get("phase") in ("Succeeded", "Failed"), timeout=90)
    return c.kubectl("-n", ns, "logs", name).stdout.strip()


def rules_for(c, pod: str, ns: str = NS) -> bool:
    """kube-router has programmed this pod's ingress firewall chain."""
    out = c.ns_run("iptables-save", "-t", "filter", check=False).stdout
    return f"POD name:{pod} namespace: {ns}" in out


def listener(c, name: str, labels: dict, port: int, ns: str) -> str:
    """A redis-server pod listening on `port` with `labels`, Ready and firewalled: its IP."""
    redis_pod(c, name, labels, ["redis-server"],
              ["--port", str(port), "--protected-mode", "no", "--save", ""], "Always", ns)
    ready = wait(f"{name} Ready", lambda: pod_ready(c, name, ns), timeout=90)
    wait(f"kube-router's rules for {name}", lambda: rules_for(c, name, ns), timeout=60)
    return ready["status"]["podIP"]


def opted_in_deployment(c, ns: str, name: str, image: str) -> str:
    """Two stand-in vLLM pods of `image`, admitted by kvmesh, rolled out: their peer group."""
    deploy = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name, "kvmesh.dev/inject": "enabled"}},
                              "spec": {"containers": [{
                                  "name": "vllm", "image": image,
                                  "command": ["vllm", "serve"], "args": ["Qwen/Qwen2.5-0.5B-Instruct"]}]}}}}
    c.kubectl("apply", "-f", "-", input=json.dumps(deploy))
    c.kubectl("-n", ns, "rollout", "status", f"deployment/{name}", "--timeout=120s", timeout=130)
    return c.kubectl_json("-n", ns, "get", "pods", "-l", f"app={name}")["items"][0]["metadata"]["labels"][
        names.LABEL_PEER_GROUP]


def group_policies(c, ns: str, group: str) -> tuple[dict, dict]:
    """The group's kvmesh-lookup-* and kvmesh-peers-* policies, once the controller applied both."""
    want = (names.LOOKUP_POLICY_PREFIX + group, names.PEER_POLICY_PREFIX + group)
    got: dict = {}

    def both() -> bool:
        got.update({p["metadata"]["name"]: p for p in c.kubectl_json("-n", ns, "get", "networkpolicies")["items"]})
        return all(w in got for w in want)
    try:
        wait(f"{want} in {ns}", both, timeout=90)
    except TimeoutError as e:
        logs = c.kubectl("-n", "kvmesh-system", "logs", "deployment/kvmesh-controller", "--tail=40", check=False)
        raise AssertionError(f"{e}; policies there: {sorted(got)}; kvmesh-controller's log:\n"
                             f"{logs.stdout}{logs.stderr}") from None
    return got[want[0]], got[want[1]]


def test_lookup_and_peer_policies_reject_outsiders_and_admit_members(cluster):
    c = cluster
    c._ctr("images", "tag", "--force", c.image_refs["redis"], "docker.io/library/redis:7.2-alpine")
    c._ctr("images", "tag", "--force", STANDIN_REF, "docker.io/lmcache/vllm-openai:v0.3.6")
    tenant_namespace(c, NS)
    group = opted_in_deployment(c, NS, "old", "lmcache/vllm-openai:v0.3.6")
    member = {names.LABEL_PEER_GROUP: group}
    wait("the lookup Deployment", lambda: c.kubectl("-n", NS, "get", "deployment", "kvmesh-redis-default",
                                                     check=False).returncode == 0, timeout=60)
    c.kubectl("-n", NS, "rollout", "status", "deployment/kvmesh-redis-default", "--timeout=120s", timeout=130)
    lookup_policy, peers_policy = group_policies(c, NS, group)

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
    ip = listener(c, "p2p-listener", member, p2p_port, NS)
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
    other = listener(c, "other-port", member, other_port, NS)
    assert ping_from_pod(c, "other-outsider", {"app": "curious"}, other, other_port) == "PONG"


def test_controller_generation_policies_admit_the_lookup_pod_to_worker_ports_only(cluster):
    """LMCache 0.5.x groups: the lmcache_controller's ports are open to the group's pods, and
    the workers' ports it connects to (control operations, health checks) to the lookup pods,
    which get no other P2P port. The lookup StatefulSet runs the stand-in image, which has no
    lmcache_controller; the listeners carry the labels the policies select by instead."""
    c = cluster
    ns = "npctrl"
    c._ctr("images", "tag", "--force", STANDIN_REF, "docker.io/lmcache/vllm-openai:v0.3.9")
    tenant_namespace(c, ns)
    group = opted_in_deployment(c, ns, "new", "lmcache/vllm-openai:v0.3.9")
    assert group.startswith(names.MODE_CONTROLLER), group
    member = {names.LABEL_PEER_GROUP: group}
    lookup_pod = {names.LABEL_LOOKUP_FOR: group}
    lookup_policy, peers_policy = group_policies(c, ns, group)
    ctrl_port = lookup_policy["spec"]["ingress"][0]["ports"][0]["port"]
    [worker_rule] = [r for r in peers_policy["spec"]["ingress"]
                     if r.get("from") == [{"podSelector": {"matchLabels": lookup_pod}}]]
    worker_port = worker_rule["ports"][0]["port"]
    init_port = next(p["port"] for p in peers_policy["spec"]["ingress"][0]["ports"]
                     if p["port"] not in {q["port"] for q in worker_rule["ports"]})

    at_ctrl = listener(c, "ctrl-listener", lookup_pod, ctrl_port, ns)
    at_worker = listener(c, "worker-listener", member, worker_port, ns)
    at_init = listener(c, "init-listener", member, init_port, ns)
    seen = {
        "controller port, outsider": ping_from_pod(c, "c-out", {"app": "curious"}, at_ctrl, ctrl_port, ns),
        "controller port, member": ping_from_pod(c, "c-mem", member, at_ctrl, ctrl_port, ns),
        "worker port, outsider": ping_from_pod(c, "w-out", {"app": "curious"}, at_worker, worker_port, ns),
        "worker port, lookup pod": ping_from_pod(c, "w-look", lookup_pod, at_worker, worker_port, ns),
        "worker port, member": ping_from_pod(c, "w-mem", member, at_worker, worker_port, ns),
        "P2P port, lookup pod": ping_from_pod(c, "i-look", lookup_pod, at_init, init_port, ns),
    }
    print(f"\nNetworkPolicy (kube-router), controller generation {group}: controller port "
          f"{ctrl_port}, worker port {worker_port}, P2P port {init_port}: {seen}", file=sys.stderr)
    admitted = {k for k, v in seen.items() if v == "PONG"}
    assert admitted == {"controller port, member", "worker port, lookup pod", "worker port, member"}, seen
    for k in set(seen) - admitted:
        assert "refused" in seen[k].lower(), seen
