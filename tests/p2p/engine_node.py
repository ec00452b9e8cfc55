"""TEST CODE. One real, unpatched LMCache 0.3.6 engine ("a vLLM pod's LMCache") per process.

Runs inside the `lmcache-0.3.6-engine` venv (tests/consumers/setup_envs.sh): in a real pod on
the real node (tests/node/pod_bridge.py starts it with the container's own environment, expanded
by the kubelet), or for bench/p2p.py on KWOK pods, started by tests/p2p/podrunner.py with exactly
the environment the kubelet would give the pod's vLLM container. Everything LMCache needs comes from that environment (`LMCacheEngineConfig.from_env`):
the lookup Redis (LMCACHE_LOOKUP_URL), the address it binds and advertises
(LMCACHE_DISTRIBUTED_URL), chunk size, CPU tier size.

Protocol: one JSON object per line. On start it writes {"event": "ready", ...} (or
{"event": "fatal", ...}); then each request line {"id": n, "cmd": ..., ...} gets one reply line
{"id": n, "ok": bool, ...}. Commands: store, keys, lookup, retrieve, stats, exit. A request may
carry "timeout" (seconds): the call runs in a worker thread and, if it has not returned by then,
the reply is {"ok": false, "timeout": true} and the engine refuses further data-path calls
(a blocked LMCache call cannot be cancelled; LMCache's peer fetch has no timeout of its own).

STAND-INS (test code; LMCache itself is not modified), see
shared/docs/research/lmcache-p2p-dataflow-on-cpu.md:
  1. `torch.cuda.current_device` / `torch.cuda.Stream` are replaced by no-op stubs before lmcache
     is imported: StorageManager and LocalCPUBackend call them unconditionally; nothing on this
     path uses the stream afterwards.
  2. `HostMemoryAllocator` (lmcache's own, plain CPU memory) is passed to `LMCacheEngine`
     instead of going through `LMCacheEngineBuilder`, whose MixedMemoryAllocator needs
     cudaHostAlloc.
  3. `CPUKVConnector` stands in for vLLM's paged GPU KV memory: it copies between a contiguous
     CPU tensor [2, layers, tokens, hidden] and LMCache's memory objects.
Tokens and KV are synthetic (seeded), for a 2-layer fake model: there is no model and no GPU.
"""

from __future__ import annotations

import logging
import os
import sys
import time

# The protocol owns the real stdout; LMCache's loggers (and anything else) print to fd 1, so
# fd 1 is pointed at stderr before anything is imported.
from node_protocol import listen_addrs, protocol_reply, serve, start_or_exit  # noqa: E402

reply = protocol_reply()
os.dup2(2, 1)
sys.stdout = sys.stderr

T_START = time.perf_counter()
import torch  # noqa: E402

from fake_model import HEAD_DIM, HIDDEN, KV_HEADS, NUM_LAYERS, sequence, sha  # noqa: E402


# ---- STAND-IN 1: torch.cuda calls that LMCache's CPU tier makes unconditionally ----------------
class _NoStream:
    """Stand-in for torch.cuda.Stream: LMCache only creates it on this path."""

    def __init__(self, *a, **k):
        pass


torch.cuda.current_device = lambda: 0
torch.cuda.Stream = _NoStream
# --------------------------------------------------------------------------------------------

from lmcache.config import LMCacheEngineMetadata  # noqa: E402
from lmcache.v1.cache_engine import LMCacheEngine  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector import GPUConnectorInterface  # noqa: E402
from lmcache.v1.memory_management import HostMemoryAllocator  # noqa: E402
from lmcache.v1.token_database import ChunkedTokenDatabase  # noqa: E402

T_IMPORTED = time.perf_counter()



# ---- STAND-IN 3: CPU KV connector in place of vLLM's paged GPU memory ------------------------
class CPUKVConnector(GPUConnectorInterface):
    """Copies KV between a contiguous CPU tensor `kvcache` [2, L, T, hidden] (LMCache's KV_2LTD
    layout) and memory objects. Stands in for vLLM's paged GPU KV cache + c_ops kernels."""

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, NUM_LAYERS, num_tokens, HIDDEN])

    def from_gpu(self, memory_obj, start, end, **kwargs):
        memory_obj.tensor.copy_(kwargs["kvcache"][:, :, start:end, :])

    def to_gpu(self, memory_obj, start, end, **kwargs):
        kwargs["kvcache"][:, :, start:end, :].copy_(memory_obj.tensor)

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
        for m, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(m, s, e, **kwargs)

    def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
        for m, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(m, s, e, **kwargs)
