"""A list-then-watch cache of one Kubernetes resource type (client-go's reflector + informer, small).

    pods = kube.informer("v1", "Pod", namespace="llm", label_selector="app=vllm")
    pods.add_handler(on_pod)          # async def on_pod(type, obj, old_obj): ...
    task = asyncio.create_task(pods.run())
    await pods.has_synced.wait()
    ...
    pods.stop(); await task

Objects are kept as the JSON dicts the API server sent (never kubernetes model objects),
keyed by (namespace, name); cluster-scoped objects have namespace "". Handlers and callers get
the stored dicts themselves: treat them as read-only. A `transform` shrinks each object before
it is stored or delivered (a parsed pod is ~30 KB of Python objects, most of which no consumer
reads): it returns the compact dict to keep; the informer keeps metadata name, namespace, uid
and resourceVersion on it whatever the transform drops, since its own bookkeeping needs them.

Protocol:
  * LIST, paginated (limit/continue), then replace the store, delivering the difference to the
    handlers (the first list: ADDED for everything, then `has_synced` is set);
  * WATCH from the list's resourceVersion with allow_watch_bookmarks and a server-side
    timeout; every event (BOOKMARK included) advances `resource_version`; when the server
    ends the watch, watch again from there;
  * 410 Gone (an ERROR event with code 410, or HTTP 410) means our resourceVersion left the
    server's window: LIST again and deliver the difference, so an object deleted during the
    gap still reaches the handlers as DELETED (a "synthetic" one: `obj is old_obj`, the last
    state we knew);
  * any other failure (connection refused/reset, timeouts, 5xx, an ERROR event, a 403):
    exponential backoff with jitter, then watch again from the last resourceVersion (the server
    answers 410 if that is too old now, which leads to a relist); if nothing was ever listed,
    list again.

Handlers run one at a time, in registration order, in the informer's task, after the store
already holds the new state. A handler that raises is logged and counted, never fatal. A slow
handler delays the watch (the server buffers, and closes a watch that falls too far behind,
which costs a re-watch or relist, never an event).

The state transitions are pure functions below (`event_changes`, `relist_changes`,
`apply_changes`, `next_resource_version`, `watch_error`, `Backoff.delay`); the `Informer` class
only does I/O and bookkeeping around them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, MutableMapping, Optional, Union

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("kvmesh.informer")

ADDED, MODIFIED, DELETED, BOOKMARK, ERROR = "ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"

Key = tuple[str, str]
Handler = Callable[[str, dict, Optional[dict]], Union[Awaitable[None], None]]


# --------------------------------------------------------------------------- pure state transitions


@dataclass(frozen=True)
class Change:
    """One delivery to the handlers: `obj` is the new state (for DELETED, the final state),
    `old` the state stored before (None for ADDED). `synthetic`: a deletion we inferred (relist
    after a gap, or the name reused by a new object) rather than saw; then `obj is old`."""

    type: str
    key: Key
    obj: dict
    old: Optional[dict]
    synthetic: bool = False


def obj_key(obj: Mapping) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def _uid(obj: Optional[Mapping]) -> Optional[str]:
    return ((obj or {}).get("metadata") or {}).get("uid")


def _rv(obj: Optional[Mapping]) -> Optional[str]:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


def _replaced(old: Optional[Mapping], new: Mapping) -> bool:
    """Same name but another object (deleted and recreated, e.g. a StatefulSet pod)."""
    return old is not None and _uid(old) is not None and _uid(new) is not None and _uid(old) != _uid(new)


def event_changes(store: Mapping[Key, dict], etype: str, obj: dict) -> list[Change]:
    """The changes one watch event (ADDED/MODIFIED/DELETED) makes to `store`; no side effects.

    Normalised against what we hold: ADDED of a known object is a MODIFIED and vice versa; a
    DELETED of an object we never held is dropped (nobody was told it existed); an object whose
    name now belongs to a new uid is a DELETED of the old one followed by an ADDED.
    """
    key = obj_key(obj)
    old = store.get(key)
    if etype == DELETED:
        return [] if old is None else [Change(DELETED, key, obj, old)]
    if etype not in (ADDED, MODIFIED):
        raise ValueError(f"not an object event: {etype!r}")
    if old is None:
        return [Change(ADDED, key, obj, None)]
    if _replaced(old, obj):
        return [Change(DELETED, key, old, old, synthetic=True), Change(ADDED, key, obj, None)]
    return [Change(MODIFIED, key, obj, old)]


def relist_changes(store: Mapping[Key, dict], items: Iterable[dict]) -> list[Change]:
    """The changes that turn `store` into the listed `items`; no side effects.

    Deletions come first (objects gone during the gap, then objects whose name was reused),
    then additions and modifications, each sorted by key: a handler that indexes by pod IP
    purges the dead pod before it learns about a new pod that may have reused its IP.
    Unchanged objects (same resourceVersion) produce nothing.
    """
    new = {obj_key(o): o for o in items}
    deletes: list[Change] = []
    upserts: list[Change] = []
    for key in sorted(store.keys() - new.keys()):
        old = store[key]
        deletes.append(Change(DELETED, key, old, old, synthetic=True))
    for key in sorted(new):
        obj, old = new[key], store.get(key)
        if old is None:
            upserts.append(Change(ADDED, key, obj, None))
        elif _replaced(old, obj):
            deletes.append(Change(DELETED, key, old, old, synthetic=True))
            upserts.append(Change(ADDED, key, obj, None))
        elif _rv(old) != _rv(obj) or _rv(obj) is None:
            upserts.append(Change(MODIFIED, key, obj, old))
    return deletes + upserts


def apply_changes(store: MutableMapping[Key, dict], changes: Iterable[Change]) -> None:
    for ch in changes:
        if ch.type == DELETED:
            store.pop(ch.key, None)
        else:
            store[ch.key] = ch.obj


def next_resource_version(current: str, etype: str, obj: Any) -> str:
    """The resourceVersion to watch from after this event: the object's (BOOKMARK included)."""
    if etype == ERROR or not isinstance(obj, dict):
        return current
    return _rv(obj) or current


