"""The caps of kvmesh.core.limits: what a pod over them gets, and that the bounded pieces
(port picking, the script cache) stay bounded."""

from __future__ import annotations

import pytest

from kvmesh.core import inject, launch, limits
from kvmesh.core.inject import Context
from kvmesh.core.policy import PolicyDefaults

POD = {"metadata": {"name": "p", "labels": {"kvmesh.dev/inject": "enabled"}},
       "spec": {"containers": [{"name": "vllm", "image": "lmcache/vllm-openai:v0.3.6",
                                "command": ["vllm", "serve", "m"]}]}}


def pod(**container) -> dict:
    c = {**POD["spec"]["containers"][0], **container}
    return {**POD, "spec": {"containers": [c]}}


def parallel(ranks: int, ports: list[int] = ()) -> dict:
    p = pod(command=["vllm", "serve", "m", "-tp", str(ranks)],
            ports=[{"containerPort": n} for n in ports])
    p["metadata"] = {**p["metadata"], "annotations": {"kvmesh.dev/allow-parallel": "true",
                                                      "kvmesh.dev/mode": "controller"}}
    return p


def decide(p: dict) -> inject.Result:
    return inject.decide(p, Context(namespace="ns", policy=PolicyDefaults()))


def old_pick(start: int, used: set[int]) -> int:  # the quadratic picker this replaced
    p = start
    while p in used and p < 65535:
        p += 1
    used.add(p)
    return p


@pytest.mark.parametrize("taken", [set(), {8200, 8201, 8210}, set(range(8200, 8400, 2)),
                                   set(range(8000, 9000))])
def test_port_set_picks_what_the_simple_walk_picked(taken):
    s, plain = limits.PortSet(set(taken)), set(taken)
    for base in (8200, 8210, 8300):
        for r in range(70):
            assert s.pick(base + r) == old_pick(base + r, plain)


class CountingSet(set):
    probes = 0

    def __contains__(self, x):
        CountingSet.probes += 1
        return super().__contains__(x)


@pytest.mark.parametrize("n", [1000, 10_000])
def test_port_picking_is_linear(n):
    # Three overlapping series of n ports (TP n): the old walk crossed every earlier pick on
    # each call (~n^2 probes); counted, not timed.
    CountingSet.probes = 0
    s = limits.PortSet(CountingSet())
    for base in (8200, 8210, 8220):
        for r in range(n):
            s.pick(base + r)
    assert CountingSet.probes <= 10 * 3 * n


def test_port_set_never_returns_a_taken_port_at_the_top():
    s = limits.PortSet({65534, 65535})
    with pytest.raises(limits.NoFreePort):
        s.pick(65534)


def test_ranks_over_the_cap_are_admitted_uninjected_naming_the_cap():
    r = decide(parallel(limits.MAX_RANKS + 1))
    assert r.action == inject.SKIP and r.reason == inject.R_LIMIT
    assert f"at most {limits.MAX_RANKS} ranks" in r.message


def test_ranks_at_the_cap_get_distinct_ports_around_declared_ones():
    r = decide(parallel(limits.MAX_RANKS, ports=list(range(8200, 8260))))
    assert r.action == inject.INJECT
    ports = [p["containerPort"] for p in r.pod["spec"]["containers"][0]["ports"]]
    assert len(ports) == len(set(ports)) == 60 + 3 * limits.MAX_RANKS


def test_env_over_the_cap():
    r = decide(pod(env=[{"name": f"V{i}", "value": "1"}
                        for i in range(limits.MAX_ENV_ENTRIES + 1)]))
    assert r.action == inject.SKIP and r.reason == inject.R_LIMIT and "env" in r.message


def test_script_over_the_cap_is_not_parsed():
    script = "true\n" * (limits.MAX_SCRIPT_BYTES // 5 + 1) + "exec vllm serve m"
    r = decide(pod(command=["sh", "-c", script]))
    assert r.action == inject.SKIP and r.reason == inject.R_SCRIPT
    assert limits.kib(limits.MAX_SCRIPT_BYTES) in r.message


def test_scripts_of_one_pod_share_one_parse_budget():
    # Two 50 KB side scripts are parsed; 28 KB of the 128 KiB remain, less than vLLM's.
    side = "true\n" * 10_000
    containers = [{"name": f"s{i}", "image": "busybox", "command": ["sh", "-c", side]}
                  for i in range(2)]
    p = pod(command=["sh", "-c", "true\n" * 8_000 + "exec vllm serve m"])
    p["spec"]["containers"] = containers + p["spec"]["containers"]
    # The vLLM container's script comes after the budget is spent: not parsed, and said so.
    r = decide(p)
    assert r.reason == inject.R_SCRIPT and "per pod" in r.message


def test_script_cache_is_bounded_in_bytes(monkeypatch):
    assert isinstance(launch._CLASSIFIED, limits.ByteLRU)
    assert launch._CLASSIFIED.max_bytes == limits.SCRIPT_CACHE_BYTES
    small = limits.ByteLRU(200_000)
    monkeypatch.setattr(launch, "_CLASSIFIED", small)
    for i in range(40):
        script = f"# {i}\n" + "echo x\n" * 1500 + "exec vllm serve m"
        assert launch.classify(["sh", "-c", script], [], "busybox") is not None
    assert small.bytes <= 200_000 and 0 < len(small) < 40


def test_byte_lru_evicts_oldest_and_skips_oversized():
    c = limits.ByteLRU(100)
    c.put("a", 1, 40)
    c.put("b", 2, 40)
    c.get("a")
    c.put("c", 3, 40)  # evicts b, the least recently used
    assert (c.get("a"), c.get("b"), c.get("c")) == (1, None, 3) and c.bytes == 80
    c.put("huge", 4, 101)
    assert c.get("huge") is None and c.bytes == 80


@pytest.mark.parametrize("value", ["inf", "Infinity", "nan", "1e400"])
def test_infinite_cpu_cache_is_denied(value):
    p = pod()
    p["metadata"] = {**p["metadata"], "annotations": {"kvmesh.dev/cpu-cache-gb": value}}
    r = decide(p)
    assert r.action == inject.DENY and r.reason == inject.R_INVALID_ANNOTATION
    assert "finite" in r.message
