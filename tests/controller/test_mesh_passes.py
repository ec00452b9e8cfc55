"""Mesh's group work: a pod event queues its own group; the event path writes only what
changed (the status, and lookup objects only when their inputs change); the full pass re-applies
every group's objects (drift repair) but still no unchanged status."""

import copy

from fake_api import FakeMeshClient
from kvmesh.controller.mesh import Mesh
from kvmesh.core.policy import PolicyDefaults
from support import injected_pod


def pod(ns, name, ip):
    p = injected_pod(name=name, uid=f"u-{ns}-{name}", ip=ip)
    p["metadata"]["namespace"] = ns
    return p


async def test_event_pass_touches_only_the_changed_group_and_writes_only_changes():
    api = FakeMeshClient()
    m = Mesh(api, PolicyDefaults(redis_address="127.0.0.1:1"))
    pods = {(ns, n): pod(ns, n, f"127.64.{i}.{j}") for i, ns in enumerate(("a", "b"))
            for j, n in enumerate(("p1", "p2"), 1)}
    for p in pods.values():
        await m._on_pod("ADDED", p, None)
    await m.resync_once(full=False)
    assert sorted(s["metadata"]["namespace"] for s in api.status_applied) == ["a", "b"]
    spec_writes = len(api.applied)
    assert spec_writes > 2  # the groups, their lookup objects, their NetworkPolicies

    await m.resync_once(full=False)  # nothing changed since
    assert len(api.status_applied) == 2 and len(api.applied) == spec_writes

    gone = pods[("a", "p1")]
    await m._on_pod("DELETED", gone, gone)
    assert ("a", next(iter(m.groups))[1]) in m.queue and len(m.queue) == 1
    await m.resync_once(full=False)
    # One status write for the departure, in its own group, and nothing else re-applied.
    assert len(api.status_applied) == 3 and len(api.applied) == spec_writes
    last = api.status_applied[-1]
    assert last["metadata"]["namespace"] == "a" and last["status"]["readyPeers"] == 1
    assert [p.split("=")[0] for p in last["status"]["peers"]] == ["p2"]

    await m.resync_once(full=True)  # drift repair: every group's objects again
    assert len(api.applied) > spec_writes and len(api.status_applied) == 3


async def test_a_changed_label_reapplies_the_network_policy_on_the_event_path():
    api = FakeMeshClient()
    m = Mesh(api, PolicyDefaults(redis_address="127.0.0.1:1"))
    p = pod("a", "p1", "127.64.0.1")
    await m._on_pod("ADDED", p, None)
    await m.resync_once(full=False)
    n = len(api.applied)
    q = copy.deepcopy(p)
    q["metadata"]["labels"]["tier"] = "canary"
    await m._on_pod("MODIFIED", q, p)
    await m.resync_once(full=False)
    assert len(api.applied) > n
    assert api.applied[-1]["kind"] == "NetworkPolicy"


async def test_a_failed_write_forgets_what_was_applied_so_the_retry_writes_it_all():
    api = FakeMeshClient()
    m = Mesh(api, PolicyDefaults(redis_address="127.0.0.1:1"))
    p = pod("a", "p1", "127.64.0.1")
    await m._on_pod("ADDED", p, None)
    await m.resync_once(full=False)
    n = len(api.applied)
    gkey = next(iter(m.groups))
    real_apply = api.apply

    async def failing(obj, subresource=None):
        raise RuntimeError("kvmeshpeergroups.kvmesh.dev not found")
    api.apply = failing
    q = copy.deepcopy(p)
    q["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    await m._on_pod("MODIFIED", q, p)
    await m.work_one()
    assert m.failures[gkey] == 1 and gkey not in m.cr and gkey not in m.status_written
    api.apply = real_apply
    m.queue.add(gkey)  # what the backoff timer does
    await m.work_one()
    assert len(api.applied) > n and api.status_applied[-1]["status"]["readyPeers"] == 0
    assert gkey not in m.failures


async def test_only_every_repair_pass_reapplies_objects():
    api = FakeMeshClient()
    m = Mesh(api, PolicyDefaults(redis_address="127.0.0.1:1"))
    await m._on_pod("ADDED", pod("a", "p1", "127.64.0.1"), None)
    await m.resync_once(full=False)  # the pod's event: everything applied once
    await m.resync_once(full=True)  # a repair pass
    assert not m.repair
    n, s = len(api.applied), len(api.status_applied)
    m.queue_all(repair=False)  # the ordinary periodic pass: status and timers only
    while len(m.queue):
        await m.work_one()
    assert (len(api.applied), len(api.status_applied)) == (n, s)
    m.queue_all(repair=True)
    while len(m.queue):
        await m.work_one()
    assert len(api.applied) > n and len(api.status_applied) == s and not m.repair


async def test_a_member_updated_while_its_group_is_reconciled_keeps_the_peer_policy():
    """The real node showed it (tests/node/test_netpol_real.py): a group's only member was
    updated (Pending -> Running) while the group's first reconcile awaited the API. The pass
    then saw an empty member list, deleted kvmesh-peers-<group> instead of applying it, yet
    recorded the inputs it had started from, so no event re-applied it until the full resync
    (95 s later there)."""
    api = FakeMeshClient()
    m = Mesh(api, PolicyDefaults())
    p = injected_pod(name="p1", uid="u1", ip="127.64.0.1")
    p["metadata"]["namespace"] = "a"
    p["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    await m._on_pod("ADDED", p, None)
    real_apply = api.apply
    updated = copy.deepcopy(p)
    updated["status"]["conditions"] = [{"type": "Ready", "status": "True"}]

    async def apply_then_update(obj, subresource=None):
        if obj["kind"] == "StatefulSet" and not any(o["kind"] == "StatefulSet" for o in api.applied):
            await m._on_pod("MODIFIED", updated, p)  # arrives while the pass applies
        return await real_apply(obj, subresource)
    api.apply = apply_then_update
    await m.resync_once(full=False)
    peers = [o for o in api.applied if o["kind"] == "NetworkPolicy"
             and o["metadata"]["name"].startswith("kvmesh-peers-")]
    assert api.deleted == [] and len(peers) == 1, (api.deleted, peers)
    assert api.status_applied[-1]["status"]["readyPeers"] == 1
