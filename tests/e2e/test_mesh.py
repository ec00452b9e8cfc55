"""Issue 4 on the real control plane: a group's lookup service appears with its first member
and goes after its last; a departed member's Redis keys are purged (real redis-server bound to
the lookup pod's own loopback IP) while live members' keys stay; annotate-to-opt-in rolls pods."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import pytest
import redis

from kvmesh.core import names
from helpers import apply, pods, publish_keys, running_pods, status, vllm_deployment, wait_for
from lmcache_controller import LMCacheController, child_env
from support import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from lmc_worker_sim import WorkerSim  # noqa: E402  (tests/backends: the simulated workers)

API = f"{names.API_GROUP}/{names.API_VERSION}"


@pytest.fixture(scope="module")
def fast_controller(stack):
    stack.restart(controller_args=("--group-grace-seconds", "3", "--resync-seconds", "1"))
    yield stack
    stack.restart()


def group_cr(cluster, ns, gid):
    r = cluster.kubectl("get", "kvmeshpeergroups.kvmesh.dev", "-n", ns, gid, "-o", "json",
                        check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def netpol(cluster, ns, name):
    r = cluster.kubectl("get", "networkpolicy", "-n", ns, name, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def kvm_ports(vllm_pods) -> list[int]:
    return sorted({p["containerPort"] for pod in vllm_pods for c in pod["spec"]["containers"]
                   for p in c.get("ports") or []
                   if p.get("name", "").startswith(names.PORT_NAME_PREFIX)})


def lookup_pod(cluster, ns, gid):
    ps = [p for p in pods(cluster, ns, f"kvmesh.dev/lookup-for={gid}")
          if p["status"].get("podIP") and p["status"].get("phase") == "Running"]
    return ps[0] if ps else None


@contextlib.contextmanager
def controller_and_workers(cpod: dict, workdir: Path):
    """The real lmcache_controller on the lookup pod's IP (the StatefulSet's ports) and the
    simulated workers connected to it, both answering; both stopped on the way out."""
    ctrl = LMCacheController(cpod["status"]["podIP"], workdir)
    sim = None
    try:
        sim = WorkerSim(ctrl.python, ctrl.pull_url, ctrl.reply_url, child_env(),
                        workdir / "sim.stderr")
        ctrl.wait_up(timeout=300)  # imports torch: minutes on a busy 2-core machine
        sim.wait_ready(timeout=300)
        yield ctrl, sim
    finally:
        if sim is not None:
            sim.close()
        ctrl.stop()


def group_redis(cluster, namespace: str, rpod: dict, workdir, group: str = "default"):
    """A real redis-server on the lookup pod's IP started with exactly the arguments of the
    Deployment kvmesh made (its ACLs included), plus a test-only admin user for inspection.
    Returns (server, admin client); server.client is a pod-level client, as LMCache's is."""
    dep = cluster.kubectl_json("get", "deployment", "-n", namespace,
                               names.lookup_service_name("redis", group))
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--user" in args  # kvmesh's own Redis enforces ACLs
    server = RedisServer(workdir, *args, "--user", "e2e-admin", "on", "nopass", "~*", "&*",
                         "+@all", host=rpod["status"]["podIP"], port=6379).start()
    admin = redis.Redis(server.host, server.port, username="e2e-admin", password="-",
                        decode_responses=True)
    return server, admin


def keys_by_value(r: redis.Redis) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in r.scan_iter(count=1000):
        if k.startswith("kvmesh:"):
            continue
        v = r.get(k)
        out[v] = out.get(v, 0) + 1
    return out


