"""Purging a dead pod's LMCache lookup keys from Redis: kvmesh's index-driven purge next to the
naive SCAN+MGET+DEL baseline, measured in the same run on the same data; plus the cost of
keeping the index (start-up reconcile, keyevent indexing rate).

Its own redis-server (127.0.0.1, free port, temp dir, no persistence), pinned to CPU 0 with this
process (indexer + purger) on CPU 1 where the machine has two. Keys are loaded with
`redis-cli --pipe` as plain SETs, LMCache style. For each total N the dead pod owns
D = min(100k, N/2) keys and the rest are spread over 16 live pods.

Goal (issue): purge of a pod's 100k keys in under 1 s, independent of the other pods' key count.
Runs in about a minute; `--sizes` to change the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvmesh.backends.redis_index import AddressIndex  # noqa: E402
from kvmesh.backends.redis_scripts import (  # noqa: E402
    PurgeResult, index_key, is_own_key, scan_batches)
from kvmesh.local.localstack import free_port  # noqa: E402

DEAD = "10.244.1.9:8200"
LIVE = [f"10.244.{2 + i // 200}.{i % 200 + 10}:8200" for i in range(16)]
MODEL = "vllm@meta-llama/Llama-3.1-8B-Instruct@1@0@"


def resp_sets(pairs) -> bytes:
    out = []
    for k, v in pairs:
        out.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v))
    return b"".join(out)


def keys_for(tag: str, n: int, start: int = 0):
    # LMCache's key name (model@...@chunk hash in hex): the tag goes into the hash as hex.
    h = tag.encode().hex()
    return (f"{MODEL}{h}{i:058x}".encode() for i in range(start, start + n))


async def naive_purge(r: aredis.Redis, addr: str, count: int = 2000) -> PurgeResult:
    """The baseline: SCAN all keys, MGET their values, DEL those equal to addr. Not value-checked
    atomically (a key re-written between MGET and DEL is lost); its cost grows with the whole
    keyspace, which is what kvmesh's index avoids."""
    t0 = time.perf_counter()
    res = PurgeResult(full_scan=True)
    want = addr.encode("ascii")
    async with contextlib.aclosing(scan_batches(r, count)) as batches:
        async for keys in batches:
            values = await r.mget(keys)
            res.checked += len(keys)
            match = [k for k, v in zip(keys, values) if v == want]
            if match:
                res.deleted += await r.delete(*match)
    res.seconds = time.perf_counter() - t0
    return res


