"""Issue 5, item 4: the CONTROLLER-mode generation (LMCache 0.5.6, `lmcache/vllm-openai:v0.3.9`+):
real engines configured only by what kvmesh injects register with the real `lmcache_controller`;
A stores chunks; B's lookup finds A through the controller; B reads the chunks from A over NIXL
(UCX over TCP on loopback) byte-identically. Then A's pod is deleted: kvmesh's controller
deregisters A and B's next lookup is a clean miss; and, with kvmesh's controller stopped, what B
sees instead.

Steps (each a test): (1) two engines from direct env dicts (kvmesh's injection run offline, no
Kubernetes); (2) the same through the real admission chain on the local control plane, with
`lmcache_controller` bound to the group's lookup pod IP; (3) pod deletion with kvmesh's
controller; (4) pod deletion without it.

Needs the `vllm-0.33.0` venv and the `nixl-1.5.1-cu13` overlay (tests/consumers/setup_envs.sh)
and root for `unshare -m` (cluster DNS stand-in). Harness environment and stand-ins are listed
in tests/p2p/ctrlrunner.py and tests/p2p/engine_node_ctrl.py; LMCache is unpatched. One of them
(STAND-IN 4, the loop waker) works around a suspected LMCache 0.5.6 bug: without it controller
lookups stall for up to a heartbeat or block for good (docs/controller-mode-on-cpu.md).
Engines are shared: step 1's two, and B plus two A pods started together for steps 2-4.
"""

from __future__ import annotations

import json
import time

import pytest

import ctrlrunner
from ctrlrunner import CtrlEngine
from lmcache_controller import LMCacheController
from scenario import CHUNK, P2PScenario, Peer, wait_for

from kvmesh.core import names
from kvmesh.core.inject import Context, decide
from kvmesh.core.policy import PolicyDefaults

IMAGE = "lmcache/vllm-openai:v0.3.9"  # the webhook picks controller mode from this version
CHUNKS = 8
TOKENS = CHUNKS * CHUNK
GID = "controller-default"
READY_S = 120
CALL_S = 10  # every data-path call is bounded
DEREGISTER_BOUND_S = 10.0
WARM_S = 45  # LMCache's startup full sync: 10 s heartbeat delay + <=5 s jitter + a 5 s poll
# LMCache 0.5.6 awaits the P2P lookup on the worker's zmq.asyncio DEALER socket from the
# storage manager's event loop (p2p_backend.py:306 -> worker.py:279-280) while the worker's own
# loop also watches that socket: the reply is often taken by the wrong thread and the lookup
# resumes only when its loop next wakes (0.2 s .. >20 s measured). The harness turns on
# engine_node_ctrl.py's STAND-IN 4 (loop waker, ctrlrunner.HARNESS_ENV) so lookups are prompt;
# the 1 s heartbeat only keeps the controller's view fresh.
HEARTBEAT_S = 1


def wait_warm(*engines: CtrlEngine, bound: float = WARM_S) -> float:
    """Wait until each engine is past LMCache's startup full sync. A worker that registers
    while the controller is fresh (its `need_full_sync_all` window) gets a FullSyncCommand with
    its first heartbeat (sent lmcache_worker_heartbeat_delay_time = 10 s after start); it then
    enters freeze mode, in which stores are skipped silently and lookups stay local, until the
    controller confirms the sync (status polled every 5 s). Warm = two heartbeat answers seen
    (so a command in the first one has been acted on), every full sync started has finished,
    and not frozen. Returns seconds waited."""
    t0 = time.monotonic()

    def warm():
        st = [e.call("stats") for e in engines]
        return all(x["ok"] and x["heartbeats"] >= 2 and x["full_syncs"][0] == x["full_syncs"][1]
                   and not x["frozen"] for x in st)
    wait_for("engines past LMCache's startup full sync", warm, bound, 0.25)
    return time.monotonic() - t0


