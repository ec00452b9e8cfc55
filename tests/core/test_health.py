"""Group health verdicts (pure): what silently breaks sharing, and the conditions."""

from __future__ import annotations

from kvmesh.core import groups, health, names
from kvmesh.core.groups import Member, PeerGroupId
from support import injected_pod


def member(name, mode=names.MODE_CONTROLLER, image="lmcache/vllm-openai:v0.3.9", seed="0",
           chunk="256", ip=None, ready=True, address=None, ports=(8200,)):
    return Member(namespace="ns", name=name, uid=f"u-{name}",
                  peer_group=PeerGroupId(mode, "default"), ip=ip or f"127.64.0.{len(name)}",
                  ready=ready, terminating=False, restarts=0, address=address,
                  instance_id=name, image=image, p2p_ports=tuple(ports), hash_seed=seed,
                  chunk_size=chunk)


def reasons(problems):
    return [p.reason for p in problems]


def test_compatible_group_has_no_problem():
    ms = [member("a"), member("bb")]
    assert health.assess(ms, names.MODE_CONTROLLER, True) == []


def test_controller_mode_versions_judged_against_the_lookup_tiers_newest():
    ms = [member("a", image="lmcache/vllm-openai:v0.3.9"),
          member("bb", image="lmcache/vllm-openai:v0.3.9"),
          member("ccc", image="lmcache/vllm-openai:v0.4.1")]
    [p] = health.assess(ms, names.MODE_CONTROLLER, None)
    # The lmcache_controller runs the newest version named (core.lookup.controller_image),
    # so the two older members are the ones that cannot register, majority or not.
    assert p.reason == health.VERSION_MISMATCH and p.pods == ("a", "bb")
    assert "0.3.9" in p.message and "(0.4.1)" in p.message


def test_untagged_images_are_not_judged():
    ms = [member("a", image="lmcache/vllm-openai:latest"), member("bb")]
    assert health.assess(ms, names.MODE_CONTROLLER, None) == []


def test_redis_mode_versions_judged_against_the_most_common():
    ms = [member(n, names.MODE_REDIS, image=i, address=f"10.0.0.{k}:8200")
          for k, (n, i) in enumerate((("a", "lmcache/vllm-openai:v0.3.5"),
                                      ("bb", "lmcache/vllm-openai:v0.3.6"),
                                      ("ccc", "lmcache/vllm-openai:v0.3.6")))]
    [p] = health.assess(ms, names.MODE_REDIS, True)
    assert p.reason == health.VERSION_MISMATCH and p.pods == ("a",)


def test_hash_seed_and_chunk_size_mismatches_name_the_odd_members():
    ms = [member("a"), member("bb"), member("ccc", seed="7", chunk="512")]
    problems = health.assess(ms, names.MODE_CONTROLLER, True)
    assert reasons(problems) == [health.HASH_SEED_MISMATCH, health.CHUNK_SIZE_MISMATCH]
    assert all(p.pods == ("ccc",) for p in problems)
    assert "PYTHONHASHSEED 7 on ccc differs from the group's 0" == problems[0].message


def test_a_value_from_a_reference_is_not_compared():
    ms = [member("a", seed=None), member("bb", seed="5")]
    assert health.assess(ms, names.MODE_CONTROLLER, True) == []


def test_two_peers_advertising_one_address():
    ms = [member("a", ip="10.0.0.1"), member("bb", ip="10.0.0.1"), member("ccc")]
    [p] = health.assess(ms, names.MODE_CONTROLLER, True)
    assert p.reason == health.DUPLICATE_ADDRESS and p.pods == ("a", "bb")
    assert "10.0.0.1:8200 by a, bb" in p.message
    # Not a peer (not ready): its address is not advertised.
    ms[1] = member("bb", ip="10.0.0.1", ready=False)
    assert health.assess(ms, names.MODE_CONTROLLER, True) == []


def test_redis_mode_duplicate_is_the_published_address():
    ms = [member("a", names.MODE_REDIS, address="10.0.0.1:8200", ip="10.0.0.1"),
          member("bb", names.MODE_REDIS, address="10.0.0.1:8200", ip="10.0.0.1")]
    assert reasons(health.assess(ms, names.MODE_REDIS, True)) == [health.DUPLICATE_ADDRESS]


def test_lookup_not_ready_only_when_known():
    ms = [member("a"), member("bb")]
    assert reasons(health.assess(ms, names.MODE_CONTROLLER, False)) == [health.LOOKUP_NOT_READY]
    assert health.assess(ms, names.MODE_CONTROLLER, None) == []


def cond(conds, type_):
    return next(c for c in conds if c["type"] == type_)


def test_conditions_sharing_degraded_and_stable_transition_times():
    t0, t1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"
    one = health.conditions([], 1, t0)
    assert cond(one, health.SHARING)["status"] == "False"
    assert cond(one, health.SHARING)["reason"] == health.NO_PEERS
    assert cond(one, health.DEGRADED)["status"] == "False"
    two = health.conditions([], 2, t1, one)
    assert cond(two, health.SHARING)["status"] == "True"
    assert cond(two, health.SHARING)["lastTransitionTime"] == t1  # it flipped
    assert cond(two, health.DEGRADED)["lastTransitionTime"] == t0  # it held
    assert health.conditions([], 2, "later", two) == two  # unchanged group, unchanged status
    p = health.Problem(health.HASH_SEED_MISMATCH, "PYTHONHASHSEED differs", ("x",))
    bad = health.conditions([p], 2, t1, two)
    assert cond(bad, health.DEGRADED)["status"] == "True"
    assert cond(bad, health.DEGRADED)["reason"] == health.HASH_SEED_MISMATCH
    assert cond(bad, health.SHARING)["status"] == "False"


def test_every_reason_has_a_fix():
    for r in (health.VERSION_MISMATCH, health.HASH_SEED_MISMATCH, health.CHUNK_SIZE_MISMATCH,
              health.DUPLICATE_ADDRESS, health.LOOKUP_NOT_READY, health.NOT_REGISTERED,
              health.NO_PEERS):
        assert r in health.FIXES


def test_member_reads_seed_and_chunk_size_also_from_its_compact_record():
    pod = injected_pod()
    c = pod["spec"]["containers"][0]  # the vLLM container of this golden
    env = {e["name"]: e for e in c["env"]}
    env["PYTHONHASHSEED"]["value"] = "42"
    m = groups.member_from_pod(pod)
    assert m.hash_seed == "42" and m.chunk_size == env["LMCACHE_CHUNK_SIZE"]["value"]
    assert groups.member_from_pod(groups.compact_pod(pod)) == m
