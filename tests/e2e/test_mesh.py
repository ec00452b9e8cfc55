"""Issue 4 on the real control plane: a group's lookup service appears with its first member
and goes after its last; a departed member's Redis keys are purged (real redis-server bound to
the lookup pod's own loopback IP) while live members' keys stay; annotate-to-opt-in rolls pods."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import redis

from kvmesh import names
from helpers import apply, pods, running_pods, status, vllm_deployment, wait_for

API = f"{names.API_GROUP}/{names.API_VERSION}"


@pytest.fixture(scope="module")
def fast_controller(stack):
    stack.restart(controller_args=("--group-grace-seconds", "3", "--resync-seconds", "1"))
    yield stack
    stack.restart()


class RealRedis:
    """redis-server bound to the IP KWOK gave the group's (fake) Redis pod."""

    def __init__(self, ip: str, port: int, tmp):
        assert shutil.which("redis-server"), "redis-server missing: `make test` installs it"
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", ip, "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(ip, port, decode_responses=True)
        wait_for("redis-server", self._ping, 10)

    def _ping(self):
        try:
            return self.client.ping()
        except redis.ConnectionError:
            return False

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def group_cr(cluster, ns, gid):
    r = cluster.kubectl("get", "kvmeshpeergroups.kvmesh.dev", "-n", ns, gid, "-o", "json",
                        check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def lookup_pod(cluster, ns, gid):
    ps = [p for p in pods(cluster, ns, f"kvmesh.dev/lookup-for={gid}")
          if p["status"].get("podIP") and p["status"].get("phase") == "Running"]
    return ps[0] if ps else None


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
    rpod = wait_for("Redis lookup pod running", lambda: lookup_pod(devcluster, namespace, gid))

    server = RealRedis(rpod["status"]["podIP"], 6379, tmp_path)
    try:
        # Two engines publish chunks the way LMCache does: SET <chunk key> <podIP:port>.
        addr = {p["metadata"]["name"]: f"{p['status']['podIP']}:8200" for p in vllm}
        for name, a in addr.items():
            with server.client.pipeline(transaction=False) as pipe:
                for i in range(3000):
                    pipe.set(f"vllm@mistralai/Mistral-7B@1@0@{name}-{i:x}", a)
                pipe.execute()
        assert keys_by_value(server.client) == {a: 3000 for a in addr.values()}
        dead, alive = sorted(addr)
        t0 = time.monotonic()
        devcluster.kubectl("delete", "pod", "-n", namespace, dead, "--wait=false")
        wait_for("dead pod's keys purged",
                 lambda: addr[dead] not in keys_by_value(server.client), 15, 0.05)
        elapsed = time.monotonic() - t0
        assert keys_by_value(server.client).get(addr[alive]) == 3000  # live keys kept
        print(f"\npod deletion -> keys purged: {elapsed * 1000:.0f} ms")
        assert elapsed < 5
        st = wait_for("status shows the purge", lambda: (group_cr(devcluster, namespace, gid)
                                                        or {}).get("status", {})
                      .get("lastPurge"), 10)
        assert st["pod"] == f"{namespace}/{dead}" and st["removed"] == 3000
        events = devcluster.kubectl_json("get", "events", "-n", namespace,
                                         "--field-selector", "reason=LookupStatePurged")
        assert any(e["involvedObject"]["kind"] == "Deployment"
                   and e["involvedObject"]["name"] == "mistral" for e in events["items"])
    finally:
        server.stop()

    # The last member leaves: after the grace period the group and its lookup service go.
    devcluster.kubectl("scale", "deployment", "-n", namespace, "mistral", "--replicas=0")
    wait_for("peer group removed", lambda: group_cr(devcluster, namespace, gid) is None, 60)
    wait_for("lookup Deployment garbage-collected", lambda: devcluster.kubectl(
        "get", "deployment", "-n", namespace, "kvmesh-redis-default", check=False
    ).returncode != 0, 60)


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
    d = vllm_deployment("mine", namespace, replicas=1, labels={names.LABEL_INJECT: "disabled"})
    d["metadata"]["annotations"] = {names.ANN_INJECT: "enabled"}
    apply(devcluster, d)
    time.sleep(3)
    got = devcluster.kubectl_json("get", "deployment", "-n", namespace, "mine")
    assert got["spec"]["template"]["metadata"]["labels"][names.LABEL_INJECT] == "disabled"
