"""TEST CODE: keys as LMCache's RedisLookupServer writes them (plain SET, no TTL, DB 0, from a
client of its own), and helpers that read them back, for the Redis backend's tests."""

from __future__ import annotations

import redis.asyncio as aredis

from kvmesh.backends.redis_scripts import scan_batches

DEAD, LIVE_A, LIVE_B = "10.1.0.9:8200", "10.1.0.10:8200", "10.1.0.11:8200"
MODEL = "vllm@meta-llama/Llama-3.1-8B-Instruct@1@0@"


def key(tag: str, i: int) -> bytes:
    """LMCache 0.3.x's CacheEngineKey.to_string (lmcache/utils.py:149-156): fmt@model@world
    size@worker id@chunk hash in hex; the tag becomes part of the hash, so it stays a valid key."""
    return f"{MODEL}{tag.encode().hex()}{i:060x}".encode()


async def load(r: aredis.Redis, addr: str, n: int, tag: str) -> list[bytes]:
    keys = [key(tag, i) for i in range(n)]
    for i in range(0, n, 5000):
        pipe = r.pipeline(transaction=False)
        for k in keys[i:i + 5000]:
            pipe.set(k, addr)
        await pipe.execute()
    return keys


async def values_of(r: aredis.Redis) -> dict[bytes, bytes]:
    """Every LMCache-style string key -> value (own kvmesh: keys excluded)."""
    out: dict[bytes, bytes] = {}
    async for keys in scan_batches(r, 5000):
        out.update(zip(keys, await r.mget(keys)))
    return out


def count(values: dict, addr: str) -> int:
    return sum(1 for v in values.values() if v == addr.encode())
