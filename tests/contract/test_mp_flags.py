"""The `mp` mode's planned server, coordinator and connector settings (docs/mp-mode.md) checked by
the REAL consumers, before any injection code exists: LMCache 0.5.6's own `lmcache server` and
`lmcache coordinator` commands (argparse, env fallbacks, validation; probe_mp.py stops them just
before they serve) and vLLM 0.33.0's `vllm serve` parser + KVTransferConfig + connector import
(probe_vllm.py).

The argv here is hand-written so that each refusal can be shown on a minimal variant; what the
injection really generates (kvmesh.core.mp, the mp goldens) is checked by the same consumers in
test_mp_inject.py.
"""

from __future__ import annotations

import json

import pytest

import consumers

ENV = "vllm-0.33.0"
POD_IP = "10.1.2.3"        # what the kubelet puts in for $(POD_IP)
COORD = "http://kvm-mp-coord.team-a.svc:9300"

SERVER_ARGV = [
    "--instance-id", "kvm-0b6f2c1e-8d1a-4c39-9f0e-7a1d2b3c4d5e-1",
    "--host", "0.0.0.0", "--port", "5555",
    "--chunk-size", "256", "--hash-algorithm", "blake3",
    "--l1-size-gb", "8", "--eviction-policy", "LRU", "--l1-align-bytes", "65536",
    "--supported-transfer-mode", "lmcache_driven",
    "--http-host", "127.0.0.1", "--http-port", "8080",
    "--p2p-advertise-url", f"{POD_IP}:8200", "--p2p-listen-url", "0.0.0.0:8200",
]
SERVER_ENV = {"LMCACHE_COORDINATOR_URL": COORD, "LMCACHE_COORDINATOR_ADVERTISE_IP": POD_IP,
              "LMCACHE_COORDINATOR_HEARTBEAT_INTERVAL": "1"}
COORD_ARGV = ["--host", "0.0.0.0", "--port", "9300", "--chunk-size", "256",
              "--hash-algorithm", "blake3"]
EXTRA = {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": 5555,
         "lmcache.mp.hash_algorithm": "blake3"}


def server(argv, env=None):
    return {"cmd": "server", "argv": list(argv), "env": dict(env or {})}


CASES = {
    "planned": server(SERVER_ARGV, SERVER_ENV),
    "planned-as-flags": server(SERVER_ARGV + ["--coordinator-url", COORD,
                                              "--coordinator-advertise-ip", POD_IP,
                                              "--coordinator-heartbeat-interval", "1"]),
    "flag-beats-env": server(SERVER_ARGV + ["--coordinator-heartbeat-interval", "2"], SERVER_ENV),
    "isolated-engine-driven": server(
        [a if a != "lmcache_driven" else "engine_driven" for a in SERVER_ARGV] + ["--isolated-ipc"],
        SERVER_ENV),
    "p2p-without-coordinator": server(SERVER_ARGV),
    "p2p-has-no-env-fallback": server(
        [a for a in SERVER_ARGV[:-4]],
        {**SERVER_ENV, "LMCACHE_P2P_ADVERTISE_URL": f"{POD_IP}:8200",
         "LMCACHE_MP_P2P_ADVERTISE_URL": f"{POD_IP}:8200"}),
    "l1-without-eviction-policy": server(
        [a for a in SERVER_ARGV if a not in ("--eviction-policy", "LRU")], SERVER_ENV),
    "l1-init-size-not-int": server(SERVER_ARGV + ["--l1-init-size-gb", "0.5"], SERVER_ENV),
    "heartbeat-zero": server(SERVER_ARGV, {**SERVER_ENV,
                                           "LMCACHE_COORDINATOR_HEARTBEAT_INTERVAL": "0"}),
    "coordinator": {"cmd": "coordinator", "argv": COORD_ARGV},
    "coordinator-no-env-fallback": {"cmd": "coordinator", "argv": [],
                                    "env": {"LMCACHE_MP_COORDINATOR_PORT": "9999",
                                            "LMCACHE_MP_COORDINATOR_INSTANCE_TIMEOUT": "5"}},
}


@pytest.fixture(scope="module")
def results():
    try:
        out = consumers.run_probe(ENV, "probe_mp.py", {"cases": list(CASES.values())})
    except consumers.ConsumerEnvMissing as e:
        pytest.fail(str(e))
    assert out["lmcache_version"] == "0.5.6", out["lmcache_version"]
    return dict(zip(CASES, out["results"]))


def ok(r):
    assert r["ok"], r
    return r["config"]


