"""bench/purge.py's naive baseline (SCAN + MGET + DEL) deletes exactly the dead address's keys,
so the benchmark compares kvmesh's purge with a baseline doing the same job."""

from __future__ import annotations

import sys
from pathlib import Path

import redis.asyncio as aredis

from lmcache_keys import DEAD, LIVE_A, load

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from purge import naive_purge  # noqa: E402


async def test_naive_baseline(redis_server, lmcache):
    await load(lmcache, DEAD, 3000, "d")
    await load(lmcache, LIVE_A, 1000, "a")
    r = aredis.Redis(port=redis_server.port)
    try:
        res = await naive_purge(r, DEAD)
    finally:
        await r.aclose()
    assert (res.deleted, res.checked) == (3000, 4000)
    assert await lmcache.dbsize() == 1000
