"""Group health on the real control plane, each condition produced for real: pods admitted by
the real webhook with a differing PYTHONHASHSEED or LMCache version, hostNetwork replicas that
advertise one address (KWOK's nodes all have 127.0.0.1), a real redis-server / real
lmcache_controller behind the group's lookup pod that is up, then stopped, and a member that
never registers with it. `kvmesh check` reports the broken group with its fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmesh.core import health, names
from helpers import apply, publish_keys, running_pods, vllm_deployment, wait_for
from test_mesh import controller_and_workers, group_cr, group_redis, lookup_pod

ENABLED = {names.LABEL_INJECT: "enabled"}


@pytest.fixture(scope="module")
def fast(stack):
    # resync 1 s: the lookup tier is judged, and a member must have registered, after 4 s.
    stack.restart(controller_args=("--group-grace-seconds", "3", "--resync-seconds", "1"))
    yield stack
    stack.restart()


def with_env(dep: dict, **env) -> dict:
    dep["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": k, "value": v} for k, v in env.items()]
    return dep


def condition(cluster, ns, gid, type_):
    cr = group_cr(cluster, ns, gid) or {}
    return next((c for c in (cr.get("status") or {}).get("conditions") or []
                 if c["type"] == type_), None)


def wait_condition(cluster, ns, gid, type_, status, reason, timeout=60):
    def probe():
        c = condition(cluster, ns, gid, type_)
        return c if c and c["status"] == status and c["reason"] == reason else None
    return wait_for(f"{gid} {type_}={status} ({reason})", probe, timeout)


def events(cluster, ns, reason):
    return [e for e in cluster.kubectl_json("get", "events", "-n", ns)["items"]
            if e["reason"] == reason]


def check_json(cluster, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "kvmesh.cli", "check", "--kubeconfig",
                        cluster.kubeconfig, "-o", "json", *args], capture_output=True,
                       text=True, timeout=60)
    return json.loads(r.stdout)


def peers(cluster, ns, gid) -> dict[str, str]:
    """pod -> token (redis: its address; controller: its instance id), from the status."""
    st = (group_cr(cluster, ns, gid) or {}).get("status") or {}
    return dict(p.split("=", 1) for p in st.get("peers") or [])


def probe_line(cluster, ns, gid) -> dict:
    [line] = [c for c in check_json(cluster, "--probe", "-n", ns)["checks"]
              if c["name"] == f"probe {ns}/{gid}"]
    return line


def wait_chunks(cluster, ns, gid, n, timeout=60):
    return wait_for(f"{gid} peersWithChunks={n}", lambda: ((group_cr(cluster, ns, gid) or {})
                    .get("status") or {}).get("peersWithChunks") == n or None, timeout)


def test_hash_seed_mismatch_and_the_redis_lookup_tier(fast, devcluster, namespace, tmp_path):
    gid = "redis-default"
    apply(devcluster, vllm_deployment("good", namespace, 2, ENABLED,
                                      image="lmcache/vllm-openai:v0.3.6"))
    apply(devcluster, with_env(vllm_deployment("odd", namespace, 1, ENABLED,
                                               image="lmcache/vllm-openai:v0.3.6"),
                               PYTHONHASHSEED="7"))
    [odd] = running_pods(devcluster, namespace, "app=odd", 1)
    c = wait_condition(devcluster, namespace, gid, health.DEGRADED, "True",
                       health.HASH_SEED_MISMATCH)
    # (the group's own seed is the one kvmesh derives for it from its hash-seed key)
    assert f"PYTHONHASHSEED 7 on {odd['metadata']['name']} differs from the group's " \
        in c["message"]
    assert condition(devcluster, namespace, gid, health.SHARING)["status"] == "False"
    ev = wait_for("HashSeedMismatch Event", lambda: events(devcluster, namespace,
                                                          health.HASH_SEED_MISMATCH), 20)
    assert ev[0]["involvedObject"]["kind"] == names.PEER_GROUP_KIND
    assert ev[0]["type"] == "Warning" and "Fix:" in ev[0]["message"]
    mine = wait_for("PeerIncompatible on the odd Deployment", lambda: [
        e for e in events(devcluster, namespace, "PeerIncompatible")
        if e["involvedObject"]["kind"] == "Deployment"
        and e["involvedObject"]["name"] == "odd"], 20)
    assert "cannot share KV cache" in mine[0]["message"]

    # kvmesh check names the group, the reason and the fix, and fails.
    report = check_json(devcluster)
    assert not report["ok"]
    [g] = [c for c in report["checks"] if c["name"] == f"group {namespace}/{gid}"]
    assert g["status"] == "fail" and health.HASH_SEED_MISMATCH in g["message"]
    assert g["fix"] == health.FIXES[health.HASH_SEED_MISMATCH]

    # The odd one goes; nothing answers at the KWOK lookup pod's IP yet: LookupNotReady.
    devcluster.kubectl("delete", "deployment", "-n", namespace, "odd")
    wait_condition(devcluster, namespace, gid, health.DEGRADED, "True",
                   health.LOOKUP_NOT_READY, 60)
    # A real redis-server behind the lookup pod: the group shares.
    rpod = wait_for("Redis lookup pod", lambda: lookup_pod(devcluster, namespace, gid))
    server, admin = group_redis(devcluster, namespace, rpod, tmp_path)
    try:
        c = wait_condition(devcluster, namespace, gid, health.SHARING, "True",
                           health.HEALTHY, 60)
        assert c["message"] == "2 ready peers, compatible"
        wait_for("SharingRestored Event", lambda: events(devcluster, namespace,
                                                        "SharingRestored"), 20)
        # kvmesh check --probe (read-only): no peer has stored a chunk yet; one engine
        # publishes chunks the way LMCache does: 1 of 2 peers holds some, found by kvmesh's
        # own address index.
        wait_chunks(devcluster, namespace, gid, 0)
        line = probe_line(devcluster, namespace, gid)
        assert line["status"] == "warn" and "none of 2 ready peers" in line["message"]
        (pod_a, addr_a), _ = sorted(peers(devcluster, namespace, gid).items())
        keys = publish_keys(server.client, pod_a, addr_a, 5)
        wait_chunks(devcluster, namespace, gid, 1)
        line = probe_line(devcluster, namespace, gid)
        assert line["status"] == "ok", line
        assert "lookup Redis holds chunks of 1 of 2 ready peers" in line["message"]
        # read-only: the lookup keys are the engine's five, each still naming its address
        def text(v):
            return v.decode() if isinstance(v, bytes) else v
        assert sorted(text(k) for k in admin.scan_iter("vllm@*")) == sorted(keys)
        assert {text(admin.get(k)) for k in keys} == {addr_a}
    finally:
        server.stop()
    wait_condition(devcluster, namespace, gid, health.DEGRADED, "True",
                   health.LOOKUP_NOT_READY, 60)


def test_mixed_lmcache_versions_are_named(fast, devcluster, namespace):
    gid = "controller-default"
    apply(devcluster, vllm_deployment("old", namespace, 1, ENABLED,
                                      image="lmcache/vllm-openai:v0.3.9"))
    apply(devcluster, vllm_deployment("new", namespace, 1, ENABLED,
                                      image="lmcache/vllm-openai:v0.4.0"))
    [old] = running_pods(devcluster, namespace, "app=old", 1)
    c = wait_condition(devcluster, namespace, gid, health.DEGRADED, "True",
                       health.VERSION_MISMATCH)
    assert (f"LMCache 0.3.9 on {old['metadata']['name']} cannot talk to the group's "
            "lmcache_controller (0.4.0)") in c["message"]
    sts = devcluster.kubectl_json("get", "statefulset", "-n", namespace,
                                  names.lookup_service_name(names.MODE_CONTROLLER, "default"))
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":v0.4.0")


def test_two_members_advertising_one_address(fast, devcluster, namespace):
    """hostNetwork replicas take their node's IP; every KWOK node here is 127.0.0.1, so two
    replicas on two nodes advertise the same IP:port (in a real cluster: a fixed IP, or
    hostNetwork pods sharing a node address)."""
    gid = "redis-default"
    dep = vllm_deployment("hostnet", namespace, 2, ENABLED, image="lmcache/vllm-openai:v0.3.6")
    dep["spec"]["template"]["spec"]["hostNetwork"] = True
    apply(devcluster, dep)
    ps = running_pods(devcluster, namespace, "app=hostnet", 2)
    assert len({p["status"]["podIP"] for p in ps}) == 1
    c = wait_condition(devcluster, namespace, gid, health.DEGRADED, "True",
                       health.DUPLICATE_ADDRESS)
    assert all(p["metadata"]["name"] in c["message"] for p in ps)


def test_member_not_registered_with_lmcache_controller(fast, devcluster, namespace, tmp_path):
    gid = "controller-default"
    apply(devcluster, vllm_deployment("qwen", namespace, 2, ENABLED))
    vllm = running_pods(devcluster, namespace, "app=qwen", 2)
    cpod = wait_for("lmcache_controller pod", lambda: lookup_pod(devcluster, namespace, gid), 30)
    with controller_and_workers(cpod, tmp_path) as (_, sim):
        registered, silent = sorted(p["metadata"]["name"] for p in vllm)
        ip = next(p["status"]["podIP"] for p in vllm if p["metadata"]["name"] == registered)
        assert sim.register(registered, 0, ip, 8500, f"{ip}:8200")["type"] == "RegisterRetMsg"
        c = wait_condition(devcluster, namespace, gid, health.DEGRADED, "True",
                           health.NOT_REGISTERED, 60)
        assert c["message"] == (f"{silent} not registered with the group's lmcache_controller")
        sip = next(p["status"]["podIP"] for p in vllm if p["metadata"]["name"] == silent)
        sim.register(silent, 0, sip, 8500, f"{sip}:8200")
        wait_condition(devcluster, namespace, gid, health.SHARING, "True", health.HEALTHY, 60)
        # kvmesh check --probe: the lmcache_controller holds no chunk of either yet; the
        # registered engine admits three (LMCacheWorker's KV admit): 1 of 2. The listing is
        # the controller's 30 s cache, so allow for it.
        wait_chunks(devcluster, namespace, gid, 0)
        line = probe_line(devcluster, namespace, gid)
        assert line["status"] == "warn" and "none of 2 ready peers" in line["message"], line
        sim.admit(peers(devcluster, namespace, gid)[registered], 0, [11, 12, 13])
        wait_chunks(devcluster, namespace, gid, 1, 90)
        line = probe_line(devcluster, namespace, gid)
        assert line["status"] == "ok", line
        assert "lmcache_controller holds chunks of 1 of 2 ready peers" in line["message"]
    wait_condition(devcluster, namespace, gid, health.DEGRADED, "True",
                   health.LOOKUP_NOT_READY, 60)
