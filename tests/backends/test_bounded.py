"""A "Redis" that answers with endless garbage (anything on the lookup address may be a pod
posing as the group's Redis): the controller's clients drop the connection at a bounded reply
size instead of buffering it, and the index's subscription reconnects. Loopback only; every
wait bounded."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from kvmesh.backends import bounded
from kvmesh.backends import redis_index as I


def _rss_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (Linux >= 4.0)
        f.write("5")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


class Garbage:
    """Answers the first command with the header of a 2 GiB bulk string and then streams
    its bytes as fast as the client reads, until the client hangs up."""

    def __init__(self, head: bytes = b"$2147483647\r\n"):
        self.head, self.sent, self.server = head, 0, None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader, writer):
        try:
            await reader.read(65536)
            writer.write(self.head)
            chunk = b"x" * (1 << 20)
            while self.sent < (3 << 30):
                writer.write(chunk)
                self.sent += len(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def test_oversized_reply_drops_the_connection():
    parser = bounded.PARSER
    _rss_peak_reset()
    base = _rss_kib("VmRSS")
    async with Garbage() as g:
        r = bounded.client(parser, port=g.port, socket_timeout=10, socket_connect_timeout=5)
        t0 = time.monotonic()
        try:
            with pytest.raises(RedisConnectionError, match="larger than 64 MiB"):
                await asyncio.wait_for(r.get("k"), 30)
        finally:
            await r.aclose()
        took = time.monotonic() - t0
    grew = (_rss_kib("VmHWM") - base) >> 10
    print(f"\n{parser.__name__}: dropped after {g.sent >> 20} MiB sent, {took:.2f}s, "
          f"peak RSS +{grew} MiB")
    assert took < 20 and grew < 400


async def test_purge_against_garbage_gives_up_bounded():
    async with Garbage() as g:
        idx = I.AddressIndex(port=g.port, max_attempts=2, backoff_base=0.01,
                             socket_timeout=5, connect_timeout=2)
        t0 = time.monotonic()
        try:
            with pytest.raises(I.PurgeError):
                await asyncio.wait_for(idx.purge_address("10.0.0.1:8200", full_scan=False), 60)
        finally:
            await idx.stop()
    assert time.monotonic() - t0 < 40


async def test_subscription_garbage_reconnects(caplog):
    # SUBSCRIBE answered with a pubsub frame whose key never ends.
    head = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$18\r\n" \
           b"__keyevent@0__:set\r\n$2147483647\r\n"
    async with Garbage(head) as g:
        idx = I.AddressIndex(port=g.port, backoff_base=0.01, reconnect_cap=0.5,
                             connect_timeout=2, prune_interval=None)
        # CONFIG GET goes to the same garbage server on the command connection and fails: the
        # point here is the subscription reader, which must not buffer gigabytes.
        _rss_peak_reset()
        base = _rss_kib("VmRSS")
        await idx.start(wait=None)
        try:
            for _ in range(300):
                if idx.stats.errors >= 2:
                    break
                await asyncio.sleep(0.1)
        finally:
            await idx.stop()
    assert idx.stats.errors >= 2
    assert (_rss_kib("VmHWM") - base) >> 10 < 400


async def test_lmcache_controller_http_reply_bounded():
    from aiohttp import ClientSession, web

    from kvmesh.backends import lmcache_controller as L

    async def huge(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(64):  # 64 MiB, more than the cap
            await resp.write(b"[" * (1 << 20))
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with ClientSession() as s:
            with pytest.raises(L.LMCacheControllerError, match="more than 8 MiB"):
                await L._get_json(s, "POST", f"http://127.0.0.1:{port}/query", timeout=20)
    finally:
        await runner.cleanup()
