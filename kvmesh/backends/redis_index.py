"""The Redis address index (redis mode): purge a dead pod's LMCache lookup keys at once.

LMCache's RedisLookupServer deletes its keys only on eviction or graceful close. A pod that is
killed leaves every key it wrote, and peers that read one then block ~127 s in ``connect()``
(docs/lmcache-contract.md, "Known upstream limits kvmesh works around or refuses").

``AddressIndex`` follows keyevent notifications (``__keyevent@<db>__:set``) and keeps the
reverse index sets of ``redis_scripts`` up to date, so ``purge_address(addr)`` drains one set:
cost proportional to the dead pod's keys, independent of everyone else's. ``reconcile`` (a full
SCAN that rebuilds the index and purges every address not live) is the backstop: at start-up
and after any gap in notifications. The subscription is read with ``resp``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvmesh.backends import bounded, resp
from kvmesh.backends.redis_scripts import (
    BARRIER_PREFIX, OWN_PREFIX, LiveAddrs, PurgeResult, ReconcileResult, _resolve_live,
    drain_index, group_by_addr, index_key, note_peers, parse_addr, prune_index, reconcile,
    scan_purge)
from kvmesh.core.names import REDIS_NOTIFY_FLAGS

log = logging.getLogger("kvmesh.purge")

NOTIFY_CONFIG = "notify-keyspace-events"
# The classes Redis's 'A' flag stands for (so 'A' already covers '$').
_NOTIFY_ALL = "g$lshzxetd"

# Cap on the unparsed bytes of the subscription (keyevent frames carry one key name each).
MAX_PENDING_BYTES = 16 << 20

# Errors after which the connection is gone or unusable: retry, reconnect, reconcile.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.IncompleteReadError,
             asyncio.TimeoutError, EOFError)


# --------------------------------------------------------------------------------------------
# Pure decision logic
# --------------------------------------------------------------------------------------------

def notify_flags_to_set(current: str, needed: str = REDIS_NOTIFY_FLAGS) -> str | None:
    """The ``notify-keyspace-events`` value to CONFIG SET so that every flag in ``needed`` is
    on, keeping whatever else was configured (an operator's flags are never removed); None if
    ``current`` already has them."""
    missing = "".join(f for f in needed
                      if f not in current and not (f in _NOTIFY_ALL and "A" in current))
    return current + missing if missing else None


def config_value(reply: dict, name: str) -> str:
    """One setting from a CONFIG GET reply, whether the client decoded it (str keys, as
    redis-py does) or not (bytes); '' when absent."""
    for k, v in reply.items():
        if (k.decode() if isinstance(k, bytes) else k) == name:
            return v.decode() if isinstance(v, bytes) else v
    return ""


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped."""
    return min(cap, base * (2 ** min(attempt, 30)))


def event_keys(frames: list, channel: bytes) -> tuple[list[bytes], list[str]]:
    """Keys from keyevent ``message`` frames on ``channel`` (deduplicated, own keys dropped) and
    the barrier tokens seen among them."""
    keys: dict[bytes, None] = {}
    tokens: list[str] = []
    for f in frames:
        if isinstance(f, list) and len(f) == 3 and f[0] == b"message" and f[1] == channel:
            key = f[2]
            if key.startswith(OWN_PREFIX):
                if key.startswith(BARRIER_PREFIX):
                    tokens.append(key[len(BARRIER_PREFIX):].decode("ascii", "replace"))
                continue
            keys[key] = None
    return list(keys), tokens


# --------------------------------------------------------------------------------------------
# Counters and errors
# --------------------------------------------------------------------------------------------

@dataclass
class Stats:
    """What the index has done since it was made (monotonic): its own log lines, the tests and
    bench/purge.py read them."""
    keys_purged: int = 0
    purges: int = 0
    errors: int = 0                  # Redis errors seen (each retry, each lost subscription)
    keys_indexed: int = 0
    subscriptions: int = 0           # successful (re)subscriptions
    reconciles: int = 0
    reconcile_purged: int = 0
    prunes: int = 0
    pruned: int = 0                  # stale index members removed (prune and reconcile)


class PurgeError(RuntimeError):
    """A purge gave up after its bounded retries; ``partial`` tells what it did. Calling
    purge_address again for the same address resumes."""

    def __init__(self, msg: str, partial: PurgeResult):
        super().__init__(msg)
        self.partial = partial


# --------------------------------------------------------------------------------------------
# The service object
# --------------------------------------------------------------------------------------------

class AddressIndex:
    """Keeps ``kvmesh:addr:<addr>`` index sets from keyevent notifications and purges by them.

    ``start()`` connects, adds ``REDIS_NOTIFY_FLAGS`` (keyevent notifications for string
    commands) to ``notify-keyspace-events`` (CONFIG SET, keeping what is set; logs what to
    configure if that is refused), subscribes to ``__keyevent@<db>__:set``, checks that a probe
    write is notified, then reconciles (``live_addrs`` provider, or rebuild-only when None).
    ``index_complete`` is True only while the subscription has been up since that reconcile
    finished; otherwise ``purge_address`` adds a full SCAN so nothing is missed.

    Every ``prune_interval`` s it prunes the index (members whose key LMCache evicted or another
    pod re-wrote), and every ``reconcile_interval`` s (off by default) it runs a full reconcile
    with ``live_addrs``.

    On any loss of the subscription (Redis restart, CLIENT KILL, network) it reconnects with
    capped exponential backoff forever, re-applies the config (a restarted Redis forgets it),
    resubscribes and reconciles again (events were lost). ``purge_address`` retries a bounded
    number of times and then raises PurgeError; calling it again resumes.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, db: int = 0, *,
                 live_addrs: LiveAddrs = None,
                 event_batch: int = 5000, drain_batch: int = 1000, scan_count: int = 2000,
                 max_attempts: int = 6, backoff_base: float = 0.05, backoff_cap: float = 2.0,
                 reconnect_cap: float = 10.0, health_interval: float = 5.0,
                 sync_timeout: float = 5.0, connect_timeout: float = 3.0,
                 socket_timeout: float = 30.0,
                 prune_interval: float | None = 600.0, reconcile_interval: float | None = None,
                 on_reconcile: Callable[[dict[str, int]], None] | None = None,
                 username: str | None = None, password: str | None = None):
        self.host, self.port, self.db = host, port, db
        # kvmesh's own Redis user (core.lookup.REDIS_KVMESH_USER) on a Redis with ACLs.
        self.username, self.password = username, password
        self.live_addrs = live_addrs
        self.event_batch, self.drain_batch, self.scan_count = event_batch, drain_batch, scan_count
        self.max_attempts = max_attempts
        self.backoff_base, self.backoff_cap, self.reconnect_cap = backoff_base, backoff_cap, reconnect_cap
        self.health_interval, self.sync_timeout = health_interval, sync_timeout
        self.connect_timeout = connect_timeout
        self.prune_interval, self.reconcile_interval = prune_interval, reconcile_interval
        # Told {address: keys purged} for dead addresses a reconcile swept, so the owner can
        # credit them to the departure they belong to (a reconcile may get there first).
        self.on_reconcile = on_reconcile
        self.stats = Stats()
        self.channel = f"__keyevent@{db}__:set".encode()
        self.redis = bounded.client(host=host, port=port, db=db, retry=Retry(NoBackoff(), 0),
                                  socket_connect_timeout=connect_timeout,
                                  socket_timeout=socket_timeout, health_check_interval=0,
                                  username=username, password=password)
        self.name = f"redis://{host}:{port}/{db}"
        self._task: asyncio.Task | None = None
        self._catchup: asyncio.Task | None = None
        self._maint: asyncio.Task | None = None
        self._subscribed = asyncio.Event()
        self._complete = False
        self._generation = 0
        self._barriers: dict[str, asyncio.Future] = {}
        self._noted: set[str] = set()  # addresses already recorded by _note_writers
        self._stopping = False
        # Test/progress hook: called after each drain round trip of purge_address.
        self.progress_hook: Callable[[str, PurgeResult], None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """Connected, with the notification subscription up: Redis answers (the index may
        still be catching up)."""
        return self._subscribed.is_set()

    @property
    def index_complete(self) -> bool:
        return self._complete and self._subscribed.is_set()

    async def start(self, wait: float | None = 30.0) -> bool:
        """Start the subscription loop; wait up to ``wait`` s for the index to be complete.
        Returns whether it is (the loop keeps trying in the background either way)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"kvmesh-address-index {self.name}")
            if self.prune_interval or self.reconcile_interval:
                self._maint = asyncio.create_task(self._maintenance(),
                                                  name=f"kvmesh-address-index-maint {self.name}")
        if wait:
            return await self.wait_complete(wait)
        return self.index_complete

    async def wait_complete(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.index_complete:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        self._stopping = True
        for t in (self._maint, self._catchup, self._task):
            if t is not None:
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
        self._task = self._catchup = self._maint = None
        self._subscribed.clear()
        self._complete = False
        await self.redis.aclose()

    async def __aenter__(self) -> "AddressIndex":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ---- subscription loop -------------------------------------------------------------------

    async def _ensure_notify(self) -> bool:
        try:
            # Add to what is configured, never replace it: an external Redis may serve others.
            cur = config_value(await self.redis.config_get(NOTIFY_CONFIG), NOTIFY_CONFIG)
            new = notify_flags_to_set(cur)
            if new is not None:
                await self.redis.config_set(NOTIFY_CONFIG, new)
                log.info("%s: set notify-keyspace-events %r -> %r (kvmesh address index)",
                         self.name, cur, new)
            return True
        except ResponseError as e:
            log.error("%s: cannot read or set notify-keyspace-events (%s). The kvmesh address "
                      "index needs keyevent notifications for string commands: start Redis "
                      "with `--notify-keyspace-events %s` or add `notify-keyspace-events %s` to "
                      "redis.conf (keep any flags you already use). Will check whether events "
                      "arrive anyway; until they do, every purge scans the whole keyspace.",
                      self.name, e, REDIS_NOTIFY_FLAGS, REDIS_NOTIFY_FLAGS)
            return False

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            writer = None
            delay = self.backoff_base
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.connect_timeout)
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if self.password is not None:
                    await self._auth(reader, writer)
                await self._ensure_notify()
                writer.write(resp.command("SUBSCRIBE", self.channel))
                await writer.drain()
                buf = b""
                while True:  # the subscribe confirmation
                    chunk = await asyncio.wait_for(reader.read(65536), self.connect_timeout)
                    if not chunk:
                        raise EOFError("Redis closed the subscription connection")
                    buf += chunk
                    frames, pos = resp.parse_frames(buf)
                    if frames:
                        break
                first = frames[0]
                if not (isinstance(first, list) and first and first[0] == b"subscribe"):
                    raise ResponseError(f"SUBSCRIBE refused: {first!r}")
                self._generation += 1
                self.stats.subscriptions += 1
                self._complete = False
                self._subscribed.set()
                log.info("%s: subscribed to %s%s", self.name, self.channel.decode(),
                         "" if self.stats.subscriptions == 1 else
                         " again; reconciling, since notifications were lost while away")
                attempt = 0
                self._catchup = asyncio.create_task(self._catch_up(self._generation))
                await self._consume(reader, writer, buf[pos:], frames[1:])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - anything: log, back off, reconnect
                self.stats.errors += 1
                delay = backoff_delay(attempt, self.backoff_base * 2, self.reconnect_cap)
                log.log(logging.WARNING if attempt < 3 else logging.ERROR,
                        "%s: address-index subscription lost or refused (%s: %s); "
                        "reconnecting in %.2fs (attempt %d). Purges meanwhile scan the whole "
                        "keyspace; check that Redis is up and reachable from the controller.",
                        self.name, type(e).__name__, e, delay, attempt + 1)
                attempt += 1
                try:  # idle pooled connections may predate a Redis restart: drop them
                    await self.redis.connection_pool.disconnect(inuse_connections=False)
                except Exception:  # noqa: BLE001
                    pass
            finally:
                self._subscribed.clear()
                self._complete = False
                if self._catchup is not None:
                    self._catchup.cancel()
                    self._catchup = None
                for fut in self._barriers.values():
                    if not fut.done():
                        fut.set_result(False)
                if writer is not None:
                    writer.close()
            if not self._stopping:
                await asyncio.sleep(delay)

    async def _auth(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """AUTH on the raw subscription connection (redis-py's connections do their own)."""
        args = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
        writer.write(resp.command(*args))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), self.connect_timeout)
        if not line.startswith(b"+OK"):
            raise ResponseError(f"AUTH as {self.username or 'default'} refused: "
                                f"{line[:200].decode('ascii', 'replace').strip()}")

    async def _consume(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       buf: bytes, frames: list) -> None:
        pending_ping = False
        while True:
            if frames:
                await self._handle(frames)
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 18), self.health_interval)
            except asyncio.TimeoutError:
                if pending_ping:
                    raise ConnectionError(f"no reply to PING within {self.health_interval}s")
                writer.write(resp.command("PING"))
                await writer.drain()
                pending_ping = True
                frames = []
                continue
            if not chunk:
                raise EOFError("Redis closed the subscription connection")
            pending_ping = False
            buf += chunk
            frames, pos = resp.parse_frames(buf)
            buf = buf[pos:]
            if len(buf) > MAX_PENDING_BYTES:  # one unfinished frame this big: not Redis
                raise ConnectionError(
                    f"{len(buf)} bytes of an unfinished frame on the subscription (keyevent "
                    f"messages are key names, under {MAX_PENDING_BYTES >> 20} MiB); "
                    "reconnecting")

    async def _handle(self, frames: list) -> None:
        for f in frames:
            if isinstance(f, tuple) and f[0] == "-":
                raise ResponseError(f"error on subscription: {f[1]!r}")
        keys, tokens = event_keys(frames, self.channel)
        for i in range(0, len(keys), self.event_batch):
            chunk = keys[i:i + self.event_batch]
            for attempt in (1, 2):  # a second try takes a fresh pooled connection
                try:
                    values = await self.redis.mget(chunk)
                    groups = group_by_addr(chunk, values)
                    if groups:
                        pipe = self.redis.pipeline(transaction=False)
                        for addr, members in groups.items():
                            pipe.sadd(index_key(addr), *members)
                        await pipe.execute()
                    break
                except TRANSIENT:
                    if attempt == 2:
                        raise
                    self.stats.errors += 1
            self.stats.keys_indexed += sum(len(m) for m in groups.values())
            await self._note_writers(groups)
        for tok in tokens:
            fut = self._barriers.get(tok)
            if fut is not None and not fut.done():
                fut.set_result(True)

    async def _note_writers(self, groups: dict) -> None:
        """Record addresses that write here while they are live kvmesh peers (``note_peers``),
        so that a reconcile may purge them after they die, even one run by another replica.
        Best effort: a reconcile records the live ones too."""
        new = [a for a in groups if a not in self._noted]
        if not new or self.live_addrs is None:
            return
        try:
            live = await asyncio.wait_for(_resolve_live(self.live_addrs), 1.0)
            mine = [a for a in new if a in live]
            if mine:
                await note_peers(self.redis, mine)
                self._noted.update(mine)
                if len(self._noted) > 65536:
                    self._noted.clear()
        except (asyncio.TimeoutError, *TRANSIENT, RedisError):
            pass

    async def _catch_up(self, generation: int) -> None:
        """After each (re)subscription: prove events arrive, then reconcile, then mark the
        index complete (if the subscription has not been lost in between)."""
        attempt = 0
        while generation == self._generation and self._subscribed.is_set():
            try:
                if not await self.sync(self.sync_timeout):
                    raise RuntimeError(
                        "a probe write was not notified: keyevent notifications are off. "
                        f"Configure `notify-keyspace-events {REDIS_NOTIFY_FLAGS}` on this Redis")
                res = await self.reconcile(self.live_addrs)
                if generation == self._generation and self._subscribed.is_set():
                    self._complete = True
                    log.info("%s: address index complete (%d keys indexed, %d stale members "
                             "pruned, %d stale keys purged in %.2fs)", self.name, res.indexed,
                             res.pruned, res.purged, res.seconds)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.stats.errors += 1
                delay = backoff_delay(attempt, self.backoff_base * 4, 30.0)
                log.error("%s: address index not complete yet (%s: %s); retrying in %.1fs",
                          self.name, type(e).__name__, e, delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def sync(self, timeout: float | None = None) -> bool:
        """Barrier: True once every notification Redis sent before this call is indexed. Writes
        ``kvmesh:barrier:<token>`` (PX 30 s) and waits for its own event."""
        if not self._subscribed.is_set():
            return False
        token = os.urandom(8).hex()
        fut = asyncio.get_running_loop().create_future()
        self._barriers[token] = fut
        try:
            await self.redis.set(BARRIER_PREFIX + token.encode(), b"1", px=30000)
            return bool(await asyncio.wait_for(asyncio.shield(fut), timeout or self.sync_timeout))
        except (asyncio.TimeoutError, *TRANSIENT, RedisError):
            return False
        finally:
            self._barriers.pop(token, None)

    # ---- operations --------------------------------------------------------------------------

    async def _with_retries(self, what: str, op: Callable[[], Awaitable], partial=None):
        attempt = 0
        while True:
            try:
                return await op()
            except TRANSIENT as e:
                self.stats.errors += 1
                attempt += 1
                if attempt >= self.max_attempts:
                    log.error("%s: %s failed after %d attempts (%s: %s); giving up for now. "
                              "It is idempotent: run it again once Redis is reachable.",
                              self.name, what, attempt, type(e).__name__, e)
                    raise PurgeError(f"{what} on {self.name}: {e}", partial or PurgeResult()) from e
                delay = backoff_delay(attempt - 1, self.backoff_base, self.backoff_cap)
                log.warning("%s: %s interrupted (%s: %s); retrying in %.2fs (attempt %d of %d)",
                            self.name, what, type(e).__name__, e, delay, attempt + 1,
                            self.max_attempts)
                await asyncio.sleep(delay)

    async def purge_address(self, addr: str, *, full_scan: bool | None = None) -> PurgeResult:
        """Delete every key whose value is ``addr`` (value-checked per key, atomically), drained
        from its index set; the index set is gone afterwards. ``full_scan``: None = also scan
        the keyspace when the index cannot be trusted (no subscription, or not yet reconciled,
        or the indexer is lagging past sync_timeout)."""
        if parse_addr(addr) is None:
            raise ValueError(f"not a host:port address: {addr!r}")
        t0 = time.perf_counter()
        res = PurgeResult()
        if full_scan is None:
            full_scan = not (self.index_complete and await self.sync())
            if full_scan:
                log.warning("%s: address index not complete or lagging; purge of %s also scans "
                            "the whole keyspace", self.name, addr)
        hook = self.progress_hook

        def progress(r: PurgeResult) -> None:
            if hook:
                hook(addr, r)

        await self._with_retries(
            f"purge of {addr}",
            lambda: drain_index(self.redis, addr, self.drain_batch, progress=progress, result=res),
            res)
        if full_scan:
            await self._with_retries(f"scan purge of {addr}",
                                     lambda: scan_purge(self.redis, addr, self.scan_count, res), res)
        res.seconds = time.perf_counter() - t0
        self.stats.purges += 1
        self.stats.keys_purged += res.deleted
        log.info("%s: purged %d keys of %s (%d checked%s) in %.3fs", self.name, res.deleted,
                 addr, res.checked, ", full scan" if res.full_scan else "", res.seconds)
        return res

    async def reconcile(self, live_addrs: LiveAddrs = None) -> ReconcileResult:
        """Full SCAN backstop (see module ``reconcile``); retried on connection loss."""
        res = await self._with_retries(
            "reconcile", lambda: reconcile(self.redis, live_addrs, self.scan_count, self.drain_batch))
        self.stats.reconciles += 1
        self.stats.pruned += res.pruned
        self.stats.reconcile_purged += res.purged
        self.stats.keys_purged += res.purged
        if res.stale_addrs:
            log.info("%s: reconcile purged %d stale keys of %d dead addresses: %s", self.name,
                     res.purged, len(res.stale_addrs),
                     ", ".join(f"{a} ({n})" for a, n in sorted(res.stale_addrs.items())[:20]))
            if self.on_reconcile:
                try:
                    self.on_reconcile(dict(res.stale_addrs))
                except Exception:
                    log.exception("on_reconcile callback failed")
        return res

    async def prune(self) -> ReconcileResult:
        """``prune_index`` with retries (purges nothing live: no live set is applied)."""
        res = await self._with_retries(
            "index prune", lambda: prune_index(self.redis, None, self.scan_count, self.drain_batch))
        self.stats.prunes += 1
        self.stats.pruned += res.pruned
        return res

    async def _maintenance(self) -> None:
        last_prune = last_reconcile = time.monotonic()
        while True:
            await asyncio.sleep(min(x for x in (self.prune_interval, self.reconcile_interval) if x))
            if not self.index_complete:
                continue  # the catch-up after (re)subscribing does a reconcile anyway
            now = time.monotonic()
            try:
                if self.reconcile_interval and now - last_reconcile >= self.reconcile_interval:
                    await self.reconcile(self.live_addrs)
                    last_reconcile = last_prune = now
                elif self.prune_interval and now - last_prune >= self.prune_interval:
                    res = await self.prune()
                    last_prune = now
                    log.info("%s: index pruned: %d stale members removed in %.2fs", self.name,
                             res.pruned, res.seconds)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - logged; next round tries again
                self.stats.errors += 1
                log.error("%s: index maintenance failed (%s: %s); next try in the next interval",
                          self.name, type(e).__name__, e)
