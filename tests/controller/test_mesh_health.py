"""Mesh writes group health: conditions in the KVMeshPeerGroup status, a Warning Event per
problem when it appears (on the group and the odd member's workload), SharingRestored when it
goes, kvmesh_group_* series that follow, and no status write while nothing changes."""

from __future__ import annotations

from fake_api import FakeMeshClient
from kvmesh.controller.main import Metrics
from kvmesh.controller.mesh import Mesh
from kvmesh.core import health
from kvmesh.core.policy import PolicyDefaults
from support import injected_pod


def pod(name, ip, seed=None):
    p = injected_pod(name=name, uid=f"u-{name}", ip=ip)
    if seed is not None:
        for e in p["spec"]["containers"][0]["env"]:
            if e["name"] == "PYTHONHASHSEED":
                e["value"] = seed
    return p


def conds(status):
    return {c["type"]: c for c in status["conditions"]}


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


async def test_hash_seed_mismatch_degrades_then_recovers():
    api, metrics = FakeMeshClient(), Metrics()
    m = Mesh(api, PolicyDefaults(), metrics)

    async def lookup_answers(gkey, g, status):  # the lookup probes are e2e's (real servers)
        return True, ()
    m.health._probe = lookup_answers
    await m._on_pod("ADDED", pod("p1", "127.64.0.1"), None)
    await m._on_pod("ADDED", pod("p2", "127.64.0.2", seed="7"), None)
    await m.resync_once(full=False)
    st = api.status_applied[-1]["status"]
    gid = api.status_applied[-1]["metadata"]["name"]
    ns = api.status_applied[-1]["metadata"]["namespace"]
    c = conds(st)
    assert c[health.DEGRADED]["status"] == "True"
    assert c[health.DEGRADED]["reason"] == health.HASH_SEED_MISMATCH
    assert "PYTHONHASHSEED 7 on p2" in c[health.DEGRADED]["message"]
    assert c[health.SHARING]["status"] == "False"
    await m.resync_once(full=False)
    for t in list(m._background):
        await t
    reasons = [(e[0]["kind"], e[1]) for e in api.events]
    assert ("KVMeshPeerGroup", health.HASH_SEED_MISMATCH) in reasons
    assert ("ReplicaSet", "PeerIncompatible") in reasons  # its owner (no Deployment known)
    assert sample(metrics, "kvmesh_group_degraded", namespace=ns, group=gid,
                  reason=health.HASH_SEED_MISMATCH) == 1
    assert sample(metrics, "kvmesh_group_problem_members", namespace=ns, group=gid,
                  reason=health.HASH_SEED_MISMATCH) == 1
    assert sample(metrics, "kvmesh_group_sharing", namespace=ns, group=gid) == 0

    writes, events = len(api.status_applied), len(api.events)
    await m.resync_once(full=True)  # nothing changed: no status write, no new Event
    assert len(api.status_applied) == writes and len(api.events) == events

    await m._on_pod("MODIFIED", pod("p2", "127.64.0.2"), None)  # the same seed again
    await m.resync_once(full=False)
    for t in list(m._background):
        await t
    c = conds(api.status_applied[-1]["status"])
    assert c[health.DEGRADED]["status"] == "False"
    assert c[health.SHARING]["status"] == "True"
    assert api.events[-1][1] == "SharingRestored"
    assert sample(metrics, "kvmesh_group_degraded", namespace=ns, group=gid,
                  reason=health.HASH_SEED_MISMATCH) is None  # the series is gone
    assert sample(metrics, "kvmesh_group_sharing", namespace=ns, group=gid) == 1


async def test_a_new_leadership_reuses_the_registry():
    metrics = Metrics()
    Mesh(FakeMeshClient(), PolicyDefaults(), metrics)
    Mesh(FakeMeshClient(), PolicyDefaults(), metrics)  # no "Duplicated timeseries"


def test_peers_with_chunks_counts_ready_peers_the_listing_shows_holding_keys():
    from kvmesh.controller.health import peers_with_chunks

    class M:  # the fields peers_with_chunks reads
        def __init__(self, iid):
            self.instance_id = iid

    class G:
        peers = [M("a"), M("b"), M("c")]
    listing = [{"instance_id": "a", "worker_id": 0, "key_count": 0},
               {"instance_id": "a", "worker_id": 1, "key_count": 5},  # one rank holds keys
               {"instance_id": "b", "worker_id": 0, "key_count": 0},
               {"instance_id": "gone", "worker_id": 0, "key_count": 9}]  # not a peer
    assert peers_with_chunks(G(), listing) == 1
    # LMCache before 0.4 (/query_worker_info): no key_count, nothing known
    assert peers_with_chunks(G(), [{"instance_id": "a", "worker_id": 0}]) is None
    assert peers_with_chunks(G(), []) == 0
