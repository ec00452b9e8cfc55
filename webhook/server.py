"""The webhook's HTTPS edge: aiohttp, TLS with hot reload, probes, Prometheus metrics.

All decisions happen in admission.review (pure); this module only moves bytes, measures and
logs. It never answers 500: a request it cannot understand gets a 4xx naming the problem, and
an internal error admits the pod un-injected with a warning (and counts it), so a kvmesh bug
can never block a workload.

Two listeners: the admission port (TLS, POST /mutate only: what the API server calls, and the
only port the NetworkPolicy admits) and the ops port (plain HTTP: /healthz, /readyz, /metrics
for the kubelet and Prometheus). Anyone who can reach the admission port can send anything,
so every request and connection is bounded (Limits): body size, no decompression, a
handshake/header/body/idle timeout per connection, a cap on open connections below the
open-file limit, AEAD-only TLS. Bad input is counted and logged once per class per minute.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import ctypes.util
import logging
import os
import resource
import signal
import ssl
import sys
import time
from asyncio import sslproto
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Union

import aiohttp
import aiohttp.http_exceptions
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvmesh.runtime import exit_watchdog, watch_loop_lag
from kvmesh.webhook import admission, heavy
from kvmesh.core.policy import PolicyDefaults

log = logging.getLogger("kvmesh.webhook")

MAX_BODY = 3 * 1024 * 1024  # etcd caps objects at 1.5 MiB; an AdmissionReview holds one
# TLS 1.2 offers only ECDHE with AEAD ciphers (no CBC, no static RSA); TLS 1.3 suites are all
# AEAD. The API server (Go) and every supported kubelet speak these.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True)
class Limits:
    """Per-connection and per-request bounds of the admission port (README "Webhook")."""

    max_body: int = MAX_BODY
    handshake_timeout: float = 5.0
    # From accept (first request) or the first byte of a later request until its head is in.
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    # Longer than the API server's idle timeout (90 s), so the client closes an idle
    # connection first and never sends a review on one the webhook is closing.
    idle_timeout: float = 120.0
    # Open connections (handshakes included). The API server needs a few dozen; the real
    # bound is memory (~60 KiB each) and the open-file limit, which the cap stays below.
    max_connections: int = 1000
    # SIGTERM to exit, whatever the API server or the clients do meanwhile.
    shutdown_timeout: float = 10.0
    # Bodies above this are read under one of `heavy_slots` and decided in a worker process
    # (webhook.heavy), one at a time: the event loop keeps answering ordinary pods (a few KiB)
    # meanwhile, and at most that many large bodies are in memory. Ordinary pods are far
    # smaller.
    heavy_body: int = 64 * 1024
    heavy_slots: int = 2
    # A worker that takes longer is stuck (a large review takes tens of ms) and is replaced;
    # generous, since a replaced worker's first answer waits for Python to start.
    worker_timeout: float = 10.0
    # JSON objects and arrays in one body (counted as '{' and '[' bytes, strings included:
    # an overestimate). Parsing holds the GIL for the whole body, ~0.3 us per node warm and
    # far more cold, so this bounds what a large review can take from the loop. The largest
    # real pod in tests/golden holds 210.
    max_json_nodes: int = 10_000


# The ops port (probes, /metrics): GETs only, a few clients (the kubelet, Prometheus). Capped and
# timed out like the admission port, so it cannot take the file descriptors or memory that
# admission needs.
OPS_LIMITS = Limits(max_body=1024, header_timeout=10.0, body_timeout=10.0, idle_timeout=30.0,
                    max_connections=64)
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvmesh_webhook_requests_total",
                                "Admission requests by outcome", ["outcome"], registry=r)
        self.injections = Counter("kvmesh_webhook_injections_total",
                                  "Pods injected, by mode", ["mode"], registry=r)
        self.skips = Counter("kvmesh_webhook_skips_total", "Pods admitted without injection, "
                             "by reason", ["reason"], registry=r)
        self.denials = Counter("kvmesh_webhook_denials_total", "Pods denied, by reason",
                               ["reason"], registry=r)
        self.errors = Counter("kvmesh_webhook_errors_total", "Requests kvmesh could not "
                              "process (bad_request: the caller's fault; internal: kvmesh's)",
                              ["kind"], registry=r)
        self.latency = Histogram("kvmesh_webhook_request_duration_seconds",
                                 "Time to answer /mutate", buckets=LATENCY_BUCKETS, registry=r)
        self.cert_reloads = Counter("kvmesh_webhook_cert_reloads_total",
                                    "Serving certificate reloads", ["result"], registry=r)
        self.cert_expiry = Gauge("kvmesh_webhook_cert_expiry_timestamp_seconds",
                                 "notAfter of the serving certificate (unix time)", registry=r)
        self.connections = Gauge("kvmesh_webhook_connections",
                                 "Open connections on the admission port", registry=r)
        self.connections_closed = Counter(
            "kvmesh_webhook_connections_closed_total", "Connections the webhook closed or "
            "refused, by reason (over-capacity, header-timeout, idle-timeout, "
            "request-timeout)", ["reason"], registry=r)
        self.bad_input = Counter("kvmesh_webhook_bad_input_total", "Requests refused before "
                                 "admission, by class", ["kind"], registry=r)
        self.loop_lag = Histogram("kvmesh_webhook_event_loop_lag_seconds",
                                  "How late the event loop ran a 50 ms timer (a stall delays "
                                  "every admission)", buckets=LATENCY_BUCKETS + (5.0,),
                                  registry=r)
        self.loop_lag_max = Gauge("kvmesh_webhook_event_loop_lag_max_seconds",
                                  "Worst event-loop lag since start", registry=r)
        self._children: dict[tuple[int, str], object] = {}

    def _child(self, family, label: str):
        # labels() takes a lock and builds a key on every call; the label sets are small and
        # fixed (actions, modes, reason codes), so resolve each child once.
        key = (id(family), label)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = family.labels(label)
        return c

    def count(self, out: admission.Outcome) -> None:
        self._child(self.requests, out.action).inc()
        if out.action == "inject":
            self._child(self.injections, out.mode or "").inc()
        elif out.action == "skip":
            self._child(self.skips, out.reason).inc()
        elif out.action == "deny":
            self._child(self.denials, out.reason).inc()


class _MemoCollector:
    """Decision-memo counters read at scrape time (nothing added to the request path)."""

    def __init__(self, memo: admission.Memo):
        self.memo = memo

    def collect(self):
        c = CounterMetricFamily("kvmesh_webhook_decision_memo",
                                "Admissions answered from the memo of identical pods (hit) or "
                                "decided anew (miss)", labels=["result"])
        c.add_metric(["hit"], self.memo.hits)
        c.add_metric(["miss"], self.memo.misses)
        yield c
        yield GaugeMetricFamily("kvmesh_webhook_decision_memo_entries",
                                "Answers held in the decision memo", value=len(self.memo))


def server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    # Client-initiated renegotiation costs the server a handshake per request: refuse it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


class CertReloader:
    """Serves from one SSLContext and reloads cert+key into it when the files change.

    New handshakes pick up the new pair; connections already open keep theirs, so no request
    is dropped. A half-written pair (cert and key not matching) is retried on the next tick
    and the old pair keeps serving meanwhile.
    """

    def __init__(self, cert: str, key: str, metrics: Metrics, interval: float = 1.0):
        self.cert, self.key, self.metrics, self.interval = cert, key, metrics, interval
        self.context = server_context()
        self._stamp: Optional[tuple] = None
        self._failed: Optional[tuple] = None  # a bad pair is reported once, not every tick
        self.loaded = False
        self.reload()

    def _file_stamp(self) -> tuple:
        out = []
        for p in (self.cert, self.key):
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def reload(self) -> bool:
        stamp = None
        try:
            stamp = self._file_stamp()
            if stamp in (self._stamp, self._failed):
                return False
            scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            scratch.load_cert_chain(self.cert, self.key)  # validates the pair first
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            self._failed = stamp
            self.metrics.cert_reloads.labels("error").inc()
            log.error("cannot load serving certificate %s / key %s: %s; %s", self.cert,
                      self.key, e, "keeping the previous pair" if self.loaded else
                      "the webhook is not ready until a valid pair exists")
            return False
        self._stamp = stamp
        self.loaded = True
        self.metrics.cert_reloads.labels("ok").inc()
        self._record_expiry()
        log.info("loaded serving certificate %s", self.cert)
        return True

    def _record_expiry(self) -> None:
        try:
            from cryptography import x509
            with open(self.cert, "rb") as f:
                leaf = x509.load_pem_x509_certificate(f.read())
            self.metrics.cert_expiry.set(leaf.not_valid_after_utc.timestamp())
        except Exception as e:  # only a metric; never fatal
            log.warning("cannot read the expiry of %s: %s", self.cert, e)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.reload()


class Limited:
    """One log line per class of event per `interval` seconds, with how many were folded in:
    hostile clients must not be able to fill the disk or hide other lines."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0):
        self.logger, self.interval = logger, interval
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}

    def log(self, level: int, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._folded[kind] = self._folded.get(kind, 0) + 1
            return
        self._last[kind] = now
        folded = self._folded.pop(kind, 0)
        if folded:
            msg += f" ({folded} more like this in the last {now - last:.0f} s not logged)"
        self.logger.log(level, msg, *args)


@dataclass
class State:
    policy: Union[PolicyDefaults, admission.Resolver]
    metrics: Metrics
    ready: Callable[[], bool]
    memo: admission.Memo
    limits: Limits = field(default_factory=Limits)
    limited: Limited = field(default_factory=lambda: Limited(log))
    edge: Optional["Edge"] = None  # the admission listener (absent in in-process tests)
    ops_edge: Optional["Edge"] = None  # the ops listener (probes, metrics)
    heavy: Optional[asyncio.Semaphore] = None
    pool: Optional[heavy.Pool] = None  # the process that decides large reviews
    policy_cache: Optional[Any] = None  # webhook.policy_cache.PolicyCache, when watching
    # webhook.seed_key.SeedKey (absent without an API server: no per-group seeds known)
    seeds: Optional[Any] = None
    native_sidecars: Optional[bool] = None  # the cluster's, from /version (mp mode needs them)


STATE = web.AppKey("state", State)
_LOG_LEVEL = {"deny": logging.INFO, "ignore": logging.WARNING}


def _state(policy: Union[PolicyDefaults, admission.Resolver], metrics: Optional[Metrics],
           ready: Callable[[], bool], limits: Limits) -> State:
    metrics = metrics or Metrics()
    state = State(policy, metrics, ready, admission.Memo(), limits)
    metrics.registry.register(_MemoCollector(state.memo))
    return state


def make_app(policy: Union[PolicyDefaults, admission.Resolver],
             metrics: Optional[Metrics] = None,
             ready: Callable[[], bool] = lambda: True,
             limits: Limits = Limits(), state: Optional[State] = None) -> web.Application:
    """The admission app: POST /mutate only (everything else is on the ops app)."""
    app = web.Application(client_max_size=limits.max_body, middlewares=[_track])
    app[STATE] = state or _state(policy, metrics, ready, limits)
    app.router.add_post("/mutate", _mutate)
    # Entries that select by namespace or policy call /mutate/<why>: the pod is opted in
    # without its own label.
    app.router.add_post("/mutate/{selected}", _mutate)
    return app


def make_ops_app(state: State) -> web.Application:
    """Probes and metrics, for the kubelet and Prometheus (plain HTTP, its own port)."""
    app = web.Application(client_max_size=OPS_LIMITS.max_body, middlewares=[_track])
    app[STATE] = state
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


def _json(obj: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _bad(state: State, status: int, kind: str, message: str, close: bool = False
         ) -> web.Response:
    """A 4xx naming the problem; counted by class, logged once per class per minute."""
    state.metrics.errors.labels("bad_request").inc()
    state.metrics.requests.labels("bad_request").inc()
    state.metrics._child(state.metrics.bad_input, kind).inc()
    state.limited.log(logging.WARNING, kind, "rejected /mutate request (%s): %s", kind, message)
    resp = _json({"error": message}, status=status)
    if close:  # the rest of the body is not read: do not keep the connection
        resp.force_close()
    return resp


def _show(value: Any, limit: int = 80) -> str:
    """A short description of untrusted JSON for error messages (no deep repr)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


async def _mutate(request: web.Request) -> web.Response:
    state: State = request.app[STATE]
    limits = state.limits
    t0 = time.perf_counter()
    try:
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            # Never decompressed (a few KiB can unpack to GiBs); the API server never
            # compresses admission requests.
            return _bad(state, 415, "content-encoding",
                        f"Content-Encoding {_show(encoding)} is not accepted; send the "
                        "AdmissionReview uncompressed", close=True)
        if request.content_type not in ("application/json", ""):
            return _bad(state, 415, "content-type", f"Content-Type must be application/json, "
                                                    f"not {_show(request.content_type)}",
                        close=True)
        if request.content_length is not None and request.content_length > limits.max_body:
            return _bad(state, 413, "too-large", f"body of {request.content_length} bytes is "
                                                 f"larger than {limits.max_body} bytes",
                        close=True)
        large = request.content_length is None or request.content_length > limits.heavy_body
        if not large:
            raw = await _read(state, request)
            if isinstance(raw, web.Response):
                return raw
            answer = _answer(state, heavy.decide_raw(
                raw, request.match_info.get("selected"), state.policy, state.memo,
                _seeds(state), limits.max_json_nodes, state.native_sidecars))
        else:
            if state.heavy is None:
                state.heavy = asyncio.Semaphore(limits.heavy_slots)
            try:
                await asyncio.wait_for(state.heavy.acquire(), limits.body_timeout)
            except asyncio.TimeoutError:
                return _bad(state, 429, "busy", f"{limits.heavy_slots} large reviews (over "
                                                f"{limits.heavy_body} bytes) already in "
                                                "progress; retry", close=True)
            try:
                raw = await _read(state, request)
                if isinstance(raw, web.Response):
                    return raw
                answer = await _decide_heavy(state, raw, request.match_info.get("selected"))
            finally:
                state.heavy.release()
        if isinstance(answer, web.Response):
            return answer
        resp, out = answer
        state.metrics.count(out)
        # Every decision is on the pod itself (kvmesh.dev/status) and in the metrics, so the
        # routine ones log at DEBUG: a line per admission at INFO costs a third of the
        # handler's time. Denials and misrouted requests are what an operator must see.
        level = _LOG_LEVEL.get(out.action, logging.DEBUG)
        if log.isEnabledFor(level):
            log.log(level, "uid=%s pod=%s/%s action=%s reason=%s mode=%s dry_run=%s ops=%d %s",
                    out.uid, out.namespace, out.name, out.action, out.reason, out.mode,
                    out.dry_run, out.patch_ops, out.message)
        return resp if isinstance(resp, web.Response) else _json(resp)
    finally:
        state.metrics.latency.observe(time.perf_counter() - t0)


async def _read(state: State, request: web.Request) -> Union[bytes, web.Response]:
    limits = state.limits
    try:
        return await asyncio.wait_for(request.read(), limits.body_timeout)
    except web.HTTPRequestEntityTooLarge:
        return _bad(state, 413, "too-large", f"body larger than {limits.max_body} bytes",
                    close=True)
    except asyncio.TimeoutError:
        return _bad(state, 408, "body-timeout", f"body not received within "
                                                f"{limits.body_timeout:g} s", close=True)
    except (ConnectionError, aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError
            ) as e:
        # The client went away mid-upload: nobody to answer; one line, no traceback.
        return _bad(state, 400, "aborted-upload", f"body not completed: "
                                                  f"{type(e).__name__}: {e}", close=True)


def _seeds(state: State) -> admission.SeedState:
    return (None, False) if state.seeds is None else (state.seeds.key, state.seeds.pending)


def _answer(state: State, got: Any) -> Union[tuple[dict, admission.Outcome], web.Response]:
    """A decision as the handler sends it: refusals and kvmesh's own failures counted and
    logged here (decide_raw is pure, and may have run in the worker process)."""
    if isinstance(got, heavy.Refusal):
        return _bad(state, got.status, got.kind, got.message)
    if isinstance(got, heavy.Failure):
        # A kvmesh bug must not block the workload: admit un-injected, loudly (one line per
        # exception type a minute, so a request that triggers it cannot flood the log).
        state.metrics.errors.labels("internal").inc()
        state.metrics.requests.labels("error").inc()
        state.limited.log(logging.ERROR, f"internal:{got.kind}", "internal error deciding "
                          "request %s; admitting without injection: %s: %s", got.uid, got.kind,
                          got.message)
        return _json(admission._response(
            got.uid, True, warnings=["internal error; pod admitted without LMCache P2P "
                                     "injection (see kvmesh webhook logs)"]))
    return got


def _policy_view(state: State) -> tuple[Any, Any]:
    """(version, policy) for the worker: the cache's snapshot, or the fixed defaults."""
    cache = state.policy_cache
    if cache is None:
        return ("fixed", id(state.policy)), state.policy
    return ("cache", cache.version), cache.snapshot()


async def _decide_heavy(state: State, raw: bytes, selected: Optional[str]
                        ) -> Union[tuple[dict, admission.Outcome], web.Response]:
    if state.pool is None:
        state.pool = heavy.Pool(timeout=state.limits.worker_timeout)
    version, policy = _policy_view(state)
    try:
        got = await state.pool.decide(raw, selected, version, policy, _seeds(state),
                                      state.limits.max_json_nodes, state.native_sidecars)
        if isinstance(got, heavy.Failure) and not got.uid:  # the worker's own failure
            raise heavy.WorkerGone(f"{got.kind}: {got.message}")
    except heavy.WorkerGone as e:
        state.metrics.errors.labels("internal").inc()
        state.metrics.requests.labels("error").inc()
        state.limited.log(logging.ERROR, "worker-gone", "the process deciding large reviews "
                          "failed (%s); restarted it; the API server retries or applies the "
                          "failure policy", e)
        return _json({"error": "kvmesh could not decide this large review; retry"}, 503)
    if isinstance(got, tuple) and isinstance(got[0], bytes):
        body, out = got
        return web.Response(body=body, content_type="application/json"), out
    return _answer(state, got)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _readyz(request: web.Request) -> web.Response:
    state: State = request.app[STATE]
    if state.ready():
        return web.Response(text="ok")
    return web.Response(status=503, text="not ready")


async def _metrics(request: web.Request) -> web.Response:
    state: State = request.app[STATE]
    return web.Response(body=generate_latest(state.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- the admission port's connections ----------------------------------------------------------

@web.middleware
async def _track(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Marks the connection busy while its request runs (the Edge times out the rest)."""
    state = request.app[STATE]
    c = None
    for edge in (state.edge, state.ops_edge):
        c = edge.by_handler.get(request.protocol) if edge is not None else None
        if c is not None:
            break
    if c is None:
        return await handler(request)
    c.busy_since, c.rx_at = edge.loop.time(), None
    try:
        return await handler(request)
    finally:
        c.busy_since, c.served, c.since = None, c.served + 1, edge.loop.time()


class _Tracked:
    """What the Edge's cap and timeouts read of one connection, on either port."""

    def _track(self, edge: "Edge") -> None:
        self.edge = edge
        self.raw: Optional[asyncio.Transport] = None
        self.handler: Any = None
        self.admitted = False
        self.busy_since: Optional[float] = None  # a request's handler is running
        self.served = 0
        self.since = edge.loop.time()  # accepted, or the last response ended
        self.rx_at: Optional[float] = None  # first bytes of the next request head

    def _accept(self, transport: asyncio.BaseTransport) -> bool:
        """Under the cap: makes and registers the aiohttp handler. Over it: aborts, False."""
        self.raw = transport  # type: ignore[assignment]
        if not self.edge.admit(self):
            transport.abort()
            return False
        self.handler = self.edge.handler_factory()
        self.edge.by_handler[self.handler] = self
        return True

    def _bytes_in(self) -> None:
        if self.rx_at is None and self.busy_since is None:
            self.rx_at = self.edge.loop.time()


class _Connection(_Tracked, sslproto.SSLProtocol):
    """One accepted TCP connection: admitted under the cap, then TLS, then aiohttp.

    asyncio's own TLS protocol with two changes: a 32 KiB read buffer instead of 256 KiB per
    connection (a TLS record is at most 16 KiB; the default made each idle connection cost
    ~280 KiB), and bookkeeping for the Edge's timeouts."""

    max_size = 32 * 1024

    def __init__(self, edge: "Edge"):
        super().__init__(edge.loop, None, edge.tls, None, server_side=True,
                         ssl_handshake_timeout=edge.limits.handshake_timeout,
                         ssl_shutdown_timeout=edge.limits.handshake_timeout)
        self._track(edge)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._accept(transport):
            self._set_app_protocol(self.handler)
            super().connection_made(transport)

    def buffer_updated(self, nbytes: int) -> None:
        self._bytes_in()
        super().buffer_updated(nbytes)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.admitted:
            return  # refused before TLS started: nothing to unwind
        self.edge.release(self)
        super().connection_lost(exc)


class _PlainConnection(_Tracked, asyncio.Protocol):
    """One accepted connection of the ops port (no TLS): admitted under the ops cap, then
    handed to aiohttp, with the same bookkeeping as _Connection for the Edge's timeouts."""

    def __init__(self, edge: "Edge"):
        self._track(edge)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._accept(transport):
            self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._bytes_in()
        self.handler.data_received(data)

    def eof_received(self) -> Optional[bool]:
        return self.handler.eof_received() if self.handler is not None else None

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.admitted:
            return
        self.edge.release(self)
        self.handler.connection_lost(exc)


class Edge:
    """A listener that accepts under a cap and times out slow and idle connections: the
    admission port (TLS) and the ops port (plain, `ops`: its own limits, no gauge)."""

    def __init__(self, state: State, handler_factory: Callable[[], Any],
                 tls: Optional[ssl.SSLContext], tick: float = 0.5, ops: bool = False):
        self.state, self.metrics = state, state.metrics
        # --header-timeout-seconds holds for both ports
        self.limits = replace(OPS_LIMITS, header_timeout=state.limits.header_timeout) if ops \
            else state.limits
        self.ops, self.what = ops, "the ops port" if ops else "the admission port"
        self.handler_factory, self.tls, self.tick = handler_factory, tls, tick
        self.loop = asyncio.get_running_loop()
        self.conns: dict[_Connection, None] = {}
        self.by_handler: dict[Any, _Connection] = {}
        # The admission port leaves room for the ops port's connections too.
        self.cap, self.nofile = connection_cap(
            self.limits.max_connections, 64 if ops else 64 + OPS_LIMITS.max_connections)
        self._peak = 0
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self, host: str, port: int) -> None:
        conn = _PlainConnection if self.tls is None else _Connection
        self.server = await self.loop.create_server(lambda: conn(self), host, port,
                                                    reuse_address=True,
                                                    backlog=64 if self.ops else 512)

    def _reason(self, reason: str) -> str:
        return "ops-" + reason if self.ops else reason

    def admit(self, c: Any) -> bool:
        if len(self.conns) >= self.cap:
            kind = self._reason("over-capacity")
            self.metrics._child(self.metrics.connections_closed, kind).inc()
            peer = c.raw.get_extra_info("peername") if c.raw else None
            self.state.limited.log(
                logging.WARNING, kind, "refused a connection to %s from %s: %d connections "
                "open, the cap (%s, below the open-file limit %d); its legitimate clients "
                "are few, so many open ones are idle or hostile clients", self.what, peer,
                len(self.conns), f"{self.cap}" if self.ops else
                f"--max-connections {self.cap}", self.nofile)
            return False
        c.admitted = True
        self.conns[c] = None
        if not self.ops:
            self.metrics.connections.set(len(self.conns))
        self._peak = max(self._peak, len(self.conns))
        return True

    def release(self, c: Any) -> None:
        self.conns.pop(c, None)
        self.by_handler.pop(c.handler, None)
        if not self.ops:
            self.metrics.connections.set(len(self.conns))
        if not self.conns and self._peak > 64:
            # A burst of connections leaves freed buffers scattered over the heap; hand them
            # back so RSS returns to what the steady state needs.
            self._peak = 0
            _trim_heap()

    def _close(self, c: Any, reason: str, what: str) -> None:
        reason = self._reason(reason)
        self.metrics._child(self.metrics.connections_closed, reason).inc()
        peer = c.raw.get_extra_info("peername") if c.raw else None
        self.state.limited.log(logging.INFO, reason, "closed the connection to %s from %s: %s",
                               self.what, peer, what)
        if c.raw is not None:
            c.raw.abort()

    def sweep(self) -> None:
        now, lim = self.loop.time(), self.limits
        request_timeout = lim.body_timeout + lim.header_timeout
        for c in list(self.conns):
            if c.busy_since is not None:
                if now - c.busy_since > request_timeout:
                    self._close(c, "request-timeout", f"a request ran over "
                                f"{request_timeout:g} s (the client is not reading its answer)")
            elif c.served == 0 or c.rx_at is not None:
                start = c.since if c.served == 0 else c.rx_at
                if now - start > lim.header_timeout:
                    self._close(c, "header-timeout", f"no complete request head within "
                                f"{lim.header_timeout:g} s")
            elif now - c.since > lim.idle_timeout:
                self._close(c, "idle-timeout", f"idle for {lim.idle_timeout:g} s")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.sweep()

    def abort_all(self) -> None:
        for c in list(self.conns):
            if c.raw is not None:
                c.raw.abort()


def connection_cap(wanted: int, reserve: int = 64) -> tuple[int, int]:
    """(cap, open-file limit): the soft limit raised to the hard one, the cap kept `reserve`
    files below it (certificates, the API watch, the ops port, logs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(1, min(wanted, soft - reserve)), soft


def _trim_heap() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _loop_errors(limited: Limited) -> Callable[[asyncio.AbstractEventLoop, dict], None]:
    """asyncio's default handler logs a traceback per event (one per failed accept when the
    file limit is hit, one per broken TLS client): one line per kind per minute instead."""
    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        msg = context.get("message") or "event loop error"
        exc = context.get("exception")
        limited.log(logging.WARNING, f"loop:{msg}", "%s: %s", msg,
                    f"{type(exc).__name__}: {exc}" if exc else "")
    return handle


async def serve(host: str, port: int, cert: str, key: str,
                policy: Union[PolicyDefaults, admission.Resolver], grace: float = 3.0,
                cert_source: Optional[object] = None,
                policy_cache: Optional[object] = None, *,
                seed_key: Optional[Any] = None,
                metrics_host: str = "0.0.0.0", metrics_port: int = 9090,
                limits: Limits = Limits(),
                stopping: Optional[asyncio.Event] = None,
                native_sidecars: Optional[bool] = None) -> None:
    """Run until SIGTERM/SIGINT (or `stopping` is set); then report not-ready, let in-flight
    requests finish, stop, all within limits.shutdown_timeout.

    cert_source (certs.serving.SelfSigned) keeps cert/key files current and says whether the
    live webhook configuration trusts them; without it the files are managed outside
    (cert-manager, `kvmesh certs`). policy_cache (webhook.policy_cache.PolicyCache) resolves
    each pod's KVMeshPolicy; the webhook is ready only once it has synced."""
    loop = asyncio.get_running_loop()
    if stopping is None:
        stopping = install_stop_signals(limits.shutdown_timeout)
    # The threads that ship large reviews to the worker process hand the GIL back to the loop
    # within 1 ms (the default 5 ms would be the stall every other admission sees).
    sys.setswitchinterval(0.001)
    metrics = Metrics()
    limited = Limited(log)
    loop.set_exception_handler(_loop_errors(limited))
    if cert_source is not None:
        # The first leaf before the listener needs it (the API may be slow or gone: a
        # SIGTERM meanwhile still stops the process).
        if not await until_stopped(cert_source.step(), stopping):
            return
    reloader = CertReloader(cert, key, metrics)
    if cert_source is not None:
        cert_source.on_change = reloader.reload

    def ready() -> bool:
        return reloader.loaded and not stopping.is_set() and \
            (cert_source is None or cert_source.ready()) and \
            (policy_cache is None or policy_cache.ready()) and \
            (seed_key is None or seed_key.ready())

    state = State(policy, metrics, ready, admission.Memo(), limits, limited, seeds=seed_key,
                  policy_cache=policy_cache, native_sidecars=native_sidecars)
    state.pool = heavy.Pool(timeout=limits.worker_timeout)
    state.pool.begin()  # now: the first large review should not wait for Python to start
    metrics.registry.register(_MemoCollector(state.memo))
    app = make_app(policy, limits=limits, state=state)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace,
                           auto_decompress=False, keepalive_timeout=limits.idle_timeout,
                           lingering_time=0)
    await runner.setup()
    edge = state.edge = Edge(state, runner.server, reloader.context)
    await edge.start(host, port)
    ops = web.AppRunner(make_ops_app(state), access_log=None, shutdown_timeout=1.0,
                        auto_decompress=False, keepalive_timeout=OPS_LIMITS.idle_timeout,
                        lingering_time=0)
    await ops.setup()
    ops_edge = state.ops_edge = Edge(state, ops.server, None, ops=True)
    await ops_edge.start(metrics_host, metrics_port)
    tasks = [asyncio.create_task(reloader.watch()), asyncio.create_task(edge.run()),
             asyncio.create_task(ops_edge.run()),
             asyncio.create_task(watch_loop_lag(metrics.loop_lag, metrics.loop_lag_max, 0.05))]
    if cert_source is not None:
        tasks.append(asyncio.create_task(cert_source.run()))
    if policy_cache is not None:
        tasks.append(asyncio.create_task(policy_cache.run()))
    if seed_key is not None:
        tasks.append(asyncio.create_task(seed_key.run()))
    # Everything alive now (imported modules: the Kubernetes client's models, pydantic, ...)
    # lives as long as the process: move it out of the collector's reach. A full collection
    # otherwise walks it all, ~0.3-0.5 s on a loaded 2-core node, stalling every admission.
    gc.collect()
    gc.freeze()
    log.info("kvmesh webhook serving https://%s:%d/mutate (probes and metrics on http://%s:%d;"
             " at most %d connections)", host, port, metrics_host, metrics_port, edge.cap)
    try:
        await stopping.wait()
        log.info("stopping: readyz now fails; finishing in-flight requests")
        await asyncio.sleep(min(grace, 1.0))  # give endpoints time to drop this replica
    finally:
        for t in tasks:
            t.cancel()
        for e in (edge, ops_edge):
            if e.server is not None:
                e.server.close()
        budget = max(1.0, limits.shutdown_timeout - min(grace, 1.0) - 2.0)
        try:
            await asyncio.wait_for(asyncio.gather(runner.cleanup(), ops.cleanup()), budget)
        except (asyncio.TimeoutError, Exception) as e:  # exiting regardless
            log.warning("shutdown did not finish cleanly within %g s (%s); exiting", budget,
                        type(e).__name__)
        edge.abort_all()
        ops_edge.abort_all()
        if state.pool is not None:
            await state.pool.close()


def install_stop_signals(bound: float) -> asyncio.Event:
    """SIGTERM/SIGINT set the returned event and arm the exit watchdog."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not stopping.is_set():
            exit_watchdog(bound)
        stopping.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    return stopping


async def until_stopped(coro: Any, stopping: asyncio.Event) -> bool:
    """Run `coro` unless `stopping` is set first (then cancel it); True if it finished."""
    task = asyncio.ensure_future(coro)
    stop = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if task in done:
        task.result()
        return True
    task.cancel()
    return False
