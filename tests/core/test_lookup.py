"""The group's NetworkPolicies (pure): who reaches the P2P ports, and that kvmesh never widens
what a user's own policies allow."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmesh.core import names
from kvmesh.core import lookup
from kvmesh.core.groups import PeerGroupId

GID = PeerGroupId("controller", "default")
OWNER = {"apiVersion": "kvmesh.dev/v1alpha1", "kind": "KVMeshPeerGroup", "name": GID.label,
         "uid": "u-g", "controller": True, "blockOwnerDeletion": True}
P2P = [8500, 8200, 8210]  # kvm-work-0, kvm-init-0, kvm-look-0 (unsorted on purpose)
PEER = {names.LABEL_PEER_GROUP: GID.label, "app": "qwen"}
LOOKUP = {names.LABEL_LOOKUP_FOR: GID.label}
OTHER = {"app": "client"}


# --- the complement of the P2P ports ---------------------------------------------------------

@pytest.mark.parametrize("ports,ranges", [
    ([], [(1, 65535)]),
    ([1], [(2, 65535)]),
    ([65535], [(1, 65534)]),
    ([1, 65535], [(2, 65534)]),
    ([8200, 8201], [(1, 8199), (8202, 65535)]),  # adjacent: no empty range between
    ([8200, 8202], [(1, 8199), (8201, 8201), (8203, 65535)]),  # a one-port gap
    ([8500, 8200, 8500, 8210], [(1, 8199), (8201, 8209), (8211, 8499), (8501, 65535)]),
    ([0, 70000, 8200], [(1, 8199), (8201, 65535)]),  # not port numbers: ignored
])
def test_ports_outside(ports, ranges):
    assert lookup.ports_outside(ports) == ranges


def test_ports_outside_of_every_port_is_nothing():
    assert lookup.ports_outside(range(1, 65536)) == []


@given(st.lists(st.integers(1, 300), max_size=40))
def test_ports_outside_covers_exactly_the_other_ports(ports):
    ranges = lookup.ports_outside(ports, 1, 300)
    covered = [p for a, b in ranges for p in range(a, b + 1)]
    assert len(covered) == len(set(covered))  # disjoint
    assert set(covered) == set(range(1, 301)) - set(ports)
    assert all(a <= b for a, b in ranges) and ranges == sorted(ranges)


# --- the peer policy ---------------------------------------------------------------------------

def policy(user_isolated: bool, ports=P2P, controller_ports=(8500,)):
    return lookup.peer_network_policy("team-a", GID, OWNER, ports, user_isolated,
                                      controller_ports)


def test_no_p2p_ports_no_policy():
    assert lookup.peer_network_policy("team-a", GID, OWNER, [], False) is None
    assert lookup.peer_network_policy("team-a", GID, OWNER, [], True) is None


def test_policy_object_selects_the_groups_pods_and_is_owned_by_the_group():
    p = policy(False)
    assert p["apiVersion"] == "networking.k8s.io/v1" and p["kind"] == "NetworkPolicy"
    meta = p["metadata"]
    assert meta["name"] == "kvmesh-peers-controller-default" and meta["namespace"] == "team-a"
    assert meta["labels"]["app.kubernetes.io/component"] == "peer-policy"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "kvmesh-controller"
    assert meta["ownerReferences"] == [OWNER]
    assert p["spec"]["podSelector"] == {"matchLabels": {names.LABEL_PEER_GROUP: GID.label}}
    assert p["spec"]["policyTypes"] == ["Ingress"]


PEER_RULE = {"from": [{"podSelector": {"matchLabels": {names.LABEL_PEER_GROUP: GID.label}}}],
             "ports": [{"protocol": "TCP", "port": 8200}, {"protocol": "TCP", "port": 8210},
                       {"protocol": "TCP", "port": 8500}]}
LOOKUP_RULE = {"from": [{"podSelector": {"matchLabels": {names.LABEL_LOOKUP_FOR: GID.label}}}],
               "ports": [{"protocol": "TCP", "port": 8500}]}


def test_rules_when_no_user_policy_selects_the_pods():
    assert policy(False)["spec"]["ingress"] == [PEER_RULE, LOOKUP_RULE, {"ports": [
        {"protocol": "TCP", "port": 1, "endPort": 8199},
        {"protocol": "TCP", "port": 8201, "endPort": 8209},
        {"protocol": "TCP", "port": 8211, "endPort": 8499},
        {"protocol": "TCP", "port": 8501, "endPort": 65535},
        {"protocol": "UDP"}, {"protocol": "SCTP"}]}]


def test_rules_when_a_user_policy_selects_the_pods_only_add_the_p2p_allowances():
    assert policy(True)["spec"]["ingress"] == [PEER_RULE, LOOKUP_RULE]


def test_redis_mode_has_no_lookup_rule_and_a_single_port_gap_needs_no_end_port():
    rules = lookup.peer_network_policy("team-b", PeerGroupId("redis", "default"), OWNER,
                                       [8200, 8202],
                                       False)["spec"]["ingress"]
    assert [r.get("from") is None for r in rules] == [False, True]
    assert rules[1]["ports"][:3] == [{"protocol": "TCP", "port": 1, "endPort": 8199},
                                     {"protocol": "TCP", "port": 8201},
                                     {"protocol": "TCP", "port": 8203, "endPort": 65535}]


def allowed(pol: dict, source_labels: dict, protocol: str, port: int) -> bool:
    """NetworkPolicy ingress semantics for a source pod in the policy's namespace reaching a
    pod the policy selects (the subset of the API this policy uses; anything else fails)."""
    for rule in pol["spec"]["ingress"]:
        sources = rule.get("from")
        if sources is not None:
            assert all(set(s) == {"podSelector"} for s in sources), sources
            if not any(all(source_labels.get(k) == v
                           for k, v in s["podSelector"]["matchLabels"].items())
                       for s in sources):
                continue
        entries = rule.get("ports")
        if entries is None:
            return True
        for e in entries:
            assert set(e) <= {"protocol", "port", "endPort"}, e
            if e.get("protocol", "TCP") != protocol:
                continue
            if "port" not in e or e["port"] <= port <= e.get("endPort", e["port"]):
                return True
    return False


@pytest.mark.parametrize("user_isolated", [False, True])
def test_only_peers_reach_the_p2p_ports(user_isolated):
    pol = policy(user_isolated)
    for port in P2P:
        assert allowed(pol, PEER, "TCP", port)
        assert not allowed(pol, OTHER, "TCP", port)
    # The lmcache_controller reaches the worker port only (control RPCs, health checks).
    assert allowed(pol, LOOKUP, "TCP", 8500)
    assert not allowed(pol, LOOKUP, "TCP", 8200) and not allowed(pol, LOOKUP, "TCP", 8210)


def test_without_a_user_policy_everything_but_the_p2p_ports_stays_open():
    pol = policy(False)
    for port in (8000, 1, 65535, 8205, 8201, 8499, 8501):  # 8205: between two P2P ports
        assert allowed(pol, OTHER, "TCP", port), port
    assert allowed(pol, OTHER, "UDP", 53) and allowed(pol, OTHER, "UDP", 8200)
    assert allowed(pol, OTHER, "SCTP", 8200)


def test_with_a_user_policy_non_peers_reach_nothing_through_this_policy():
    pol = policy(True)
    for proto, port in [("TCP", 8000), ("TCP", 1), ("TCP", 65535), ("TCP", 8205),
                        ("UDP", 53), ("SCTP", 8200)]:
        assert not allowed(pol, OTHER, proto, port), (proto, port)
    assert not allowed(pol, PEER, "TCP", 8000)  # peers too: only the P2P ports are added


# --- does a user's policy isolate the group's pods? ----------------------------------------

def netpol(name, selector, types=None, managed=False):
    meta = {"name": name, "namespace": "team-a"}
    if managed:
        meta["labels"] = {"app.kubernetes.io/managed-by": "kvmesh-controller"}
    spec = {"podSelector": selector}
    if types is not None:
        spec["policyTypes"] = types
    return {"metadata": meta, "spec": spec}


MEMBERS = [PEER, {names.LABEL_PEER_GROUP: GID.label, "app": "qwen", "tier": "canary"}]


def test_isolating_policies():
    assert lookup.isolating_policies([], MEMBERS) == []
    assert lookup.isolating_policies([
        netpol("kvmesh-peers-x", {}, ["Ingress"], managed=True),  # kvmesh's own
        netpol("egress-only", {}, ["Egress"]),
        netpol("other-app", {"matchLabels": {"app": "web"}}, ["Ingress"]),
        netpol("no-canary", {"matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["stable"]}]}),
    ], MEMBERS) == []
    assert lookup.isolating_policies([
        netpol("deny-all", {}, ["Ingress", "Egress"]),  # empty selector: every pod
        netpol("qwen", {"matchLabels": {"app": "qwen"}}),  # no policyTypes: Ingress
        netpol("canary-only", {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
               ["Ingress"]),  # one member is enough
        netpol("unreadable", {"matchExpressions": [{"key": "a", "operator": "Gt"}]}),
    ], MEMBERS) == ["canary-only", "deny-all", "qwen", "unreadable"]


# --- what kvmesh creates: names that fit, image by policy, pod security ------------------------

def _objects(mode: str, group: str, **policy) -> list[dict]:
    from kvmesh.core.policy import PolicyDefaults
    gid = PeerGroupId(mode, group)
    cr = {**lookup.peer_group("ns", gid)}
    cr["metadata"] = {**cr["metadata"], "uid": "u"}
    return lookup.desired(cr, PolicyDefaults(**policy))


LONGEST = "g" * 32


def test_group_name_pattern_bounds_every_derived_name():
    from kvmesh.core.groups import GROUP_NAME
    assert GROUP_NAME.match(LONGEST) and not GROUP_NAME.match(LONGEST + "g")
    assert not GROUP_NAME.match("default\n")
    for mode in names.MODES:
        for obj in _objects(mode, LONGEST):
            name = obj["metadata"]["name"]
            # Service and label values: DNS-1035/1123 labels (63); a StatefulSet's name plus
            # "-<10-char revision hash>" is a label value too.
            assert len(name) <= (52 if obj["kind"] == "StatefulSet" else 63), name
            for v in obj["metadata"]["labels"].values():
                assert len(v) <= 63


def test_lookup_image_from_policy_never_from_members():
    sts = next(o for o in _objects("controller", "default") if o["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == \
        names.LMCACHE_CONTROLLER_IMAGE
    sts = next(o for o in _objects("controller", "default",
                                   controllerImage="registry.local:5000/lmc@sha256:" + "a" * 64)
               if o["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"].startswith("registry.local")


def test_lmcache_controller_liveness_waits_for_its_start():
    """Its start (one big Python import) may outlast the liveness budget on a busy node: the
    startup probe gives it 5 min on the liveness endpoint before liveness counts."""
    sts = next(o for o in _objects("controller", "default") if o["kind"] == "StatefulSet")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    start, live = c["startupProbe"], c["livenessProbe"]
    assert start["httpGet"] == live["httpGet"] == {"path": "/metrics", "port": "http"}
    assert start["periodSeconds"] * start["failureThreshold"] >= 300
    assert live["periodSeconds"] * live["failureThreshold"] < 300 and live["timeoutSeconds"] >= 5


def test_lookup_image_is_the_published_image_of_the_members_lmcache_version():
    from kvmesh.core.policy import PolicyDefaults
    pol = PolicyDefaults()
    # The newest controller-generation version any member names; a member's own repository,
    # a redis-generation tag or an unversioned image never becomes the image.
    assert lookup.controller_image(pol, ["evil.example/lmcache:v0.5.6", "lmcache/vllm-openai:v0.3.9"]) \
        == "lmcache/vllm-openai:v0.5.6"
    assert lookup.controller_image(pol, ["lmcache/vllm-openai:v0.3.6", "vllm/vllm-openai:v0.10.0"]) \
        == names.LMCACHE_CONTROLLER_IMAGE
    assert lookup.controller_image(PolicyDefaults(controllerImage="r/x:1"),
                                   ["lmcache/vllm-openai:v0.5.6"]) == "r/x:1"


@pytest.mark.parametrize("bad", ["", "Lmcache/X", "img; rm -rf /", "a" * 300, "x:1\n"])
def test_controller_image_rejects_non_references(bad):
    from pydantic import ValidationError
    from kvmesh.core.policy import PolicyDefaults
    with pytest.raises(ValidationError):
        PolicyDefaults(controllerImage=bad)


@pytest.mark.parametrize("mode", names.MODES)
def test_lookup_pods_restricted_with_limits_and_probes(mode):
    for obj in _objects(mode, "default"):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = obj["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc["runAsNonRoot"]
            assert set(c["resources"]["limits"]) == {"cpu", "memory"}
            assert set(c["resources"]["requests"]) == {"cpu", "memory"}
            assert c["readinessProbe"] and c["livenessProbe"]


def test_group_redis_gets_acls_and_only_the_password_hash():
    from kvmesh.core.policy import PolicyDefaults
    pw = lookup.redis_password(b"m" * 32, "ns", "default")
    assert pw == lookup.redis_password(b"m" * 32, "ns", "default")  # any leader derives it
    assert pw != lookup.redis_password(b"m" * 32, "ns2", "default")  # per namespace/group
    assert pw != lookup.redis_password(b"n" * 32, "ns", "default")
    gid = PeerGroupId("redis", "default")
    cr = {**lookup.peer_group("ns", gid)}
    cr["metadata"] = {**cr["metadata"], "uid": "u"}
    dep = lookup.desired(cr, PolicyDefaults(), lookup.password_sha256(pw))[0]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--user") + 1] == "default" and "~vllm@*" in args
    assert f"#{lookup.password_sha256(pw)}" in args and pw not in " ".join(args)
    with pytest.raises(ValueError):
        lookup.redis_acl_args("not-a-hash")


# --- mp mode: one lmcache coordinator per group ----------------------------------------------

def test_mp_coordinator_is_one_recreated_replica_matching_the_groups_chunk_size():
    objs = {o["kind"]: o for o in _objects("mp", "team-x", chunkSize=64)}
    assert set(objs) == {"Deployment", "Service", "NetworkPolicy"}
    dep, svc, pol = objs["Deployment"], objs["Service"], objs["NetworkPolicy"]
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == "kvmesh-mp-team-x" \
        == names.lookup_service_name("mp", "team-x")
    # Never two coordinators at once: they would split the membership.
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["lmcache", "coordinator"] and c["image"] == names.LMCACHE_MP_IMAGE
    args = dict(zip(c["args"][::2], c["args"][1::2]))
    assert args == {"--host": "0.0.0.0", "--port": "9300", "--chunk-size": "64",
                    "--hash-algorithm": "blake3", "--instance-timeout": "10",
                    "--health-check-interval": "1"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": names.COORDINATOR_PORT}]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 9300, "targetPort": "http"}]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] == \
        {names.LABEL_LOOKUP_FOR: "mp-team-x"}
    # Only the group's pods and kvmesh reach the coordinator.
    (rule,) = pol["spec"]["ingress"]
    assert rule["ports"] == [{"port": 9300, "protocol": "TCP"}]
    assert rule["from"][0] == {"podSelector": {"matchLabels": {
        names.LABEL_PEER_GROUP: "mp-team-x"}}}


def test_mp_coordinator_image_is_published_lmcache_with_mp_p2p_or_the_policys():
    from kvmesh.core.policy import PolicyDefaults
    pol = PolicyDefaults()
    assert lookup.mp_image(pol, ["lmcache/vllm-openai:v0.5.1", "lmcache/vllm-openai:v0.4.7",
                                 "evil.example/x:v9.9.9"]) == "lmcache/vllm-openai:v0.5.1"
    assert lookup.mp_image(pol, ["lmcache/vllm-openai:v0.4.7"]) == names.LMCACHE_MP_IMAGE
    assert lookup.mp_image(PolicyDefaults(controllerImage="r/c:1"), []) == "r/c:1"


def test_mp_peers_reach_each_other_on_every_port_for_nixls_data_listeners():
    gid = PeerGroupId("mp", "default")
    for isolated in (False, True):
        pol = lookup.peer_network_policy("ns", gid, OWNER, [6555, 6556], isolated,
                                         peers_any_port=True)
        peers = {"podSelector": {"matchLabels": {names.LABEL_PEER_GROUP: gid.label}}}
        assert {"from": [peers]} in pol["spec"]["ingress"]  # no ports: all of them
        assert pol["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6555},
                                                      {"protocol": "TCP", "port": 6556}]
    plain = lookup.peer_network_policy("ns", GID, OWNER, P2P, True)
    assert all("ports" in r for r in plain["spec"]["ingress"])  # other modes: unchanged
