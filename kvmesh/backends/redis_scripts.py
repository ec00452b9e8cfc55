"""The address index's data in the lookup Redis: key layout, the Lua scripts that change it,
and the one-shot operations built on them (no retries, no state: ``redis_index.AddressIndex``
adds both).

LMCache's RedisLookupServer (redis mode) writes one plain ``SET <CacheEngineKey> "<podIP>:<port>"``
per stored chunk (no TTL, DB 0). kvmesh keeps, per address, a reverse index set
``kvmesh:addr:<addr>`` of the keys that hold it, so a dead pod's keys are found without scanning
everyone else's.

The Redis may be shared (``redisAddress``), so a key is LMCache's only by its *name*, never by its
value alone: every path (index, scan, delete) requires LMCache 0.3.x's ``CacheEngineKey`` format
(``is_lmcache_key``); and a reconcile purges an address only if kvmesh recorded it as one of its
peers writing to this Redis (``MEMBERS_KEY``). Every delete is value- and name-checked atomically
in Lua (``GET key == addr`` and the key format), so a key that a live pod re-wrote to its own
address, or an application's key that happens to hold an ``ip:port``, is never deleted, whatever
the index says. The index is a superset
hint: stale members (keys since deleted or re-written) are harmless and pruned by
``prune_index``. Standalone Redis only (the scripts touch keys they were not passed in KEYS;
LMCache's lookup server is a single Redis anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Union

import redis.asyncio as aredis

# Everything kvmesh writes lives under this prefix, so scans can tell it from LMCache's keys.
OWN_PREFIX = b"kvmesh:"
INDEX_PREFIX = b"kvmesh:addr:"
BARRIER_PREFIX = b"kvmesh:barrier:"
# Hash: address -> unix time kvmesh last saw it as a live peer with keys in this Redis. Only
# these addresses are ever purged by a reconcile ("the group"): on a shared Redis, another
# LMCache deployment's keys are not kvmesh's to delete.
MEMBERS_KEY = b"kvmesh:members"
# A recorded peer not seen live for this long is forgotten (pod IPs are reused).
MEMBER_TTL_SECONDS = 7 * 24 * 3600

# LMCache 0.3.x CacheEngineKey.to_string (lmcache/utils.py:149-156 in 0.3.6), the key its
# RedisLookupServer SETs (lmcache/v1/lookup_server/redis_server.py:55,66):
#   <fmt>@<model_name>@<world_size>@<worker_id>@<chunk_hash as %x, may be negative>[@<tag>%<value>]...
_LMCACHE_KEY = re.compile(rb"[^@]+@[^@]+@[0-9]+@[0-9]+@-?[0-9a-f]+(?:@[^@%]+%[^@]*)*\Z", re.S)
# Longer names are not LMCache's (its model names are short); bounds the regex's work.
MAX_KEY_BYTES = 4096

LiveAddrs = Union[Iterable[str], Callable[[], Union[Iterable[str], Awaitable[Iterable[str]]]], None]


# --------------------------------------------------------------------------------------------
# Key layout and values (pure)
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


def is_lmcache_key(key: bytes | str) -> bool:
    """Whether ``key`` has the name LMCache 0.3.x gives its lookup entries (see _LMCACHE_KEY)."""
    if isinstance(key, str):
        key = key.encode("utf-8", "surrogateescape")
    return len(key) <= MAX_KEY_BYTES and _LMCACHE_KEY.match(key) is not None


def index_key(addr: str) -> bytes:
    return INDEX_PREFIX + addr.encode("ascii")


def is_own_key(key: bytes) -> bool:
    return key.startswith(OWN_PREFIX)


def group_by_addr(keys: Iterable[bytes], values: Iterable[bytes | None]) -> dict[str, list[bytes]]:
    """Keys grouped by the address they point at; own keys, keys not named as LMCache names
    its entries and non-address values dropped."""
    groups: dict[str, list[bytes]] = {}
    for key, value in zip(keys, values):
        if is_own_key(key) or not is_lmcache_key(key):
            continue
        addr = parse_addr_cached(value)
        if addr is not None:
            groups.setdefault(addr, []).append(key)
    return groups


# --------------------------------------------------------------------------------------------
# Lua (all deletes are value-checked inside Redis: a script runs atomically)
# --------------------------------------------------------------------------------------------

# Lua below: one MGET and one DEL per batch rather than a GET and a DEL per key (3-4x fewer
# redis.call()s, which dominate the cost); MGET returns nil for a key that is not a string, so
# no error can stop a script half-way. Batches stay far below Lua's unpack() limit (~8000).

# is_lmcache_key in Lua (same grammar as _LMCACHE_KEY), so that nothing put into an index set
# (by kvmesh or by anyone who can SADD) can make a script delete a key LMCache did not name.
_LUA_IS_LMC = """
local function lmc(k)
  if #k > %d then return false end
  local _, e = string.find(k, '^[^@]+@[^@]+@%%d+@%%d+@%%-?[0-9a-f]+')
  if not e then return false end
  local rest = string.sub(k, e + 1)
  while rest ~= '' do
    local t = string.match(rest, '^@([^@]+)')
    if not t or not string.find(t, '^[^%%%%]+%%%%') then return false end
    rest = string.sub(rest, #t + 2)
  end
  return true
end
""" % MAX_KEY_BYTES

# The check every delete goes through: of the keys in `keys`, delete those whose value is still
# ARGV[1] (the dead address) and whose name is LMCache's; leaves their count in #doomed.
_LUA_DEL_MATCHING = _LUA_IS_LMC + """
local values = redis.call('MGET', unpack(keys))
local doomed = {}
for i, v in ipairs(values) do
  if v == ARGV[1] and lmc(keys[i]) then doomed[#doomed + 1] = keys[i] end
end
if #doomed > 0 then redis.call('DEL', unpack(doomed)) end
"""

# Pop up to ARGV[2] members of the index set KEYS[1]; delete each whose value is still ARGV[1].
# Pop and deletes happen in one script, so an interrupted purge loses nothing: the members not
# yet popped are still in the set and the next call goes on (idempotent, resumable).
# Returns {members popped, keys deleted}.
LUA_DRAIN = """
local keys = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
if #keys == 0 then return {0, 0} end
""" + _LUA_DEL_MATCHING + """
return {#keys, #doomed}
"""

# Delete KEYS[i] if its value is ARGV[1]. Returns the number deleted.
LUA_DEL_IF = """
local keys = KEYS
""" + _LUA_DEL_MATCHING + """
return #doomed
"""

# One SSCAN step over the index set KEYS[1] (cursor ARGV[2], COUNT ARGV[3]) removing members
# whose value is no longer ARGV[1]; the members never leave Redis. Returns {cursor, removed}.
LUA_PRUNE = _LUA_IS_LMC + """
local r = redis.call('SSCAN', KEYS[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local members = r[2]
if #members == 0 then return {r[1], 0} end
local values = redis.call('MGET', unpack(members))
local gone = {}
for i, v in ipairs(values) do
  if v ~= ARGV[1] or not lmc(members[i]) then gone[#gone + 1] = members[i] end
end
if #gone == 0 then return {r[1], 0} end
return {r[1], redis.call('SREM', KEYS[1], unpack(gone))}
"""


# --------------------------------------------------------------------------------------------
# Results
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


# --------------------------------------------------------------------------------------------
# Operations (no retries here; AddressIndex adds them)
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
    async with contextlib.aclosing(scan_batches(r, count)) as batches:
        async for keys in batches:
            values = await r.mget(keys)
            match = [k for k, v in zip(keys, values) if v == want and is_lmcache_key(k)]
            res.checked += len(keys)
            if match:
                res.deleted += await r.eval(LUA_DEL_IF, len(match), *match, addr)
    return res


async def scan_batches(r: aredis.Redis, count: int):
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
    async with contextlib.aclosing(scan_batches(r, count)) as batches:
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


async def note_peers(r: aredis.Redis, addrs: Iterable[str], now: float | None = None) -> None:
    """Record ``addrs`` as kvmesh peers seen live with keys in this Redis (``MEMBERS_KEY``)."""
    addrs = [a for a in addrs if parse_addr(a) is not None]
    if addrs:
        stamp = int(now if now is not None else time.time())
        await r.hset(MEMBERS_KEY, mapping={a: stamp for a in addrs})


async def known_peers(r: aredis.Redis, live: Iterable[str] = (), now: float | None = None
                      ) -> set[str]:
    """The addresses a reconcile may purge: those recorded by ``note_peers``. ``live`` ones are
    recorded now (they are peers with keys here); entries not seen for MEMBER_TTL_SECONDS are
    forgotten."""
    now = now if now is not None else time.time()
    await note_peers(r, live, now)
    got = await r.hgetall(MEMBERS_KEY)
    peers, old = set(), []
    for a, t in got.items():
        a = a.decode("ascii", "replace") if isinstance(a, bytes) else a
        try:
            seen = float(t)
        except (TypeError, ValueError):
            seen = 0.0
        if now - seen > MEMBER_TTL_SECONDS:
            old.append(a)
        else:
            peers.add(a)
    if old:
        await r.hdel(MEMBERS_KEY, *old)
    return peers


async def prune_index(r: aredis.Redis, live_addrs: LiveAddrs = None, count: int = 2000,
                      drain_batch: int = 1000, result: ReconcileResult | None = None
                      ) -> ReconcileResult:
    """Visit every ``kvmesh:addr:*`` set: purge it (LUA_DRAIN) if its address is not live and a
    recorded kvmesh peer (``known_peers``; live ones are recorded here), else
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
    peers: set[str] = set()
    if live is not None:
        peers = await known_peers(r, live & addrs)
    for addr in sorted(addrs):
        if live is not None and addr not in live and addr in peers:
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
