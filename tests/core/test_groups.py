"""Membership rules (pure): who is a peer and which changes end a peer's life."""

import copy

import pytest

from kvmesh.core import groups, names
from support import injected_pod


def test_member_from_injected_pods_of_both_modes():
    c = groups.member_from_pod(injected_pod())
    assert c.mode == "controller" and c.peer_group.label == "controller-default" and c.is_peer
    assert c.instance_id == "p-1" and c.worker_ports == (8500,)
    r = groups.member_from_pod(injected_pod("02-api-server-redis"))
    assert r.mode == "redis" and r.address == "127.64.0.9:8200"
    sts = groups.member_from_pod(injected_pod("10-statefulset"))
    assert sts.instance_id == "u-1"  # StatefulSets register under the pod uid


def test_member_p2p_ports_are_the_kvm_named_container_ports_and_labels_are_kept():
    pod = injected_pod()  # declares its own "http" 8000 next to kvmesh's ports
    c = groups.member_from_pod(pod)
    assert c.p2p_ports == (8200, 8210, 8500)  # kvm-init-0, kvm-look-0, kvm-work-0; not 8000
    assert dict(c.labels)[names.LABEL_PEER_GROUP] == "controller-default"
    assert dict(c.labels)["app"] == "qwen"
    assert groups.member_from_pod(injected_pod("02-api-server-redis")).p2p_ports == (8200,)
    ports = pod["spec"]["containers"][0]["ports"]
    ports.insert(0, {"name": "kvm-dist", "containerPort": 8500})  # a repeat: listed once
    ports.append({"name": "kvm-x", "containerPort": 7000})
    assert groups.member_from_pod(pod).p2p_ports == (7000, 8200, 8210, 8500)
    del pod["spec"]["containers"][0]["ports"]
    assert groups.member_from_pod(pod).p2p_ports == ()


def test_uninjected_pods_are_not_members():
    pod = injected_pod()
    pod["metadata"]["annotations"][names.ANN_STATUS] = '{"injected":false}'
    assert groups.member_from_pod(pod) is None
    del pod["metadata"]["labels"][names.LABEL_PEER_GROUP]
    assert groups.member_from_pod(pod) is None


@pytest.mark.parametrize("status", [
    '{"injected":true,"mode":"redis","group":"%s","container":"vllm"}' % ("g" * 33),
    '{"injected":true,"mode":"redis","group":"Bad_Name","container":"vllm"}',
    '{"injected":true,"mode":"redis","group":"ok\\n","container":"vllm"}',
    '{"injected":true,"mode":"redis","group":["x"],"container":"vllm"}',
    '{"injected":true,"mode":["redis"],"container":"vllm"}',
    '["injected"]', "[" * 5000 + "]" * 5000, '"just a string"',
])
def test_pod_controlled_status_that_fits_no_object_name_makes_no_member(status):
    # Anyone who can create a pod writes this annotation: it never yields a group whose
    # derived object names the API server would refuse, nor an exception in the informer.
    pod = injected_pod("02-api-server-redis")
    pod["metadata"]["annotations"][names.ANN_STATUS] = status
    assert groups.member_from_pod(pod) is None


def _changed(mutate):
    old = injected_pod("02-api-server-redis")
    new = copy.deepcopy(old)
    mutate(new)
    return groups.departure(groups.member_from_pod(old), groups.member_from_pod(new))


@pytest.mark.parametrize("mutate,reason", [
    (lambda p: p["status"].update(podIP="127.64.0.10"), "ip-changed"),
    (lambda p: p["status"]["containerStatuses"][0].update(restartCount=1), "restarted"),
    (lambda p: p["metadata"].update(deletionTimestamp="2026-01-01T00:00:00Z"), "terminating"),
    (lambda p: p["status"]["conditions"][0].update(status="False"), "not-ready"),
    (lambda p: p["metadata"].update(uid="u-2"), "deleted"),
])
def test_departures(mutate, reason):
    d = _changed(mutate)
    assert d is not None and d.reason == reason
    assert d.member.address == "127.64.0.9:8200"  # always the OLD incarnation's state


