"""Issue 9's decisions, one rule per test: what a container runs (its effective argv), the
skips for setups kvmesh does not understand, the mode from the best evidence, the cache that
fits, and the messages. The real manifests behind each rule are in tests/golden/real."""

import json

import pytest

from kvmesh.core import contract, images, inject, launch, names
from kvmesh.core.inject import Context, choose_mode, decide
from kvmesh.core.overrides import Overrides
from kvmesh.core.policy import PolicyDefaults

CTX = Context(namespace="ns")
V1 = contract.kv_transfer_json(contract.CONNECTOR_V1)


def pod(*containers, labels=None, annotations=None, **spec):
    return {"metadata": {"generateName": "p-", "labels": {names.LABEL_INJECT: "enabled",
                                                          **(labels or {})},
                         **({"annotations": annotations} if annotations else {})},
            "spec": {"containers": list(containers), **spec}}


def c(image="lmcache/vllm-openai:v0.3.9", command=("vllm", "serve", "m"), args=(), env=(),
      name="vllm", **kw):
    out = {"name": name, "image": image, **kw}
    if command is not None:
        out["command"] = list(command)
    if args:
        out["args"] = list(args)
    if env:
        out["env"] = [{"name": n, "value": v} for n, v in env]
    return out


def status(r):
    return json.loads(r.pod["metadata"]["annotations"][names.ANN_STATUS])


# --- what a container runs -------------------------------------------------------------------

def test_args_to_a_vllm_named_image_of_unknown_entrypoint_are_not_vllm():
    r = decide(pod(c(image="nvcr.io/nvidia/ai-dynamo/vllm-runtime:0.7.1", command=None,
                     args=("python3", "-m", "dynamo.frontend"))), CTX)
    assert r.reason == inject.R_NO_VLLM and "dynamo.frontend" in r.message
    # Recorded: an opted-in pod without status is one the webhook never saw (controller).
    assert status(r) == {"injected": False, "reason": inject.R_NO_VLLM, "message": r.message,
                         "mode": None, "modeReason": "", "container": None}


def test_flags_through_dollar_at_are_read_like_the_shell_passes_them():
    script = 'exec vllm serve m "$@"'
    ln = launch.classify(["bash", "-c", script, "bash"], ["--tensor-parallel-size=4"], "x")
    assert ln.words == ("m", "--tensor-parallel-size=4") and ln.flags.tp == "4"
    r = decide(pod(c(command=("bash", "-c", script, "bash"), args=("-tp", "2"))), CTX)
    assert r.reason == inject.R_PARALLEL and "tensor-parallel 2" in r.message


def test_a_user_connector_in_dollar_at_args_is_never_overridden():
    nixl = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
    r = decide(pod(c(command=("sh", "-c", 'vllm serve m "$@"', "sh"),
                     args=("--kv-transfer-config", nixl))), CTX)
    assert r.reason == inject.R_FOREIGN_CONNECTOR


def test_the_flag_goes_after_dollar_at_so_the_shell_runs_it_last():
    r = decide(pod(c(command=("sh", "-c", 'exec vllm serve m "$@"', "sh"), args=("--port", "9"))),
               CTX)
    script = r.pod["spec"]["containers"][0]["command"][2]
    assert script == f"exec vllm serve m \"$@\" --kv-transfer-config '{V1}'"


def test_env_values_expand_in_scripts_and_eval():
    env = (("EXTRA", "--tensor-parallel-size=8"),)
    ln = launch.classify(["sh", "-c", "vllm serve m $EXTRA"], [], "x", env)
    assert ln.flags.tp == "8" and not ln.unresolved
    ln = launch.classify(["sh", "-c", 'eval "exec vllm serve m ${EXTRA} $@"', "--"], ["-pp", "2"],
                         "x", env)
    assert (ln.flags.tp, ln.flags.pp) == ("8", "2") and "eval" in ln.script_error


def test_a_variable_that_may_hold_flags_is_a_skip_not_a_guess():
    r = decide(pod(c(command=("sh", "-c", "vllm serve m $EXTRA_ARGS"))), CTX)
    assert r.reason == inject.R_ARGS_UNKNOWN and "$EXTRA_ARGS" in r.message
    r = decide(pod(c(command=("sh", "-c", "vllm serve m --tensor-parallel-size $TP"))), CTX)
    assert r.reason == inject.R_ARGS_UNKNOWN and "--tensor-parallel-size" in r.message


