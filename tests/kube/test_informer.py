"""kvmesh.kube.informer: the pure state transitions, and the informer against the real
local API server (the `devcluster` fixture; KWOK runs the pods).

The 410 path is driven by wrapping the list function so that one watch request answers
"410 Expired" (the local watch cache never expires a resourceVersion within a test's lifetime);
everything else (lists with real continue tokens, watch events, bookmarks, an outage through a
TCP proxy that is stopped and restarted) is the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import pytest
from kubernetes_asyncio import client

from kvmesh.kube import connect as kube
from kvmesh.kube import informer as I
from kvmesh.kube.informer import ADDED, BOOKMARK, DELETED, MODIFIED, Backoff, Change, Informer
from support import free_port

# --------------------------------------------------------------------------- helpers


def mk(name: str, rv: str, uid: str | None = None, ns: str = "ns", **labels) -> dict:
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}",
                         "resourceVersion": rv, "labels": labels}}


def pod(name: str, **labels) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {"app": "vllm"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]}}


async def wait_until(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class Recorder:
    """A handler that records (type, name, obj, old) and checks the old/new chain per object:
    every delivery's `old` is the very dict delivered before for that object."""

    def __init__(self, informer: Informer | None = None):
        self.events: list[tuple[str, str, dict, dict | None]] = []
        self.synced_at_call: list[bool] = []
        self.rv_at_call: list[str] = []  # the informer's resourceVersion while delivering
        self.problems: list[str] = []  # an assert in a handler would only be logged by the informer
        self._last: dict[tuple[str, str], dict] = {}
        self.informer = informer

    async def __call__(self, etype: str, obj: dict, old: dict | None) -> None:
        key = I.obj_key(obj)
        if old is not self._last.get(key):
            self.problems.append(f"{etype} {key}: old is not the previous delivery")
        if self.informer is not None:  # the store already holds the new state
            if self.informer.get(*key) is not (None if etype == DELETED else obj):
                self.problems.append(f"{etype} {key}: store not updated before the handler")
            self.synced_at_call.append(self.informer.has_synced.is_set())
            self.rv_at_call.append(self.informer.resource_version)
        if etype == DELETED:
            self._last.pop(key, None)
        else:
            self._last[key] = obj
        self.events.append((etype, obj["metadata"]["name"], obj, old))

    def of(self, name: str) -> list[tuple[str, dict, dict | None]]:
        return [(t, o, old) for t, n, o, old in self.events if n == name]

    def has(self, etype: str, name: str) -> bool:
        return any(t == etype and n == name for t, n, _, _ in self.events)


class Tap:
    """Wraps a list function: records each call's kwargs; `inject` holds coroutine functions
    that answer the next watch requests instead of the server."""

    def __init__(self, fn):
        self.fn, self.calls, self.inject = fn, [], []

    async def __call__(self, **kw):
        self.calls.append(kw)
        if kw.get("watch") and self.inject:
            return await self.inject.pop(0)(kw)
        return await self.fn(**kw)

    @property
    def watch_calls(self) -> list[dict]:
        return [c for c in self.calls if c.get("watch")]


class FakeContent:
    def __init__(self, data: bytes, chunk: int = 7):
        self._chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]

    async def readany(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


class FakeResponse:
    """The slice of aiohttp.ClientResponse the informer uses; the body is fed in 7-byte chunks."""

    def __init__(self, status: int = 200, data: bytes = b""):
        self.status, self.reason, self._data = status, "Fake", data
        self.content = FakeContent(data)

    @classmethod
    def events(cls, *events: dict) -> "FakeResponse":
        return cls(200, b"".join(json.dumps(e).encode() + b"\n" for e in events))

    @classmethod
    def json(cls, body: dict, status: int = 200) -> "FakeResponse":
        return cls(status, json.dumps(body).encode())

    async def read(self) -> bytes:
        return self._data

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


EXPIRED = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410,
           "message": "too old resource version: 1 (263)"}