def test_redis_group_lifecycle_and_purge(fast_controller, devcluster, namespace, tmp_path):
    gid = "redis-default"
    apply(devcluster, vllm_deployment("mistral", namespace, replicas=2,
                                      labels={names.LABEL_INJECT: "enabled"},
                                      image="lmcache/vllm-openai:v0.3.6"))
    vllm = running_pods(devcluster, namespace, "app=mistral", 2)
    cr = wait_for("KVMeshPeerGroup", lambda: group_cr(devcluster, namespace, gid), 30)
    assert cr["spec"] == {"mode": "redis", "group": "default"}
    svc = devcluster.kubectl_json("get", "service", "-n", namespace, "kvmesh-redis-default")
    assert svc["spec"]["ports"][0]["port"] == 6379
    assert svc["spec"]["ports"][0]["targetPort"] == "redis"  # targets the port Redis uses
    dep = devcluster.kubectl_json("get", "deployment", "-n", namespace, "kvmesh-redis-default")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "allkeys-lru" in args and "--maxmemory" in args
    assert dep["metadata"]["ownerReferences"][0]["kind"] == names.PEER_GROUP_KIND
    devcluster.kubectl("get", "networkpolicy", "-n", namespace, f"kvmesh-lookup-{gid}")
    peers = wait_for("P2P NetworkPolicy", lambda: netpol(devcluster, namespace,
                                                         f"kvmesh-peers-{gid}"), 30)
    group_pods = {"podSelector": {"matchLabels": {names.LABEL_PEER_GROUP: gid}}}
    assert peers["spec"]["podSelector"] == group_pods["podSelector"]
    assert peers["metadata"]["ownerReferences"][0]["kind"] == names.PEER_GROUP_KIND
    peer_rule, rest = peers["spec"]["ingress"]  # no user policy here: the rest stays open
    assert peer_rule["from"] == [group_pods] and kvm_ports(vllm) == [8200]  # kvm-dist
    assert sorted(p["port"] for p in peer_rule["ports"]) == kvm_ports(vllm)
    assert "from" not in rest and {"protocol": "UDP"} in rest["ports"]
    rpod = wait_for("Redis lookup pod running", lambda: lookup_pod(devcluster, namespace, gid))

    server, admin = group_redis(devcluster, namespace, rpod, tmp_path)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):  # pods: no CONFIG
            server.client.config_set("notify-keyspace-events", "")
        # Two engines publish chunks the way LMCache does: SET <chunk key> <podIP:port>.
        addr = {p["metadata"]["name"]: f"{p['status']['podIP']}:8200" for p in vllm}
        for name, a in addr.items():
            publish_keys(server.client, name, a, 3000)
        assert keys_by_value(admin) == {a: 3000 for a in addr.values()}
        dead, alive = sorted(addr)
        t0 = time.monotonic()
        devcluster.kubectl("delete", "pod", "-n", namespace, dead, "--wait=false")
        wait_for("dead pod's keys purged",
                 lambda: addr[dead] not in keys_by_value(admin), 15, 0.05)
        elapsed = time.monotonic() - t0
        assert keys_by_value(admin).get(addr[alive]) == 3000  # live keys kept
        print(f"\npod deletion -> keys purged: {elapsed * 1000:.0f} ms")
        assert elapsed < 5

        def last_purge():
            # The departure's purge and the index's catch-up reconcile (if Redis just came
            # up) may split the keys between them; the record counts both, each key once.
            st = ((group_cr(devcluster, namespace, gid) or {}).get("status") or {}) \
                .get("lastPurge") or {}
            return st if st.get("removed", 0) >= 3000 else None
        st = wait_for("status shows the purge of all 3000 keys", last_purge, 10)
        assert st["pod"] == f"{namespace}/{dead}" and st["removed"] == 3000

        def purge_event():  # Events are recorded in the background, after the purge
            events = devcluster.kubectl_json("get", "events", "-n", namespace,
                                             "--field-selector", "reason=LookupStatePurged")
            return any(e["involvedObject"]["kind"] == "Deployment"
                       and e["involvedObject"]["name"] == "mistral" for e in events["items"])
        wait_for("a LookupStatePurged Event on the Deployment", purge_event, 15)
    finally:
        server.stop()

    # The last member leaves: after the grace period the group and its lookup service go.
    devcluster.kubectl("scale", "deployment", "-n", namespace, "mistral", "--replicas=0")
    wait_for("peer group removed", lambda: group_cr(devcluster, namespace, gid) is None, 60)
    wait_for("lookup Deployment garbage-collected", lambda: devcluster.kubectl(
        "get", "deployment", "-n", namespace, "kvmesh-redis-default", check=False
    ).returncode != 0, 60)


def test_peer_policy_stays_additive_under_a_user_policy(fast_controller, devcluster,
                                                       namespace):
    """A user's policy selecting the vLLM pods makes kvmesh drop its all-sources rule (which
    would widen the user's isolation), and deleting it brings the rule back."""
    name = f"kvmesh-peers-{names.group_id(names.MODE_REDIS, names.DEFAULT_GROUP)}"
    apply(devcluster, vllm_deployment("iso", namespace, replicas=1,
                                      labels={names.LABEL_INJECT: "enabled"},
                                      image="lmcache/vllm-openai:v0.3.6"))
    vllm = running_pods(devcluster, namespace, "app=iso", 1)

    def open_to_all():  # True/False once the policy exists
        p = netpol(devcluster, namespace, name)
        return None if p is None else any("from" not in r for r in p["spec"]["ingress"])
    wait_for("peer policy keeping non-P2P ports open", lambda: open_to_all() is True, 30)
    apply(devcluster, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "user-iso", "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"app": "iso"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "web"}}}],
                              "ports": [{"port": 8000}]}]}})
    wait_for("all-sources rule dropped", lambda: open_to_all() is False, 30)
    [rule] = netpol(devcluster, namespace, name)["spec"]["ingress"]
    assert sorted(p["port"] for p in rule["ports"]) == kvm_ports(vllm)
    log = fast_controller.controller.log_path
    wait_for("INFO line naming the user's policy", lambda: "already selected by NetworkPolicy "
             "user-iso," in log.read_text(errors="replace"), 10)
    devcluster.kubectl("delete", "networkpolicy", "-n", namespace, "user-iso")
    wait_for("all-sources rule back", lambda: open_to_all() is True, 30)