def fetch_once_indexed(b: CtrlEngine, seed: int, tokens: int, bound: float = 5.0) -> dict:
    """B's fetch, repeated while it is a clean miss: LMCache reports stored chunks to the
    controller asynchronously (batched admit messages), so a lookup right after A's store can
    miss. Returns the first hit, with `misses` (clean misses before it) and `index_ms`."""
    t0, misses = time.monotonic(), 0
    while True:
        got = b.call("fetch", seed=seed, tokens=tokens, timeout=CALL_S)
        assert got["ok"], got
        if got["hit"] or time.monotonic() - t0 > bound:
            got["misses"], got["index_ms"] = misses, (time.monotonic() - t0) * 1000
            return got
        misses += 1
        time.sleep(0.05)


def assert_share(ctrl: LMCacheController, a: CtrlEngine, b: CtrlEngine, seed: int) -> dict:
    """A stores; B finds A through the controller and reads A's chunks over NIXL."""
    stored = a.call("store", seed=seed, tokens=TOKENS, timeout=CALL_S)
    assert stored["ok"] and stored["local_hit"] == TOKENS and len(stored["keys"]) == CHUNKS, stored
    # B computes the same chunk keys (asserted, so a silent zero-hit run fails loudly)
    assert b.call("keys", seed=seed, tokens=TOKENS)["keys"] == stored["keys"]
    served = a.call("stats")["served"]
    got = fetch_once_indexed(b, seed, TOKENS)
    assert got["local_hit_before"] == 0  # B had nothing ...
    # ... the controller named A (instance id, its p2p_host:init port) for all chunks ...
    assert got["controller"] == [a.ready["instance_id"], "LocalCPUBackend", CHUNKS,
                                 f"{a.pod_ip}:{a.ready['init_ports'][0]}"], got
    # ... and B now holds A's exact bytes, read from A (A served the batched get, B did not)
    assert got["hit"] == TOKENS and got["retrieved"] == TOKENS and got["equal"], got
    assert got["sha256"] == stored["sha256"]
    assert a.call("stats")["served"] - served == 1 and got["self_served"] == 0
    print(f"\nB fetched {CHUNKS} chunks ({TOKENS} tokens, 16 MiB) from A: lookup+NIXL read "
          f"{got['lookup_ms']:.1f} ms, copy into KV buffer {got['retrieve_ms']:.1f} ms "
          f"({got['misses']} clean misses while the controller indexed A's chunks)")
    return got


def clean_miss(b: CtrlEngine, seed: int, t0: float, bound: float) -> tuple[float | None, list]:
    """B's fetch until it is a clean miss *answered by the controller* (0 chunks)."""
    seen = []
    while time.monotonic() - t0 < bound:
        r = b.call("fetch", seed=seed, tokens=TOKENS, timeout=5)
        seen.append(r)
        if r.get("ok") and r["hit"] == 0 and r["retrieved"] == 0 and r["controller"] and \
                r["controller"][2] == 0:
            return time.monotonic() - t0, seen
        time.sleep(0.05)
    return None, seen


# --- step 1: no Kubernetes --------------------------------------------------------------------

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
            assert ctrl.workers(r["instance_id"])[0]["ip"] == e.pod_ip
            assert e.call("stats")["loop_waker_ms"] > 0  # STAND-IN 4 is on (harness env)
        warm_s = wait_warm(a, b)
        print(f"\nengines ready in {a.ready['start_s']:.1f}/{b.ready['start_s']:.1f} s, "
              f"past LMCache's startup full sync {warm_s:.1f} s later")
        assert_share(ctrl, a, b, seed=11)
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


# --- steps 2-4: the real control plane --------------------------------------------------------

