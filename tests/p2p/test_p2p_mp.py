"""Issue 11: the MP generation (LMCache's multiprocess P2P, lmcache 0.5.6) end to end on the real
control plane: kvmesh's webhook injects the `lmcache server` sidecar into an opted-in
Deployment's pods, kvmesh's controller creates the group's `lmcache coordinator`; both run as
the real LMCache processes, configured ONLY from those objects (tests/p2p/mprunner.py names the
stand-ins: image = venv, pod network = pod IP on loopback, cluster DNS = /etc/hosts, emptyDir
= a test directory, no GPU, no kubelet). Then:

1. A stores KV chunks; B finds them through the coordinator and reads them from A over NIXL
   (UCX/TCP on loopback), byte-identical; the KVMeshPeerGroup lists both registrations.
2. A's server crashes and restarts in place (same IP and ports, restartCount + 1): kvmesh
   DELETEs the dead incarnation at once, B misses cleanly within seconds, and hits A's new
   incarnation as soon as it stored: no permanent outage.
3. A's pod is deleted with its server crashed: kvmesh DELETEs it, B misses cleanly.

The same events with LMCache's defaults and no kvmesh are timed by bench/p2p.py (`--mp`).
Needs the vllm-0.33.0 venv and the nixl-1.5.1-cu13 overlay (tests/consumers/setup_envs.sh)
and root (`unshare -m`). Each server starts in 30-90 s on a busy 2-core machine; every wait is
bounded.
"""

from __future__ import annotations

import time

import pytest

from mpscenario import CHUNK, GID, KIB_PER_CHUNK, MpScenario
from support import wait_for

from kvmesh.core import lookup, names

# kvmesh's figure (DELETE + 1 s heartbeat) is ~4-6 s: 4 polls of B after the DELETE, plus a
# lookup in flight that waits 3 s on the dead peer. Bounded generously for a loaded machine.
CLEAN_MISS_BOUND_S = 20.0
RECOVER_BOUND_S = 300.0  # includes the restarted server's own start (30-90 s here)


@pytest.fixture(scope="module")
def mesh(devcluster, stack, tmp_path_factory):
    s = MpScenario(devcluster, stack, tmp_path_factory.mktemp("p2pmp"))
    try:
        s.start(replicas=2)
        yield s
    finally:
        s.stop()
        stack.restart()


def test_step1_injected_servers_share_through_the_coordinator_kvmesh_created(mesh):
    b, a = mesh.members
    # the coordinator is kvmesh's object, run as it is written
    dep = mesh.cluster.kubectl_json("get", "deployment", "-n", mesh.namespace,
                                    names.lookup_service_name(names.MODE_MP, "default"))
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == lookup.coordinator_args(CHUNK)  # the policy's chunk size
    assert mesh.coordinator.argv[2:] == [mesh.coordinator.ip if w == "0.0.0.0" else w
                                         for w in args]
    # the servers registered as kvmesh named them, at their pod IPs, P2P on
    listed = mesh.coordinator.listed()
    for m in (a, b):
        assert m.server.instance_id == names.mp_instance_id(m.pod["metadata"]["uid"], 1)
        e = listed[m.server.instance_id]
        assert e["ip"] == m.ip and e["p2p_advertised_url"].startswith(m.ip + ":")
        assert e["mq_port"] == int(m.server.args["--port"])
    assert a.ip != b.ip

    def status_lists_both():
        st = mesh.peer_group().get("status") or {}
        pods = {r.get("pod"): r["id"] for r in st.get("instances") or []}
        return st if pods == {a.name: a.server.instance_id, b.name: b.server.instance_id} \
            else None
    st = wait_for("the KVMeshPeerGroup listing both registrations", status_lists_both, 30, 0.5)
    assert st["registered"] == 2

    times = {}
    for n in (1, 4, 16):
        got = mesh.share(a, b, seed=100 + n, chunks=n)
        assert got["ok"] and got["hit"] == n * CHUNK and got["equal"], got
        assert got["sha256"] == got["store"]["sha256"] == got["want_sha256"]
        times[n] = (round(got["lookup_ms"], 1), round(got["retrieve_ms"], 1))
    print(f"\nB fetched from A (chunks of {KIB_PER_CHUNK} KiB): chunks -> (lookup incl. P2P "
          f"lookup + NIXL read into B's L1 ms, copy into B's KV ms): {times}")


def test_step2_restart_in_place_is_healed_by_kvmesh(mesh):
    b, a = mesh.members
    mesh.prime(a, b, seed=200, chunks=8)
    out = mesh.restart_in_place(a, b, seed=200, chunks=8, bound=RECOVER_BOUND_S)
    print(f"\nrestart in place with kvmesh: {out}")
    assert out.clean_miss_s is not None and out.clean_miss_s < CLEAN_MISS_BOUND_S, out
    # the dead incarnation was gone before the new one registered, and the new one is served
    assert out.detail["new_id"] == names.mp_instance_id(a.pod["metadata"]["uid"], 2)
    assert not out.detail["old_listed_after_restart"], out
    assert out.first_hit_s is not None and out.detail["fetch"]["equal"], out
    rec = (mesh.peer_group().get("status") or {}).get("lastPurge") or {}
    assert rec.get("reason") == "restarted" and out.detail["old_id"] in rec.get("what", ""), rec


def test_step3_deleted_pod_is_deregistered_and_b_misses_cleanly(mesh):
    b, a = mesh.members
    mesh.prime(a, b, seed=300, chunks=8)
    a_id = a.server.instance_id
    out = mesh.delete_pod(a, b, seed=300, chunks=8, bound=CLEAN_MISS_BOUND_S + 10)
    print(f"\npod deleted with kvmesh: {out}")
    assert out.clean_miss_s is not None and out.clean_miss_s < CLEAN_MISS_BOUND_S, out
    assert a_id not in mesh.coordinator.listed()
    t0 = time.monotonic()
    rec = wait_for("the purge record", lambda: (mesh.peer_group().get("status") or {})
                   .get("lastPurge", {}).get("reason") == "deleted" and
                   mesh.peer_group()["status"]["lastPurge"], 10, 0.2)
    assert a_id in rec["what"] and time.monotonic() - t0 < 10
    assert b.server.instance_id in mesh.coordinator.listed()  # B untouched
