"""TEST CODE. One real, unpatched LMCache 0.5.6 engine in CONTROLLER mode ("a vLLM pod's LMCache")
per process: P2P backend, registration/lookup through the real `lmcache_controller`, chunk reads
from the peer over NIXL (UCX). The controller-mode twin of tests/p2p/engine_node.py, same
line protocol (JSON per line; {"event": "ready"|"fatal"}, then {"id": n, "ok": ...} replies;
a request may carry "timeout" in seconds, after which the call is abandoned and the engine
refuses further data-path calls).

Runs in the `vllm-0.33.0` venv (lmcache 0.5.6, torch CUDA-13 build; no GPU is used) with NIXL
(`nixl==1.5.1` + `nixl-cu13==1.5.1`) from the `nixl-1.5.1-cu13` overlay on PYTHONPATH
(tests/consumers/setup_envs.sh). Configured only by its environment, the way vLLM's LMCache
connector does it (`LMCacheEngineConfig.from_env()` + `validate()`, then
`LMCacheEngineBuilder.get_or_create` and `post_init`).

HARNESS ENVIRONMENT (not injected by kvmesh, set by the runner): `UCX_TLS=tcp,self` and
`UCX_NET_DEVICES=lo` (UCX over TCP on loopback: this machine has no RDMA device and only
loopback may carry test traffic).

STAND-INS (test code; LMCache itself is not modified):
  1. `CPUKVConnector` stands in for vLLM's paged GPU KV memory: it copies between a contiguous
     CPU tensor [2, layers, tokens, hidden] and LMCache's memory objects (LMCache's own
     MockGPUConnector does nothing, so it cannot show byte-identical transfer).
  2. `LookupAnswers` stands in for vLLM's scheduler-side async lookup server: LMCache's
     storage manager reports each async lookup's loaded prefix length to it
     (`send_response_to_scheduler`); here it is recorded in-process.
  3. The pod's network namespace, ONLY for engines run as processes on this host
     (KVMESH_TEST_POD_NETNS=1, set by tests/p2p/ctrlrunner.py; off in real pods, where
     tests/node/test_p2p_ctrl_real.py runs this file unchanged). In a pod, LMCacheWorker's
     `get_ip()` (which asks the routing table for the source address towards 8.8.8.8) yields
     the pod IP, and its RPC socket bound on `*:<worker port>` is reachable only at the pod's
     addresses. On the one-host harness `get_ip()` would yield the machine's address and two
     pods' `*:<port>` would collide, so inside `lmcache.v1.cache_controller.worker` only,
     `get_ip` returns the pod IP (LMCACHE_P2P_HOST's value, i.e. $(KVMESH_POD_IP)) and a `*:`
     bind becomes `<pod IP>:`.
  4. LOOP WAKER (works around a suspected upstream bug; see docs/controller-mode-on-cpu.md).
     P2PBackend awaits the controller lookup on the worker's zmq.asyncio DEALER socket from the
     storage manager's event loop (p2p_backend.py:306 -> worker.py:279-280), while the worker's
     own loop (worker.py:179-184) still has that socket's fd registered. The reply is then
     picked up by whichever loop wakes first, often in the wrong thread, and the awaiting
     coroutine resumes only when its loop next wakes for some other reason (the next heartbeat).
     A daemon thread here calls `call_soon_threadsafe(no-op)` on the worker loop and on the
     storage manager loop every KVMESH_TEST_LOOP_WAKE_MS ms (harness env; 0 = off), so each
     loop runs its ready callbacks promptly. Nothing in LMCache or pyzmq is modified.
Tokens and KV are synthetic (seeded) for a 2-layer fake model: there is no model and no GPU.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid

from node_protocol import listen_addrs, protocol_reply, serve, start_or_exit  # noqa: E402

reply = protocol_reply()
os.dup2(2, 1)
sys.stdout = sys.stderr

T_START = time.perf_counter()
import torch  # noqa: E402

from fake_model import HEAD_DIM, HIDDEN, KV_HEADS, NUM_LAYERS, sequence, sha  # noqa: E402

from lmcache.v1.cache_engine import LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
import lmcache.v1.cache_controller.worker as _worker_mod  # noqa: E402

T_IMPORTED = time.perf_counter()



# ---- STAND-IN 1: CPU KV connector in place of vLLM's paged GPU memory ------------------------
class CPUKVConnector(GPUConnectorInterface):
    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, NUM_LAYERS, num_tokens, HIDDEN])

    def from_gpu(self, memory_obj, start, end, **kwargs):
        t = memory_obj.tensor
        t.copy_(kwargs["kvcache"][:, :, start:end, :].reshape(t.shape))

    def to_gpu(self, memory_obj, start, end, **kwargs):
        dst = kwargs["kvcache"][:, :, start:end, :]
        dst.copy_(memory_obj.tensor.reshape(dst.shape))

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
        for m, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(m, s, e, **kwargs)

    def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
        for m, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(m, s, e, **kwargs)


# ---- STAND-IN 2: the scheduler's async lookup server ------------------------------------------
class LookupAnswers:
    def __init__(self):
        self.cond = threading.Condition()
        self.answers: dict[str, int] = {}

    def send_response_to_scheduler(self, lookup_id, retrieved_length):
        with self.cond:
            self.answers[lookup_id] = int(retrieved_length)
            self.cond.notify_all()

    def wait(self, lookup_id: str) -> int:
        with self.cond:
            while lookup_id not in self.answers:
                self.cond.wait(0.5)
            return self.answers.pop(lookup_id)


# ---- STAND-IN 3: the pod's network namespace (LMCacheWorker's own address only) -------------
def _pod_netns(pod_ip: str) -> None:
    real_get_zmq_socket = _worker_mod.get_zmq_socket

    def get_zmq_socket(context, socket_path, *a, **k):
        if isinstance(socket_path, str) and socket_path.startswith("*:"):
            socket_path = f"{pod_ip}:{socket_path[2:]}"
        return real_get_zmq_socket(context, socket_path, *a, **k)

    _worker_mod.get_ip = lambda: pod_ip
    _worker_mod.get_zmq_socket = get_zmq_socket
# --------------------------------------------------------------------------------------------


class LoopWaker:
    """STAND-IN 4: wake LMCache's worker and storage-manager event loops every `period_s`."""

    def __init__(self, loops: dict, period_s: float):
        self.loops, self.period_s = loops, period_s
        threading.Thread(target=self._run, daemon=True, name="kvmesh-test-loop-waker").start()

    def _run(self) -> None:
        noop = lambda: None  # noqa: E731
        while True:
            time.sleep(self.period_s)
            for loop in self.loops.values():
                if not loop.is_closed():
                    loop.call_soon_threadsafe(noop)


