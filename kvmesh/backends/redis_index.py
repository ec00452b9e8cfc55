"""Purge a dead pod's LMCache lookup state from Redis at once (legacy generation, contract §1.3–1.4).

LMCache's RedisLookupServer writes one plain ``SET <CacheEngineKey> "<podIP>:<port>"`` per stored
chunk (no TTL, DB 0) and deletes keys only on eviction or graceful close. A pod that is killed
leaves every key it wrote, and peers that read one then block ~127 s in ``connect()``.

Three ways to remove them, cheapest first:

* ``AddressIndex`` follows keyevent notifications (``__keyevent@<db>__:set``) and keeps a reverse
  index ``kvmesh:addr:<addr>`` (a Redis set of keys) per value. ``purge_address(addr)`` then drains
  that one set: cost proportional to the dead pod's keys, independent of everyone else's.
* ``reconcile(live_addrs)`` SCANs every key, rebuilds the index, and purges every address that is
  not live. The backstop: at start-up and after any gap in notifications.
* ``purge_address_naive(r, addr)``: SCAN + MGET + DEL of matching keys, the documented baseline.

Every delete is value-checked atomically in Lua (``GET key == addr``), so a key that a live pod
re-wrote to its own address is never deleted, whatever the index says. The index is a superset
hint: stale members (keys since deleted or re-written) are harmless and pruned by ``reconcile``.

Layout: pure decision functions first, then Redis primitives taking a ``redis.asyncio.Redis``,
then ``AddressIndex`` (subscription, retries, counters). Standalone Redis only (Lua touches keys
it was not passed in KEYS; LMCache's lookup server is a single Redis anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Union

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("kvmesh.purge")

OWN_PREFIX = b"kvmesh:"
INDEX_PREFIX = b"kvmesh:addr:"
BARRIER_PREFIX = b"kvmesh:barrier:"
# Keyevent notifications ('E') for string commands ('$'; 'A' includes it).
NEEDED_NOTIFY_FLAGS = "E$"

# Errors after which the connection is gone or unusable: retry, reconnect, reconcile.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.IncompleteReadError,
             asyncio.TimeoutError, EOFError)

LiveAddrs = Union[Iterable[str], Callable[[], Union[Iterable[str], Awaitable[Iterable[str]]]], None]


# --------------------------------------------------------------------------------------------
# Pure decision logic
# --------------------------------------------------------------------------------------------

def parse_addr(value: bytes | str | None) -> str | None:
    """``"host:port"`` as LMCache writes it (``distributed_url``), else None.

    One colon only (LMCache splits on ':', so IPv6 never worked), a non-empty host without
    whitespace, and a decimal port 1..65535."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        if len(value) > 300:
            return None
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    host, sep, port = value.partition(":")
    if not sep or not host or ":" in port or not port.isdigit() or len(port) > 5:
        return None
    if not 0 < int(port) < 65536 or any(c.isspace() or c in "@/" for c in host):
        return None
    return value


_ADDR_MEMO: dict[bytes, str | None] = {}


def parse_addr_cached(value: bytes | None) -> str | None:
    """parse_addr for the hot paths: values repeat (one per pod), so remember them."""
    if value is None:
        return None
    try:
        return _ADDR_MEMO[value]
    except KeyError:
        if len(_ADDR_MEMO) > 65536:
            _ADDR_MEMO.clear()
        got = _ADDR_MEMO[value] = parse_addr(value)
        return got


def index_key(addr: str) -> bytes:
    return INDEX_PREFIX + addr.encode("ascii")


def is_own_key(key: bytes) -> bool:
    return key.startswith(OWN_PREFIX)


def notify_flags_to_set(current: str) -> str | None:
    """The ``notify-keyspace-events`` value to CONFIG SET so that keyevent notifications for
    string commands are on, keeping whatever else was configured; None if already enough."""
    missing = ""
    if "E" not in current:
        missing += "E"
    if "$" not in current and "A" not in current:
        missing += "$"
    return current + missing if missing else None