def test_kubelet_variable_in_a_script_is_not_a_command_substitution():
    # The LWS worker: $(LWS_LEADER_ADDRESS) is the kubelet's, and no vLLM server runs.
    r = decide(pod(c(command=("sh", "-c", "bash /vllm-workspace/x.sh worker "
                                          "--ray_address=$(LWS_LEADER_ADDRESS)"))), CTX)
    assert r.reason == inject.R_NO_VLLM
    with pytest.raises(launch.ScriptError):
        launch.find_in_script("echo $(vllm serve m)")


def test_unresolved_port_does_not_assume_one():
    r = decide(pod(c(command=("sh", "-c", "vllm serve m --port ${PORT}"))), CTX)
    assert r.action == "inject"
    assert not any("assuming 1" in w for w in r.warnings)
    assert any("--port '${PORT}'" in w for w in r.warnings)


def test_named_container_running_no_vllm_is_denied():
    r = decide(pod(c(name="vllm"), c(name="side", image="busybox", command=("sleep", "9")),
                   annotations={names.ANN_CONTAINER: "side"}), CTX)
    assert r.reason == inject.R_NOT_VLLM_SERVER and "'sleep 9'" in r.message


# --- setups kvmesh does not understand -------------------------------------------------------

@pytest.mark.parametrize("container,labels,reason", [
    (c(args=("--kv-transfer-config",
             '{"kv_connector":"NixlConnector","kv_role":"kv_producer"}')), {}, inject.R_DISAGG),
    (c(args=("--kv-transfer-config",
             '{"kv_connector":"MultiConnector","kv_role":"kv_both","kv_connector_extra_config":'
             '{"connectors":[{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}]}}')),
     {}, inject.R_DISAGG),
    (c(env=(("LMCACHE_ENABLE_PD", "True"),)), {}, inject.R_DISAGG),
    (c(env=(("LMCACHE_CONTROLLER_PULL_URL", "router:9000"),)), {}, inject.R_ELSEWHERE),
    (c(env=(("LMCACHE_REMOTE_URL", "lm://cache:81"),)), {}, inject.R_ELSEWHERE),
    (c(), {"lmcache.ai/lmcache-inject": "true"}, inject.R_OTHER_INJECTOR),
    (c(args=("--kv-offloading-size", "10")), {}, inject.R_NATIVE_OFFLOAD),
    (c(args=("--kv-transfer-config", '{"kv_connector":"OffloadingConnector"}')), {},
     inject.R_NATIVE_OFFLOAD),
    (c(command=("sh", "-c", 'vllm serve m --kv-transfer-config "$(cat /etc/kv.json)"')), {},
     inject.R_KV_UNKNOWN),
    (c(image="rocm/vllm:instinct_main"), {}, inject.R_IMAGE),
    (c(image="vllm/vllm-openai:v0.8.5"), {}, inject.R_IMAGE),
    (c(image="vllm/vllm-openai:latest", resources={"limits": {"google.com/tpu": "4"}}), {},
     inject.R_IMAGE),
])
def test_setups_kvmesh_does_not_understand_are_skips_with_status(container, labels, reason):
    r = decide(pod(container, labels=labels), CTX)
    assert (r.action, r.reason) == ("skip", reason), r.message
    st = status(r)
    assert st["injected"] is False and st["reason"] == reason and st["message"] == r.message


def test_kvmesh_own_addresses_are_not_elsewhere():
    first = decide(pod(c()), CTX)
    again = decide(first.pod, CTX)
    assert again.action == "inject" and again.pod == first.pod


def test_a_template_moved_to_another_group_is_reinjected_not_skipped():
    first = decide(pod(c()), CTX)
    moved = first.pod
    moved["metadata"]["annotations"] = {**moved["metadata"]["annotations"],
                                        names.ANN_GROUP: "other"}
    r = decide(moved, CTX)
    env = {e["name"]: e.get("value") for e in r.pod["spec"]["containers"][0]["env"]}
    assert r.action == "inject" and "kvmesh-lmcache-other" in env["LMCACHE_CONTROLLER_PULL_URL"]


def test_image_supported_annotation_vouches_for_a_custom_build():
    p = pod(c(image="vllm/vllm-openai:v0.8.5"), annotations={names.ANN_IMAGE_SUPPORTED: "true"})
    assert decide(p, CTX).action == "inject"


def test_image_facts():
    assert images.unsupported("vllm/vllm-openai:v0.9.2", images.CUDA, "") is None
    assert "0.6.4" in images.unsupported("rocm/vllm:rocm6.2_vllm_0.6.4", images.CUDA, "")
    assert images.platform("vllm/vllm-openai:latest", {"limits": {"amd.com/gpu": 1}},
                           frozenset())[0] == images.ROCM
    assert images.platform("my/throughput-server:1", {}, frozenset())[0] == images.CUDA
    assert images.platform("opea/vllm-gaudi:latest", {}, frozenset())[0] == images.HPU


