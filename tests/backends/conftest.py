"""A real redis-server per test: 127.0.0.1, a free port, a temp dir, no persistence
(support.RedisServer); and the writer's client, a client of its own as LMCache's pods are."""

from __future__ import annotations

import pytest
import redis.asyncio as aredis

from support import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_redis_server(tmp_path):
    """For servers with extra command-line options."""
    made: list[RedisServer] = []

    def make(*extra: str) -> RedisServer:
        d = tmp_path / f"redis{len(made)}"
        d.mkdir()
        srv = RedisServer(d, *extra).start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()


@pytest.fixture
async def lmcache(redis_server):
    """The writer: a client of its own, as LMCache's pods are."""
    r = aredis.Redis(port=redis_server.port)
    yield r
    await r.aclose()