def group_by_addr(keys: Iterable[bytes], values: Iterable[bytes | None]) -> dict[str, list[bytes]]:
    """Keys grouped by the address they point at; own keys and non-address values dropped."""
    groups: dict[str, list[bytes]] = {}
    for key, value in zip(keys, values):
        if is_own_key(key):
            continue
        addr = parse_addr_cached(value)
        if addr is not None:
            groups.setdefault(addr, []).append(key)
    return groups


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped."""
    return min(cap, base * (2 ** min(attempt, 30)))


_MESSAGE_HEAD = b"*3\r\n$7\r\nmessage\r\n$"  # 18 bytes


def parse_resp_frames(buf: bytes, pos: int = 0) -> tuple[list, int]:
    """Parse complete RESP2 top-level replies from ``buf[pos:]`` (what a SUBSCRIBEd connection
    receives: arrays of bulk strings/integers, plus ``+``/``-`` lines). Returns the frames and
    the offset of the first unparsed byte. Errors come back as ``("-", message)``."""
    frames: list = []
    n = len(buf)
    fast = _MESSAGE_HEAD
    while pos < n:
        if buf.startswith(fast, pos):  # fast path: a pubsub message, the bulk of the traffic
            p = pos + 18
            eol = buf.find(b"\r\n", p)
            if eol < 0:
                break
            start = eol + 2
            end = start + int(buf[p:eol])
            if n < end + 3:
                break
            channel = buf[start:end]
            eol = buf.find(b"\r\n", end + 3)
            if eol < 0:
                break
            start = eol + 2
            end = start + int(buf[end + 3:eol])
            if n < end + 2:
                break
            frames.append([b"message", channel, buf[start:end]])
            pos = end + 2
            continue
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            break
        kind = buf[pos]
        if kind in (43, 45):  # '+' status, '-' error
            frames.append((chr(kind), buf[pos + 1:eol]))
            pos = eol + 2
            continue
        if kind != 42:  # '*'
            raise ValueError(f"unexpected RESP reply type {chr(kind)!r} on the subscription")
        count = int(buf[pos + 1:eol])
        p = eol + 2
        items: list = []
        complete = True
        for _ in range(max(count, 0)):
            eol = buf.find(b"\r\n", p)
            if eol < 0:
                complete = False
                break
            t = buf[p]
            if t == 58:  # ':'
                items.append(int(buf[p + 1:eol]))
                p = eol + 2
            elif t == 36:  # '$'
                length = int(buf[p + 1:eol])
                if length < 0:
                    items.append(None)
                    p = eol + 2
                    continue
                start = eol + 2
                if n < start + length + 2:
                    complete = False
                    break
                items.append(buf[start:start + length])
                p = start + length + 2
            else:
                raise ValueError(f"unexpected RESP element type {chr(t)!r} on the subscription")
        if not complete:
            break
        frames.append(items)
        pos = p
    return frames, pos


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


def resp_command(*args: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


# --------------------------------------------------------------------------------------------
# Lua (all deletes are value-checked inside Redis: a script runs atomically)
# --------------------------------------------------------------------------------------------

# Lua below: one MGET and one DEL per batch rather than a GET and a DEL per key (3-4x fewer
# redis.call()s, which dominate the cost); MGET returns nil for a key that is not a string, so
# no error can stop a script half-way. Batches stay far below Lua's unpack() limit (~8000).

# Pop up to ARGV[2] members of the index set KEYS[1]; delete each whose value is still ARGV[1].
# Pop and deletes happen in one script, so an interrupted purge loses nothing: the members not
# yet popped are still in the set and the next call goes on (idempotent, resumable).
LUA_DRAIN = """
local members = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
if #members == 0 then return {0, 0} end
local values = redis.call('MGET', unpack(members))
local doomed = {}
for i, v in ipairs(values) do
  if v == ARGV[1] then doomed[#doomed + 1] = members[i] end
end
if #doomed > 0 then redis.call('DEL', unpack(doomed)) end
return {#members, #doomed}
"""

# Delete KEYS[i] if its value is ARGV[1]. Returns the number deleted.
LUA_DEL_IF = """
local values = redis.call('MGET', unpack(KEYS))
local doomed = {}
for i, v in ipairs(values) do
  if v == ARGV[1] then doomed[#doomed + 1] = KEYS[i] end
end
if #doomed > 0 then redis.call('DEL', unpack(doomed)) end
return #doomed
"""

# One SSCAN step over the index set KEYS[1] (cursor ARGV[2], COUNT ARGV[3]) removing members
# whose value is no longer ARGV[1]; the members never leave Redis. Returns {cursor, removed}.
LUA_PRUNE = """
local r = redis.call('SSCAN', KEYS[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local members = r[2]
if #members == 0 then return {r[1], 0} end
local values = redis.call('MGET', unpack(members))
local gone = {}
for i, v in ipairs(values) do
  if v ~= ARGV[1] then gone[#gone + 1] = members[i] end
end
if #gone == 0 then return {r[1], 0} end
return {r[1], redis.call('SREM', KEYS[1], unpack(gone))}
"""


# --------------------------------------------------------------------------------------------
# Results and counters
# --------------------------------------------------------------------------------------------

@dataclass
class PurgeResult:
    deleted: int = 0      # keys deleted (value was addr)
    checked: int = 0      # candidate keys whose value was compared
    seconds: float = 0.0
    full_scan: bool = False  # the index could not be trusted, so the whole keyspace was scanned


@dataclass
class ReconcileResult:
    scanned: int = 0      # string keys seen by SCAN (own keys excluded)
    indexed: int = 0      # keys added to an address's index set (live and stale alike)
    pruned: int = 0       # stale index members removed (key gone or re-written elsewhere)
    purged: int = 0       # keys deleted because their address is not live
    stale_addrs: dict[str, int] = field(default_factory=dict)  # addr -> keys purged
    seconds: float = 0.0


@dataclass
class Stats:
    """Plain counters for the lead's Prometheus wiring (monotonic unless noted)."""
    keys_purged: int = 0
    purges: int = 0
    purge_seconds: float = 0.0       # summed over purges
    full_scan_purges: int = 0
    errors: int = 0                  # Redis errors seen (each retry, each lost subscription)
    events: int = 0                  # keyevent notifications processed
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
# Redis primitives (no retries here; AddressIndex adds them)
# --------------------------------------------------------------------------------------------

async def drain_index(r: aredis.Redis, addr: str, batch: int = 1000, depth: int = 4,
                      progress: Callable[[PurgeResult], None] | None = None,
                      result: PurgeResult | None = None) -> PurgeResult:
    """Delete every key in addr's index set whose value is still addr, emptying the set (Redis
    removes an empty set). ``depth`` LUA_DRAIN calls go per round trip. ``result`` accumulates
    (so a caller retrying after an error keeps the tally)."""
    res = result or PurgeResult()
    ikey = index_key(addr)
    while True:
        pipe = r.pipeline(transaction=False)
        for _ in range(depth):
            pipe.eval(LUA_DRAIN, 1, ikey, addr, batch)
        replies = await pipe.execute()
        done = False
        for checked, deleted in replies:
            res.checked += checked
            res.deleted += deleted
            done = done or checked < batch
        if progress:
            progress(res)
        if done:
            return res


async def scan_purge(r: aredis.Redis, addr: str, count: int = 2000,
                     result: PurgeResult | None = None) -> PurgeResult:
    """Full-keyspace fallback for one address: SCAN + MGET, value-checked delete (Lua)."""
    res = result or PurgeResult()
    res.full_scan = True
    want = addr.encode("ascii")
    async with contextlib.aclosing(_scan_batches(r, count)) as batches:
        async for keys in batches:
            values = await r.mget(keys)
            match = [k for k, v in zip(keys, values) if v == want]
            res.checked += len(keys)
            if match:
                res.deleted += await r.eval(LUA_DEL_IF, len(match), *match, addr)
    return res


async def _scan_batches(r: aredis.Redis, count: int):
    """SCAN string keys, own keys dropped, one list per SCAN reply (may repeat keys). The next
    SCAN is already in flight (on a second pooled connection) while the caller works on a
    batch, so Redis and this process work in parallel."""
    nxt = asyncio.ensure_future(r.scan(cursor=0, count=count, _type="string"))
    try:
        while True:
            cursor, keys = await nxt
            nxt = None
            if cursor != 0:
                nxt = asyncio.ensure_future(r.scan(cursor=cursor, count=count, _type="string"))
            keys = [k for k in keys if not is_own_key(k)]
            if keys:
                yield keys
            if cursor == 0:
                return
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            try:
                await nxt
            except (asyncio.CancelledError, Exception):
                pass


async def purge_address_naive(r: aredis.Redis, addr: str, count: int = 2000) -> PurgeResult:
    """Baseline: SCAN all keys, MGET their values, DEL those equal to addr. Not value-checked
    atomically (a key re-written between MGET and DEL is lost); cost grows with the whole
    keyspace. Kept for the benchmark and as the documented fallback idea of contract §1.4."""
    t0 = time.perf_counter()
    res = PurgeResult(full_scan=True)
    want = addr.encode("ascii")
    async with contextlib.aclosing(_scan_batches(r, count)) as batches:
        async for keys in batches:
            values = await r.mget(keys)
            res.checked += len(keys)
            match = [k for k, v in zip(keys, values) if v == want]
            if match:
                res.deleted += await r.delete(*match)
    res.seconds = time.perf_counter() - t0
    return res


async def _resolve_live(live_addrs: LiveAddrs) -> set[str] | None:
    if live_addrs is None:
        return None
    if callable(live_addrs):
        got = live_addrs()
        if inspect.isawaitable(got):
            got = await got
        return set(got)
    return set(live_addrs)


async def reconcile(r: aredis.Redis, live_addrs: LiveAddrs, count: int = 2000,
                    drain_batch: int = 1000) -> ReconcileResult:
    """Rebuild every address's index from a full SCAN, then ``prune_index``: drop index members
    that no longer point at their address, and purge every address not in ``live_addrs``.

    ``live_addrs``: a set, or a (sync or async) callable evaluated after the scan, right
    before anything is deleted (a pod that became live during the scan is then spared).
    None: rebuild and prune only, delete nothing. Keys whose value is live are never deleted:
    purging goes through LUA_DRAIN, which re-checks each key's value inside Redis."""
    t0 = time.perf_counter()
    res = ReconcileResult()
    async with contextlib.aclosing(_scan_batches(r, count)) as batches:
        async for keys in batches:
            values = await r.mget(keys)
            res.scanned += len(keys)
            groups = group_by_addr(keys, values)
            if groups:
                pipe = r.pipeline(transaction=False)
                for addr, members in groups.items():
                    pipe.sadd(index_key(addr), *members)
                await pipe.execute()
                res.indexed += sum(len(m) for m in groups.values())
    await prune_index(r, live_addrs, count, drain_batch, res)
    res.seconds = time.perf_counter() - t0
    return res


async def prune_index(r: aredis.Redis, live_addrs: LiveAddrs = None, count: int = 2000,
                      drain_batch: int = 1000, result: ReconcileResult | None = None
                      ) -> ReconcileResult:
    """Visit every ``kvmesh:addr:*`` set: purge it (LUA_DRAIN) if its address is not live, else
    remove members whose key is gone or now holds another value (LUA_PRUNE, SSCAN inside
    Redis). Cost: the index size, not the keyspace. Keeps the index from growing with
    LMCache's eviction churn (its DELs are not tracked); run it periodically."""
    res = result or ReconcileResult()
    t0 = time.perf_counter()
    addrs: set[str] = set()
    cursor = 0
    while True:
        cursor, ikeys = await r.scan(cursor=cursor, match=INDEX_PREFIX + b"*", count=count,
                                     _type="set")
        for ik in ikeys:
            addr = parse_addr(ik[len(INDEX_PREFIX):])
            if addr is not None:
                addrs.add(addr)
        if cursor == 0:
            break
    live = await _resolve_live(live_addrs)
    for addr in sorted(addrs):
        if live is not None and addr not in live:
            got = await drain_index(r, addr, batch=drain_batch)
            if got.deleted:
                res.stale_addrs[addr] = got.deleted
                res.purged += got.deleted
            continue
        ikey = index_key(addr)
        scur = b"0"
        while True:
            scur, removed = await r.eval(LUA_PRUNE, 1, ikey, addr, scur, count)
            res.pruned += removed
            if scur in (b"0", 0):
                break
    if result is None:
        res.seconds = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------------
# The service object
# --------------------------------------------------------------------------------------------

class AddressIndex:
    """Keeps ``kvmesh:addr:<addr>`` index sets from keyevent notifications and purges by them.

    ``start()`` connects, ensures ``notify-keyspace-events`` has ``E$`` (CONFIG SET; logs what to
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
                 on_purge: Callable[[str, PurgeResult], None] | None = None,
                 on_reconcile: Callable[[dict[str, int]], None] | None = None,
                 on_error: Callable[[str, BaseException], None] | None = None):
        self.host, self.port, self.db = host, port, db
        self.live_addrs = live_addrs
        self.event_batch, self.drain_batch, self.scan_count = event_batch, drain_batch, scan_count
        self.max_attempts = max_attempts
        self.backoff_base, self.backoff_cap, self.reconnect_cap = backoff_base, backoff_cap, reconnect_cap
        self.health_interval, self.sync_timeout = health_interval, sync_timeout
        self.connect_timeout = connect_timeout
        self.prune_interval, self.reconcile_interval = prune_interval, reconcile_interval
        self.on_purge, self.on_error = on_purge, on_error
        # Told {address: keys purged} for dead addresses a reconcile swept, so the owner can
        # credit them to the departure they belong to (a reconcile may get there first).
        self.on_reconcile = on_reconcile
        self.stats = Stats()
        self.channel = f"__keyevent@{db}__:set".encode()
        self.redis = aredis.Redis(host=host, port=port, db=db, retry=Retry(NoBackoff(), 0),
                                  socket_connect_timeout=connect_timeout,
                                  socket_timeout=socket_timeout, health_check_interval=0)
        self.name = f"redis://{host}:{port}/{db}"
        self._task: asyncio.Task | None = None
        self._catchup: asyncio.Task | None = None
        self._maint: asyncio.Task | None = None
        self._subscribed = asyncio.Event()
        self._complete = False
        self._generation = 0
        self._barriers: dict[str, asyncio.Future] = {}
        self._stopping = False
        # Test/progress hook: called after each drain round trip of purge_address.
        self.progress_hook: Callable[[str, PurgeResult], None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

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

    def _error(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        if self.on_error:
            try:
                self.on_error(what, exc)
            except Exception:  # a metrics callback must not break the loop
                log.exception("on_error callback failed")

    # ---- subscription loop -------------------------------------------------------------------

    async def _ensure_notify(self) -> bool:
        try:
            cur = (await self.redis.config_get("notify-keyspace-events")).get(
                b"notify-keyspace-events", b"").decode()
            new = notify_flags_to_set(cur)
            if new is not None:
                await self.redis.config_set("notify-keyspace-events", new)
                log.info("%s: set notify-keyspace-events %r -> %r (kvmesh address index)",
                         self.name, cur, new)
            return True
        except ResponseError as e:
            log.error("%s: cannot read or set notify-keyspace-events (%s). The kvmesh address "
                      "index needs keyevent notifications for string commands: start Redis "
                      "with `--notify-keyspace-events E$` or add `notify-keyspace-events E$` to "
                      "redis.conf (keep any flags you already use). Will check whether events "
                      "arrive anyway; until they do, every purge scans the whole keyspace.",
                      self.name, e)
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
                await self._ensure_notify()
                writer.write(resp_command("SUBSCRIBE", self.channel))
                await writer.drain()
                buf = b""
                while True:  # the subscribe confirmation
                    chunk = await asyncio.wait_for(reader.read(65536), self.connect_timeout)
                    if not chunk:
                        raise EOFError("Redis closed the subscription connection")
                    buf += chunk
                    frames, pos = parse_resp_frames(buf)
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
                self._error("subscription", e)
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
                writer.write(resp_command("PING"))
                await writer.drain()
                pending_ping = True
                frames = []
                continue
            if not chunk:
                raise EOFError("Redis closed the subscription connection")
            pending_ping = False
            buf += chunk
            frames, pos = parse_resp_frames(buf)
            buf = buf[pos:]

    async def _handle(self, frames: list) -> None:
        for f in frames:
            if isinstance(f, tuple) and f[0] == "-":
                raise ResponseError(f"error on subscription: {f[1]!r}")
        keys, tokens = event_keys(frames, self.channel)
        self.stats.events += len(keys) + len(tokens)
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
                except TRANSIENT as e:
                    if attempt == 2:
                        raise
                    self._error("indexing", e)
            self.stats.keys_indexed += sum(len(m) for m in groups.values())
        for tok in tokens:
            fut = self._barriers.get(tok)
            if fut is not None and not fut.done():
                fut.set_result(True)

    async def _catch_up(self, generation: int) -> None:
        """After each (re)subscription: prove events arrive, then reconcile, then mark the
        index complete (if the subscription has not been lost in between)."""
        attempt = 0
        while generation == self._generation and self._subscribed.is_set():
            try:
                if not await self.sync(self.sync_timeout):
                    raise RuntimeError(
                        "a probe write was not notified: keyevent notifications are off. "
                        "Configure `notify-keyspace-events E$` on this Redis")
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
                self._error("catch-up", e)
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
                self._error(what, e)
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
        self.stats.purge_seconds += res.seconds
        self.stats.full_scan_purges += int(res.full_scan)
        log.info("%s: purged %d keys of %s (%d checked%s) in %.3fs", self.name, res.deleted,
                 addr, res.checked, ", full scan" if res.full_scan else "", res.seconds)
        if self.on_purge:
            try:
                self.on_purge(addr, res)
            except Exception:
                log.exception("on_purge callback failed")
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
                self._error("maintenance", e)
                log.error("%s: index maintenance failed (%s: %s); next try in the next interval",
                          self.name, type(e).__name__, e)

    async def purge_address_naive(self, addr: str) -> PurgeResult:
        return await purge_address_naive(self.redis, addr, self.scan_count)
