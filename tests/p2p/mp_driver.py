"""TEST CODE, run by the vllm-0.33.0 venv's python: the vLLM side of one mp-mode pod, through
LMCache's OWN client classes (the ones `LMCacheMPConnector` creates:
`lmcache.integration.vllm.vllm_multi_process_adapter.LMCacheMPWorkerAdapter` and
`LMCacheMPSchedulerAdapter`), with CPU KV tensors in vLLM's layout instead of GPU memory
(STAND-IN: no GPU; the server takes the engine-driven CPU path).

argv[1]: JSON {"url": "tcp://host:port" (the connector's lmcache.mp.host:port), "chunk": chunk
size = vLLM block size, "model": name}. One JSON line per stdin command on stdout:
  {"cmd": "store", "seed": s, "chunks": n}      -> fill blocks 0..n-1 with seed's data, store
  {"cmd": "lookup", "seed": s, "chunks": n, "limit": sec} -> the scheduler's lookup: hit tokens
  {"cmd": "fetch", "seed": s, "chunks": n, "limit": sec}  -> lookup, then retrieve the hit into
      blocks at the end and compare them byte for byte with seed's data (sha256, torch.equal)
Every reply has "ok"; timings are in ms. The seed's data is a pure function of the seed, so any
pod can check bytes it never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback

import torch
import zmq

from lmcache.integration.vllm.vllm_multi_process_adapter import (
    LMCacheMPSchedulerAdapter,
    LMCacheMPWorkerAdapter,
    LoadStoreOp,
    ParallelStrategy,
)

LAYERS, HEADS, HEAD, BLOCKS = 8, 8, 128, 64
DTYPE = torch.bfloat16
PS = ParallelStrategy(mla_only=False, vllm_world_size=1, vllm_worker_id=0, tp_size=1,
                      pp_size=1, n_servers=1)


def say(**kw) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


class Pod:
    def __init__(self, url: str, chunk: int, model: str):
        self.chunk = chunk
        self.kv = {f"model.layers.{i}.self_attn.attn":
                   torch.zeros((2, BLOCKS, chunk, HEADS, HEAD), dtype=DTYPE)
                   for i in range(LAYERS)}
        ctx = zmq.Context()
        t = time.perf_counter()
        self.worker = LMCacheMPWorkerAdapter(url, ctx, model, chunk, PS)
        self.worker.register_kv_caches(self.kv, layout_hints={"kv_layout": "NHD"})
        self.sched = LMCacheMPSchedulerAdapter([url], ctx, model, chunk, PS)
        self.start_ms = (time.perf_counter() - t) * 1000
        self.n = 0

    def tokens(self, seed: int, chunks: int) -> list[int]:
        g = torch.Generator().manual_seed(10_000 + seed)
        return torch.randint(0, 32000, (chunks * self.chunk,), generator=g).tolist()

    def data(self, seed: int, chunks: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn((2, chunks, self.chunk, HEADS, HEAD), generator=g).to(DTYPE)
                for k in sorted(self.kv)}

    @staticmethod
    def sha(blocks: dict) -> str:
        h = hashlib.sha256()
        for k in sorted(blocks):
            h.update(blocks[k].contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def req(self, what: str) -> str:
        self.n += 1
        return f"{what}-{os.getpid()}-{self.n}"

    def store(self, seed: int, chunks: int) -> dict:
        src = self.data(seed, chunks)
        for k, v in src.items():
            self.kv[k][:, :chunks] = v
        toks, req = self.tokens(seed, chunks), self.req("store")
        t = time.perf_counter()
        self.worker.submit_store_request(
            req, LoadStoreOp(token_ids=toks, block_ids=[list(range(chunks))], start=0,
                             end=len(toks)), None)
        ok = self.worker.store_futures[req].result(timeout=60)
        return {"ok": bool(ok), "store_ms": (time.perf_counter() - t) * 1000,
                "sha256": self.sha(src)}

    def lookup(self, seed: int, chunks: int, limit: float) -> dict:
        toks, req = self.tokens(seed, chunks), self.req("lookup")
        t = time.perf_counter()
        self.sched.maybe_submit_lookup_request(req, toks)
        while True:
            hit = self.sched.check_lookup_result(req)
            if hit is not None or time.perf_counter() - t > limit:
                break
            time.sleep(0.002)
        ms = (time.perf_counter() - t) * 1000
        self.sched.cleanup_lookup_result(req)
        return {"ok": hit is not None, "hit": hit, "lookup_ms": ms, "req": req,
                "timeout": hit is None}

    def fetch(self, seed: int, chunks: int, limit: float) -> dict:
        r = self.lookup(seed, chunks, limit)
        hit = r["hit"] or 0
        r.update(retrieved=0, equal=False, sha256=None)
        if not hit:
            return r
        n = hit // self.chunk
        dst = list(range(BLOCKS - n, BLOCKS))
        for k in self.kv:
            self.kv[k][:, dst] = 0
        toks, req = self.tokens(seed, chunks)[:hit], self.req("retrieve")
        t = time.perf_counter()
        self.worker.submit_retrieve_request(
            req, LoadStoreOp(token_ids=toks, block_ids=[dst], start=0, end=hit), None)
        fut, _ = self.worker.retrieve_futures[req]
        ok = fut.result(timeout=60)
        r["retrieve_ms"] = (time.perf_counter() - t) * 1000
        got = {k: self.kv[k][:, dst].clone() for k in sorted(self.kv)}
        want = self.data(seed, chunks)
        want = {k: v[:, :n] for k, v in want.items()}
        r.update(ok=bool(ok), retrieved=hit, sha256=self.sha(got),
                 want_sha256=self.sha(want),
                 equal=all(torch.equal(got[k], want[k]) for k in got))
        return r


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        pod = Pod(spec["url"], spec["chunk"], spec.get("model", "kvmesh-test/fake-model"))
    except Exception as e:  # noqa: BLE001 - reported to the test, then exit
        say(ok=False, error=repr(e), trace=traceback.format_exc()[-2000:])
        return
    say(ok=True, ready=True, start_ms=pod.start_ms,
        transfer=type(pod.worker.transfer_ctx).__name__)
    for line in sys.stdin:
        try:
            c = json.loads(line)
            fn = {"store": pod.store, "lookup": pod.lookup, "fetch": pod.fetch}[c.pop("cmd")]
            say(**fn(**c))
        except Exception as e:  # noqa: BLE001
            say(ok=False, error=repr(e), trace=traceback.format_exc()[-2000:])


if __name__ == "__main__":
    main()
    os._exit(0)  # LMCache's client threads are not daemonic