class Server:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kvmesh-bench-redis-")
        self.port = free_port()
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", self.dir, "--logfile", f"{self.dir}/redis.log"]
        if os.cpu_count() and os.cpu_count() >= 2 and shutil.which("taskset"):
            cmd = ["taskset", "-c", "0"] + cmd
            os.sched_setaffinity(0, {1})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def pipe(self, data: bytes) -> float:
        """Load RESP commands with redis-cli --pipe; returns seconds."""
        path = Path(self.dir) / "load.resp"
        path.write_bytes(data)
        t0 = time.perf_counter()
        with path.open("rb") as f:
            subprocess.run(["redis-cli", "-p", str(self.port), "--pipe"], stdin=f, check=True,
                           stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        path.unlink()
        return dt

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def lmcache_keys(r: aredis.Redis) -> int:
    """Keys that are not kvmesh's own (index sets, barrier probes that expire on their own)."""
    n = 0
    async for k in r.scan_iter(count=5000, _type="string"):
        n += not is_own_key(k)
    return n


async def redis_cpu(r: aredis.Redis) -> float:
    """CPU seconds (user + sys) the redis-server process has used: unlike wall time, barely
    affected by other load on the machine."""
    cpu = await r.info("cpu")
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"]


async def one_size(srv: Server, r: aredis.Redis, total: int, reps: int) -> dict:
    dead_n = min(100_000, total // 2)
    other_n = total - dead_n
    await r.flushall()
    per = -(-other_n // len(LIVE))
    pairs = []
    for i, addr in enumerate(LIVE):
        n = min(per, other_n - i * per)
        pairs.extend((k, addr.encode()) for k in keys_for(f"l{i:02d}", max(n, 0)))
    srv.pipe(resp_sets(pairs))
    del pairs
    dead_data = resp_sets((k, DEAD.encode()) for k in keys_for("dead", dead_n))

    idx = AddressIndex(port=srv.port, event_batch=5000, sync_timeout=120)
    t0 = time.perf_counter()
    assert await idx.start(wait=300), "index did not complete"
    reconcile_s = time.perf_counter() - t0

    # Indexing: a burst of D plain SETs while the indexer runs; done when its barrier passes.
    t0 = time.perf_counter()
    load_s = srv.pipe(dead_data)
    assert await idx.sync(120), "indexer did not catch up"
    index_s = time.perf_counter() - t0
    assert await r.scard(index_key(DEAD)) == dead_n

    purge_times, purge_cpu = [], []
    for rep in range(reps):
        if rep:
            srv.pipe(dead_data)
            assert await idx.sync(120)
        cpu0 = await redis_cpu(r)
        res = await idx.purge_address(DEAD)
        purge_cpu.append(await redis_cpu(r) - cpu0)
        assert res.deleted == dead_n and not res.full_scan, res
        purge_times.append(res.seconds)
    assert await lmcache_keys(r) == other_n

    srv.pipe(dead_data)
    assert await idx.sync(120)
    cpu0 = await redis_cpu(r)
    naive = await naive_purge(idx.redis, DEAD, idx.scan_count)
    naive_cpu = await redis_cpu(r) - cpu0
    assert naive.deleted == dead_n, naive
    assert await lmcache_keys(r) == other_n
    mem = (await r.info("memory"))["used_memory"] / 2**20
    assert idx.stats.subscriptions == 1, "subscriber was disconnected (output buffer limit?)"
    await idx.stop()
    return dict(total=total, dead=dead_n, other=other_n, reconcile_s=reconcile_s,
                load_rate=dead_n / load_s, index_rate=dead_n / index_s,
                purge_med=statistics.median(purge_times), purge_max=max(purge_times),
                naive_s=naive.seconds, mem=mem, purge_cpu=statistics.median(purge_cpu),
                naive_cpu=naive_cpu)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,200000,1000000")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    srv = Server()
    r = aredis.Redis(port=srv.port)
    rows = []
    try:
        for total in (int(s) for s in args.sizes.split(",")):
            rows.append(await one_size(srv, r, total, args.reps))
            x = rows[-1]
            print(f"  done {x['total']:>9,} keys: kvmesh {x['purge_med']:.3f}s, "
                  f"naive {x['naive_s']:.3f}s", flush=True)
    finally:
        await r.aclose()
        srv.stop()

    print()
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(wall times inflate with other load; Redis CPU much less)")
    print("| total keys | dead pod | other pods' | start-up reconcile | indexing burst "
          "(redis-cli --pipe rate) | kvmesh purge wall median / max (Redis CPU) "
          "| naive SCAN+MGET+DEL wall (Redis CPU) | speedup wall | Redis memory |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        print(f"| {x['total']:,} | {x['dead']:,} | {x['other']:,} | {x['reconcile_s']:.2f} s | "
              f"{x['index_rate']:,.0f} ev/s ({x['load_rate']:,.0f}/s) | "
              f"{x['purge_med'] * 1000:.0f} / {x['purge_max'] * 1000:.0f} ms "
              f"({x['purge_cpu'] * 1000:.0f} ms) | "
              f"{x['naive_s'] * 1000:.0f} ms ({x['naive_cpu'] * 1000:.0f} ms) | "
              f"{x['naive_s'] / x['purge_med']:.1f}x | {x['mem']:.0f} MiB |")
    full = [x for x in rows if x["dead"] == 100_000]
    print()
    if full:
        worst = max(x["purge_max"] for x in full)
        spread = max(x["purge_med"] for x in full) / min(x["purge_med"] for x in full)
        cpu_spread = max(x["purge_cpu"] for x in full) / min(x["purge_cpu"] for x in full)
        print(f"Goal: 100k keys of one pod purged in < 1 s: worst {worst:.3f} s -> "
              f"{'MET' if worst < 1 else 'NOT MET'}")
        print(f"Independence: with the other pods holding "
              f"{min(x['other'] for x in full):,}..{max(x['other'] for x in full):,} keys the "
              f"median purge wall time varies {spread:.2f}x, its Redis CPU {cpu_spread:.2f}x -> "
              f"{'MET' if cpu_spread < 1.5 else 'NOT MET'} (judged on Redis CPU, threshold 1.5x)")
    else:
        print("Goal not evaluated: no size with a 100k-key dead pod (needs total >= 200,000)")


if __name__ == "__main__":
    asyncio.run(main())