# --- the mode from the best evidence ---------------------------------------------------------

@pytest.mark.parametrize("image,mode", [
    ("lmcache/vllm-openai:2025-05-27-v1", names.MODE_REDIS),
    ("lmcache/vllm-openai:nightly-2025-10-02", names.MODE_CONTROLLER),
    ("lmcache/vllm-openai:latest", names.MODE_CONTROLLER),
    ("vllm/vllm-openai:v0.10.1", names.MODE_REDIS),
    ("vllm/vllm-openai:v0.11.0", names.MODE_CONTROLLER),
    ("lmcache/vllm-openai:v0.3.6", names.MODE_REDIS),
])
def test_mode_from_the_image_tag(image, mode):
    ch = choose_mode(Overrides(), PolicyDefaults(), image, ())
    assert ch.mode == mode and ch.reason.startswith("image tag") and ch.problem is None


def test_tag_inside_the_window_between_generations_is_mode_unknown():
    ch = choose_mode(Overrides(), PolicyDefaults(), "lmcache/vllm-openai:nightly-2025-09-20", ())
    assert ch.problem[1] == inject.R_MODE_UNKNOWN
    assert choose_mode(Overrides(mode="redis"), PolicyDefaults(),
                       "lmcache/vllm-openai:nightly-2025-09-20", ()).problem is None


def test_pod_configuration_decides_when_the_tag_does_not():
    v0 = '{"kv_connector":"LMCacheConnector","kv_role":"kv_both"}'
    r = decide(pod(c(image="example.com/custom:1", args=("--kv-transfer-config", v0))), CTX)
    assert r.mode == names.MODE_REDIS and r.mode_reason.startswith("pod configuration")
    r = decide(pod(c(image="example.com/custom:1",
                     env=(("LMCACHE_LOOKUP_URL", "kvmesh-redis-default.ns.svc:6379"),))), CTX)
    assert r.mode == names.MODE_REDIS and status(r)["modeReason"].endswith("LMCACHE_LOOKUP_URL")


def test_use_experimental_is_not_redis_evidence():
    r = decide(pod(c(image="example.com/custom:1",
                     env=(("LMCACHE_USE_EXPERIMENTAL", "True"),))), CTX)
    assert r.mode == names.MODE_CONTROLLER and r.mode_reason.startswith("policy default")


def test_contradicting_evidence_is_a_denial_naming_the_fields():
    v0 = '{"kv_connector":"LMCacheConnector","kv_role":"kv_both"}'
    r = decide(pod(c(args=("--kv-transfer-config", v0))), CTX)
    assert r.reason == inject.R_CONNECTOR_CONFLICT
    assert "LMCacheConnector" in r.message and "image tag: LMCache 0.3.9" in r.message


def test_mp_evidence_is_recognised_and_skipped_until_mp_is_a_mode():
    mp = '{"kv_connector":"LMCacheMPConnector","kv_role":"kv_both"}'
    ch = choose_mode(Overrides(), PolicyDefaults(), "example.com/x:1",
                     ((names.MODE_MP, "--kv-offloading-backend lmcache"),))
    assert ch.mode == names.MODE_MP
    r = decide(pod(c(image="example.com/x:1", args=("--kv-transfer-config", mp))), CTX)
    expected = inject.R_MODE_UNSUPPORTED if names.MODE_MP not in names.MODES else inject.R_INJECTED
    assert r.reason == expected


# --- the cache fits the container's memory ---------------------------------------------------