def test_no_departure_for_unrelated_changes_and_deletion_is_one():
    assert _changed(lambda p: p["metadata"]["labels"].update(x="y")) is None
    old = groups.member_from_pod(injected_pod())
    assert groups.departure(old, None).reason == "deleted"
    starting = injected_pod()
    starting["status"] = {"phase": "Pending"}
    assert groups.departure(groups.member_from_pod(starting), None) is None


def test_live_addresses_only_counts_ready_redis_peers():
    a = groups.member_from_pod(injected_pod("02-api-server-redis", "a", "ua", "127.64.0.1"))
    b_pod = injected_pod("02-api-server-redis", "b", "ub", "127.64.0.2")
    b_pod["status"]["conditions"][0]["status"] = "False"
    b = groups.member_from_pod(b_pod)
    c = groups.member_from_pod(injected_pod())
    assert groups.live_addresses([a, b, c]) == {"127.64.0.1:8200"}
    gs = groups.groups_of([a, b, c])
    assert set(gs) == {("team-b", groups.PeerGroupId("redis", "default")),
                       ("team-a", groups.PeerGroupId("controller", "default"))}
    assert [m.name for m in gs[("team-b", groups.PeerGroupId("redis", "default"))].peers] == ["a"]


def test_arrival_of_a_starting_pod_at_an_address_purges_what_predates_it():
    starting = injected_pod("02-api-server-redis", "new", "u-new", "127.64.0.9")
    starting["status"]["conditions"][0]["status"] = "False"
    m = groups.member_from_pod(starting)
    a = groups.arrival(None, m)
    assert a.reason == "address-reused" and a.member.address == "127.64.0.9:8200"
    assert groups.arrival(m, m) is None  # same incarnation, same address: nothing new
    ready = groups.member_from_pod(injected_pod("02-api-server-redis"))
    assert groups.arrival(None, ready) is None  # a running peer's keys are its own


def test_departures_while_unwatched_from_recorded_peers():
    alive = groups.member_from_pod(injected_pod("02-api-server-redis", "a", "ua", "127.64.0.1"))
    reused = groups.member_from_pod(injected_pod("02-api-server-redis", "c", "uc", "127.64.0.2"))
    gid = groups.PeerGroupId("redis", "default")
    g = groups.groups_of([alive, reused])[("team-b", gid)]
    recorded = ["a=127.64.0.1:8200", "b=127.64.0.2:8200", "d=127.64.0.3:8200"]
    gone = groups.departed_during_gap(recorded, g, gid, "team-b")
    assert sorted(d.member.address for d in gone) == ["127.64.0.2:8200", "127.64.0.3:8200"]
    assert all(d.reason == "departed-while-unwatched" for d in gone)
    assert groups.departed_during_gap(recorded, None, gid, "team-b")[0] \
        .member.name == "a"


def test_a_peer_group_is_one_value_with_one_label_form():
    gid = groups.PeerGroupId("redis", "team-x")
    assert gid.label == str(gid) == "redis-team-x" == names.group_id("redis", "team-x")
    assert {gid: 1}[groups.PeerGroupId("redis", "team-x")] == 1  # a dict key, by value
    assert groups.GROUP_NAME.match("team-x") and not groups.GROUP_NAME.match("-x")


