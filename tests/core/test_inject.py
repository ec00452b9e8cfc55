"""Behaviour of the pure core, one rule per test (the goldens cover whole manifests)."""

import copy
import json

import pytest

from kvmesh.core import hashseed, names
from kvmesh.core import inject
from kvmesh.core.inject import Context, decide
from kvmesh.core.policy import PolicyDefaults

CTX = Context(namespace="ns")


def pod(*containers, labels=None, annotations=None, **spec):
    return {"metadata": {"generateName": "p-", "labels": {names.LABEL_INJECT: "enabled",
                                                          **(labels or {})},
                         **({"annotations": annotations} if annotations else {})},
            "spec": {"containers": list(containers), **spec}}


def vllm(image="lmcache/vllm-openai:v0.3.9", command=("vllm", "serve", "m"), **kw):
    c = {"name": kw.pop("name", "vllm"), "image": image, **kw}
    if command is not None:
        c["command"] = list(command)
    if isinstance(c.get("args"), tuple):
        c["args"] = list(c["args"])
    return c


def env_of(result, container=0):
    return result.pod["spec"]["containers"][container].get("env", [])


def env_map(result, container=0):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in env_of(result, container)}


def test_pod_ip_defined_before_every_reference():
    for mode in ("redis", "controller"):
        r = decide(pod(vllm(env=[{"name": "LMCACHE_P2P_HOST", "value": "svc"},
                                 {"name": "LMCACHE_DISTRIBUTED_URL", "value": "svc:1"}]),
                       annotations={names.ANN_MODE: mode}), CTX)
        env = env_of(r)
        ip_at = next(i for i, e in enumerate(env) if e["name"] == names.POD_IP_VAR)
        refs = [i for i, e in enumerate(env) if f"$({names.POD_IP_VAR})" in str(e.get("value", ""))]
        assert refs, (mode, env)  # the loop below must have something to check
        for i in refs:
            assert i > ip_at, (mode, env[i])