# --------------------------------------------------------------------------------------------


class ConnectionCounter(logging.Handler):
    """Counts connections this engine's distributed server accepted, from LMCache's own
    'Connected by <peer>' log record (a handler is attached; LMCache is not changed)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("Connected by"):
            self.count += 1


class Node:
    def __init__(self):
        t0 = time.perf_counter()
        self.cfg = LMCacheEngineConfig.from_env()
        meta = LMCacheEngineMetadata(
            model_name="kvmesh-test/fake-2layer", world_size=1, worker_id=0, fmt="vllm",
            kv_dtype=torch.float16,
            kv_shape=(NUM_LAYERS, 2, self.cfg.chunk_size, KV_HEADS, HEAD_DIM))
        self.counter = ConnectionCounter()
        logging.getLogger("lmcache.v1.distributed_server.naive_server").addHandler(self.counter)
        # STAND-IN 2: LMCache's own plain-CPU allocator, passed directly (no builder).
        allocator = HostMemoryAllocator(int(self.cfg.max_local_cpu_size * 1024**3))
        self.engine = LMCacheEngine(
            self.cfg, meta, allocator, ChunkedTokenDatabase(self.cfg, meta), CPUKVConnector(),
            broadcast_fn=lambda t, r: None, broadcast_object_fn=lambda o, r: o)
        self.init_s = time.perf_counter() - t0
        self.wedged: str | None = None

    def keys(self, tokens: torch.Tensor) -> list[str]:
        return [k.to_string() for _, _, k in self.engine.token_database.process_tokens(tokens)]

    # -- commands (each returns a dict merged into the reply)

    def cmd_store(self, seed: int, tokens: int) -> dict:
        toks, kv = sequence(seed, tokens)
        t0 = time.perf_counter()
        self.engine.store(toks, kvcache=kv)
        ms = (time.perf_counter() - t0) * 1000
        local = self.engine.lookup(toks, search_range=["LocalCPUBackend"])
        return {"ms": ms, "local_hit": local, "keys": self.keys(toks), "sha256": sha(kv)}

    def cmd_keys(self, seed: int, tokens: int) -> dict:
        return {"keys": self.keys(sequence(seed, tokens)[0])}

    def cmd_lookup(self, seed: int, tokens: int) -> dict:
        toks, _ = sequence(seed, tokens)
        local = self.engine.lookup(toks, search_range=["LocalCPUBackend"])
        t0 = time.perf_counter()
        hit = self.engine.lookup(toks)  # local tier, then the Redis lookup service
        return {"hit": hit, "local_hit": local, "ms": (time.perf_counter() - t0) * 1000}

    def cmd_retrieve(self, seed: int, tokens: int) -> dict:
        toks, expected = sequence(seed, tokens)
        local = self.engine.lookup(toks, search_range=["LocalCPUBackend"])
        served_before = self.counter.count
        buf = torch.zeros_like(expected)
        t0 = time.perf_counter()
        mask = self.engine.retrieve(toks, kvcache=buf)
        ms = (time.perf_counter() - t0) * 1000
        got = int(mask.sum())
        return {"retrieved": got, "ms": ms, "local_hit_before": local,
                "equal": bool(got == tokens and torch.equal(buf, expected)),
                "sha256": sha(buf), "expected_sha256": sha(expected),
                "self_served": self.counter.count - served_before}

    def cmd_stats(self) -> dict:
        return {"served_connections": self.counter.count, "wedged": self.wedged}


def wait_bound(url: str, timeout: float = 15.0) -> bool:
    """LMCache starts its server in the background and swallows a bind failure: confirm it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if url in listen_addrs():
            return True
        time.sleep(0.02)
    return False


def start() -> tuple[Node, str, bool]:
    node = Node()
    url = node.cfg.distributed_url
    return node, url, wait_bound(url) if node.cfg.enable_p2p else False


def main() -> None:
    node, url, bound = start_or_exit(reply, start)
    reply({"event": "ready", "pid": os.getpid(), "hash_none": hash(None),
           "distributed_url": url, "lookup_url": node.cfg.lookup_url,
           "enable_p2p": node.cfg.enable_p2p, "chunk_size": node.cfg.chunk_size,
           "bound": bound, "listen": listen_addrs(),
           "import_s": T_IMPORTED - T_START, "init_s": node.init_s})
    serve(node, reply, {"store", "keys", "lookup", "retrieve"})

if __name__ == "__main__":
    main()
