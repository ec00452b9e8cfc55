"""Redis replies bounded in size: the lookup endpoint is reached through addresses a namespace's
pods can influence (a pod may pose as the group's Redis), so a reply is never trusted to be
small. A reply larger than ``MAX_REPLY_BYTES`` drops the connection with a clear error instead
of growing the controller's memory (time is bounded separately by socket timeouts)."""

from __future__ import annotations

from redis._parsers import _AsyncHiredisParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.utils import HIREDIS_AVAILABLE

# The largest reply kvmesh asks for: an MGET of 5,000 LMCache keys' values ("ip:port") or a
# SCAN page of 2,000 key names, each well under 1 KiB; 64 MiB leaves a wide margin.
MAX_REPLY_BYTES = 64 << 20


def _too_big(limit: int) -> RedisConnectionError:
    return RedisConnectionError(
        f"Redis reply larger than {limit >> 20} MiB: not the lookup Redis kvmesh expects "
        "(its replies are ip:port values and LMCache key names); connection dropped")


class BoundedHiredisParser(_AsyncHiredisParser):
    """hiredis, but the bytes read for one reply are counted and capped."""

    limit = MAX_REPLY_BYTES

    async def read_response(self, *args, **kwargs):
        self._kvmesh_read = 0
        return await super().read_response(*args, **kwargs)

    async def read_from_socket(self):
        # redis-py 8.1's own method, plus the count (tests/backends/test_bounded.py runs it).
        buffer = await self._stream.read(self._read_size)
        if not buffer or not isinstance(buffer, bytes):
            raise RedisConnectionError("Connection closed by server.") from None
        self._kvmesh_read = getattr(self, "_kvmesh_read", 0) + len(buffer)
        if self._kvmesh_read > self.limit:
            raise _too_big(self.limit)
        self._reader.feed(buffer)
        return True


# hiredis is a declared dependency (redis[hiredis]); the bound is implemented on its parser only.
if not HIREDIS_AVAILABLE:
    raise ImportError("kvmesh needs hiredis (pip install 'redis[hiredis]') for bounded Redis replies")
PARSER = BoundedHiredisParser


def client(parser=None, **connection_kwargs):
    """A redis.asyncio client whose connections parse with the bounded parser (redis-py takes
    the parser only through the pool). ``connection_kwargs``: host, port, db, timeouts, retry."""
    import redis.asyncio as aredis
    pool = aredis.ConnectionPool(parser_class=parser or PARSER, **connection_kwargs)
    return aredis.Redis.from_pool(pool)  # closes the pool with the client