class CtrlScenario(P2PScenario):
    """P2PScenario's Kubernetes side (pods, deaths) with controller-mode engines and the real
    lmcache_controller on the lookup pod's IP instead of Redis."""

    def start(self, replicas: int = 2) -> "CtrlScenario":
        ctrlrunner.engine_python()
        policy = self.workdir / "policy.yaml"
        policy.write_text(f"cpuCacheGb: 1\nheartbeatSeconds: {HEARTBEAT_S}\n")
        self.controller_args = ("--policy", str(policy), "--resync-seconds", "1",
                                "--group-grace-seconds", "3")
        self.webhook_args = ("--policy", str(policy))
        self.stack.restart(controller_args=self.controller_args, webhook_args=self.webhook_args)
        self.cluster.create_namespace(self.namespace, labels={"kvmesh-test": "true"})
        dep = {"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": self.deployment, "namespace": self.namespace},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": self.deployment}},
                        "template": {"metadata": {"labels": {"app": self.deployment,
                                                             names.LABEL_INJECT: "enabled"}},
                                     "spec": {"containers": [{
                                         "name": "vllm", "image": IMAGE,
                                         "command": ["vllm", "serve",
                                                     "Qwen/Qwen2.5-0.5B-Instruct"]}]}}}}
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(dep))
        pods = wait_for(f"{replicas} ready pods", lambda: self._ready_pods(replicas), 60, 0.2)

        def lookup_pod():
            ps = [p for p in self.cluster.kubectl_json(
                "get", "pods", "-n", self.namespace, "-l", f"kvmesh.dev/lookup-for={GID}")["items"]
                if p["status"].get("podIP") and p["status"].get("phase") == "Running"]
            return ps[0] if ps else None
        self.lookup_pod = wait_for("lmcache_controller pod", lookup_pod, 60, 0.2)
        self.ctrl = LMCacheController(self.lookup_pod["status"]["podIP"], self.workdir)
        self.hosts = {names.lookup_host(names.MODE_CONTROLLER, "default", self.namespace):
                      self.ctrl.ip}
        first, *others = sorted(pods, key=lambda p: p["metadata"]["name"])
        self.used |= {p["metadata"]["name"] for p in pods}
        self.b = Peer(first, self._engine(first))
        # the A pods of steps 2/3 and 4, started alongside B (engine start and LMCache's startup
        # full sync overlap instead of adding up)
        self.a_next: list[Peer] = [Peer(p, self._engine(p)) for p in others]
        self.ctrl.wait_up()
        for peer in (self.b, *self.a_next):
            self._ready(peer)
        self.warm_s = wait_warm(self.b.engine, *(a.engine for a in self.a_next))
        print(f"\n{len(pods)} engines ready in "
              f"{max(p.engine.ready['start_s'] for p in (self.b, *self.a_next)):.1f} s, past "
              f"LMCache's startup full sync {self.warm_s:.1f} s later")
        return self

    def _engine(self, pod: dict) -> CtrlEngine:
        e = CtrlEngine.for_pod(pod, self.workdir / "engines", self.hosts)
        self.runner.engines.append(e)
        return e

    def fresh_a(self, timeout: float = 60) -> Peer:
        if self.a_next:
            return self.a_next.pop(0)
        pod = self.unused_pod(timeout)
        peer = Peer(pod, self._engine(pod))
        self._ready(peer)
        wait_warm(peer.engine)
        return peer

    @staticmethod
    def _ready(peer: Peer) -> None:
        r = peer.engine.wait_ready(READY_S)
        # Peer.address (a death's "address"): the P2P init URL the controller hands out
        r["distributed_url"] = f"{r['p2p_host']}:{r['init_ports'][0]}"

    def stop(self) -> None:
        super().stop()
        if getattr(self, "ctrl", None):
            self.ctrl.stop()


@pytest.fixture(scope="module")
def mesh(devcluster, stack, tmp_path_factory):
    s = CtrlScenario(devcluster, stack, tmp_path_factory.mktemp("p2pctrl"))
    try:
        s.start(replicas=3)  # B, step 2/3's A, step 4's A
        yield s
    finally:
        s.stop()
        stack.restart()