class Recording(Backoff):
    """Backoff that also records the delays it hands out."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        object.__setattr__(self, "delays", [])

    def __call__(self, attempt: int) -> float:
        d = super().__call__(attempt)
        self.delays.append(d)
        return d


@contextlib.asynccontextmanager
async def running(inf: Informer, sync_timeout: float = 10.0):
    task = asyncio.create_task(inf.run())
    try:
        await asyncio.wait_for(inf.has_synced.wait(), sync_timeout)
        yield task
    finally:
        inf.stop()
        await asyncio.wait_for(task, 5)


# --------------------------------------------------------------------------- pure transitions


def test_event_changes_normalises_against_the_store():
    a1, a2 = mk("a", "1"), mk("a", "2")
    store: dict = {}
    assert I.event_changes(store, ADDED, a1) == [Change(ADDED, ("ns", "a"), a1, None)]
    assert I.event_changes(store, MODIFIED, a1) == [Change(ADDED, ("ns", "a"), a1, None)]
    assert I.event_changes(store, DELETED, a1) == []  # never told anyone it existed
    store[("ns", "a")] = a1
    assert I.event_changes(store, ADDED, a2) == [Change(MODIFIED, ("ns", "a"), a2, a1)]
    assert I.event_changes(store, MODIFIED, a2) == [Change(MODIFIED, ("ns", "a"), a2, a1)]
    final = mk("a", "3")
    assert I.event_changes(store, DELETED, final) == [Change(DELETED, ("ns", "a"), final, a1)]
    reborn = mk("a", "4", uid="other")  # same name, new object (e.g. a StatefulSet pod)
    assert I.event_changes(store, MODIFIED, reborn) == [
        Change(DELETED, ("ns", "a"), a1, a1, synthetic=True), Change(ADDED, ("ns", "a"), reborn, None)]
    with pytest.raises(ValueError):
        I.event_changes(store, BOOKMARK, a2)
    assert store == {("ns", "a"): a1}  # pure


def test_relist_diff_emits_synthetic_deletes_first():
    gone, same, changed, reused = mk("gone", "1"), mk("same", "2"), mk("changed", "3"), mk("reused", "4")
    store = {I.obj_key(o): o for o in (gone, same, changed, reused)}
    changed2, reused2, new = mk("changed", "9"), mk("reused", "10", uid="new-uid"), mk("new", "11")
    items = [mk("same", "2"), changed2, reused2, new]
    changes = I.relist_changes(store, items)
    assert [(c.type, c.key[1], c.synthetic) for c in changes] == [
        (DELETED, "gone", True), (DELETED, "reused", True),
        (MODIFIED, "changed", False), (ADDED, "new", False), (ADDED, "reused", False)]
    d = changes[0]
    assert d.obj is gone and d.old is gone  # the last state we knew
    assert changes[2].old is changed and changes[2].obj is changed2
    I.apply_changes(store, changes)
    assert store == {I.obj_key(o): o for o in items}
    assert I.relist_changes(store, items) == []  # nothing changed, nothing delivered


def test_resource_version_advances_on_every_event_including_bookmarks():
    assert I.next_resource_version("5", BOOKMARK, {"kind": "Pod", "metadata": {"resourceVersion": "9"}}) == "9"
    assert I.next_resource_version("5", MODIFIED, mk("a", "7")) == "7"
    assert I.next_resource_version("5", DELETED, mk("a", "8")) == "8"
    assert I.next_resource_version("5", "ERROR", EXPIRED) == "5"
    assert I.next_resource_version("5", BOOKMARK, {"metadata": {}}) == "5"


def test_watch_error_classifies_410():
    assert isinstance(I.watch_error(EXPIRED), I.Gone)
    assert isinstance(I.watch_error({**EXPIRED, "reason": "Gone"}), I.Gone)
    e = I.watch_error({"kind": "Status", "code": 500, "reason": "InternalError", "message": "etcd down"})
    assert isinstance(e, client.ApiException) and e.status == 500 and "etcd down" in e.reason


def test_backoff_grows_with_jitter_and_is_bounded():
    b = Backoff(initial=0.2, maximum=30.0)
    assert b.delay(1, 0.0) == pytest.approx(0.1) and b.delay(1, 0.999) < 0.2
    for n in range(1, 40):  # worst jitter of attempt n+1 >= best jitter of attempt n
        assert b.delay(n + 1, 0.0) >= b.delay(n, 0.999) or b.delay(n + 1, 0.0) >= 15.0
        assert 0.1 <= b(n) <= 30.0
    assert b.delay(10_000, 0.999) <= 30.0


# --------------------------------------------------------------------------- the loop, offline


class FakeApi:
    """A list function that lists one pod at RV 10 and answers watches from a script."""

    def __init__(self, *watch_script):
        self.script, self.calls = list(watch_script), []

    async def __call__(self, **kw):
        self.calls.append(kw)
        if not kw.get("watch"):
            return FakeResponse.json({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "10"},
                                      "items": [{"metadata": {"name": "a", "namespace": "ns", "uid": "u",
                                                              "resourceVersion": "10"}}]})
        if self.script:
            return self.script.pop(0)
        await asyncio.Event().wait()  # a quiet watch

    def watch_rvs(self) -> list[str]:
        return [c["resource_version"] for c in self.calls if c.get("watch")]


async def test_error_event_backs_off_and_rewatches_from_same_rv_without_relist():
    api = FakeApi(
        FakeResponse.events({"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError",
                                                         "message": "boom"}}),
        FakeResponse.events({"type": "ADDED", "object": mk("b", "11")},
                            {"type": BOOKMARK, "object": {"kind": "Pod", "metadata": {"resourceVersion": "15"}}}),
    )
    inf = Informer(api, backoff=Backoff(0.01, 0.05), min_watch_seconds=0)
    rec = Recorder(inf)
    inf.add_handler(rec)
    async with running(inf):
        assert rec.events[0][:2] == (ADDED, "a") and rec.events[0][2]["kind"] == "Pod"  # kind filled in
        await wait_until(lambda: len(api.watch_rvs()) == 3, 5, "third watch")
    assert api.watch_rvs() == ["10", "10", "15"]
    assert (inf.errors, inf.lists, inf.relists, inf.bookmarks, inf.resource_version) == (1, 1, 0, 1, "15")
    assert [e[:2] for e in rec.events] == [(ADDED, "a"), (ADDED, "b")] and rec.problems == []
    assert inf.consecutive_failures == 0 and inf.watch_restarts == 2


async def test_repeated_410_relists_but_does_not_spin():
    api = FakeApi(FakeResponse.json(EXPIRED, status=410), FakeResponse.events({"type": "ERROR", "object": EXPIRED}))
    inf = Informer(api, backoff=Recording(0.01, 0.05))
    async with running(inf):
        await wait_until(lambda: len(api.watch_rvs()) == 3, 5, "third watch")
    assert (inf.gone, inf.relists, inf.errors) == (2, 2, 0)
    assert len(inf.backoff.delays) == 1  # the first 410 relists at once, the second waits


# --------------------------------------------------------------------------- against the API server


@pytest.fixture
async def pods(devcluster):
    """The pod list/watch request of Kube.informer, against the API server."""
    api = await kube.api_client(devcluster.kubeconfig)
    yield api.lister("v1", "Pod")
    await close(api)


async def close(api) -> None:
    await api.close()
    # A watch the informer closed on stop() finishes its TLS close_notify asynchronously; let it
    # before pytest-asyncio closes this test's loop (else: "unclosed transport" ResourceWarning).
    await asyncio.sleep(0.1)


def kapi(devcluster, method: str, path: str, body: dict | None = None, **kw):
    return asyncio.to_thread(devcluster.api, method, path, body, **kw)


async def create(devcluster, ns: str, name: str, **labels) -> dict:
    return await kapi(devcluster, "POST", f"/api/v1/namespaces/{ns}/pods", pod(name, **labels))


async def delete(devcluster, ns: str, name: str, grace: int | None = None) -> None:
    q = "" if grace is None else f"?gracePeriodSeconds={grace}"
    await kapi(devcluster, "DELETE", f"/api/v1/namespaces/{ns}/pods/{name}{q}")


async def relabel(devcluster, ns: str, name: str, **labels) -> dict:
    return await kapi(devcluster, "PATCH", f"/api/v1/namespaces/{ns}/pods/{name}", {"metadata": {"labels": labels}},
                      content_type="application/merge-patch+json")


async def server_state(devcluster, ns: str) -> dict[str, str]:
    body = await kapi(devcluster, "GET", f"/api/v1/namespaces/{ns}/pods")
    return {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in body["items"]}


def cache_state(inf: Informer) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in inf.items()}


async def test_list_then_watch_delivers_adds_updates_deletes(devcluster, namespace, pods):
    for i in range(3):
        await create(devcluster, namespace, f"p{i}")
    tap = Tap(pods)
    inf = Informer(tap, namespace=namespace, page_size=1, watch_timeout=30)
    rec = Recorder(inf)
    inf.add_handler(rec)
    async with running(inf) as task:
        # the initial list, paginated for real, is delivered as ADDED before has_synced (KWOK
        # may still be making the new pods Running: the watch then adds MODIFIEDs after it)
        initial = [e for e, synced in zip(rec.events, rec.synced_at_call) if not synced]
        assert sorted(n for t, n, _, _ in initial) == ["p0", "p1", "p2"]
        assert all(t == ADDED for t, *_ in initial) and rec.synced_at_call[:3] == [False] * 3
        assert all(t == MODIFIED for t, *_ in rec.events[3:]), rec.events[3:]
        lists = [c for c in tap.calls if not c.get("watch")]
        assert len(lists) >= 3 and lists[0]["limit"] == 1 and lists[1].get("_continue")
        assert inf.items()[0]["kind"] == "Pod"
        list_rv = inf.resource_version

        await create(devcluster, namespace, "p3")  # KWOK schedules it and makes it Running with an IP
        ip = await wait_until(lambda: ((inf.get(namespace, "p3") or {}).get("status") or {}).get("podIP"),
                              10, "p3 running")
        assert ip.startswith("127.64.")
        p3 = rec.of("p3")
        assert p3[0][0] == ADDED and p3[0][2] is None and all(t == MODIFIED for t, _, _ in p3[1:])
        assert p3[-1][2]["status"].get("podIP") != ip  # old lacks the IP the new one has

        await relabel(devcluster, namespace, "p0", app="vllm", role="decode")
        await wait_until(lambda: rec.has(MODIFIED, "p0") and rec.of("p0")[-1][1]["metadata"]["labels"].get("role"),
                         5, "p0 relabelled")
        t, new, old = rec.of("p0")[-1]
        assert new["metadata"]["labels"]["role"] == "decode" and "role" not in old["metadata"]["labels"]

        await delete(devcluster, namespace, "p1")  # graceful: KWOK finishes it
        await wait_until(lambda: rec.has(DELETED, "p1"), 10, "p1 DELETED")
        t, final, old = rec.of("p1")[-1]
        assert final is not old and final["metadata"]["name"] == "p1" and inf.get(namespace, "p1") is None
        want = await server_state(devcluster, namespace)
        await wait_until(lambda: cache_state(inf) == want, 5, "cache == server")
        assert not task.done()
    assert all(c["allow_watch_bookmarks"] and c["timeout_seconds"] == 30 for c in tap.watch_calls)
    assert tap.watch_calls[0]["resource_version"] == list_rv
    assert rec.problems == []
    assert (inf.relists, inf.gone, inf.synthetic_deletes, inf.handler_errors) == (0, 0, 0, 0)


@pytest.mark.parametrize("how", ["error-event", "http-410"])
async def test_410_relists_and_delivers_the_gap(devcluster, namespace, pods, how):
    for name in ("a", "b"):
        await create(devcluster, namespace, name)
    gate = asyncio.Event()

    async def expired(kw):
        await gate.wait()
        if how == "error-event":
            return FakeResponse.events({"type": "ERROR", "object": EXPIRED})
        return FakeResponse.json(EXPIRED, status=410)

    tap = Tap(pods)
    tap.inject.append(expired)
    inf = Informer(tap, namespace=namespace, watch_timeout=30)
    rec = Recorder(inf)
    inf.add_handler(rec)
    async with running(inf):
        known_a = inf.get(namespace, "a")
        # the gap: the informer is not watching while these happen
        await delete(devcluster, namespace, "a", grace=0)
        await relabel(devcluster, namespace, "b", app="vllm", gap="yes")
        await create(devcluster, namespace, "c")
        gate.set()
        await wait_until(lambda: inf.relists == 1 and rec.has(ADDED, "c"), 5, "relist")
        t, obj, old = rec.of("a")[-1]
        assert t == DELETED and obj is old and old is known_a  # synthetic: the last state we knew
        assert any(t == MODIFIED and o["metadata"]["labels"].get("gap") == "yes" and "gap" not in old["metadata"]["labels"]
                   for t, o, old in rec.of("b"))
        assert inf.gone == 1 and inf.synthetic_deletes == 1 and inf.get(namespace, "a") is None
        relist_rv = rec.rv_at_call[[n for _, n, _, _ in rec.events].index("c")]  # c came with the relist
        await wait_until(lambda: len(tap.watch_calls) >= 2, 5, "watch after relist")
        assert tap.watch_calls[1]["resource_version"] == relist_rv

        await delete(devcluster, namespace, "b", grace=0)  # the watch works again after the relist
        await wait_until(lambda: rec.has(DELETED, "b"), 5, "b DELETED")
        t, final, old = rec.of("b")[-1]
        assert final is not old
        want = await server_state(devcluster, namespace)
        await wait_until(lambda: cache_state(inf) == want, 5, "cache == server")
    assert inf.synthetic_deletes == 1 and inf.errors == 0 and inf.handler_errors == 0 and rec.problems == []


async def test_bookmarks_advance_resource_version(devcluster, namespace, pods):
    tap = Tap(pods)
    inf = Informer(tap, namespace=namespace, label_selector="app=watched", watch_timeout=3)
    rec = Recorder(inf)
    inf.add_handler(rec)
    async with running(inf):
        rv0 = inf.resource_version
        other = await create(devcluster, namespace, "other", app="other")  # not ours: no event, RV moves
        other_rv = int(other["metadata"]["resourceVersion"])
        await wait_until(lambda: inf.bookmarks >= 1, 6, "a BOOKMARK")
        assert int(inf.resource_version) >= other_rv > int(rv0)
        await wait_until(lambda: len(tap.watch_calls) >= 2, 6, "the server to end the watch")
    first, second = tap.watch_calls[:2]
    assert first["allow_watch_bookmarks"] is True and first["resource_version"] == rv0
    assert first["label_selector"] == "app=watched" and first["timeout_seconds"] == 3
    assert int(second["resource_version"]) >= other_rv  # re-watch from the bookmark
    assert rec.events == [] and inf.relists == 0 and inf.errors == 0


async def test_handler_exception_does_not_stop_delivery(devcluster, namespace, pods, caplog):
    await create(devcluster, namespace, "x")
    calls = []

    async def broken(etype, obj, old):
        calls.append(etype)
        raise RuntimeError("handler bug")

    inf = Informer(pods, namespace=namespace, watch_timeout=30)
    rec = Recorder(inf)
    inf.add_handler(broken)
    inf.add_handler(rec)
    with caplog.at_level(logging.ERROR, logger="kvmesh.informer"):
        async with running(inf) as task:
            await create(devcluster, namespace, "y")
            await wait_until(lambda: rec.has(ADDED, "y"), 5, "y ADDED")
            await delete(devcluster, namespace, "x", grace=0)
            await wait_until(lambda: rec.has(DELETED, "x"), 5, "x DELETED")
            assert not task.done()
    assert inf.handler_errors == len(calls) == len(rec.events) == inf.events >= 3
    assert rec.problems == []
    assert "handler" in caplog.text and "handler bug" in caplog.text


# --------------------------------------------------------------------------- an outage


class TcpProxy:
    """127.0.0.1:port -> the API server, byte for byte (TLS passes through). stop() closes the
    listener and resets every connection; start() listens again on the same port."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.AbstractServer | None = None
        self._transports: set = set()
        self._tasks: set = set()
        self._stopped = True

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._stopped = False

    async def stop(self) -> None:
        self._stopped = True
        self._server.close()
        for t in list(self._transports):
            t.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._transports.clear()

    async def _handle(self, reader, writer) -> None:
        task = asyncio.current_task()
        if self._stopped:  # accepted just before stop()
            writer.transport.abort()
            return
        self._tasks.add(task)
        self._transports.add(writer.transport)
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        if self._stopped:
            up_w.transport.abort()
            writer.transport.abort()
            self._tasks.discard(task)
            return
        self._transports.add(up_w.transport)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        finally:
            self._transports.discard(writer.transport)
            self._transports.discard(up_w.transport)
            self._tasks.discard(task)


