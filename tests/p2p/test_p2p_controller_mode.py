"""Issue 5, item 4: the CONTROLLER-mode generation (LMCache 0.5.6, `lmcache/vllm-openai:v0.3.9`+),
without Kubernetes: real engines configured only by the env kvmesh's injection (the webhook's own
`decide()`, run offline) gives two pods register with the real `lmcache_controller`; A stores
chunks; B's lookup finds A through the controller; B reads the chunks from A over NIXL (UCX over
TCP on loopback) byte-identically; then fetch times per chunk count.

The same scenario through the real admission chain, on a real kubelet, with `lmcache_controller`
as the lookup StatefulSet's pod, and pod deletion with and without kvmesh's controller, is
tests/node/test_p2p_ctrl_real.py (it replaced this module's former KWOK steps 2-4 and their
stand-ins for the pod network and the kubelet).

Needs the `vllm-0.33.0` venv and the `nixl-1.5.1-cu13` overlay (tests/consumers/setup_envs.sh)
and root for `unshare -m` (cluster DNS stand-in). Harness environment and stand-ins are listed
in tests/p2p/ctrlrunner.py and tests/p2p/engine_node_ctrl.py; LMCache is unpatched. Here all of
them are on: the engines are processes on this host (so STAND-IN 3, the pod network namespace
of the worker's RPC endpoint, and the /etc/hosts stand-in for cluster DNS), and STAND-IN 4 (the
loop waker) works around a suspected LMCache 0.5.6 bug: without it controller lookups stall for
up to a heartbeat or block for good (docs/controller-mode-on-cpu.md).
"""

from __future__ import annotations

import time

import ctrlrunner
from ctrlrunner import CALL_S, CHUNK, IMAGE, CtrlEngine, assert_share, fetch_once_indexed, wait_warm
from lmcache_controller import LMCacheController

from kvmesh.core import names
from kvmesh.core.inject import Context, decide
from kvmesh.core.policy import PolicyDefaults

READY_S = 120
# LMCache 0.5.6 awaits the P2P lookup on the worker's zmq.asyncio DEALER socket from the
# storage manager's event loop (p2p_backend.py:306 -> worker.py:279-280) while the worker's own
# loop also watches that socket: the reply is often taken by the wrong thread and the lookup
# resumes only when its loop next wakes (0.2 s .. >20 s measured). The harness turns on
# engine_node_ctrl.py's STAND-IN 4 (loop waker, ctrlrunner.HARNESS_ENV) so lookups are prompt;
# the 1 s heartbeat only keeps the controller's view fresh.
HEARTBEAT_S = 1


def offline_pod(name: str, ip: str, ns: str) -> dict:
    """kvmesh's injection (the webhook's own decide()) applied to a pod, plus a pod status."""
    p = {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}-{time.time_ns()}",
                      "labels": {names.LABEL_INJECT: "enabled"}},
         "spec": {"containers": [{"name": "vllm", "image": IMAGE,
                                  "command": ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct"]}]}}
    # With a hash-seed key, as the webhook decides: both engines get their group's one
    # PYTHONHASHSEED (without it each process hashes with its own random seed: no shared key).
    r = decide(p, Context(ns, PolicyDefaults(cpu_cache_gb=1, heartbeat_seconds=HEARTBEAT_S),
                          selected=True, hash_seed_key=b"p2p-test-hash-seed-key.........."))
    assert r.mode == "controller", (r.action, r.reason, r.message)
    r.pod["status"] = {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"}
    return r.pod


def test_step1_two_engines_share_through_controller_and_nixl(tmp_path):
    ctrlrunner.engine_python()
    ns, ctrl_ip = "offline", "127.65.0.1"
    host = names.lookup_host(names.MODE_CONTROLLER, "default", ns)
    ctrl = LMCacheController(ctrl_ip, tmp_path)
    engines = []
    try:
        pods = [offline_pod("a", "127.65.0.2", ns), offline_pod("b", "127.65.0.3", ns)]
        engines = [CtrlEngine.for_pod(p, tmp_path, {host: ctrl_ip}) for p in pods]
        ctrl.wait_up()
        a, b = engines
        for e in engines:
            r = e.wait_ready(READY_S)
            assert r["pull_url"] == f"{host}:8300" and r["transfer_channel"] == "nixl"
            assert r["enable_p2p"] and r["enable_controller"] and r["async_loading"]
            assert r["bound"] and r["listen"][-3:] == [f"{e.pod_ip}:{p}" for p in (8200, 8210, 8500)]
            assert ctrl.workers(r["instance_id"])[0]["peer_init_url"] == f"{e.pod_ip}:8200"
            # the worker registers its pod IP (stand-in 3), not the machine's address
            assert r["netns_standin"] and ctrl.workers(r["instance_id"])[0]["ip"] == e.pod_ip
            assert e.call("stats")["loop_waker_ms"] > 0  # STAND-IN 4 is on (harness env)
        warm_s = wait_warm(a, b)
        print(f"\nengines ready in {a.ready['start_s']:.1f}/{b.ready['start_s']:.1f} s, "
              f"past LMCache's startup full sync {warm_s:.1f} s later")
        assert_share(a, b, seed=11)
        times = {}
        for n in (1, 4, 16, 32):  # fetch time per chunk count (fresh keys each time)
            s = a.call("store", seed=1000 + n, tokens=n * CHUNK, timeout=CALL_S)
            got = fetch_once_indexed(b, 1000 + n, n * CHUNK)
            assert s["ok"] and got["equal"], got  # (fetch_once_indexed asserted got["ok"])
            times[n] = (round(got["lookup_ms"], 1), round(got["retrieve_ms"], 1), got["misses"])
        print(f"\nchunks -> (controller lookup + NIXL read ms, copy ms, misses before indexed): {times}")
    finally:
        for e in engines:
            e.close()
        ctrl.stop()
