"""mp mode in the pure core (kvmesh.core.mp through inject.decide), one rule per test. The real
consumers check the same output in tests/contract/test_mp_inject.py."""

import copy
import json

import pytest

from kvmesh.core import inject, mp, names
from kvmesh.core.inject import Context, decide
from kvmesh.core.policy import PolicyDefaults

CTX = Context(namespace="ns")
MP = {names.ANN_MODE: "mp"}


def pod(*containers, annotations=None, **spec):
    return {"metadata": {"generateName": "p-", "labels": {names.LABEL_INJECT: "enabled"},
                         **({"annotations": annotations} if annotations else {})},
            "spec": {"containers": list(containers), **spec}}


def vllm(*extra, image="lmcache/vllm-openai:v0.5.6", **kw):
    return {"name": kw.pop("name", "vllm"), "image": image,
            "command": ["vllm", "serve", "m", *extra], **kw}


def kv_of(r) -> dict:
    c = r.pod["spec"]["containers"][0]
    words = c.get("command", []) + c.get("args", [])
    at = len(words) - 1 - words[::-1].index("--kv-transfer-config")
    return json.loads(words[at + 1])


def server_of(r) -> dict:
    [s] = [c for c in r.pod["spec"].get("initContainers", []) if c["name"] == names.MP_SIDECAR]
    return s


def arg(server: dict, flag: str) -> str:
    [v] = [a.split("=", 1)[1] for a in server["args"] if a.startswith(flag + "=")]
    return v


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_annotation_injects_connector_and_native_sidecar():
    r = decide(pod(vllm(), annotations=MP), CTX)
    assert (r.action, r.mode) == ("inject", "mp")
    kv = kv_of(r)
    assert kv["kv_connector"] == "LMCacheMPConnector"
    assert kv["kv_connector_module_path"] == "lmcache.integration.vllm.lmcache_mp_connector"
    s = server_of(r)
    port = arg(s, "--port")
    assert kv["kv_connector_extra_config"]["lmcache.mp.host"] == "tcp://127.0.0.1"
    assert str(kv["kv_connector_extra_config"]["lmcache.mp.port"]) == port
    assert s["restartPolicy"] == "Always" and s["image"] == "lmcache/vllm-openai:v0.5.6"
    assert "startupProbe" in s and "readinessProbe" not in s
    assert r.pod["metadata"]["labels"][names.LABEL_PEER_GROUP] == "mp-default"