async def test_outage_backs_off_and_recovers(devcluster, namespace, caplog):
    host, port = devcluster.server.removeprefix("https://").rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    api = await kube.api_client(devcluster.kubeconfig)
    api.api.configuration.host = proxy.url
    try:
        for name in ("a", "b"):
            await create(devcluster, namespace, name)
        backoff = Recording(initial=0.05, maximum=0.4)
        inf = Informer(api.lister("v1", "Pod"), namespace=namespace, watch_timeout=30,
                       backoff=backoff)
        rec = Recorder(inf)
        inf.add_handler(rec)
        with caplog.at_level(logging.WARNING, logger="kvmesh.informer"):
            async with running(inf) as task:
                await proxy.stop()  # the API server is unreachable from here on
                await wait_until(lambda: inf.errors >= 2, 5, "watch failures")
                await delete(devcluster, namespace, "a", grace=0)  # happens during the outage
                await create(devcluster, namespace, "c")
                await wait_until(lambda: len(backoff.delays) >= 5, 5, "retries")
                d = backoff.delays
                assert d[0] <= d[1] <= d[2] <= d[3] and max(d) <= 0.4 and d[0] >= 0.025
                assert not task.done() and inf.consecutive_failures >= 5 and inf.get(namespace, "a")

                await proxy.start()  # back
                await wait_until(lambda: rec.has(DELETED, "a") and rec.has(ADDED, "c"), 5, "catch-up")
                want = await server_state(devcluster, namespace)
                await wait_until(lambda: cache_state(inf) == want, 5, "cache == server")
                await wait_until(lambda: inf.consecutive_failures == 0, 5, "healthy")
        # caught up by re-watching from the last resourceVersion (the server still had it)
        assert inf.relists == 0 and inf.gone == 0 and inf.handler_errors == 0 and rec.problems == []
        assert f"informer {inf.name}: watch failed" in caplog.text and "will watch again from resourceVersion" in caplog.text
    finally:
        await close(api)
        await proxy.stop()