def test_reuses_user_pod_ip_variable_even_when_defined_late():
    user_ip = {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    r = decide(pod(vllm(env=[{"name": "LMCACHE_P2P_HOST", "value": "0.0.0.0"},
                             {"name": "A", "value": "1"}, user_ip])), CTX)
    env = env_of(r)
    names_ = [e["name"] for e in env]
    assert names.POD_IP_VAR not in names_
    assert names_.index("MY_IP") < names_.index("LMCACHE_P2P_HOST")
    assert env_map(r)["LMCACHE_P2P_HOST"] == "$(MY_IP)"
    assert any("0.0.0.0" in w for w in r.warnings)


def test_no_duplicate_env_names_even_if_user_had_some():
    r = decide(pod(vllm(env=[{"name": "LMCACHE_CHUNK_SIZE", "value": "128"},
                             {"name": "LMCACHE_CHUNK_SIZE", "value": "512"}])), CTX)
    names_ = [e["name"] for e in env_of(r)]
    assert len(names_) == len(set(names_))
    assert env_map(r)["LMCACHE_CHUNK_SIZE"] == "512"  # the kubelet's winner is kept


def test_modes_inject_only_their_generation():
    redis = env_map(decide(pod(vllm("lmcache/vllm-openai:v0.3.6")), CTX))
    ctrl = env_map(decide(pod(vllm("lmcache/vllm-openai:v0.3.7")), CTX))
    assert "LMCACHE_LOOKUP_URL" in redis and "LMCACHE_P2P_HOST" not in redis
    assert "LMCACHE_P2P_HOST" in ctrl and "LMCACHE_LOOKUP_URL" not in ctrl
    assert "LMCACHE_DISTRIBUTED_URL" not in ctrl and "LMCACHE_ENABLE_CONTROLLER" not in redis
    assert redis["LMCACHE_LOOKUP_URL"] == "kvmesh-redis-default.ns.svc:6379"
    assert ctrl["LMCACHE_CONTROLLER_PULL_URL"] == "kvmesh-lmcache-default.ns.svc:8300"


def test_mode_precedence_annotation_policy_tag_default():
    p = pod(vllm("lmcache/vllm-openai:v0.3.6"))
    assert decide(p, CTX).mode == "redis"
    pol = Context("ns", PolicyDefaults(mode="controller"))
    assert decide(p, pol).mode == "controller"
    p_ann = pod(vllm("lmcache/vllm-openai:v0.3.9"), annotations={names.ANN_MODE: "redis"})
    assert decide(p_ann, pol).mode == "redis"
    r = decide(pod(vllm("example/custom:1")), Context("ns", PolicyDefaults(default_mode="redis")))
    assert r.mode == "redis" and "default" in r.mode_reason
    status = json.loads(r.pod["metadata"]["annotations"][names.ANN_STATUS])
    assert status["mode"] == "redis" and status["modeReason"] == r.mode_reason


def test_idempotent_and_hash_stable():
    p = pod(vllm(env=[{"name": "X", "value": "1"}], ports=[{"containerPort": 8200}]),
            vllm(name="side", image="busybox", command=("sleep", "1"),
                 ports=[{"containerPort": 8210, "hostPort": 8210}]))
    r1 = decide(p, CTX)
    r2 = decide(r1.pod, CTX)
    assert r1.action == r2.action == "inject"
    assert r2.pod == r1.pod
    assert p != r1.pod  # the input was not mutated in place...
    assert p["spec"]["containers"][0]["env"] == [{"name": "X", "value": "1"}]  # ...at all


def test_ports_avoid_every_port_in_the_pod():
    p = pod(vllm(command=("vllm", "serve", "m", "--port", "8500"),
                 ports=[{"containerPort": 8210}]),
            vllm(name="side", image="busybox", command=("sleep",),
                 ports=[{"containerPort": 8200}, {"containerPort": 8201, "hostPort": 9999}]),
            initContainers=[{"name": "i", "image": "busybox", "ports": [{"containerPort": 8202}]}])
    r = decide(p, CTX)
    ours = [x["containerPort"] for x in r.pod["spec"]["containers"][0]["ports"]
            if x.get("name", "").startswith("kvm-")]
    assert not set(ours) & {8200, 8201, 8202, 8210, 8500, 9999}
    assert len(set(ours)) == len(ours) == 3
    m = env_map(r)
    assert m["LMCACHE_P2P_INIT_PORTS"] == str(ours[0])


def test_hostnetwork_declares_host_ports():
    r = decide(pod(vllm(), hostNetwork=True), CTX)
    ports = r.pod["spec"]["containers"][0]["ports"]
    assert ports
    for p in ports:
        assert p["hostPort"] == p["containerPort"]


def test_tuning_values_win_when_valid_and_are_repaired_when_not():
    r = decide(pod(vllm(env=[{"name": "LMCACHE_MAX_LOCAL_CPU_SIZE", "value": "12"},
                             {"name": "LMCACHE_CHUNK_SIZE", "value": "abc"},
                             {"name": "PYTHONHASHSEED", "value": "random"},
                             {"name": "LMCACHE_TRACK_USAGE", "value": "true"}])),
               Context("ns", hash_seed_key=b"k" * 32))
    m = env_map(r)
    assert m["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "12"
    assert m["LMCACHE_CHUNK_SIZE"] == "256"
    # "random" is replaced by the group's own seed
    assert m["PYTHONHASHSEED"] == str(hashseed.derive(b"k" * 32, "ns", "controller-default"))
    assert m["LMCACHE_TRACK_USAGE"] == "true"
    assert sum("kvmesh replaced" in w for w in r.warnings) == 2


def test_tuning_value_from_configmap_is_kept():
    ref = {"configMapKeyRef": {"name": "c", "key": "k"}}
    r = decide(pod(vllm(env=[{"name": "LMCACHE_CHUNK_SIZE", "valueFrom": ref}])), CTX)
    assert env_map(r)["LMCACHE_CHUNK_SIZE"] == ref


def test_heartbeat_below_worker_timeout():
    r = decide(pod(vllm(env=[{"name": "LMCACHE_LMCACHE_WORKER_HEARTBEAT_TIME", "value": "30"}])),
               CTX)
    assert float(env_map(r)["LMCACHE_LMCACHE_WORKER_HEARTBEAT_TIME"]) < 30
    with pytest.raises(ValueError, match="below"):
        PolicyDefaults(heartbeat_seconds=30, worker_timeout_seconds=30)


def test_instance_id_from_identity():
    deploy_pod = pod(vllm())
    sts_pod = pod(vllm())
    sts_pod["metadata"] = {"name": "web-0", "labels": {names.LABEL_INJECT: "enabled"},
                           "ownerReferences": [{"kind": "StatefulSet", "name": "web"}]}
    by = lambda r: env_map(r)["LMCACHE_LMCACHE_INSTANCE_ID"]["fieldRef"]["fieldPath"]
    assert by(decide(deploy_pod, CTX)) == "metadata.name"
    assert by(decide(sts_pod, CTX)) == "metadata.uid"
    # a StatefulSet pod whose user set the name-based id gets the uid instead
    sts_pod["spec"]["containers"][0]["env"] = [
        {"name": "LMCACHE_LMCACHE_INSTANCE_ID",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    r = decide(sts_pod, CTX)
    assert by(r) == "metadata.uid" and any("INSTANCE_ID" in w for w in r.warnings)


@pytest.mark.parametrize("args,reason", [
    (["--tensor-parallel-size", "2"], inject.R_PARALLEL),
    (["-pp", "2"], inject.R_PARALLEL),
    (["--data-parallel-size=4"], inject.R_DATA_PARALLEL),
    (["--kv-transfer-config", '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'],
     inject.R_FOREIGN_CONNECTOR),
    (["--kv-transfer-config.kv_connector", "MultiConnector"], inject.R_FOREIGN_CONNECTOR),
])
def test_skips_with_named_reason_and_status(args, reason):
    r = decide(pod(vllm(args=args)), CTX)
    assert (r.action, r.reason) == ("skip", reason)
    assert json.loads(r.pod["metadata"]["annotations"][names.ANN_STATUS])["reason"] == reason
    assert "env" not in r.pod["spec"]["containers"][0]


def test_skipped_pod_is_labelled_with_its_reason_whatever_opted_it_in():
    """The controller finds skipped pods by the kvmesh.dev/skipped label: a pod opted in only
    by its namespace or a policy (no label of its own) must carry it too."""
    by_label = pod(vllm(args=["-tp", "2"]), labels={"app": "x"})
    by_namespace = copy.deepcopy(by_label)
    del by_namespace["metadata"]["labels"][names.LABEL_INJECT]
    for p, ctx in ((by_label, CTX), (by_namespace, Context("ns", selected=True))):
        r = decide(p, ctx)
        assert r.reason == inject.R_PARALLEL
        assert r.pod["metadata"]["labels"] == {**p["metadata"]["labels"],
                                               names.LABEL_SKIPPED: inject.R_PARALLEL}
        assert names.LABEL_SKIPPED not in p["metadata"]["labels"]  # input untouched
        again = decide(r.pod, ctx)  # the webhook's reinvocation: nothing changes
        assert again.pod == r.pod
    bare = pod(vllm(image="busybox", command=("sleep", "1")))
    del bare["metadata"]["labels"]
    r = decide(bare, Context("ns", selected=True))  # no labels at all before
    assert r.pod["metadata"]["labels"] == {names.LABEL_SKIPPED: inject.R_NO_VLLM}


def test_skip_label_is_never_on_injected_or_untouched_pods():
    # A template skipped before (e.g. rendered offline) and injected now loses the label.
    r = decide(pod(vllm(), labels={names.LABEL_SKIPPED: inject.R_PARALLEL}), CTX)
    assert r.action == "inject" and names.LABEL_SKIPPED not in r.pod["metadata"]["labels"]
    assert names.LABEL_PEER_GROUP in r.pod["metadata"]["labels"]
    opted_out = pod(vllm(args=["-tp", "2"]), labels={names.LABEL_INJECT: "disabled"})
    not_opted_in = pod(vllm(args=["-tp", "2"]))
    del not_opted_in["metadata"]["labels"][names.LABEL_INJECT]
    for p, ctx, reason in ((opted_out, Context("ns", selected=True), inject.R_OPTED_OUT),
                           (not_opted_in, CTX, inject.R_NOT_OPTED_IN)):
        r = decide(p, ctx)  # not kvmesh's pod: returned as it came
        assert r.reason == reason and r.pod is p


def test_every_skip_reason_is_a_valid_label_value():
    import re
    value = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # and short kebab-case
    reasons = [v for k, v in vars(inject).items() if k.startswith("R_")]
    assert len(reasons) > 20 and all(value.match(r) for r in reasons), reasons


def test_tp_from_env_reference():
    r = decide(pod(vllm(args=["--tensor-parallel-size", "$(TP)"],
                        env=[{"name": "TP", "value": "4"}])), CTX)
    assert r.reason == inject.R_PARALLEL and "tensor-parallel 4" in r.message


def test_allow_parallel_gives_one_port_per_rank():
    r = decide(pod(vllm(args=["-tp", "2", "-pp", "2"]),
                   annotations={names.ANN_ALLOW_PARALLEL: "true"}), CTX)
    m = env_map(r)
    for var in ("LMCACHE_P2P_INIT_PORTS", "LMCACHE_P2P_LOOKUP_PORTS",
                "LMCACHE_LMCACHE_WORKER_PORTS"):
        assert len(m[var].split(",")) == 4
    assert r.warnings


@pytest.mark.parametrize("annotations,fragment", [
    ({names.ANN_MODE: "Redis"}, "kvmesh.dev/mode has value 'Redis'"),
    ({names.ANN_ALLOW_PARALLEL: "yes"}, '"true" or "false"'),
    ({names.ANN_CPU_CACHE_GB: "20Gi"}, "not \"20Gi\""),
    ({names.ANN_GROUP: "Bad_Group"}, "kvmesh.dev/group"),
    ({names.ANN_CONTAINER: "nope"}, "names no container"),
    ({"kvmesh.dev/moed": "redis"}, "unknown annotation kvmesh.dev/moed"),
])
def test_invalid_annotations_deny_naming_key_and_value(annotations, fragment):
    r = decide(pod(vllm(), annotations=annotations), CTX)
    assert r.action == "deny" and fragment in r.message


def test_invalid_opt_in_label_denies_when_selected():
    r = decide(pod(vllm(), labels={names.LABEL_INJECT: "true"}), Context("ns", selected=True))
    assert r.action == "deny" and '"enabled" or "disabled"' in r.message


def test_not_opted_in_and_opted_out_leave_pod_untouched():
    p = pod(vllm())
    del p["metadata"]["labels"][names.LABEL_INJECT]
    r = decide(p, CTX)
    assert (r.action, r.reason) == ("skip", inject.R_NOT_OPTED_IN) and r.pod is p
    assert decide(p, Context("ns", selected=True)).action == "inject"
    p["metadata"]["labels"][names.LABEL_INJECT] = "disabled"
    assert decide(p, Context("ns", selected=True)).reason == inject.R_OPTED_OUT


def test_named_container_running_something_else_is_denied_naming_what_it_runs():
    # Class 8 of issue 9: it used to be marked injected, with env and ports but no flag.
    r = decide(pod(vllm(command=("/start.sh",), name="engine"),
                   annotations={names.ANN_CONTAINER: "engine"}), CTX)
    assert (r.action, r.reason) == ("deny", inject.R_NOT_VLLM_SERVER)
    assert "'engine'" in r.message and "/start.sh" in r.message


def test_named_args_only_container_of_an_unknown_entrypoint_is_denied_with_the_fix():
    r = decide(pod(vllm(image="example.com/team/engine:1", command=None,
                        args=("--model", "m"), name="engine"),
                   annotations={names.ANN_CONTAINER: "engine"}), CTX)
    assert r.reason == inject.R_NOT_VLLM_SERVER and "give the command" in r.message


def test_no_vllm_container_is_a_skip():
    r = decide(pod(vllm(image="busybox", command=("sleep", "1"))), CTX)
    assert r.reason == inject.R_NO_VLLM


@pytest.mark.parametrize("bad", [None, 1, "x", [], {"spec": 1}, {"spec": {"containers": 5}},
                                 {"spec": {"containers": [{"image": "x"}]}},
                                 {"metadata": {"labels": {"a": 1}}, "spec": {}},
                                 {"spec": {"containers": [{"name": "a", "command": "vllm"}]}}])
def test_malformed_pods_deny_cleanly(bad):
    r = decide(bad, Context("ns", selected=True))
    assert r.action == "deny" and r.reason == inject.R_MALFORMED


def test_external_redis_address_from_policy():
    pol = PolicyDefaults(redis_address="redis.shared.svc:7000")
    r = decide(pod(vllm("lmcache/vllm-openai:v0.3.6")), Context("ns", pol))
    assert env_map(r)["LMCACHE_LOOKUP_URL"] == "redis.shared.svc:7000"
    with pytest.raises(ValueError, match="without scheme"):
        PolicyDefaults(redis_address="redis://x:1")


def test_decide_never_mutates_its_input():
    p = pod(vllm(env=[{"name": "LMCACHE_P2P_HOST", "value": "0.0.0.0"}]))
    before = copy.deepcopy(p)
    decide(p, CTX)
    assert p == before