class LogWatch(logging.Handler):
    """Reads LMCache's own log records (a handler is attached; LMCache is not changed):
    peer reads this engine served, and the controller's last answer to this engine's lookup."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.served = 0
        self.controller_answers: list = []
        self.heartbeats = 0  # heartbeat responses received from the controller
        self.full_syncs_started = 0  # full syncs the controller asked for (freeze mode follows)
        self.full_syncs_done = 0


    def emit(self, record):
        msg = str(record.msg)
        if msg.startswith("Received P2P batched lookup and get msg"):
            self.served += 1
        elif msg.startswith("Got layout info from controller"):
            info = record.args[0] if isinstance(record.args, tuple) else record.args
            self.controller_answers.append(list(info))
        elif msg.startswith("Received heartbeat response"):
            self.heartbeats += 1
        elif msg.startswith("Starting full sync for worker"):
            self.full_syncs_started += 1
        elif msg.startswith("Exiting freeze mode after full sync"):
            self.full_syncs_done += 1


class Node:
    def __init__(self):
        t0 = time.perf_counter()
        self.cfg = LMCacheEngineConfig.from_env()  # what vLLM's connector does without a file
        self.cfg.validate()
        self.pod_ip = self.cfg.p2p_host
        self.netns_standin = os.environ.get("KVMESH_TEST_POD_NETNS") == "1"
        if self.netns_standin:
            _pod_netns(self.pod_ip)
        self.watch = LogWatch()
        for name in ("lmcache.v1.storage_backend.p2p_backend",
                     "lmcache.v1.cache_controller.full_sync_sender",
                     "lmcache.v1.cache_controller.worker"):
            lg = logging.getLogger(name)
            lg.addHandler(self.watch)
            if lg.level > logging.INFO or lg.level == logging.NOTSET:
                lg.setLevel(logging.INFO)
        meta = LMCacheMetadata(
            model_name="kvmesh-test/fake-2layer", world_size=1, local_world_size=1,
            worker_id=0, local_worker_id=0, kv_dtype=torch.float16,
            kv_shape=(NUM_LAYERS, 2, self.cfg.chunk_size, KV_HEADS, HEAD_DIM), role="worker")
        self.answers = LookupAnswers()
        self.engine = LMCacheEngineBuilder.get_or_create(
            self.cfg.lmcache_instance_id, self.cfg, meta, CPUKVConnector(),
            broadcast_fn=lambda t, r: None, broadcast_object_fn=lambda o, r: o)
        self.engine.post_init(async_lookup_server=self.answers)
        self.init_s = time.perf_counter() - t0
        self.wedged: str | None = None
        worker = self.engine.lmcache_worker
        wake_ms = float(os.environ.get("KVMESH_TEST_LOOP_WAKE_MS", "0") or 0)
        self.waker = LoopWaker({"lmcache-worker": worker.loop,
                                "storage-manager": self.engine.storage_manager.loop},
                               wake_ms / 1000) if wake_ms > 0 else None

    def keys(self, tokens: torch.Tensor) -> list[str]:
        return [str(k.chunk_hash) for _, _, k in self.engine.token_database.process_tokens(tokens)]

    def local_hit(self, toks) -> int:
        return self.engine.lookup(toks, search_range=["LocalCPUBackend"])

    # -- commands

    def cmd_store(self, seed: int, tokens: int) -> dict:
        toks, kv = sequence(seed, tokens)
        t0 = time.perf_counter()
        self.engine.store(toks, kvcache=kv)
        ms = (time.perf_counter() - t0) * 1000
        return {"ms": ms, "local_hit": self.local_hit(toks), "keys": self.keys(toks),
                "sha256": sha(kv)}

    def cmd_keys(self, seed: int, tokens: int) -> dict:
        return {"keys": self.keys(sequence(seed, tokens)[0])}

    def cmd_fetch(self, seed: int, tokens: int) -> dict:
        """What vLLM does for a new request: async lookup + prefetch (local tier, then the
        controller, then the peer over NIXL), wait for the scheduler answer, then retrieve
        into the KV buffer."""
        toks, expected = sequence(seed, tokens)
        local = self.local_hit(toks)
        n_answers = len(self.watch.controller_answers)
        served_before = self.watch.served
        lookup_id = f"req-{uuid.uuid4().hex[:12]}"
        t0 = time.perf_counter()
        self.engine.async_lookup_and_prefetch(lookup_id, toks, pin=True)
        hit = self.answers.wait(lookup_id)
        lookup_ms = (time.perf_counter() - t0) * 1000
        buf = torch.zeros_like(expected)
        got = 0
        retrieve_ms = 0.0
        if hit > 0:
            t1 = time.perf_counter()
            mask = self.engine.retrieve(toks, kvcache=buf, req_id=lookup_id)
            retrieve_ms = (time.perf_counter() - t1) * 1000
            got = int(mask.sum())
        self.engine.lookup_unpin(lookup_id)
        ctrl = self.watch.controller_answers[n_answers:]
        return {"hit": hit, "retrieved": got, "local_hit_before": local,
                "lookup_ms": lookup_ms, "retrieve_ms": retrieve_ms,
                "controller": ctrl[-1] if ctrl else None,
                "equal": bool(got == tokens and torch.equal(buf, expected)),
                "sha256": sha(buf), "expected_sha256": sha(expected),
                "self_served": self.watch.served - served_before}

    def cmd_stats(self) -> dict:
        # controller_answers: every lookup answer in LMCache's log, also those of a fetch
        # that never replied (blocked after the lookup)
        return {"served": self.watch.served, "wedged": self.wedged,
                "instance_id": self.cfg.lmcache_instance_id,
                "controller_answers": self.watch.controller_answers,
                "frozen": self.engine.is_frozen(), "heartbeats": self.watch.heartbeats,
                "full_syncs": [self.watch.full_syncs_started, self.watch.full_syncs_done],
                "loop_waker_ms": self.waker.period_s * 1000 if self.waker else 0}


def start() -> tuple[Node, set[str]]:
    node = Node()
    # the P2P servers start in the background: wait for the declared ports to listen
    want = {f"{node.pod_ip}:{node.cfg.p2p_init_ports[0]}",
            f"{node.pod_ip}:{node.cfg.p2p_lookup_ports[0]}"}
    deadline = time.monotonic() + 20
    while not want <= set(listen_addrs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return node, want


def main() -> None:
    node, want = start_or_exit(reply, start)
    cfg = node.cfg
    reply({"event": "ready", "pid": os.getpid(), "instance_id": cfg.lmcache_instance_id,
           "p2p_host": cfg.p2p_host, "init_ports": cfg.p2p_init_ports,
           "lookup_ports": cfg.p2p_lookup_ports, "worker_ports": cfg.lmcache_worker_ports,
           "pull_url": cfg.controller_pull_url, "reply_url": cfg.controller_reply_url,
           "transfer_channel": cfg.transfer_channel, "enable_p2p": cfg.enable_p2p,
           "enable_controller": cfg.enable_controller, "async_loading": cfg.enable_async_loading,
           "chunk_size": cfg.chunk_size, "bound": want <= set(listen_addrs()),
           "listen": listen_addrs(), "import_s": T_IMPORTED - T_START, "init_s": node.init_s,
           "netns_standin": node.netns_standin})
    serve(node, reply, {"store", "keys", "fetch"})

if __name__ == "__main__":
    main()
