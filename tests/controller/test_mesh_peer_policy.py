"""Mesh.reconcile_peer_policy with the API faked: what it applies or deletes, what it logs,
and that a failed NetworkPolicy listing changes nothing."""

import dataclasses
import logging
from types import SimpleNamespace

import pytest
from kubernetes_asyncio import client

from kvmesh.core import names
from kvmesh.core import groups
from kvmesh.kube import apply as kapply
from kvmesh.controller.mesh import Mesh
from kvmesh.core.policy import PolicyDefaults
from support import injected_pod

GKEY = ("team-a", groups.PeerGroupId("controller", "default"))
OWNER = {"apiVersion": "kvmesh.dev/v1alpha1", "kind": "KVMeshPeerGroup",
         "name": "controller-default", "uid": "u-g", "controller": True}


def user_policy(name, match_labels):
    return {"metadata": {"name": name, "namespace": "team-a"},
            "spec": {"podSelector": {"matchLabels": match_labels}, "policyTypes": ["Ingress"]}}


@pytest.fixture
def api(monkeypatch):
    """The namespace's NetworkPolicies (`listed`, or an exception) and what kvmesh wrote."""
    state = SimpleNamespace(listed=[], applied=[], deleted=[])

    async def list_policies(self, ns):
        if isinstance(state.listed, Exception):
            raise state.listed
        return SimpleNamespace(items=list(state.listed))

    async def apply(api, obj, **kw):
        state.applied.append(obj)
        return obj

    async def delete(api, api_version, kind, ns, name):
        state.deleted.append((kind, ns, name))
        return True
    monkeypatch.setattr(client.NetworkingV1Api, "list_namespaced_network_policy",
                        list_policies)
    monkeypatch.setattr(kapply, "apply", apply)
    monkeypatch.setattr(kapply, "delete", delete)
    return state


def group(canary_b=False) -> groups.Group:
    a = injected_pod(name="a", uid="ua")
    b = injected_pod(name="b", uid="ub")
    if canary_b:
        b["metadata"]["labels"]["tier"] = "canary"
    return groups.groups_of([groups.member_from_pod(p) for p in (a, b)])[GKEY]


def froms(obj):
    return [r.get("from") is not None for r in obj["spec"]["ingress"]]


async def test_flips_between_open_and_additive_logging_each_change_once(api, caplog):
    mesh = Mesh(client.ApiClient(), PolicyDefaults())
    g = group()
    caplog.set_level(logging.INFO, "kvmesh.mesh")
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    assert [froms(o) for o in api.applied] == [[True, True, False]] * 2  # peers, lmcache, all
    assert api.applied[0]["metadata"]["name"] == "kvmesh-peers-controller-default"
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "no other NetworkPolicy selects its pods" in caplog.text

    caplog.clear()
    api.listed = [user_policy("mine", {"app": "qwen"})]
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    assert froms(api.applied[-1]) == [True, True]
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "already selected by NetworkPolicy mine," in caplog.text


async def test_a_user_policy_selecting_some_members_is_warned_about(api, caplog):
    mesh = Mesh(client.ApiClient(), PolicyDefaults())
    api.listed = [user_policy("canary", {"tier": "canary"})]
    caplog.set_level(logging.INFO, "kvmesh.mesh")
    await mesh.reconcile_peer_policy(GKEY, group(canary_b=True), OWNER)
    assert froms(api.applied[-1]) == [True, True]
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "pods a are selected by no policy but" in warning.getMessage()


async def test_a_failed_listing_changes_nothing(api, caplog):
    mesh = Mesh(client.ApiClient(), PolicyDefaults())
    g = group()
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    api.listed = client.exceptions.ApiException(status=403, reason="Forbidden")
    caplog.set_level(logging.INFO, "kvmesh.mesh")
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)  # does not raise
    assert len(api.applied) == 1 and mesh.user_isolated[GKEY] is False
    assert "cannot list NetworkPolicies in team-a" in caplog.text


async def test_no_p2p_ports_deletes_the_policy(api):
    mesh = Mesh(client.ApiClient(), PolicyDefaults())
    g = group()
    g.members = {k: dataclasses.replace(m, p2p_ports=()) for k, m in g.members.items()}
    await mesh.reconcile_peer_policy(GKEY, g, OWNER)
    assert api.applied == [] and api.deleted == [
        ("NetworkPolicy", "team-a", names.PEER_POLICY_PREFIX + "controller-default")]


async def test_switched_off_deletes_the_policy_even_with_p2p_ports(api):
    # --peer-network-policy=off: for network plugins without endPort, which would apply only
    # `port` and cut the pods' other ports.
    mesh = Mesh(client.ApiClient(), PolicyDefaults(), peer_policy=False)
    await mesh.reconcile_peer_policy(GKEY, group(), OWNER)
    assert api.applied == [] and api.deleted == [
        ("NetworkPolicy", "team-a", names.PEER_POLICY_PREFIX + "controller-default")]
