"""Smoke tests: the real consumers (LMCache 0.3.6 / 0.5.6 config loaders, vLLM's
`vllm serve` parser) accept good kvmesh-style settings and reject broken ones.

Needs the cached venvs: run `bash tests/consumers/setup_envs.sh` first.  A
missing venv FAILS these tests (ConsumerEnvMissing), it never skips them.
"""

import json

import pytest

from consumers import kubelet_expand, lmcache_parse, lmcache_probe, vllm_parse

pytestmark = pytest.mark.consumers

REDIS_ENV = {
    "LMCACHE_USE_EXPERIMENTAL": "True",
    "LMCACHE_ENABLE_P2P": "True",
    "LMCACHE_LOOKUP_URL": "kvmesh-lookup.ns.svc:6379",
    "LMCACHE_DISTRIBUTED_URL": "10.1.2.3:8200",
    "LMCACHE_LOCAL_CPU": "True",
    "LMCACHE_MAX_LOCAL_CPU_SIZE": "5",
    "LMCACHE_CHUNK_SIZE": "256",
}

POD = {
    "metadata": {"name": "vllm-abc", "namespace": "ns", "uid": "u-1"},
    "status": {"podIP": "10.1.2.3"},
}

# docs/lmcache-contract.md, controller mode: as a container env list (P2P host through $(POD_IP))
CONTROLLER_CONTAINER_ENV = [
    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    {"name": "LMCACHE_ENABLE_P2P", "value": "True"},
    {"name": "LMCACHE_ENABLE_CONTROLLER", "value": "True"},
    {"name": "LMCACHE_LMCACHE_INSTANCE_ID",
     "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "LMCACHE_CONTROLLER_PULL_URL", "value": "lmcache-ctrl.ns.svc:8300"},
    {"name": "LMCACHE_CONTROLLER_REPLY_URL", "value": "lmcache-ctrl.ns.svc:8400"},
    {"name": "LMCACHE_LMCACHE_WORKER_PORTS", "value": "8500"},
    {"name": "LMCACHE_P2P_HOST", "value": "$(POD_IP)"},
    {"name": "LMCACHE_P2P_INIT_PORTS", "value": "8200"},
    {"name": "LMCACHE_P2P_LOOKUP_PORTS", "value": "8210"},
    {"name": "LMCACHE_TRANSFER_CHANNEL", "value": "nixl"},
    {"name": "LMCACHE_ENABLE_ASYNC_LOADING", "value": "True"},
    {"name": "LMCACHE_LOCAL_CPU", "value": "True"},
    {"name": "LMCACHE_MAX_LOCAL_CPU_SIZE", "value": "20"},
    {"name": "PYTHONHASHSEED", "value": "0"},
    {"name": "LMCACHE_LMCACHE_WORKER_HEARTBEAT_TIME", "value": "10"},
    {"name": "LMCACHE_EXTRA_CONFIG",
     "value": '{"p2p_socket_recv_timeout_ms":5000,"p2p_max_retry_count":2}'},
]


def without(d, key):
    return {k: v for k, v in d.items() if k != key}


def test_redis_generation_on_lmcache_036():
    ans = lmcache_probe("redis", [REDIS_ENV, without(REDIS_ENV, "LMCACHE_LOOKUP_URL")])
    assert ans["lmcache_version"] == "0.3.6"
    good, no_lookup = ans["results"]
    assert good["ok"], good
    cfg = good["config"]
    assert cfg["enable_p2p"] is True
    assert cfg["lookup_url"] == "kvmesh-lookup.ns.svc:6379"
    assert cfg["distributed_url"] == "10.1.2.3:8200"
    assert cfg["local_cpu"] is True and cfg["max_local_cpu_size"] == 5.0
    assert cfg["chunk_size"] == 256
    assert not no_lookup["ok"]
    assert no_lookup["stage"] == "validate"
    assert "lookup_url" in no_lookup["error"], no_lookup


def test_controller_generation_on_lmcache_056():
    env = kubelet_expand(CONTROLLER_CONTAINER_ENV, POD)
    assert env["LMCACHE_P2P_HOST"] == "10.1.2.3"
    bad_list = {**env, "LMCACHE_P2P_INIT_PORTS": "[8200]"}
    ans = lmcache_probe("controller", [env, without(env, "LMCACHE_P2P_HOST"), bad_list])
    assert ans["lmcache_version"] == "0.5.6"
    good, no_host, bad = ans["results"]
    assert good["ok"], good
    cfg = good["config"]
    assert cfg["enable_p2p"] is True and cfg["enable_controller"] is True
    assert cfg["lmcache_instance_id"] == "vllm-abc"
    assert cfg["p2p_host"] == "10.1.2.3"
    assert cfg["p2p_init_ports"] == [8200] and cfg["p2p_lookup_ports"] == [8210]
    assert cfg["lmcache_worker_ports"] == [8500]
    assert cfg["controller_pull_url"] == "lmcache-ctrl.ns.svc:8300"
    assert cfg["transfer_channel"] == "nixl"
    assert cfg["enable_async_loading"] is True
    assert cfg["lmcache_worker_heartbeat_time"] == 10
    assert cfg["extra_config"] == {"p2p_socket_recv_timeout_ms": 5000, "p2p_max_retry_count": 2}
    assert not no_host["ok"] and no_host["stage"] == "validate"
    assert "p2p_host" in no_host["error"], no_host
    # a JSON-style list becomes None with only a warning, then validation fails
    assert not bad["ok"], bad
    assert any("p2p_init_ports" in w for w in bad["warnings"]), bad


def test_probe_does_not_leak_between_cases():
    # case 2 has no LMCACHE_* at all: nothing from case 1 may survive
    good, empty = lmcache_parse("controller", [{"LMCACHE_CHUNK_SIZE": "512"}, {}])
    assert good["ok"] and good["config"]["chunk_size"] == 512
    assert empty["ok"] and empty["config"]["chunk_size"] == 256


KV_V1 = json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"})


def test_vllm_serve_parser():
    model = "Qwen/Qwen2.5-0.5B"
    # (a bad kv_role and the unregistered V0 connector: tests/contract/test_vllm_contract.py)
    v1, shell, api = vllm_parse(
        [
            {"argv": ["vllm", "serve", model, "--kv-transfer-config", KV_V1]},
            {"shell": "pip list >/dev/null && echo start; exec vllm serve "
                      f"{model} --tensor-parallel-size 2 --kv-transfer-config '{KV_V1}'\n"
                      "echo unreachable"},
            {"argv": ["python3", "-m", "vllm.entrypoints.openai.api_server",
                      "--model", model, "--kv-transfer-config", KV_V1]},
        ]
    )
    assert v1["ok"], v1
    assert v1["model"] == model and v1["tensor_parallel_size"] == 1
    assert v1["kv_transfer_config"]["kv_connector"] == "LMCacheConnectorV1"
    assert v1["kv_transfer_config"]["kv_role"] == "kv_both"
    assert v1["connector_registered"] is True
    assert shell["ok"], shell
    assert shell["tensor_parallel_size"] == 2 and shell["connector_registered"] is True
    assert api["ok"] and api["form"] == "api_server" and api["connector_registered"] is True
