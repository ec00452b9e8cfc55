"""A Redis shared with an application (``redisAddress``): kvmesh deletes only LMCache's lookup
entries of its own peers, recognised by LMCache's key name and kvmesh's peer record, never by
value alone. Every purge and reconcile path runs against a real redis-server holding unrelated
keys whose values are the dead pod's ``ip:port``, and entries another LMCache deployment (not
a kvmesh peer) wrote."""

from __future__ import annotations

import redis.asyncio as aredis

from kvmesh.backends import redis_index as I
from kvmesh.backends import redis_scripts as S
from lmcache_keys import DEAD, LIVE_A, count, key, load, values_of

FOREIGN = "10.9.0.5:8200"  # an LMCache pod of another deployment using the same Redis


async def seed_app(r: aredis.Redis) -> dict[bytes, bytes]:
    """The application's own data: strings holding the dead pod's address, and names that
    look almost like LMCache's."""
    app = {b"app:db-primary": DEAD.encode(), b"app:cache-peer": LIVE_A.encode(),
           b"session:42": DEAD.encode(), DEAD.encode(): DEAD.encode(),
           b"vllm@m@1@0@nothex": DEAD.encode(), b"vllm@m@1@0@ab@notag": DEAD.encode()}
    await r.mset(app)
    await r.hset(b"app:hash", mapping={b"primary": DEAD.encode()})
    return app


async def assert_app_intact(r: aredis.Redis, app: dict[bytes, bytes]) -> None:
    assert dict(zip(app, await r.mget(list(app)))) == app
    assert await r.hget(b"app:hash", b"primary") == DEAD.encode()


async def poison_index(r: aredis.Redis, app: dict[bytes, bytes]) -> None:
    # Anyone who can SADD (or a bug) puts the app's keys into the dead address's index set.
    await r.sadd(S.index_key(DEAD), *app)


async def test_every_path_spares_unrelated_keys(redis_server, lmcache):
    app = await seed_app(lmcache)
    foreign = await load(lmcache, FOREIGN, 300, "f")
    live = {LIVE_A}
    r = aredis.Redis(port=redis_server.port)
    try:
        # 1. The index's start-up reconcile (catch-up) with the live set, DEAD a recorded peer.
        await load(lmcache, DEAD, 500, "d")
        await load(lmcache, LIVE_A, 200, "a")
        await S.note_peers(lmcache, [DEAD])
        await poison_index(lmcache, app)
        async with I.AddressIndex(port=redis_server.port, live_addrs=lambda: live,
                                  prune_interval=None) as idx:
            assert idx.stats.reconcile_purged == 500
            await assert_app_intact(lmcache, app)
            # Notifications: app writes after start never enter any index set.
            await lmcache.set(b"app:db-replica", DEAD)
            await load(lmcache, DEAD, 400, "e")          # DEAD's keys again (a reused IP)
            assert await idx.sync()
            members = set(await lmcache.smembers(S.index_key(DEAD)))
            assert members == {key("e", i) for i in range(400)}
            app[b"app:db-replica"] = DEAD.encode()
            # 2. The departure purge: index drain, with the index poisoned again.
            await poison_index(lmcache, app)
            res = await idx.purge_address(DEAD)
            assert res.deleted == 400 and not res.full_scan
            await assert_app_intact(lmcache, app)
            # 3. The full-scan fallback.
            await load(lmcache, DEAD, 300, "g")
            await poison_index(lmcache, app)
            res = await idx.purge_address(DEAD, full_scan=True)
            assert res.deleted == 300 and res.full_scan
            await assert_app_intact(lmcache, app)
            # 4. An explicit reconcile, 5. the periodic prune.
            await load(lmcache, DEAD, 100, "h")
            await poison_index(lmcache, app)
            assert (await idx.reconcile(lambda: live)).purged == 100
            await poison_index(lmcache, app)
            await idx.prune()
            await assert_app_intact(lmcache, app)
        # 6. The one-shot operations, without the service object.
        await load(lmcache, DEAD, 50, "i")
        await poison_index(lmcache, app)
        assert (await S.drain_index(r, DEAD)).deleted == 0  # nobody indexed "i" (index stopped)
        assert (await S.scan_purge(r, DEAD)).deleted == 50
        await poison_index(lmcache, app)
        # FOREIGN is not live either, but it was never a kvmesh peer: its entries stay.
        assert (await S.reconcile(r, live)).purged == 0
        await assert_app_intact(lmcache, app)
    finally:
        await r.aclose()
    # The other deployment's entries: LMCache's names, but its pod was never a kvmesh peer.
    assert await lmcache.mget(foreign) == [FOREIGN.encode()] * 300
    vals = await values_of(lmcache)
    assert count(vals, DEAD) == len([k for k, v in app.items() if v == DEAD.encode()])
    assert count(vals, LIVE_A) == 201  # its 200 lookup keys and app:cache-peer


async def test_lua_delete_checks_the_name_inside_redis(redis_server, lmcache):
    # The name check runs in the script itself: passing the app's key straight in deletes nothing.
    await lmcache.set(b"app:db-primary", DEAD)
    await lmcache.set(key("d", 1), DEAD)
    r = aredis.Redis(port=redis_server.port)
    try:
        assert await r.eval(S.LUA_DEL_IF, 2, b"app:db-primary", key("d", 1), DEAD) == 1
    finally:
        await r.aclose()
    assert await lmcache.get(b"app:db-primary") == DEAD.encode()
    assert await lmcache.get(key("d", 1)) is None
