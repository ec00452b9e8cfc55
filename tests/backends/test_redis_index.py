"""kvmesh.backends.redis_index against a real redis-server (started per test by conftest.py).

Keys are written the way LMCache's RedisLookupServer writes them: plain SET, no TTL, DB 0,
from a client of its own (lmcache_keys.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
import redis.asyncio as aredis

from kvmesh.backends import redis_index as I
from kvmesh.backends import redis_scripts as S
from lmcache_keys import DEAD, LIVE_A, LIVE_B, count, load, values_of

CH = b"__keyevent@0__:set"


@pytest.fixture
async def index(redis_server):
    idx = I.AddressIndex(port=redis_server.port, health_interval=1.0)
    assert await idx.start(wait=10)
    yield idx
    await idx.stop()


# ---- pure functions ---------------------------------------------------------------------------

@pytest.mark.parametrize("current,expected", [
    ("", "E$"), ("E", "E$"), ("$E", None), ("AE", None), ("Kx", "KxE$"), ("KA", "KAE"),
    ("Eg$", None), ("g", "gE$"),
])
def test_notify_flags_to_set(current, expected):
    assert I.notify_flags_to_set(current) == expected


@pytest.mark.parametrize("reply", [
    {"notify-keyspace-events": "Kx"},  # redis-py decodes CONFIG GET replies to str
    {b"notify-keyspace-events": b"Kx"},
])
def test_config_value_str_or_bytes(reply):
    assert I.config_value(reply, "notify-keyspace-events") == "Kx"
    assert I.config_value({}, "notify-keyspace-events") == ""


def test_event_keys_dedup_own_and_barriers():
    frames = [[b"subscribe", CH, 1]]
    frames += [[b"message", CH, k] for k in
               (b"k1", b"kvmesh:addr:x", b"kvmesh:barrier:ab12", b"k1")]
    frames += [[b"message", b"__keyevent@1__:set", b"k2"], [b"pong", b""]]
    assert I.event_keys(frames, CH) == ([b"k1"], ["ab12"])


# ---- index from notifications + purge ---------------------------------------------------------

async def test_purge_dead_address_exact_counts(index, lmcache):
    dead = await load(lmcache, DEAD, 10000, "d")
    await load(lmcache, LIVE_A, 6000, "a")
    await load(lmcache, LIVE_B, 4000, "b")
    await lmcache.set(b"vllm@junk@1", b"not-an-address")
    await lmcache.sadd(b"some:set", b"x")  # non-string keys are left alone
    assert await index.sync()

    # The index came from notifications only (the start-up reconcile saw an empty Redis).
    assert set(await lmcache.smembers(S.index_key(DEAD))) == set(dead)
    assert await lmcache.scard(S.index_key(LIVE_A)) == 6000
    assert await lmcache.scard(S.index_key(LIVE_B)) == 4000
    assert index.stats.keys_indexed == 20000

    res = await index.purge_address(DEAD)
    assert (res.deleted, res.checked, res.full_scan) == (10000, 10000, False)
    vals = await values_of(lmcache)
    assert (count(vals, DEAD), count(vals, LIVE_A), count(vals, LIVE_B)) == (0, 6000, 4000)
    assert len(vals) == 10001 and vals[b"vllm@junk@1"] == b"not-an-address"
    assert not await lmcache.exists(S.index_key(DEAD))
    assert await lmcache.scard(S.index_key(LIVE_A)) == 6000
    assert index.stats.keys_purged == 10000 and index.stats.purges == 1

    again = await index.purge_address(DEAD)  # idempotent
    assert (again.deleted, again.checked) == (0, 0)


async def test_key_rewritten_by_live_pod_survives(index, lmcache):
    dead = await load(lmcache, DEAD, 5000, "d")
    assert await index.sync()
    stolen = dead[:300]
    pipe = lmcache.pipeline(transaction=False)
    for k in stolen:  # a live pod stored the same chunk since: the key is now its own
        pipe.set(k, LIVE_A)
    await pipe.execute()
    # Drain straight away, before the indexer has seen these writes: the dead pod's index set
    # still lists the stolen keys, and only the atomic value check spares them.
    res = await S.drain_index(index.redis, DEAD)
    assert (res.deleted, res.checked) == (4700, 5000)
    vals = await values_of(lmcache)
    assert len(vals) == 300 and all(vals[k] == LIVE_A.encode() for k in stolen)
    assert await index.sync()
    assert set(await lmcache.smembers(S.index_key(LIVE_A))) == set(stolen)


async def test_purge_waits_for_indexer_backlog(index, lmcache):
    # Written and purged back to back: purge_address's barrier makes the indexer catch up first.
    await load(lmcache, DEAD, 20000, "d")
    res = await index.purge_address(DEAD)
    assert res.deleted == 20000 and not res.full_scan
    assert await values_of(lmcache) == {}  # only kvmesh:barrier:* probes (PX 30 s) remain


# ---- reconcile --------------------------------------------------------------------------------

async def test_startup_reconcile_with_live_provider(redis_server, lmcache):
    await load(lmcache, DEAD, 2000, "d")  # died while nobody watched
    await load(lmcache, LIVE_A, 1000, "a")
    await S.note_peers(lmcache, [DEAD])  # ... but was seen live by an earlier leader
    swept: list[dict[str, int]] = []
    async with I.AddressIndex(port=redis_server.port, live_addrs=lambda: {LIVE_A},
                              on_reconcile=swept.append) as idx:
        assert idx.index_complete and idx.stats.reconcile_purged == 2000
        # The owner learns which dead address lost how many keys (to credit its departure).
        assert swept == [{DEAD: 2000}]
        vals = await values_of(lmcache)
        assert len(vals) == 1000 and count(vals, LIVE_A) == 1000


async def test_full_scan_fallback_without_subscription(redis_server, lmcache):
    await load(lmcache, DEAD, 3000, "d")
    await load(lmcache, LIVE_A, 1000, "a")
    idx = I.AddressIndex(port=redis_server.port)  # never started: no index to trust
    try:
        res = await idx.purge_address(DEAD)
    finally:
        await idx.stop()
    assert res.full_scan and res.deleted == 3000
    assert await lmcache.dbsize() == 1000


# ---- resilience -------------------------------------------------------------------------------

async def test_redis_restarted_mid_purge(redis_server, lmcache, caplog):
    caplog.set_level(logging.INFO, logger="kvmesh.purge")
    idx = I.AddressIndex(port=redis_server.port, drain_batch=100, health_interval=1.0,
                         backoff_base=0.02)
    assert await idx.start(wait=10)
    try:
        await load(lmcache, DEAD, 20000, "d")
        await load(lmcache, LIVE_A, 2000, "a")
        assert await idx.sync()
        restarted = []

        def hook(addr, res):
            if not restarted:  # kill -9 after the first round trip, come back empty
                restarted.append(res.deleted)
                redis_server.restart_empty()

        idx.progress_hook = hook
        res = await idx.purge_address(DEAD)  # retries, finds the (empty) set, finishes
        assert restarted and 0 < restarted[0] < 20000 and res.deleted == restarted[0]
        assert idx.stats.errors >= 1
        idx.progress_hook = None

        assert await idx.wait_complete(15), "did not resubscribe after the restart"
        assert idx.stats.subscriptions == 2
        assert "E" in (await lmcache.config_get("notify-keyspace-events"))["notify-keyspace-events"]
        assert any("subscription lost" in r.message for r in caplog.records)

        await load(lmcache, DEAD, 3000, "n")  # later writes are indexed and purged
        await load(lmcache, LIVE_A, 500, "m")
        res = await idx.purge_address(DEAD)
        assert (res.deleted, res.full_scan) == (3000, False)
        vals = await values_of(lmcache)
        assert len(vals) == 500 and count(vals, LIVE_A) == 500
    finally:
        await idx.stop()


async def test_connection_killed_mid_purge_then_resumed(redis_server, lmcache):
    idx = I.AddressIndex(port=redis_server.port, drain_batch=100, max_attempts=1)
    assert await idx.start(wait=10)
    try:
        await load(lmcache, DEAD, 20000, "d")
        await load(lmcache, LIVE_A, 2000, "a")
        assert await idx.sync()
        killer = redis.Redis(port=redis_server.port)
        killed = []

        def hook(addr, res):
            if not killed:
                killed.append(killer.client_kill_filter(_type="normal"))

        idx.progress_hook = hook
        with pytest.raises(I.PurgeError) as err:
            await idx.purge_address(DEAD)
        partial = err.value.partial
        assert killed and 0 < partial.deleted < 20000
        idx.progress_hook = None
        res = await idx.purge_address(DEAD)  # resumes from what is left in the index set
        assert partial.deleted + res.deleted == 20000
        vals = await values_of(lmcache)
        assert (count(vals, DEAD), count(vals, LIVE_A)) == (0, 2000)
        assert not await lmcache.exists(S.index_key(DEAD))
        killer.close()
    finally:
        await idx.stop()


async def test_connection_killed_mid_purge_retried_transparently(redis_server, lmcache):
    idx = I.AddressIndex(port=redis_server.port, drain_batch=100, backoff_base=0.01)
    assert await idx.start(wait=10)
    try:
        await load(lmcache, DEAD, 5000, "d")
        assert await idx.sync()
        killer = redis.Redis(port=redis_server.port)
        idx.progress_hook = lambda a, r: r.checked == 400 and killer.client_kill_filter(_type="normal")
        await idx.purge_address(DEAD)
        killer.close()
        assert idx.stats.errors >= 1 and await values_of(lmcache) == {}
    finally:
        await idx.stop()


async def test_subscription_killed_resubscribes_and_reconciles(redis_server, lmcache):
    idx = I.AddressIndex(port=redis_server.port, backoff_base=0.01)
    assert await idx.start(wait=10)
    try:
        await lmcache.client_kill_filter(_type="pubsub")
        await load(lmcache, DEAD, 2000, "d")  # written while the subscriber is (maybe) away
        for _ in range(200):
            if idx.stats.subscriptions == 2:
                break
            await asyncio.sleep(0.05)
        assert await idx.wait_complete(10)
        assert idx.stats.subscriptions == 2 and idx.stats.reconciles == 2
        assert await lmcache.scard(S.index_key(DEAD)) == 2000  # rebuilt by the reconcile
        res = await idx.purge_address(DEAD)
        assert res.deleted == 2000 and not res.full_scan
    finally:
        await idx.stop()


async def test_config_refused_logs_and_falls_back(make_redis_server, caplog):
    srv = make_redis_server("--rename-command", "CONFIG", "")
    caplog.set_level(logging.INFO, logger="kvmesh.purge")
    idx = I.AddressIndex(port=srv.port, sync_timeout=0.3, backoff_base=0.01)
    w = aredis.Redis(port=srv.port)
    try:
        assert not await idx.start(wait=1.5)
        assert any("notify-keyspace-events E$" in r.message and r.levelno == logging.ERROR
                   for r in caplog.records)
        await load(w, DEAD, 1000, "d")
        res = await idx.purge_address(DEAD)
        assert res.full_scan and res.deleted == 1000
    finally:
        await idx.stop()
        await w.aclose()


async def test_preconfigured_notifications_without_config_command(make_redis_server):
    srv = make_redis_server("--rename-command", "CONFIG", "", "--notify-keyspace-events", "E$")
    idx = I.AddressIndex(port=srv.port)
    w = aredis.Redis(port=srv.port)
    try:
        assert await idx.start(wait=10)  # the probe write proved events arrive
        await load(w, DEAD, 1000, "d")
        res = await idx.purge_address(DEAD)
        assert res.deleted == 1000 and not res.full_scan
    finally:
        await idx.stop()
        await w.aclose()


def _flag_set(flags: str) -> set[str]:
    """A notify-keyspace-events value as a set of flags, 'A' spelled out (Redis may read back
    either spelling)."""
    return set(flags.replace("A", "g$lshzxetd"))


@pytest.mark.parametrize("operator_flags", ["Kx", "Eg$", "KEA"])
async def test_adds_notify_flags_keeping_the_operators(make_redis_server, operator_flags):
    # An external Redis configured by someone else: the index may add what it needs, never
    # take away what others rely on (issue 13: `Kx` became `$E`, `Eg$` became `E$`).
    srv = make_redis_server("--notify-keyspace-events", operator_flags)
    before = srv.client.config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert _flag_set(before) == _flag_set(operator_flags)
    w = aredis.Redis(port=srv.port)
    try:
        async with I.AddressIndex(port=srv.port) as idx:
            assert idx.index_complete  # the probe write was notified
            after = srv.client.config_get("notify-keyspace-events")["notify-keyspace-events"]
            assert _flag_set(after) >= _flag_set(before) | {"E", "$"}
            if {"E", "$"} <= _flag_set(before):
                assert after == before  # nothing to add: left exactly as it was
            await load(w, DEAD, 1000, "d")
            res = await idx.purge_address(DEAD)
            assert res.deleted == 1000 and not res.full_scan
    finally:
        await w.aclose()


async def test_periodic_prune_drops_evicted_and_rewritten_members(redis_server, lmcache):
    idx = I.AddressIndex(port=redis_server.port, prune_interval=0.2)
    assert await idx.start(wait=10)
    try:
        keys = await load(lmcache, LIVE_A, 1000, "a")
        assert await idx.sync()
        await lmcache.delete(*keys[:300])  # LMCache's eviction: DEL, which is not tracked
        pipe = lmcache.pipeline(transaction=False)
        for k in keys[300:400]:
            pipe.set(k, LIVE_B)
        await pipe.execute()
        assert await idx.sync()
        assert await lmcache.scard(S.index_key(LIVE_A)) == 1000  # stale until pruned
        for _ in range(100):
            if idx.stats.pruned >= 400:
                break
            await asyncio.sleep(0.05)
        assert idx.stats.pruned == 400 and idx.stats.prunes >= 1
        assert set(await lmcache.smembers(S.index_key(LIVE_A))) == set(keys[400:])
        assert set(await lmcache.smembers(S.index_key(LIVE_B))) == set(keys[300:400])
        assert await lmcache.dbsize() - len(await lmcache.keys(b"kvmesh:*")) == 700
    finally:
        await idx.stop()