def test_server_listens_everywhere_and_advertises_the_pod_ip():
    s = server_of(decide(pod(vllm(), annotations=MP), CTX))
    p2p = {p["name"]: p["containerPort"] for p in s["ports"]}
    assert arg(s, "--host") == "0.0.0.0"
    assert arg(s, "--p2p-advertise-url") == f"$(POD_IP):{p2p[names.PORT_NAME_MP_P2P]}"
    assert arg(s, "--p2p-listen-url") == f"0.0.0.0:{p2p[names.PORT_NAME_MP_P2P]}"
    assert int(arg(s, "--port")) == p2p[names.PORT_NAME_MP_RPC]
    assert arg(s, "--http-host") == "127.0.0.1"
    e = env(s)
    assert e["LMCACHE_COORDINATOR_ADVERTISE_IP"] == "$(POD_IP)"
    assert e["LMCACHE_COORDINATOR_HEARTBEAT_INTERVAL"] == "1"
    assert e["LMCACHE_COORDINATOR_URL"] == "http://kvmesh-mp-default.ns.svc:9300"
    assert e["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # POD_IP is defined before the entry referring to it (the kubelet expands in order)
    order = [x["name"] for x in s["env"]]
    assert order.index("POD_IP") < order.index("LMCACHE_COORDINATOR_ADVERTISE_IP")
    assert arg(s, "--l1-align-bytes") == "65536"


def test_instance_id_is_the_names_format_per_incarnation():
    script = server_of(decide(pod(vllm(), annotations=MP), CTX))["command"][2]
    assert names.mp_instance_id("${POD_UID}", "${n}") in script
    assert f"{names.MP_STATE_DIR}/incarnation" in script
    assert f"DELETE" in script and "sleep 5" in script


def test_ports_collide_with_nothing_in_the_pod():
    side = {"name": "proxy", "image": "envoy", "ports": [{"containerPort": 5555},
                                                         {"containerPort": 8080}]}
    init = {"name": "fetch", "image": "x", "ports": [{"containerPort": 8200}]}
    r = decide(pod(vllm("--port", "5556"), side, initContainers=[init], annotations=MP), CTX)
    s = server_of(r)
    used = {5555, 5556, 8080, 8200}
    mine = [int(arg(s, "--port")), int(arg(s, "--http-port"))] + \
        [p["containerPort"] for p in s["ports"]]
    assert not used & set(mine) and len(set(mine)) == 3, mine


def test_reinjection_changes_nothing():
    p = pod(vllm("--kv-transfer-config", json.dumps({
        "kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"lmcache.mp.port": 1, "lmcache.mp.eager_prefetch": True}})),
        annotations=MP, initContainers=[{"name": "fetch", "image": "x"}])
    once = decide(p, CTX)
    twice = decide(once.pod, CTX)
    assert twice.pod == once.pod and not twice.warnings
    assert [c["name"] for c in once.pod["spec"]["initContainers"]] == ["fetch", names.MP_SIDECAR]
    c = once.pod["spec"]["containers"][0]
    assert (c["command"] + c["args"]).count("--kv-transfer-config") == 1


def test_user_values_that_break_p2p_are_replaced_with_warnings():
    user = {"kv_connector": "LMCacheMPConnector",
            "kv_connector_module_path": "vllm.distributed.kv_transfer.kv_connector.v1."
                                        "lmcache_mp_connector",
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://localhost",
                                          "lmcache.mp.autostart": True,
                                          "lmcache.mp.server_urls": "tcp://a:1",
                                          "lmcache.mp.hash_algorithm": "builtin",
                                          "lmcache.mp.mq_timeout": 60}}
    r = decide(pod(vllm("--kv-transfer-config", json.dumps(user)), annotations=MP), CTX)
    kv = kv_of(r)
    extra = kv["kv_connector_extra_config"]
    assert kv["kv_connector_module_path"] == mp.CONNECTOR_MODULE
    assert kv["kv_role"] == "kv_producer"  # the user's role stays
    assert extra["lmcache.mp.host"] == "tcp://127.0.0.1" and extra["lmcache.mp.mq_timeout"] == 60
    assert "lmcache.mp.autostart" not in extra and "lmcache.mp.server_urls" not in extra
    assert extra["lmcache.mp.hash_algorithm"] == "blake3"
    text = " ".join(r.warnings)
    for what in ("kv_connector_module_path", "lmcache.mp.host", "lmcache.mp.autostart",
                 "lmcache.mp.server_urls", "lmcache.mp.hash_algorithm"):
        assert what in text, (what, r.warnings)


def test_hash_seed_guardrail_on_the_vllm_container():
    r = decide(pod(vllm(env=[{"name": "PYTHONHASHSEED", "value": "random"}]), annotations=MP),
               CTX)
    e = env(r.pod["spec"]["containers"][0])
    assert e["PYTHONHASHSEED"] == "0" and any("PYTHONHASHSEED" in w for w in r.warnings)
    assert names.POD_IP_VAR not in e  # vLLM's process binds nothing for P2P in mp mode


def test_other_generations_variables_are_flagged():
    r = decide(pod(vllm(env=[{"name": "LMCACHE_P2P_HOST", "value": "x"},
                             {"name": "LMCACHE_LOOKUP_URL", "value": "y"}]), annotations=MP), CTX)
    assert sum("other LMCache generation" in w for w in r.warnings) == 2, r.warnings


def test_chunk_size_is_the_groups():
    s = server_of(decide(pod(vllm(), annotations=MP),
                         Context("ns", PolicyDefaults(chunkSize=512))))
    assert arg(s, "--chunk-size") == "512"


@pytest.mark.parametrize("flags,reason", [
    (["--kv-offloading-backend", "lmcache", "--kv-offloading-size", "12"], "--kv-offloading"),
    (["--kv-offloading-backend=lmcache"], "--kv-offloading"),
    (["--kv-transfer-config", '{"kv_connector":"LMCacheMPConnector","kv_role":"kv_both"}'],
     "LMCacheMPConnector"),
])
def test_mode_from_the_pods_own_config(flags, reason):
    r = decide(pod(vllm(*flags, image="vllm/vllm-openai:v0.33.0")), CTX)
    assert (r.action, r.mode) == ("inject", "mp") and reason in r.mode_reason, r.mode_reason
    assert server_of(r)


def test_offloading_size_is_the_l1_size_unless_annotated():
    flags = ("--kv-offloading-backend", "lmcache", "--kv-offloading-size", "12")
    assert arg(server_of(decide(pod(vllm(*flags)), CTX)), "--l1-size-gb") == "12"
    r = decide(pod(vllm(*flags), annotations={names.ANN_CPU_CACHE_GB: "3.5"}), CTX)
    s = server_of(r)
    assert arg(s, "--l1-size-gb") == "3.5"
    assert s["resources"]["limits"]["memory"] == f"{4 + mp.SERVER_OVERHEAD_GIB}Gi"


def test_lmcache_0_5_tags_stay_controller_by_default():
    """The decision recorded in docs/mp-mode.md: mp only when asked for or shown."""
    r = decide(pod(vllm(image="lmcache/vllm-openai:v0.5.6")), CTX)
    assert r.mode == "controller"
    r = decide(pod(vllm()), Context("ns", PolicyDefaults(mode="mp")))
    assert (r.mode, r.mode_reason) == ("mp", "policy")


def test_explicit_other_mode_with_mp_config_is_a_conflict():
    r = decide(pod(vllm("--kv-offloading-backend", "lmcache", "--kv-offloading-size", "4"),
                   annotations={names.ANN_MODE: "controller"}), CTX)
    assert (r.action, r.reason) == ("deny", inject.R_CONNECTOR_CONFLICT)
    r = decide(pod(vllm("--kv-transfer-config", '{"kv_connector":"LMCacheConnectorV1",'
                                                '"kv_role":"kv_both"}'), annotations=MP), CTX)
    assert (r.action, r.reason) == ("deny", inject.R_CONNECTOR_CONFLICT)


def test_old_lmcache_and_clusters_without_native_sidecars_are_named_skips():
    r = decide(pod(vllm(image="lmcache/vllm-openai:v0.3.9"), annotations=MP), CTX)
    assert (r.action, r.reason) == ("skip", inject.R_MP_VERSION)
    r = decide(pod(vllm(), annotations=MP), Context("ns", native_sidecars=False))
    assert (r.action, r.reason) == ("skip", inject.R_NO_SIDECARS)
    assert "controller" in r.message and "initContainers" not in r.pod["spec"]
    assert mp.kube_has_native_sidecars("1", "28") is False
    assert mp.kube_has_native_sidecars("1", "29+") is True
    assert mp.kube_has_native_sidecars("1", "x") is None


def test_gpu_visibility_decides_the_transfer_mode():
    plain = decide(pod(vllm(resources={"limits": {"nvidia.com/gpu": 1}}), annotations=MP), CTX)
    assert arg(server_of(plain), "--supported-transfer-mode") == "engine_driven"
    assert kv_of(plain)["kv_connector_extra_config"]["lmcache.mp.mp_transfer_mode"] == \
        "engine_driven"
    dra = decide(pod(vllm(resources={"claims": [{"name": "gpu"}]}), annotations=MP,
                     resourceClaims=[{"name": "gpu", "resourceClaimName": "c"}]), CTX)
    s = server_of(dra)
    assert arg(s, "--supported-transfer-mode") == "lmcache_driven"
    assert s["resources"]["claims"] == [{"name": "gpu"}]
    assert kv_of(dra)["kv_connector_extra_config"]["lmcache.mp.mp_transfer_mode"] == \
        "lmcache_driven"
    opt = decide(pod(vllm(), annotations={**MP, names.ANN_MP_GPU_VISIBILITY: "all"}), CTX)
    assert env(server_of(opt))["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert arg(server_of(opt), "--supported-transfer-mode") == "lmcache_driven"


def test_shm_and_security_context_follow_the_vllm_container():
    sc = {"runAsNonRoot": True, "allowPrivilegeEscalation": False}
    r = decide(pod(vllm(volumeMounts=[{"name": "shm", "mountPath": "/dev/shm"}],
                        securityContext=sc), annotations=MP,
                   volumes=[{"name": "shm", "emptyDir": {"medium": "Memory"}}]), CTX)
    s = server_of(r)
    assert {"name": "shm", "mountPath": "/dev/shm"} in s["volumeMounts"]
    assert s["securityContext"] == sc
    vols = [v["name"] for v in r.pod["spec"]["volumes"]]
    assert vols == ["shm", names.MP_STATE_VOLUME]


def test_isolated_ipc_is_mirrored_to_the_server():
    user = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.mp.isolated_ipc": True}}
    r = decide(pod(vllm("--kv-transfer-config", json.dumps(user)), annotations=MP), CTX)
    assert "--isolated-ipc" in server_of(r)["args"]
    assert kv_of(r)["kv_connector_extra_config"]["lmcache.mp.isolated_ipc"] is True


def test_shell_form_gets_the_flag_after_the_users():
    script = ("exec vllm serve m --kv-transfer-config "
              "'{\"kv_connector\":\"LMCacheMPConnector\",\"kv_role\":\"kv_both\"}'")
    c = {"name": "vllm", "image": "x/vllm-openai:v1", "command": ["sh", "-c", script]}
    r = decide(pod(c, annotations=MP), CTX)
    assert r.action == "inject"
    out = r.pod["spec"]["containers"][0]["command"][2]
    assert out.count("--kv-transfer-config") == 2 and out.rstrip().endswith("}'")
    assert decide(r.pod, CTX).pod == r.pod


def test_input_is_never_modified():
    p = pod(vllm("--kv-transfer-config", '{"kv_connector":"LMCacheMPConnector"}'),
            annotations=MP, initContainers=[{"name": "a", "image": "x"}],
            volumes=[{"name": "v", "emptyDir": {}}])
    before = copy.deepcopy(p)
    decide(p, CTX)
    assert p == before