def test_compact_pod_keeps_everything_a_member_reads():
    import copy
    import json as _json
    from support import REPO, injected_pod
    cases = sorted(p.stem for p in (REPO / "tests" / "golden" / "cases").glob("*.yaml"))
    checked = 0
    for case in cases:
        try:
            full = injected_pod(case, name="p-9", uid="u-9")
        except Exception:  # not a single-pod workload, or not injected: not a member
            continue
        if groups.member_from_pod(full) is None:
            continue
        full["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:x": {}}}]
        full["metadata"]["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "r",
             "controller": True}, {"apiVersion": "v1", "kind": "X", "name": "n", "uid": "x"}]
        before = copy.deepcopy(full)
        small = groups.compact_pod(full)
        assert full == before  # the informer's object is not changed
        assert groups.member_from_pod(small) == groups.member_from_pod(full), case
        assert small["metadata"]["ownerReferences"] == [full["metadata"]["ownerReferences"][0]]
        assert len(_json.dumps(small)) < 0.6 * len(_json.dumps(full)), case
        checked += 1
    assert checked >= 3


# --- mp mode: the registration belongs to the server sidecar --------------------------------

def _mp_changed(mutate, **kw):
    from support import mp_pod
    old = mp_pod(**kw)
    new = copy.deepcopy(old)
    mutate(new)
    return groups.member_from_pod(old), groups.member_from_pod(new)


def test_mp_member_is_named_by_pod_uid_and_sidecar_incarnation():
    from support import mp_pod
    m = groups.member_from_pod(mp_pod(uid="0b4f-77", sidecar_restarts=2))
    assert m.mode == "mp" and m.peer_group.label == "mp-default" and m.is_peer
    assert m.instance_id == names.mp_instance_id("0b4f-77", 3) == "kvm-0b4f-77-3"
    assert m.token == m.instance_id and m.restarts == 2
    sidecar = next(c for c in mp_pod()["spec"]["initContainers"] if c["name"] == names.MP_SIDECAR)
    assert m.p2p_ports == tuple(sorted(p["containerPort"] for p in sidecar["ports"]))
    assert {p["name"] for p in sidecar["ports"]} == {"kvm-mp-rpc", "kvm-mp-p2p"}
    assert "registration kvm-0b4f-77-3" in groups.Departure(m, "deleted").what


def test_mp_vllm_restart_is_not_a_server_departure_but_the_sidecars_is():
    old, new = _mp_changed(lambda p: p["status"]["containerStatuses"][0]
                           .update(restartCount=4))
    assert groups.departure(old, new) is None and new.instance_id == old.instance_id
    old, new = _mp_changed(lambda p: p["status"]["initContainerStatuses"][1]
                           .update(restartCount=1))
    d = groups.departure(old, new)
    assert d.reason == "restarted" and d.member.instance_id == "kvm-u-1-1"
    assert new.instance_id == "kvm-u-1-2"


@pytest.mark.parametrize("mutate", [
    lambda p: p["status"]["initContainerStatuses"][1].update(
        state={"terminated": {"exitCode": 3}}),
    lambda p: p["status"].update(phase="Failed"),
])
def test_mp_stopped_server_is_a_departure(mutate):
    old, new = _mp_changed(mutate)
    d = groups.departure(old, new)
    assert new.server_stopped and d is not None
    assert d.reason == "server-stopped" and d.member.instance_id == "kvm-u-1-1"


@pytest.mark.parametrize("count", [-1, "3", 1 << 40, None, True])
def test_mp_restart_count_that_is_no_count_counts_as_zero(count):
    from support import mp_pod
    p = mp_pod()
    p["status"]["initContainerStatuses"][1]["restartCount"] = count
    assert groups.member_from_pod(p).instance_id == "kvm-u-1-1"


def test_compact_pod_keeps_the_mp_sidecar_and_its_status():
    from support import mp_pod
    for restarts, state in ((0, {"running": {}}), (5, {"terminated": {"exitCode": 1}})):
        p = mp_pod(sidecar_restarts=restarts)
        p["status"]["initContainerStatuses"][1]["state"] = state
        small = groups.compact_pod(p)
        assert groups.member_from_pod(small) == groups.member_from_pod(p)
        assert small["spec"]["initContainers"][0]["name"] == names.MP_SIDECAR
        assert "args" not in small["spec"]["initContainers"][0]
        assert len(small["status"]["initContainerStatuses"]) == 1