def test_annotate_workload_rolls_pods_in_and_out(fast_controller, devcluster, namespace):
    apply(devcluster, vllm_deployment("annotated", namespace, replicas=1))
    [p0] = running_pods(devcluster, namespace, "app=annotated", 1)
    assert "env" not in p0["spec"]["containers"][0]
    devcluster.kubectl("annotate", "deployment", "-n", namespace, "annotated",
                       f"{names.ANN_INJECT}=enabled")

    def injected_pod():
        ps = [p for p in pods(devcluster, namespace, "app=annotated")
              if status(p).get("injected") and p["status"].get("phase") == "Running"
              and not p["metadata"].get("deletionTimestamp")]
        return ps[0] if ps else None
    p1 = wait_for("pods rolled into the mesh", injected_pod, 60)
    assert p1["metadata"]["labels"][names.LABEL_INJECT] == "enabled"
    devcluster.kubectl("annotate", "deployment", "-n", namespace, "annotated",
                       f"{names.ANN_INJECT}-")

    def plain_pod():
        d = devcluster.kubectl_json("get", "deployment", "-n", namespace, "annotated")
        labels = d["spec"]["template"]["metadata"]["labels"]
        return names.LABEL_INJECT not in labels
    wait_for("label removed from the template", plain_pod, 30)


def test_user_label_is_not_fought(fast_controller, devcluster, namespace):
    def template_label(name):
        d = devcluster.kubectl_json("get", "deployment", "-n", namespace, name)
        return d["spec"]["template"]["metadata"]["labels"].get(names.LABEL_INJECT)

    d = vllm_deployment("mine", namespace, replicas=1, labels={names.LABEL_INJECT: "disabled"})
    d["metadata"]["annotations"] = {names.ANN_INJECT: "enabled"}
    apply(devcluster, d)
    # A witness: annotated the same way but without a label of its own. Its template getting
    # labelled proves the controller is processing this namespace's workloads.
    w = vllm_deployment("witness", namespace, replicas=1)
    w["metadata"]["annotations"] = {names.ANN_INJECT: "enabled"}
    apply(devcluster, w)
    wait_for("the controller labels the witness's template",
             lambda: template_label("witness") == "enabled", 30)
    log = fast_controller.controller.log_path
    wait_for("the controller reports the user's own label on mine", lambda: (
        f"Deployment {namespace}/mine: the user set the pod template's" in
        log.read_text(errors="replace")), 30)
    assert template_label("mine") == "disabled"


# --- controller mode: the real lmcache_controller on the lookup pod's own IP ----------------

def test_controller_group_deregisters_deleted_member(fast_controller, devcluster, namespace,
                                                     tmp_path):
    gid = "controller-default"
    apply(devcluster, vllm_deployment("qwen", namespace, replicas=2,
                                      labels={names.LABEL_INJECT: "enabled"}))
    vllm = running_pods(devcluster, namespace, "app=qwen", 2)
    sts = wait_for("lmcache_controller StatefulSet", lambda: devcluster.kubectl(
        "get", "statefulset", "-n", namespace, "kvmesh-lmcache-default", "-o", "json",
        check=False).stdout or None, 30)
    spec = json.loads(sts)["spec"]["template"]["spec"]["containers"][0]
    assert spec["image"] == "lmcache/vllm-openai:v0.3.9"  # same LMCache as the group
    assert spec["command"] == ["lmcache_controller"] and "--health-check-interval" in spec["args"]
    cpod = wait_for("lmcache_controller pod", lambda: lookup_pod(devcluster, namespace, gid), 30)
    with controller_and_workers(cpod, tmp_path) as (ctrl, sim):
        for p in vllm:
            pip = p["status"]["podIP"]
            ret = sim.register(p["metadata"]["name"], 0, pip, 8500, f"{pip}:8200")
            assert ret["type"] == "RegisterRetMsg"
        dead, alive = sorted(p["metadata"]["name"] for p in vllm)
        assert ctrl.workers(dead) and ctrl.workers(alive)
        sim.kill(dead, 0)  # the engine dies without deregistering, as on SIGKILL
        t0 = time.monotonic()
        devcluster.kubectl("delete", "pod", "-n", namespace, dead, "--wait=false")
        wait_for("dead instance deregistered", lambda: ctrl.workers(dead) == [], 15, 0.05)
        print(f"\npod deletion -> deregistered: {(time.monotonic() - t0) * 1000:.0f} ms")
        assert ctrl.workers(alive)  # the live member stays registered