def test_cache_reduced_to_fit_the_memory_limit_and_said_in_the_status():
    r = decide(pod(c(resources={"limits": {"memory": "8Gi"}})), CTX)
    env = {e["name"]: e.get("value") for e in r.pod["spec"]["containers"][0]["env"]}
    assert env["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "4.5"  # 8.59 GB - 4 GB headroom, in 0.5 steps
    assert "reduced from 5 GB to 4.5 GB" in status(r)["adjusted"]


def test_cache_that_cannot_fit_is_a_skip_never_a_larger_cache():
    r = decide(pod(c(resources={"limits": {"memory": "2Gi"}})), CTX)
    assert r.reason == inject.R_CACHE_FIT and "2Gi" in r.message
    r = decide(pod(c(resources={"requests": {"memory": "9000Mi", "nvidia.com/gpu": "1"}},
                     env=(("VLLM_CPU_KVCACHE_SPACE", "4"),))), CTX)
    assert r.action == "inject"
    size = {e["name"]: e.get("value") for e in r.pod["spec"]["containers"][0]["env"]}
    assert float(size["LMCACHE_MAX_LOCAL_CPU_SIZE"]) <= 9000 * 2**20 / 1e9 - 4 - 4 * 2**30 / 1e9


def test_a_user_cache_size_that_does_not_fit_is_replaced():
    r = decide(pod(c(resources={"limits": {"memory": "16Gi"}},
                     env=(("LMCACHE_MAX_LOCAL_CPU_SIZE", "40"),))), CTX)
    env = {e["name"]: e.get("value") for e in r.pod["spec"]["containers"][0]["env"]}
    assert float(env["LMCACHE_MAX_LOCAL_CPU_SIZE"]) < 16 * 2**30 / 1e9
    assert any("LMCACHE_MAX_LOCAL_CPU_SIZE" in w for w in r.warnings)


def test_memory_quantities():
    assert contract.memory_gb("2Gi") == 2**31 / 1e9
    assert contract.memory_gb("2147483648") == 2.147483648  # bytes, not GB
    assert contract.memory_gb("20G") == 20.0


# --- messages --------------------------------------------------------------------------------

def test_a_skipped_parallel_pod_does_not_say_injecting():
    r = decide(pod(c(args=("-tp", "4"), resources={"limits": {"memory": "1Gi"}}),
                   annotations={names.ANN_ALLOW_PARALLEL: "true"}), CTX)
    assert r.action == "skip"
    assert not any("injecting" in w for w in r.warnings)


def test_a_pod_document_gets_the_instance_id_the_webhook_gives_it():
    p = pod(c())  # generateName: a later pod never reuses the name
    p["kind"] = "Pod"
    cli = decide(p, Context("ns", owner_kind="Pod"))
    hook = decide(p, Context("ns"))
    assert cli.pod == hook.pod


def test_a_very_long_image_reference_is_decided_without_caching_it():
    r = decide(pod(c(image="example.com/" + "a" * 5000 + ":20240101")), CTX)
    assert r.reason == inject.R_IMAGE and images._unsupported.cache_info().currsize < 256


@pytest.mark.parametrize("script", [
    "export LMCACHE_DISTRIBUTED_URL=${POD_IP} && vllm serve m",
    "LMCACHE_CHUNK_SIZE=512 exec vllm serve m",
    "cd /w; env LMCACHE_CONFIG_FILE=/etc/lmc.yaml vllm serve m",
])
def test_a_script_that_sets_lmcache_variables_itself_is_configured_elsewhere(script):
    # Real case: llm-d-kv-cache-manager's vllm-setup-helm chart at its defaults exports
    # LMCACHE_DISTRIBUTED_URL=${POD_IP} before `vllm serve`; the shell's value beats kvmesh's
    # env and LMCache 0.3.6 fails to split a bare IP.
    r = decide(pod(c(command=("/bin/sh", "-c"), args=(script,))), CTX)
    assert (r.action, r.reason) == ("skip", inject.R_ELSEWHERE), r.message
    assert "its script sets LMCache variables itself (LMCACHE_" in r.message


def test_a_script_that_only_mentions_lmcache_is_injected():
    r = decide(pod(c(command=("/bin/sh", "-c"), args=('echo "LMCACHE_X is kvmesh\'s"; vllm serve m',))), CTX)
    assert r.action == "inject", r.message


@pytest.mark.parametrize("command", [
    ("/bin/bash", "-lc", "--"),           # KubeRay's form
    ("bash", "-o", "pipefail", "-c"),     # an option with an argument before -c
    ("bash", "--norc", "-ec"),            # a long option, then a cluster with c
    ("sh", "-c", "-"),
])
def test_the_script_is_the_first_operand_after_the_shell_options(command):
    script = "exec vllm serve m --tensor-parallel-size 2"
    assert launch.script_in([*command, script]) == script
    r = decide(pod(c(command=command, args=(script,))), CTX)
    assert r.reason == inject.R_PARALLEL and "tensor-parallel 2" in r.message, r.message


def test_a_shell_without_c_runs_no_script():
    assert launch.script_in(["bash", "--rcfile", "-c", "x"]) is None  # -c is --rcfile's file
    assert launch.script_in(["sh", "run.sh", "-c", "x"]) is None
    assert launch.script_in(["sh", "-c"]) is None
