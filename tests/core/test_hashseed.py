"""Per-group PYTHONHASHSEED: equal within a peer group, different across groups, never a
guess when the key is not known (kvmesh.core.hashseed and its one hook in inject)."""

from __future__ import annotations

import json

import pytest

from kvmesh.core import hashseed, inject, lookup, names
from kvmesh.core.groups import PeerGroupId
from kvmesh.core.inject import Context, decide
from kvmesh.core.policy import PolicyDefaults

KEY = b"k" * 32


def pod(name: str = "p", group: str = "", image: str = "lmcache/vllm-openai:v0.3.6",
        env: list | None = None) -> dict:
    c = {"name": "vllm", "image": image, "command": ["vllm", "serve", "m"]}
    if env is not None:
        c["env"] = env
    return {"metadata": {"name": name, "annotations": {names.ANN_GROUP: group} if group else {},
                         "labels": {names.LABEL_INJECT: names.INJECT_ENABLED}},
            "spec": {"containers": [c]}}


def seed_of(r: inject.Result) -> str | None:
    return {e["name"]: e.get("value") for e in r.pod["spec"]["containers"][0].get("env", [])
            }.get("PYTHONHASHSEED")


def test_derive_is_stable_32_bit_and_keyed():
    s = hashseed.derive(KEY, "ns", "redis-default")
    assert s == hashseed.derive(KEY, "ns", "redis-default")  # webhook, controller, replicas
    assert 0 <= s < 2 ** 32
    assert s != hashseed.derive(KEY, "ns", "redis-other")
    assert s != hashseed.derive(KEY, "ns2", "redis-default")
    assert s != hashseed.derive(b"j" * 32, "ns", "redis-default")
    # Not a prefix of the group's Redis password (derived from another key, but even from the
    # same one the domain prefix keeps them apart): the seed is visible in the pod spec.
    assert f"{s:08x}" != lookup.redis_password(KEY, "ns", "redis-default")[:8]
    with pytest.raises(ValueError):
        hashseed.derive(b"short", "ns", "g")


def test_two_pods_of_one_group_get_the_same_seed_two_groups_differ():
    ctx = Context("ns", hash_seed_key=KEY)
    a1, a2 = decide(pod("a-1"), ctx), decide(pod("a-2"), ctx)
    b = decide(pod("b-1", group="b"), ctx)
    other_ns = decide(pod("a-1"), Context("ns2", hash_seed_key=KEY))
    controller_mode = decide(pod("c-1", image="lmcache/vllm-openai:v0.5.6"), ctx)
    assert seed_of(a1) == seed_of(a2) == str(hashseed.derive(KEY, "ns", "redis-default"))
    assert len({seed_of(a1), seed_of(b), seed_of(other_ns), seed_of(controller_mode)}) == 4


def test_policy_seed_wins_for_every_group_it_covers():
    ctx = Context("ns", PolicyDefaults(hash_seed=7), hash_seed_key=KEY)
    assert seed_of(decide(pod("a"), ctx)) == seed_of(decide(pod("b", group="b"), ctx)) == "7"


def test_users_own_seed_kept_when_valid_replaced_by_the_groups_when_not():
    ctx = Context("ns", hash_seed_key=KEY)
    kept = decide(pod(env=[{"name": "PYTHONHASHSEED", "value": "42"}]), ctx)
    assert seed_of(kept) == "42"
    fixed = decide(pod(env=[{"name": "PYTHONHASHSEED", "value": "random"}]), ctx)
    assert seed_of(fixed) == str(hashseed.derive(KEY, "ns", "redis-default"))
    assert any("PYTHONHASHSEED" in w and "random" in w for w in fixed.warnings)


def test_without_the_key_no_seed_is_guessed_offline():
    r = decide(pod(), Context("ns"))  # the offline CLI: the webhook sets it at admission
    assert r.action == "inject" and seed_of(r) is None
    assert any("PYTHONHASHSEED not set" in w for w in r.warnings)
    # ...and re-admission with the key completes it
    again = decide(r.pod, Context("ns", hash_seed_key=KEY))
    assert seed_of(again) == str(hashseed.derive(KEY, "ns", "redis-default"))


def test_webhook_waiting_for_the_key_skips_with_a_named_reason():
    pending = Context("ns", hash_seed_pending=True)
    r = decide(pod(), pending)
    assert (r.action, r.reason) == ("skip", inject.R_SEED)
    assert names.HASH_SEED_SECRET in r.message
    status = json.loads(r.pod["metadata"]["annotations"][names.ANN_STATUS])
    assert status["injected"] is False and status["reason"] == inject.R_SEED
    assert seed_of(r) is None and "env" not in r.pod["spec"]["containers"][0]
    # A seed that does not depend on the key: injected as usual.
    assert decide(pod(), Context("ns", PolicyDefaults(hash_seed=3), hash_seed_pending=True)
                  ).action == "inject"
    assert seed_of(decide(pod(env=[{"name": "PYTHONHASHSEED", "value": "5"}]), pending)) == "5"
    assert decide(pod(env=[{"name": "PYTHONHASHSEED", "value": "random"}]), pending
                  ).reason == inject.R_SEED


def test_lmcache_controller_hashes_with_its_groups_seed():
    gid = PeerGroupId(names.MODE_CONTROLLER, "default")
    group_obj = {"metadata": {"name": gid.label, "namespace": "ns", "uid": "u"},
                 "spec": {"mode": gid.mode, "group": gid.group}}
    sts = next(o for o in lookup.desired(group_obj, PolicyDefaults(), hash_seed_key=KEY)
               if o["kind"] == "StatefulSet")
    env = {e["name"]: e.get("value")
           for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    member = decide(pod(image="lmcache/vllm-openai:v0.5.6"), Context("ns", hash_seed_key=KEY))
    assert env["PYTHONHASHSEED"] == seed_of(member)
