"""The webhook's HTTPS edge: aiohttp, TLS with hot reload, probes, Prometheus metrics.

All decisions happen in admission.review (pure); this module only moves bytes, measures and
logs. It never answers 500: a request it cannot understand gets a 400 naming the problem, and
an internal error admits the pod un-injected with a warning (and counts it), so a kvmesh bug
can never block a workload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvmesh.webhook import admission
from kvmesh.core.policy import PolicyDefaults

log = logging.getLogger("kvmesh.webhook")

MAX_BODY = 3 * 1024 * 1024  # etcd caps objects at 1.5 MiB; an AdmissionReview holds one
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


class CertReloader:
    """Serves from one SSLContext and reloads cert+key into it when the files change.

    New handshakes pick up the new pair; connections already open keep theirs, so no request
    is dropped. A half-written pair (cert and key not matching) is retried on the next tick
    and the old pair keeps serving meanwhile.
    """

    def __init__(self, cert: str, key: str, metrics: Metrics, interval: float = 1.0):
        self.cert, self.key, self.metrics, self.interval = cert, key, metrics, interval
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
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


@dataclass
class State:
    policy: Union[PolicyDefaults, admission.Resolver]
    metrics: Metrics
    ready: Callable[[], bool]
    memo: admission.Memo


STATE = web.AppKey("state", State)
_LOG_LEVEL = {"deny": logging.INFO, "ignore": logging.WARNING}


def make_app(policy: Union[PolicyDefaults, admission.Resolver],
             metrics: Optional[Metrics] = None,
             ready: Callable[[], bool] = lambda: True) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    metrics = metrics or Metrics()
    state = State(policy, metrics, ready, admission.Memo())
    metrics.registry.register(_MemoCollector(state.memo))
    app[STATE] = state
    app.router.add_post("/mutate", _mutate)
    # Entries that select by namespace or policy call /mutate/<why>: the pod is opted in
    # without its own label.
    app.router.add_post("/mutate/{selected}", _mutate)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


def _json(obj: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _bad(state: State, status: int, message: str) -> web.Response:
    state.metrics.errors.labels("bad_request").inc()
    state.metrics.requests.labels("bad_request").inc()
    log.warning("rejected /mutate request: %s", message)
    return _json({"error": message}, status=status)


async def _mutate(request: web.Request) -> web.Response:
    state: State = request.app[STATE]
    t0 = time.perf_counter()
    try:
        if request.content_type not in ("application/json", ""):
            return _bad(state, 415, f"Content-Type must be application/json, "
                                    f"not {request.content_type}")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _bad(state, 413, f"body larger than {MAX_BODY} bytes")
        try:
            body = orjson.loads(raw)
        except ValueError as e:  # orjson.JSONDecodeError, invalid UTF-8 included
            return _bad(state, 400, f"body is not valid JSON: {e}")
        try:
            selected = bool(request.match_info.get("selected"))
            resp, out = admission.review(body, state.policy, selected=selected, memo=state.memo)
        except admission.BadReview as e:
            return _bad(state, 400, str(e))
        except Exception:
            # A kvmesh bug must not block the workload: admit un-injected, loudly.
            state.metrics.errors.labels("internal").inc()
            state.metrics.requests.labels("error").inc()
            uid = body["request"]["uid"]  # review() validated this before deciding
            log.exception("internal error deciding request %s; admitting without injection",
                          uid)
            return _json(admission._response(
                uid, True, warnings=["internal error; pod admitted without LMCache P2P "
                                     "injection (see kvmesh webhook logs)"]))
        state.metrics.count(out)
        # Every decision is on the pod itself (kvmesh.dev/status) and in the metrics, so the
        # routine ones log at DEBUG: a line per admission at INFO costs a third of the
        # handler's time. Denials and misrouted requests are what an operator must see.
        level = _LOG_LEVEL.get(out.action, logging.DEBUG)
        if log.isEnabledFor(level):
            log.log(level, "uid=%s pod=%s/%s action=%s reason=%s mode=%s dry_run=%s ops=%d %s",
                    out.uid, out.namespace, out.name, out.action, out.reason, out.mode,
                    out.dry_run, out.patch_ops, out.message)
        return _json(resp)
    finally:
        state.metrics.latency.observe(time.perf_counter() - t0)


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


async def serve(host: str, port: int, cert: str, key: str,
                policy: Union[PolicyDefaults, admission.Resolver], grace: float = 3.0,
                cert_source: Optional[object] = None,
                policy_cache: Optional[object] = None) -> None:
    """Run until SIGTERM/SIGINT; then report not-ready, let in-flight requests finish, stop.

    cert_source (certs.serving.SelfSigned) keeps cert/key files current and says whether the
    live webhook configuration trusts them; without it the files are managed outside
    (cert-manager, `kvmesh certs`). policy_cache (webhook.policy_cache.PolicyCache) resolves
    each pod's KVMeshPolicy; the webhook is ready only once it has synced."""
    metrics = Metrics()
    if cert_source is not None:
        await cert_source.step()  # first leaf before the listener needs it
    reloader = CertReloader(cert, key, metrics)
    if cert_source is not None:
        cert_source.on_change = reloader.reload
    stopping = asyncio.Event()

    def ready() -> bool:
        return reloader.loaded and not stopping.is_set() and \
            (cert_source is None or cert_source.ready()) and \
            (policy_cache is None or policy_cache.ready())

    app = make_app(policy, metrics, ready=ready)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=reloader.context)
    await site.start()
    tasks = [asyncio.create_task(reloader.watch())]
    if cert_source is not None:
        tasks.append(asyncio.create_task(cert_source.run()))
    if policy_cache is not None:
        tasks.append(asyncio.create_task(policy_cache.run()))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("kvmesh webhook serving https://%s:%d/mutate", host, port)
    try:
        await stopping.wait()
        log.info("stopping: readyz now fails; finishing in-flight requests")
        await asyncio.sleep(min(grace, 1.0))  # give endpoints time to drop this replica
    finally:
        for t in tasks:
            t.cancel()
        await runner.cleanup()
