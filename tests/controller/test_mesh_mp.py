"""mp mode in the mesh against a REAL `lmcache coordinator` (lmcache 0.5.6, vllm-0.33.0 consumer
venv) on 127.0.0.1: the status lists its registrations by pod and incarnation; a sidecar
restart, a pod deletion or a stopped server DELETEs exactly the dead incarnations at once,
confirmed through GET /instances; terminating and not-ready pods are left alone; an
unreachable coordinator is retried.

Servers are LMCache's own registration client (tests/backends/mp_registrant.py, what
`lmcache server` runs) with a 0.5 s heartbeat; a crashed server is a SIGKILLed registrant.
The API server is tests/controller/fake_api.py (pods are fed to the mesh's handler); the
group's lookup pod in it points at the real coordinator.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from lmcache_mp import ENV, Coordinator, Registrant, consumers  # noqa: E402

from fake_api import FakeMeshClient  # noqa: E402
from kvmesh.controller import mp  # noqa: E402
from kvmesh.controller.main import Metrics  # noqa: E402
from kvmesh.controller.mesh import Mesh  # noqa: E402
from kvmesh.core import names  # noqa: E402
from kvmesh.core.policy import PolicyDefaults  # noqa: E402
from support import free_port, metric_sum, mp_pod  # noqa: E402

NS = "team-a"


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp_mesh")
    try:  # no eviction: only kvmesh's DELETE removes a crashed registrant
        c = Coordinator("127.0.0.1", free_port(), d, "--instance-timeout", "600")
    except consumers.ConsumerEnvMissing as e:
        pytest.fail(f"{e}\n(needed for the real lmcache coordinator: "
                    f"bash tests/consumers/setup_envs.sh {ENV})")
    try:
        c.wait_up(timeout=240)
        yield c
    finally:
        c.stop()


@pytest.fixture
def servers(coord, tmp_path):
    made: list[Registrant] = []

    def make(*ids: str) -> Registrant:
        r = Registrant(coord, [{"instance_id": i, "advertise_ip": "127.64.0.9",
                                "http_port": 8080, "p2p_advertised_url": "127.64.0.9:6556",
                                "mq_port": 6555} for i in ids],
                       tmp_path, heartbeat=0.5, tag=str(len(made)))
        made.append(r)
        r.wait_registered(timeout=240)  # a loaded 2-core machine
        return r

    yield make
    for r in made:
        if r.alive():
            r.stop()


def lookup_pod(port: int) -> dict:
    return {"metadata": {"name": "kvmesh-mp-default-0", "namespace": NS},
            "spec": {"containers": [{"ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def mesh_for(port: int) -> tuple[Mesh, FakeMeshClient, Metrics]:
    api, metrics = FakeMeshClient(), Metrics()
    api.lookup = [lookup_pod(port)]
    return Mesh(api, PolicyDefaults(), metrics, resync_seconds=1), api, metrics


def uid() -> str:
    return f"{time.time_ns():x}-4d2e"  # a uid-like value with a dash, unique per test


def deletes(metrics: Metrics, result: str) -> float:
    from prometheus_client import generate_latest
    return metric_sum(generate_latest(metrics.registry).decode(),
                      "kvmesh_controller_coordinator_deletes_total", result=result)


async def test_status_lists_the_registrations_by_pod_and_incarnation(coord, servers):
    ua, ub = uid(), uid() + "b"
    servers(names.mp_instance_id(ua, 1), names.mp_instance_id(ub, 1), "not-kvmesh")
    m, api, _ = mesh_for(int(coord.url.rsplit(":", 1)[1]))
    for name, u, ip in (("a", ua, "127.64.0.2"), ("b", ub, "127.64.0.3")):
        await m._on_pod("ADDED", mp_pod(name=name, uid=u, ip=ip), None)
    await m.resync_once(full=False)
    st = api.status_applied[-1]["status"]
    assert st["coordinator"] == coord.url.removeprefix("http://")
    assert st["registered"] >= 3  # (the module's coordinator may hold earlier tests' ids)
    rows = {r["id"]: r for r in st["instances"]}
    assert rows[f"kvm-{ua}-1"] == {"id": f"kvm-{ua}-1", "ip": "127.64.0.9", "p2p": True,
                                   "pod": "a", "incarnation": 1}
    assert rows[f"kvm-{ub}-1"]["pod"] == "b"
    assert "pod" not in rows["not-kvmesh"]  # not a registration kvmesh named
    assert sorted(st["peers"]) == [f"a=kvm-{ua}-1", f"b=kvm-{ub}-1"]
    # the lookup tier it applied: the coordinator Deployment, its Service and policies
    kinds = {(o["kind"], o["metadata"]["name"]) for o in api.applied}
    assert {("Deployment", "kvmesh-mp-default"), ("Service", "kvmesh-mp-default"),
            ("NetworkPolicy", "kvmesh-lookup-mp-default"),
            ("NetworkPolicy", "kvmesh-peers-mp-default")} <= kinds


async def test_sidecar_restart_deletes_the_previous_incarnation_at_once(coord, servers):
    ua, ub = uid(), uid() + "b"
    dead = servers(names.mp_instance_id(ua, 1))
    live = servers(names.mp_instance_id(ua, 2), names.mp_instance_id(ub, 1))
    m, api, metrics = mesh_for(int(coord.url.rsplit(":", 1)[1]))
    a = mp_pod(name="a", uid=ua, ip="127.64.0.2")
    await m._on_pod("ADDED", a, None)
    await m._on_pod("ADDED", mp_pod(name="b", uid=ub, ip="127.64.0.3"), None)
    dead.crash()  # the sidecar's server died; the kubelet restarted it (incarnation 2)
    a2 = copy.deepcopy(a)
    a2["status"]["initContainerStatuses"][1]["restartCount"] = 1
    t0 = time.monotonic()
    await m._on_pod("MODIFIED", a2, a)  # the purge runs on the watch path
    took = time.monotonic() - t0
    listed = coord.listed()
    assert f"kvm-{ua}-1" not in listed  # gone, and confirmed gone before _on_pod returned
    assert {f"kvm-{ua}-2", f"kvm-{ub}-1"} <= set(listed)  # the live ones untouched
    assert took < 5, took
    rec = m.last_purge[(NS, m.members[(NS, "a")].peer_group)]
    assert (rec.reason, rec.what, rec.removed) == ("restarted",
                                                   f"coordinator registration kvm-{ua}-1", 1)
    assert deletes(metrics, "confirmed") == 1 and not m.pending
    await m.resync_once(full=False)
    assert "registrations" in api.events[-1][2] and api.events[-1][1] == "LookupStatePurged"
    assert [r["id"] for r in api.status_applied[-1]["status"]["instances"]
            if r.get("pod") == "a"] == [f"kvm-{ua}-2"]
    live.stop()


async def test_terminating_and_not_ready_are_left_alone_deletion_removes_every_incarnation(
        coord, servers):
    ua = uid()
    both = servers(names.mp_instance_id(ua, 1), names.mp_instance_id(ua, 2))
    m, _, metrics = mesh_for(int(coord.url.rsplit(":", 1)[1]))
    a = mp_pod(name="a", uid=ua, sidecar_restarts=1)
    await m._on_pod("ADDED", a, None)
    both.crash()  # incarnation 1 left over (never deleted), 2 dies with the pod
    not_ready = copy.deepcopy(a)
    not_ready["status"]["conditions"][0]["status"] = "False"
    await m._on_pod("MODIFIED", not_ready, a)
    terminating = copy.deepcopy(not_ready)
    terminating["metadata"]["deletionTimestamp"] = "2026-11-30T10:00:00Z"
    await m._on_pod("MODIFIED", terminating, not_ready)
    # the sidecar outlives vLLM and deregisters itself: nothing deleted yet
    assert {f"kvm-{ua}-1", f"kvm-{ua}-2"} <= set(coord.listed())
    assert deletes(metrics, "confirmed") == 0 and not m.pending
    await m._on_pod("DELETED", terminating, terminating)
    assert not {f"kvm-{ua}-1", f"kvm-{ua}-2"} & set(coord.listed())
    assert deletes(metrics, "confirmed") == 2


async def test_unreachable_coordinator_is_retried_and_a_live_server_is_not_fought(
        coord, servers):
    ua = uid()
    dead = servers(names.mp_instance_id(ua, 1))
    m, api, metrics = mesh_for(free_port())  # nothing listens there
    a = mp_pod(name="a", uid=ua)
    await m._on_pod("ADDED", a, None)
    dead.crash()
    await m._on_pod("DELETED", a, a)
    assert m.pending and f"kvm-{ua}-1" in coord.listed()
    assert metric_sum_errors(metrics) == 1
    api.lookup = [lookup_pod(int(coord.url.rsplit(":", 1)[1]))]  # the coordinator is back
    await m.retry_purges()
    assert not m.pending and f"kvm-{ua}-1" not in coord.listed()

    # A DELETE aimed at an incarnation that still runs (the sidecar's counter and the
    # kubelet's restartCount disagree) costs it one heartbeat: it registers again, and the
    # mesh does not fight it (no retry).
    ub = uid() + "b"
    live = servers(names.mp_instance_id(ub, 1))
    b = mp_pod(name="b", uid=ub)
    await m._on_pod("ADDED", b, None)
    b2 = copy.deepcopy(b)
    b2["status"]["initContainerStatuses"][1]["restartCount"] = 1
    await m._on_pod("MODIFIED", b2, b)
    assert not m.pending
    t0 = time.monotonic()
    # The coordinator lists the new registration a moment before the registrar logs it (seen
    # under load): wait for both, then check it registered exactly once more.
    while f"kvm-{ub}-1" not in coord.listed() or \
            live.registrations().count(f"kvm-{ub}-1") < 2:
        assert time.monotonic() - t0 < 10, "the live server did not register again"
        time.sleep(0.1)
    assert live.alive() and live.registrations().count(f"kvm-{ub}-1") == 2


async def test_a_peer_the_coordinator_does_not_list_is_not_registered(coord, servers):
    """Group health (issue 14): a Ready peer whose registration the real coordinator's
    GET /instances does not list for the grace (4 resyncs of 1 s) makes the group Degraded,
    NotRegistered, naming that pod (condition, Event, kvmesh_group_* series); its server
    registering ends it. Before the grace, nobody is named."""
    from prometheus_client import generate_latest
    from kvmesh.core import health
    ua, ub = uid(), uid() + "b"
    servers(names.mp_instance_id(ua, 1))  # a's server registered; b's never does
    m, api, metrics = mesh_for(int(coord.url.rsplit(":", 1)[1]))
    await m._on_pod("ADDED", mp_pod(name="a", uid=ua, ip="127.64.0.2"), None)
    await m._on_pod("ADDED", mp_pod(name="b", uid=ub, ip="127.64.0.3"), None)

    def conds() -> dict:
        return {c["type"]: c for c in api.status_applied[-1]["status"]["conditions"]}

    await m.resync_once()  # every group
    assert conds()[health.DEGRADED]["status"] == "False"  # within the grace: not judged
    t0 = time.monotonic()
    while conds()[health.DEGRADED]["reason"] != health.NOT_REGISTERED:
        assert time.monotonic() - t0 < 30, conds()
        time.sleep(0.5)
        await m.resync_once()  # every group
    assert time.monotonic() - t0 >= 3  # not before the grace (4 s from the first sight)
    c = conds()[health.DEGRADED]
    assert c["status"] == "True"
    assert c["message"] == ("b not registered with the group's lmcache coordinator "
                            "(GET /instances)")
    assert conds()[health.SHARING]["status"] == "False"
    await asyncio.sleep(0.2)  # Events are sent in the background
    ev = [e for e in api.events if e[1] == health.NOT_REGISTERED]
    assert ev and ev[0][3] == "Warning" and "Fix:" in ev[0][2]
    text = generate_latest(metrics.registry).decode()
    assert metric_sum(text, "kvmesh_group_degraded", reason=health.NOT_REGISTERED) == 1
    assert metric_sum(text, "kvmesh_group_problem_members", reason=health.NOT_REGISTERED) == 1

    servers(names.mp_instance_id(ub, 1))  # b's server registers: the group shares
    await m.resync_once()  # every group
    assert conds()[health.SHARING]["status"] == "True", conds()
    assert conds()[health.DEGRADED]["reason"] == health.HEALTHY
    await asyncio.sleep(0.2)
    assert any(e[1] == "SharingRestored" for e in api.events)
    assert "NotRegistered" not in generate_latest(metrics.registry).decode()

    # The coordinator stops answering: LookupNotReady (no stale listing reused).
    api.lookup = [lookup_pod(free_port())]
    await m.resync_once()  # every group
    assert conds()[health.DEGRADED]["reason"] == health.LOOKUP_NOT_READY


def metric_sum_errors(metrics: Metrics) -> float:
    from prometheus_client import generate_latest
    return metric_sum(generate_latest(metrics.registry).decode(),
                      "kvmesh_controller_errors_total", loop="purge")


def test_dead_ids_pure():
    listed = ["kvm-u-1-1", "kvm-u-1-2", "kvm-u-1-3", "kvm-u-2-1", "kvm-u-1-x", "other"]
    assert mp.dead_ids(listed, "u-1", 3, "kvm-u-1-2") == ["kvm-u-1-1", "kvm-u-1-2"]
    assert mp.dead_ids(listed, "u-1", None, "kvm-u-1-3") == ["kvm-u-1-1", "kvm-u-1-2",
                                                             "kvm-u-1-3"]
    assert mp.dead_ids([], "u-1", None, "kvm-u-1-4") == ["kvm-u-1-4"]  # not listed: sent anyway
    assert mp.dead_ids([], "u-1", 4, "kvm-u-1-4") == []  # the live one: never
    assert mp.parse_instance_id("kvm-0b4f-77-12") == ("0b4f-77", 12)
    for bad in ("kvm-u-0", "kvm--1", "x-u-1", "kvm-u-", "kvm-u-1e3", "kvm-u-" + "9" * 12):
        assert mp.parse_instance_id(bad) is None, bad