async def test_transform_shrinks_listed_and_watched_objects_keeping_identity(
        devcluster, namespace, pods):
    await create(devcluster, namespace, "t0")
    seen = []

    def only_ip(obj):
        seen.append(obj["metadata"]["name"])
        return {"status": {"podIP": (obj.get("status") or {}).get("podIP")}}
    inf = Informer(pods, namespace=namespace, watch_timeout=30, transform=only_ip)
    rec = Recorder(inf)
    inf.add_handler(rec)
    async with running(inf):
        await create(devcluster, namespace, "t1")
        await wait_until(lambda: ((inf.get(namespace, "t1") or {}).get("status") or {})
                         .get("podIP"), 10, "t1 running, seen through the watch")
        await delete(devcluster, namespace, "t0", grace=0)
        await wait_until(lambda: rec.has(DELETED, "t0"), 10, "t0 DELETED")
        for obj in inf.items():
            assert set(obj) == {"metadata", "status"} and set(obj["status"]) == {"podIP"}
            assert set(obj["metadata"]) == {"name", "namespace", "uid", "resourceVersion"}
        assert {"t0", "t1"} <= set(seen) and rec.problems == []
        want = await server_state(devcluster, namespace)
        await wait_until(lambda: cache_state(inf) == want, 5, "cache == server")
