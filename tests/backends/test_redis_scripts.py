"""kvmesh.backends.redis_scripts: the index's key layout and its one-shot operations, against a
real redis-server (started per test by conftest.py)."""

from __future__ import annotations

import pytest
import redis.asyncio as aredis

from kvmesh.backends import redis_scripts as S
from lmcache_keys import DEAD, LIVE_A, LIVE_B, count, key, load, values_of


@pytest.mark.parametrize("value,expected", [
    (b"10.0.0.1:8200", "10.0.0.1:8200"), ("pod-a.ns:1", "pod-a.ns:1"),
    (b"10.0.0.1", None), (b"10.0.0.1:", None), (b":80", None), (b"10.0.0.1:0", None),
    (b"10.0.0.1:65536", None), (b"::1:80", None), (b"a b:80", None), (b"h:8x", None),
    (b"\xff:80", None), (None, None), (b"x" * 400 + b":1", None),
])
def test_parse_addr(value, expected):
    assert S.parse_addr(value) == expected


def test_group_by_addr_drops_own_junk_and_foreign_names():
    a, b, c, d = (key("a", i) for i in range(4))
    keys = [a, b, b"kvmesh:x", c, d, b"app:db-primary"]
    values = [DEAD.encode(), b"junk", DEAD.encode(), None, LIVE_A.encode(), DEAD.encode()]
    assert S.group_by_addr(keys, values) == {DEAD: [a], LIVE_A: [d]}


@pytest.mark.parametrize("name,ok", [
    (b"vllm@meta-llama/Llama-3.1-8B-Instruct@1@0@1f2e", True),
    (b"vllm@m@2@1@-7ab", True),                     # Python's hash() may be negative
    (b"vllm@m@1@0@abc@user%alice@lora%x", True),    # request tags
    (b"app:db-primary", False), (b"session:10.1.0.9:8200", False),
    (b"vllm@m@1@0@", False), (b"vllm@m@1@0@xyz", False), (b"vllm@m@one@0@ab", False),
    (b"vllm@m@1@0@ab@notag", False), (b"vllm@m@1@0@AB", False), (b"@m@1@0@ab", False),
    (b"vllm@m@1@0@ab\n", False), (b"vllm@" + b"m" * 5000 + b"@1@0@ab", False),
])
def test_is_lmcache_key(name, ok):
    assert S.is_lmcache_key(name) is ok


async def test_reconcile_purges_stale_and_rebuilds_live(redis_server, lmcache):
    a = await load(lmcache, LIVE_A, 3000, "a")
    b = await load(lmcache, LIVE_B, 2000, "b")
    await load(lmcache, DEAD, 4000, "d")
    await load(lmcache, "10.1.0.99:8200", 1000, "e")
    # Leftovers in the index: a member now owned by B, one since deleted, an empty dead set.
    await lmcache.sadd(S.index_key(LIVE_A), b[0], b"vllm@gone@1")
    await lmcache.sadd(S.index_key("10.1.0.77:8200"), b"vllm@gone@2")
    await S.note_peers(lmcache, [DEAD, "10.1.0.99:8200"])  # kvmesh saw them live, once
    r = aredis.Redis(port=redis_server.port)
    try:
        res = await S.reconcile(r, {LIVE_A, LIVE_B})
    finally:
        await r.aclose()
    # Pruned: b[0] and vllm@gone@1 from A's set, and 10.1.0.77's only member (an address
    # kvmesh never recorded as a peer is pruned, not purged).
    assert (res.scanned, res.indexed, res.purged, res.pruned) == (10000, 10000, 5000, 3)
    assert res.stale_addrs == {DEAD: 4000, "10.1.0.99:8200": 1000}
    vals = await values_of(lmcache)
    assert len(vals) == 5000 and (count(vals, LIVE_A), count(vals, LIVE_B)) == (3000, 2000)
    assert set(await lmcache.smembers(S.index_key(LIVE_A))) == set(a)
    assert set(await lmcache.smembers(S.index_key(LIVE_B))) == set(b)
    idx_keys = set(await lmcache.keys(b"kvmesh:addr:*"))
    assert idx_keys == {S.index_key(LIVE_A), S.index_key(LIVE_B)}


async def test_reconcile_live_provider_evaluated_after_scan(redis_server, lmcache):
    await load(lmcache, DEAD, 500, "d")
    calls = []

    async def live():  # e.g. the pod informer; a pod that became live during the scan counts
        calls.append(1)
        return {DEAD}

    r = aredis.Redis(port=redis_server.port)
    try:
        res = await S.reconcile(r, live)
        assert res.purged == 0 and calls == [1]
        assert (await S.reconcile(r, None)).purged == 0  # None: rebuild only
    finally:
        await r.aclose()
    assert await lmcache.dbsize() == 502  # + kvmesh:members (DEAD recorded while live)
    assert set(await lmcache.hkeys(S.MEMBERS_KEY)) == {DEAD.encode()}