def test_planned_server_settings(results):
    for case in ("planned", "planned-as-flags"):
        c = ok(results[case])
        mp, p2p, co = c["mp"], c["mp"]["p2p_config"], c["coordinator"]
        assert (mp["host"], mp["port"]) == ("0.0.0.0", 5555)      # peers reach tcp://POD_IP:5555
        assert mp["instance_id"] == SERVER_ARGV[1]                  # what the coordinator lists
        assert (p2p["advertise_url"], p2p["listen_url"]) == (f"{POD_IP}:8200", "0.0.0.0:8200")
        assert p2p["transfer_engine"] == "nixl"
        assert (co["url"], co["advertise_ip"], co["heartbeat_interval"]) == (COORD, POD_IP, 1.0)
        assert c["http"] == {"http_host": "127.0.0.1", "http_port": 8080}
        assert c["serve"] == {"host": "127.0.0.1", "port": 8080}
        mem = c["storage_manager"]["l1_manager_config"]["memory_config"]
        assert (mem["size_in_bytes"], mem["align_bytes"]) == (8 << 30, 65536)
        assert (mp["chunk_size"], mp["hash_algorithm"]) == (256, "blake3")
        assert (mp["supported_transfer_mode"], mp["isolated_ipc"]) == ("lmcache_driven", False)


def test_flag_beats_env(results):
    assert ok(results["flag-beats-env"])["coordinator"]["heartbeat_interval"] == 2.0


def test_isolated_ipc_and_engine_driven(results):
    mp = ok(results["isolated-engine-driven"])["mp"]
    assert (mp["supported_transfer_mode"], mp["isolated_ipc"]) == ("engine_driven", True)


def test_p2p_refused_without_coordinator(results):
    r = results["p2p-without-coordinator"]
    assert not r["ok"] and "P2P requires a coordinator" in r["error"], r


def test_p2p_flags_have_no_env_fallback(results):
    p2p = ok(results["p2p-has-no-env-fallback"])["mp"]["p2p_config"]
    assert p2p["advertise_url"] == "" and p2p["listen_url"] == "", p2p


@pytest.mark.parametrize("case,words", [
    ("l1-without-eviction-policy", ["--l1-size-gb and --eviction-policy"]),
    ("l1-init-size-not-int", ["--l1-init-size-gb", "invalid int value"]),
    ("heartbeat-zero", ["heartbeat interval", "> 0"]),
])
def test_server_refuses(results, case, words):
    r = results[case]
    assert not r["ok"], r
    for w in words:
        assert w in r["error"], r["error"]


def test_planned_coordinator_settings(results):
    c = ok(results["coordinator"])
    cfg = c["config"]
    assert (cfg["host"], cfg["port"], cfg["chunk_size"], cfg["hash_algorithm"]) == \
        ("0.0.0.0", 9300, 256, "blake3")
    assert (cfg["instance_timeout"], cfg["health_check_interval"]) == (30.0, 10.0)
    assert cfg["timeout_keep_alive"] == 10  # must stay above the servers' 1 s heartbeat
    assert c["serve"]["host"] == "0.0.0.0" and c["serve"]["port"] == 9300


def test_coordinator_reads_no_env(results):
    """0.5.6's coordinator takes flags only (docs.lmcache.ai describes LMCACHE_MP_COORDINATOR_*
    variables of a later version): kvmesh passes flags."""
    cfg = ok(results["coordinator-no-env-fallback"])["config"]
    assert (cfg["port"], cfg["instance_timeout"]) == (9300, 30.0)


@pytest.mark.consumers
def test_vllm_accepts_the_connector_config():
    """LMCache's own connector through kv_connector_module_path, and the bare registry name (which
    vLLM 0.33 resolves to the same external class when lmcache imports,
    vllm/distributed/kv_transfer/kv_connector/v1/lmcache_mp_connector.py:1185-1217)."""
    module_path, bare = consumers.vllm_parse([
        {"argv": ["vllm", "serve", "m", "--kv-transfer-config", json.dumps({
            "kv_connector": "LMCacheMPConnector",
            "kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector",
            "kv_role": "kv_both", "kv_connector_extra_config": EXTRA})],
         "load_connector": True},
        {"argv": ["vllm", "serve", "m", "--kv-transfer-config", json.dumps({
            "kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": EXTRA})]},
    ])
    assert module_path["ok"], module_path
    kv = module_path["kv_transfer_config"]
    assert kv["kv_connector_module_path"] == "lmcache.integration.vllm.lmcache_mp_connector"
    assert kv["kv_connector_extra_config"] == EXTRA
    assert module_path.get("connector_import") == "ok", module_path
    assert bare["ok"] and bare["connector_registered"] is True, bare
