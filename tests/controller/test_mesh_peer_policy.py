"""Mesh.reconcile_peer_policy with the API faked: what it applies or deletes, what it logs,
and that a failed NetworkPolicy listing changes nothing."""

import dataclasses
import logging

import pytest

from fake_api import FakeMeshClient
from kvmesh.core import names
from kvmesh.core import groups
from kvmesh.controller.mesh import Mesh
from kvmesh.core.policy import PolicyDefaults
from kvmesh.kube.api import ApiError
from support import injected_pod

GKEY = ("team-a", groups.PeerGroupId("controller", "default"))
OWNER = {"apiVersion": "kvmesh.dev/v1alpha1", "kind": "KVMeshPeerGroup",
         "name": "controller-default", "uid": "u-g", "controller": True}


def user_policy(name, match_labels):
    return {"metadata": {"name": name, "namespace": "team-a"},
            "spec": {"podSelector": {"matchLabels": match_labels}, "policyTypes": ["Ingress"]}}


@pytest.fixture
def api():
    """The namespace's NetworkPolicies (`network_policies_listed`, or an exception) and what
    kvmesh wrote."""
    return FakeMeshClient()


def group(canary_b=False) -> groups.Group:
    a = injected_pod(name="a", uid="ua")
    b = injected_pod(name="b", uid="ub")
    if canary_b:
        b["metadata"]["labels"]["tier"] = "canary"
    return groups.groups_of([groups.member_from_pod(p) for p in (a, b)])[GKEY]


def froms(obj):
    return [r.get("from") is not None for r in obj["spec"]["ingress"]]


async def test_flips_between_open_and_additive_logging_each_change_once(api, caplog):
    mesh = Mesh(api, PolicyDefaults())
    g = group()
    caplog.set_level(logging.INFO, "kvmesh.mesh")
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    assert [froms(o) for o in api.applied] == [[True, True, False]] * 2  # peers, lmcache, all
    assert api.applied[0]["metadata"]["name"] == "kvmesh-peers-controller-default"
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "no other NetworkPolicy selects its pods" in caplog.text

    caplog.clear()
    api.network_policies_listed = [user_policy("mine", {"app": "qwen"})]
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    assert froms(api.applied[-1]) == [True, True]
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "already selected by NetworkPolicy mine," in caplog.text


async def test_a_user_policy_selecting_some_members_is_warned_about(api, caplog):
    mesh = Mesh(api, PolicyDefaults())
    api.network_policies_listed = [user_policy("canary", {"tier": "canary"})]
    caplog.set_level(logging.INFO, "kvmesh.mesh")
    await mesh.reconcile_peer_policy(GKEY, group(canary_b=True), OWNER)
    assert froms(api.applied[-1]) == [True, True]
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "pods a are selected by no policy but" in warning.getMessage()


async def test_a_failed_listing_changes_nothing(api, caplog):
    mesh = Mesh(api, PolicyDefaults())
    g = group()
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    api.network_policies_listed = ApiError(status=403, reason="Forbidden")
    caplog.set_level(logging.INFO, "kvmesh.mesh")
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)  # does not raise
    assert len(api.applied) == 1 and mesh.user_isolated[GKEY] is False
    assert "cannot list NetworkPolicies in team-a" in caplog.text


async def test_no_p2p_ports_deletes_the_policy(api):
    mesh = Mesh(api, PolicyDefaults())
    g = group()
    g.members = {k: dataclasses.replace(m, p2p_ports=()) for k, m in g.members.items()}
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    assert api.applied == [] and api.deleted == [
        ("NetworkPolicy", "team-a", names.PEER_POLICY_PREFIX + "controller-default")]


async def test_switched_off_deletes_the_policy_even_with_p2p_ports(api):
    # --peer-network-policy=off: for network plugins without endPort, which would apply only
    # `port` and cut the pods' other ports.
    mesh = Mesh(api, PolicyDefaults(), peer_policy=False)
    await mesh.reconcile_peer_policy(GKEY, group(), OWNER)
    assert api.applied == [] and api.deleted == [
        ("NetworkPolicy", "team-a", names.PEER_POLICY_PREFIX + "controller-default")]