_IDENTITY = ("name", "namespace", "uid", "resourceVersion")


def shrink(obj: dict, transform: Optional[Callable[[dict], dict]]) -> dict:
    """`transform(obj)`, keeping the metadata the informer itself relies on."""
    if transform is None:
        return obj
    out = transform(obj)
    meta, kept = obj.get("metadata") or {}, out.setdefault("metadata", {})
    for k in _IDENTITY:
        if k in meta:
            kept.setdefault(k, meta[k])
    return out


class Gone(Exception):
    """410: the resourceVersion we asked for is no longer in the server's window; relist."""


def watch_error(status: Any) -> Exception:
    """The exception for an ERROR event's object (a metav1.Status): Gone for code 410."""
    status = status if isinstance(status, dict) else {}
    code = status.get("code")
    text = f"{status.get('reason') or 'Error'}: {status.get('message') or status}"
    if code == 410:
        return Gone(text)
    return ApiException(status=code or 0, reason=f"watch ERROR event: {text}")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter": attempt n (1-based) waits between half and all
    of min(maximum, initial * factor**(n-1)). Never below initial/2, never above maximum, and
    non-decreasing from one attempt to the next until the cap is reached."""

    initial: float = 0.2
    maximum: float = 30.0
    factor: float = 2.0

    def delay(self, attempt: int, rand: float) -> float:
        """Pure: `rand` in [0, 1)."""
        ceiling = min(self.maximum, self.initial * self.factor ** max(0, min(attempt - 1, 64)))
        return ceiling * (0.5 + 0.5 * rand)

    def __call__(self, attempt: int) -> float:
        return self.delay(attempt, random.random())


# --------------------------------------------------------------------------- the informer


def _describe(list_fn: Callable, namespace: Optional[str], label_selector: Optional[str],
              field_selector: Optional[str]) -> str:
    fn = getattr(list_fn, "func", list_fn)  # functools.partial
    name = getattr(fn, "__name__", type(fn).__name__)
    args = [a for a in getattr(list_fn, "args", ()) if isinstance(a, str)]
    if namespace:
        args.append(f"namespace={namespace}")
    if label_selector:
        args.append(f"labels={label_selector}")
    if field_selector:
        args.append(f"fields={field_selector}")
    return f"{name}({', '.join(args)})"


async def api_error(resp) -> ApiException:
    """An ApiException for a non-2xx response of a _preload_content=False call."""
    try:
        body = (await resp.read()).decode("utf-8", "replace")
    except Exception as e:  # noqa: BLE001 - the status code is what matters
        body = f"<body unreadable: {e!r}>"
    reason = getattr(resp, "reason", None) or ""
    try:
        st = json.loads(body)
        if isinstance(st, dict) and st.get("kind") == "Status":
            reason = f"{st.get('reason') or reason}: {st.get('message', '')}"
    except ValueError:
        pass
    exc = ApiException(status=resp.status, reason=reason)
    exc.body = body
    return exc


class Informer:
    """A cache of one resource type kept true by LIST + WATCH; see the module docstring.

    `list_fn` (normally built by `Kube.informer`) returns the unread response of a list or
    watch request; it is called with keyword arguments only: `namespace` (when given), the selectors, `limit`/`_continue` or
    `watch`/`resource_version`/`allow_watch_bookmarks`/`timeout_seconds`, and
    `_preload_content=False`/`_request_timeout`.

    Counters (plain ints, for metrics): `lists` (completed LISTs), `relists` (those after the
    first), `watches` (watch requests made), `watch_restarts` (those after the first),
    `events` (changes delivered to handlers, synthetic ones included), `synthetic_deletes`,
    `bookmarks`, `gone` (410s seen), `errors` (failed list/watch attempts), `handler_errors`.
    Also `resource_version`, `consecutive_failures`, `last_error`, `last_retry_delay`.
    """

    def __init__(
        self,
        list_fn: Callable[..., Awaitable[Any]],
        *,
        namespace: Optional[str] = None,
        label_selector: Optional[str] = None,
        field_selector: Optional[str] = None,
        handlers: Iterable[Handler] = (),
        watch_timeout: int = 240,
        page_size: int = 500,
        backoff: Optional[Callable[[int], float]] = None,
        min_watch_seconds: float = 1.0,
        connect_timeout: float = 10.0,
        list_timeout: float = 60.0,
        read_grace: float = 30.0,
        name: Optional[str] = None,
        transform: Optional[Callable[[dict], dict]] = None,
    ):
        self._list_fn = list_fn
        self.transform = transform
        self._query: dict[str, Any] = {}
        if namespace is not None:
            self._query["namespace"] = namespace
        if label_selector:
            self._query["label_selector"] = label_selector
        if field_selector:
            self._query["field_selector"] = field_selector
        self._handlers: list[Handler] = list(handlers)
        self.watch_timeout = int(watch_timeout)
        self.page_size = int(page_size)
        self.backoff = backoff or Backoff()
        self.min_watch_seconds = min_watch_seconds
        self.connect_timeout = connect_timeout
        self.list_timeout = list_timeout
        self.read_grace = read_grace
        self.name = name or _describe(list_fn, namespace, label_selector, field_selector)

        self._store: dict[Key, dict] = {}
        self.has_synced = asyncio.Event()
        self.resource_version = ""
        self.lists = self.relists = 0
        self.watches = self.watch_restarts = 0
        self.events = self.synthetic_deletes = self.bookmarks = 0
        self.gone = self.errors = self.handler_errors = 0
        self.consecutive_failures = 0
        self.last_error: Optional[BaseException] = None
        self.last_retry_delay = 0.0
        self._gone_in_a_row = 0
        self._task: Optional[asyncio.Task] = None
        self._stop_requested = False

    # -- the cache

    def items(self) -> list[dict]:
        return list(self._store.values())

    def get(self, namespace: Optional[str], name: str) -> Optional[dict]:
        return self._store.get((namespace or "", name))

    def __len__(self) -> int:
        return len(self._store)

    def add_handler(self, handler: Handler) -> None:
        """Register before run(): a handler added later does not get the objects already held."""
        self._handlers.append(handler)

    # -- lifecycle

    async def run(self) -> None:
        """List, watch, repeat until stop() (returns) or cancellation (raises CancelledError).
        One-shot: after stop(), run() returns at once."""
        if self._task is not None:
            raise RuntimeError(f"informer {self.name} is already running")
        if self._stop_requested:
            return
        self._task = asyncio.create_task(self._loop(), name=f"informer {self.name}")
        try:
            await self._task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not self._stop_requested or (me is not None and me.cancelling()):
                raise
        finally:
            self._task.cancel()
            self._task = None

    def stop(self) -> None:
        """Ask run() to return; in-flight requests and handler calls are cancelled."""
        self._stop_requested = True
        if self._task is not None:
            self._task.cancel()

    # -- the loop

    async def _loop(self) -> None:
        while True:
            if not self.resource_version:
                try:
                    await self._relist()
                except Exception as e:  # noqa: BLE001 - every failure is retried
                    await self._failed("list", e, "list again")
                    continue
            try:
                progressed, seconds = await self._watch()
            except Gone as e:
                self.gone += 1
                self._gone_in_a_row += 1
                log.info("informer %s: watch from resourceVersion %s expired (%s); relisting",
                         self.name, self.resource_version, e)
                self.resource_version = ""
                if self._gone_in_a_row > 1:  # 410 again right after a relist: do not spin
                    await self._failed("watch", e, "relist", count_error=False)
                continue
            except Exception as e:  # noqa: BLE001
                await self._failed("watch", e, f"watch again from resourceVersion {self.resource_version}")
                continue
            if not progressed and seconds < self.min_watch_seconds:  # do not hammer a server that hangs up
                await self._failed("watch", RuntimeError(f"watch closed after {seconds:.2f}s with no events"),
                                   f"watch again from resourceVersion {self.resource_version}")
            else:
                self._healthy()

    def _healthy(self) -> None:
        self.consecutive_failures = 0
        self._gone_in_a_row = 0

    async def _failed(self, what: str, e: BaseException, then: str, count_error: bool = True) -> None:
        if count_error:
            self.errors += 1
        self.last_error = e
        self.consecutive_failures += 1
        delay = self.last_retry_delay = float(self.backoff(self.consecutive_failures))
        detail = f"HTTP {e.status} {e.reason}" if isinstance(e, ApiException) else f"{type(e).__name__}: {e}"
        log.warning("informer %s: %s failed (%s); attempt %d, will %s in %.2fs",
                    self.name, what, detail, self.consecutive_failures, then, delay)
        await asyncio.sleep(delay)

    # -- LIST

    async def _relist(self) -> None:
        items, rv = await self._list()
        changes = relist_changes(self._store, items)
        first = self.lists == 0
        self.lists += 1
        if not first:
            self.relists += 1
        self.resource_version = rv
        gone = sum(1 for c in changes if c.type == DELETED)
        if first:
            log.info("informer %s: listed %d objects at resourceVersion %s", self.name, len(items), rv)
        else:
            log.info("informer %s: relisted %d objects at resourceVersion %s: %d changes (%d deletions)",
                     self.name, len(items), rv, len(changes), gone)
        await self._deliver_all(changes)
        if not self.has_synced.is_set():
            self.has_synced.set()

    async def _list(self) -> tuple[list[dict], str]:
        items: list[dict] = []
        cont: Optional[str] = None
        rv = ""
        restarted = False
        while True:
            kw = dict(self._query, limit=self.page_size, _preload_content=False,
                      _request_timeout=aiohttp.ClientTimeout(total=self.list_timeout,
                                                             sock_connect=self.connect_timeout))
            if cont:
                kw["_continue"] = cont
            try:
                body = await self._get_json(**kw)
            except ApiException as e:
                if e.status == 410 and cont and not restarted:
                    # the continue token expired between pages: start over from the current state
                    log.info("informer %s: list continue token expired; listing again", self.name)
                    items, cont, restarted = [], None, True
                    continue
                raise
            kind = body.get("kind") or ""
            item_kind = kind[:-4] if kind.endswith("List") else ""
            api_version = body.get("apiVersion")
            for it in body.get("items") or []:
                if item_kind:  # list items lack kind/apiVersion; watch objects have them
                    it.setdefault("kind", item_kind)
                    if api_version:
                        it.setdefault("apiVersion", api_version)
                items.append(shrink(it, self.transform))
            meta = body.get("metadata") or {}
            rv = meta.get("resourceVersion") or rv
            cont = meta.get("continue")
            if not cont:
                if not rv:
                    raise ValueError("list response carries no metadata.resourceVersion")
                return items, rv

    async def _get_json(self, **kw) -> dict:
        resp = await self._list_fn(**kw)
        try:
            if not 200 <= resp.status < 300:
                raise await api_error(resp)
            body = json.loads(await resp.read())
        finally:
            resp.release()
        if not isinstance(body, dict):
            raise ValueError(f"list response is not an object: {type(body).__name__}")
        return body

    # -- WATCH

    async def _watch(self) -> tuple[bool, float]:
        """One watch request until the server ends it; returns (delivered anything, seconds)."""
        kw = dict(self._query, watch=True, resource_version=self.resource_version,
                  allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout,
                  _preload_content=False,
                  _request_timeout=aiohttp.ClientTimeout(
                      total=None, sock_connect=self.connect_timeout,
                      sock_read=self.watch_timeout + self.read_grace))
        if self.watches:
            self.watch_restarts += 1
        self.watches += 1
        t0 = time.monotonic()
        progressed = False
        log.debug("informer %s: watching from resourceVersion %s", self.name, self.resource_version)
        resp = await self._list_fn(**kw)
        try:
            if not 200 <= resp.status < 300:
                err = await api_error(resp)
                raise Gone(f"HTTP 410 {err.reason}") if err.status == 410 else err
            buf = bytearray()
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                buf += chunk
                start = 0
                while (nl := buf.find(b"\n", start)) >= 0:
                    line = bytes(buf[start:nl])
                    start = nl + 1
                    if line.strip():
                        await self._on_line(line)
                        progressed = True
                del buf[:start]
            if buf.strip():
                log.warning("informer %s: watch stream ended inside an event (%d bytes dropped)",
                            self.name, len(buf))
        finally:
            resp.close()
        return progressed, time.monotonic() - t0

    async def _on_line(self, line: bytes) -> None:
        ev = json.loads(line)
        etype, obj = ev.get("type"), ev.get("object")
        if etype == ERROR:
            raise watch_error(obj)
        self._healthy()  # the server is answering with our resourceVersion
        if etype == BOOKMARK:
            self.bookmarks += 1
            self.resource_version = next_resource_version(self.resource_version, etype, obj)
            return
        if etype not in (ADDED, MODIFIED, DELETED) or not isinstance(obj, dict):
            log.warning("informer %s: ignoring unexpected watch event %r", self.name, etype)
            return
        changes = event_changes(self._store, etype, shrink(obj, self.transform))
        self.resource_version = next_resource_version(self.resource_version, etype, obj)
        await self._deliver_all(changes)

    # -- delivery

    async def _deliver_all(self, changes: list[Change]) -> None:
        for ch in changes:
            apply_changes(self._store, (ch,))
            self.events += 1
            if ch.synthetic:
                self.synthetic_deletes += 1
            for handler in self._handlers:
                try:
                    result = handler(ch.type, ch.obj, ch.old)
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.handler_errors += 1
                    ns, name = ch.key
                    log.exception("informer %s: handler %s failed on %s %s/%s (continuing)",
                                  self.name, getattr(handler, "__qualname__", handler), ch.type, ns, name)