def test_step2_injected_pods_share_through_controller_and_nixl(mesh):
    b = mesh.b
    env = {e["name"]: e for e in b.pod["spec"]["containers"][0]["env"]}
    host_var = env["LMCACHE_P2P_HOST"]["value"]  # "$(KVMESH_POD_IP)"
    assert env[host_var[2:-1]]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["LMCACHE_CONTROLLER_PULL_URL"]["value"] == \
        f"kvmesh-lmcache-default.{mesh.namespace}.svc:8300"
    assert env["LMCACHE_TRANSFER_CHANNEL"]["value"] == "nixl"
    a = mesh.fresh_a()
    for peer in (a, b):
        r = peer.engine.ready
        # instance id from the pod's own metadata (name for Deployment pods, uid if names recur)
        field = env["LMCACHE_LMCACHE_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert r["p2p_host"] == peer.ip
        assert r["instance_id"] == peer.pod["metadata"][field.split(".", 1)[1]]
        assert r["bound"] and f"{peer.ip}:8200" in r["listen"]
        w = mesh.ctrl.workers(r["instance_id"])
        assert w and w[0]["peer_init_url"] == f"{peer.ip}:8200" and w[0]["ip"] == peer.ip
    assert a.ip != b.ip
    assert_share(mesh.ctrl, a.engine, b.engine, seed=101)
    mesh.step2_a = a  # step 3 deletes this A's pod


def test_step3_deleted_pod_is_deregistered_and_b_misses_cleanly(mesh):
    a = getattr(mesh, "step2_a", None)
    if a is None:  # step 2 did not run
        a = mesh.fresh_a()
    assert_share(mesh.ctrl, a.engine, mesh.b.engine, seed=201)
    a_id = a.engine.ready["instance_id"]
    assert mesh.ctrl.workers(a_id)
    death = mesh.kill("deleted", a)  # SIGKILL (no deregistration by LMCache), then pod delete
    wait_for("A deregistered by kvmesh", lambda: mesh.ctrl.workers(a_id) == [],
             DEREGISTER_BOUND_S, 0.05)
    dereg = time.monotonic() - death.t0
    elapsed, seen = clean_miss(mesh.b.engine, 201, death.t0, DEREGISTER_BOUND_S)
    assert elapsed is not None, f"B still hits dead A {DEREGISTER_BOUND_S}s after deletion: {seen[-1]}"
    assert all(r["ok"] for r in seen), seen  # no exception, no timeout (both reply ok: false)
    assert seen[-1]["controller"] is not None and seen[-1]["controller"][2] == 0, seen[-1]
    assert mesh.ctrl.workers(mesh.b.engine.ready["instance_id"])  # B stays registered
    print(f"\ndeleted: kvmesh deregistered A {dereg * 1000:.0f} ms after the deletion; B's "
          f"first clean miss at {elapsed * 1000:.0f} ms ({len(seen)} lookups, last "
          f"{seen[-1]['lookup_ms']:.1f} ms)")


def test_step4_without_kvmesh_controller(mesh, stack):
    """The same deletion with kvmesh's controller stopped: the controller still names dead A,
    and B's fetch blocks on A until the call's bound (every call is bounded)."""
    stack.controller.stop()
    try:
        a = mesh.fresh_a()
        assert_share(mesh.ctrl, a.engine, mesh.b.engine, seed=301)
        a_id = a.engine.ready["instance_id"]
        death = mesh.kill("deleted", a)
        time.sleep(1.5)
        assert mesh.ctrl.workers(a_id)  # nobody deregistered A
        answers_before = len(mesh.b.engine.call("stats")["controller_answers"])
        results = []
        for _ in range(3):
            r = mesh.b.engine.call("fetch", seed=301, tokens=TOKENS, timeout=CALL_S)
            results.append(r)
            if r.get("timeout"):
                break
        summary = [{k: r.get(k) for k in ("ok", "timeout", "hit", "retrieved", "controller",
                                          "lookup_ms", "exception", "error", "elapsed_s")}
                   for r in results]
        print(f"\nwithout kvmesh, deleted: {time.monotonic() - death.t0:.1f}s after deletion "
              f"B saw: {json.dumps(summary)}")
        # B's first fetch gets no bytes and never returns: it is abandoned at the call's bound
        first = results[0]
        assert first.get("timeout") is True and first["elapsed_s"] >= CALL_S, summary
        # ... because the controller still named dead A for all chunks (B's own LMCache log;
        # the blocked fetch itself never replied)
        answers = mesh.b.engine.call("stats")["controller_answers"][answers_before:]
        assert answers == [[a_id, "LocalCPUBackend", CHUNKS, death.address]], answers
    finally:
        stack.start_controller(*mesh.controller_args)
