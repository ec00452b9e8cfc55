"""Every injected golden, expanded like the kubelet expands it, is parsed by the REAL LMCache
configuration loader of its mode's generation (lmcache 0.3.6 for redis mode, 0.5.6 for
controller mode) to the intended values and passes its validation; removing any required P2P
variable makes the same loader reject it, so the assertions cannot pass vacuously."""

from __future__ import annotations

import pytest

import consumers
from injected import POD_IP, POD_NAME, POD_UID, injected_goldens

# mp mode's LMCache runs in the server sidecar: tests/contract/test_mp_inject.py checks it.
CASES = [c for c in injected_goldens() if c.mode != "mp"]
REQUIRED = {
    "redis": ["LMCACHE_LOOKUP_URL", "LMCACHE_DISTRIBUTED_URL"],
    "controller": ["LMCACHE_ENABLE_CONTROLLER", "LMCACHE_CONTROLLER_PULL_URL",
                   "LMCACHE_CONTROLLER_REPLY_URL", "LMCACHE_LMCACHE_WORKER_PORTS",
                   "LMCACHE_P2P_HOST", "LMCACHE_P2P_INIT_PORTS", "LMCACHE_P2P_LOOKUP_PORTS",
                   "LMCACHE_TRANSFER_CHANNEL"],
}


def test_goldens_cover_both_modes():
    assert {c.mode for c in CASES} == {"redis", "controller"}
    assert len(CASES) >= 12


@pytest.fixture(scope="module")
def parsed():
    """One probe per generation for all cases (and their broken variants)."""
    out = {}
    for mode in ("redis", "controller"):
        cases = [c for c in CASES if c.mode == mode]
        envs = []
        for c in cases:
            env = consumers.kubelet_expand(c.container["env"], c.pod)
            envs.append(env)
            envs.extend({k: v for k, v in env.items() if k != drop} for drop in REQUIRED[mode])
        results = consumers.lmcache_parse(mode, envs)
        step = 1 + len(REQUIRED[mode])
        for i, c in enumerate(cases):
            out[c.case] = (envs[i * step], results[i * step], results[i * step + 1:(i + 1) * step])
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.case for c in CASES])
def test_real_lmcache_parses_injected_env(case, parsed):
    env, result, _ = parsed[case.case]
    assert result["ok"], result
    cfg = result["config"]
    # A broken value is turned into None with a log line by LMCache: none may appear.
    noisy = [w for w in result.get("warnings", []) if "configuration file" not in w
             and any(k in w or k.lower().removeprefix("lmcache_") in w for k in env)]
    assert not noisy, noisy
    assert cfg["enable_p2p"] is True
    assert cfg["local_cpu"] is True
    assert cfg["max_local_cpu_size"] == float(env["LMCACHE_MAX_LOCAL_CPU_SIZE"]) > 0
    assert cfg["chunk_size"] == int(env["LMCACHE_CHUNK_SIZE"])
    if case.mode == "redis":
        # The address LMCache binds and advertises is the pod's own IP and declared port.
        assert cfg["distributed_url"] == f"{POD_IP}:{case.ports['kvm-dist']}"
        host, port = cfg["lookup_url"].split(":")
        assert host.startswith("kvmesh-redis-") and host.endswith(".svc") and int(port) == 6379
        assert cfg["enable_controller"] is False
    else:
        ranks = len([p for p in case.ports if p.startswith("kvm-init-")])
        assert ranks >= 1
        assert cfg["enable_controller"] is True
        assert cfg["p2p_host"] == POD_IP
        assert cfg["p2p_init_ports"] == [case.ports[f"kvm-init-{r}"] for r in range(ranks)]
        assert cfg["p2p_lookup_ports"] == [case.ports[f"kvm-look-{r}"] for r in range(ranks)]
        assert cfg["lmcache_worker_ports"] == [case.ports[f"kvm-work-{r}"] for r in range(ranks)]
        assert cfg["transfer_channel"] == "nixl"
        assert cfg["enable_async_loading"] is True
        assert cfg["controller_pull_url"].endswith(".svc:8300")
        assert cfg["controller_reply_url"].endswith(".svc:8400")
        assert cfg["lmcache_instance_id"] in (case.pod["metadata"]["name"], POD_UID)
        if case.pod["metadata"].get("generateName"):
            assert cfg["lmcache_instance_id"] == case.pod["metadata"]["name"] == POD_NAME
        assert 0 < cfg["lmcache_worker_heartbeat_time"] < 30
    assert env["PYTHONHASHSEED"].isdigit()


@pytest.mark.parametrize("case", CASES, ids=[c.case for c in CASES])
def test_real_lmcache_rejects_env_missing_a_required_variable(case, parsed):
    _, _, broken = parsed[case.case]
    for drop, result in zip(REQUIRED[case.mode], broken):
        assert result["ok"] is False, f"LMCache accepted the env without {drop}"


def test_0_5_6_rejects_redis_mode_env():
    """Why mode selection must never guess: the legacy env crashes current LMCache."""
    redis_case = next(c for c in CASES if c.mode == "redis")
    env = consumers.kubelet_expand(redis_case.container["env"], redis_case.pod)
    [result] = consumers.lmcache_parse("controller", [env])
    assert result["ok"] is False and "enable_controller" in result["error"]
