"""Shared test helpers: a real `kvmesh webhook` process over TLS, AdmissionReview building,
patch application with an independent JSON-patch implementation (jsonpatch)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jsonpatch

from kvmesh.core.names import MP_SIDECAR
from kvmesh.local.net import free_port  # noqa: F401  (the one helper; re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
KVMESH = [sys.executable, "-m", "kvmesh.cli"]


def wait_for(what: str, probe, timeout: float = 60, interval: float = 0.25):
    """Poll `probe` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)



async def wait_until(pred, timeout: float = 5.0, interval: float = 0.05):
    """Await ``pred()`` until it returns something truthy (returned) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        v = await pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {v!r})")
        await asyncio.sleep(interval)

def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(KVMESH + list(args), input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def review_for(pod: dict, dry_run: bool = False, uid: str | None = None) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid or str(uuid.uuid4()),
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                        "namespace": (pod.get("metadata") or {}).get("namespace", "default"),
                        "operation": "CREATE", "userInfo": {"username": "system:test"},
                        "object": pod, "dryRun": dry_run}}


def apply_response(pod: dict, response: dict) -> dict:
    if not response.get("patch"):
        return pod
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, ops)


class Webhook:
    """A real `kvmesh webhook` subprocess on loopback with a fresh CA."""

    def __init__(self, tmp: Path, extra_args: tuple[str, ...] = ()):
        self.tmp = tmp
        r = run_cli("certs", "--out", str(tmp), "--host", "127.0.0.1", "--days", "1")
        assert r.returncode == 0, r.stderr
        self.port = free_port()
        self.metrics_port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ops_url = f"http://127.0.0.1:{self.metrics_port}"  # probes and /metrics
        self.log = open(tmp / "webhook.log", "w")
        self.proc = subprocess.Popen(
            KVMESH + ["webhook", "--host", "127.0.0.1", "--port", str(self.port),
                      "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                      "--cert", str(tmp / "tls.crt"), "--key", str(tmp / "tls.key"),
                      *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "KVMESH_LOG_LEVEL": "WARNING"})
        self.ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        deadline = time.monotonic() + 180  # a busy 2-core machine takes its time to import
        while True:
            try:
                if self.get("/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("webhook did not start: "
                                   + (tmp / "webhook.log").read_text())
            time.sleep(0.05)

    def request(self, path: str, body: bytes | None, method: str = "POST",
                headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, body, method=method,
                                     headers=headers or {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str) -> tuple[int, bytes]:
        """GET from the ops port (/healthz, /readyz, /metrics)."""
        try:
            with urllib.request.urlopen(self.ops_url + path, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def review(self, pod: dict, dry_run: bool = False, query: str = "") -> dict:
        status, body = self.request("/mutate" + query,
                                    json.dumps(review_for(pod, dry_run)).encode())
        assert status == 200, body
        return json.loads(body)["response"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class RedisServer:
    """A real redis-server, no persistence, files in `workdir`: bound to `host` (loopback by
    default; the e2e tests bind the IP KWOK gave a group's fake Redis pod) on `port` (a free
    one by default, kept across restarts). start() stops the process again if it never
    answers PING, so a failed start leaks nothing."""

    def __init__(self, workdir: Path, *extra: str, host: str = "127.0.0.1",
                 port: int | None = None):
        import shutil
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            raise RuntimeError("redis-server not found: `apt-get install -y redis-server` "
                               "(the Makefile's test target installs it)")
        self.dir, self.extra, self.host = workdir, extra, host
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self._client = None

    @property
    def client(self):
        """A redis-py client (str replies), made on first use."""
        if self._client is None:
            import redis
            self._client = redis.Redis(self.host, self.port, decode_responses=True)
        return self._client

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", self.host, "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on {self.host}:{self.port} did not answer PING "
                           f"within 10 s: {self.log_tail()}")

    def stop(self) -> None:
        """SIGKILL (as a crash would); idempotent."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart_empty(self) -> None:
        self.stop()
        self.start()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of metric `name`'s samples in a Prometheus text exposition whose labels include
    `labels`; 0.0 when there is none (a labelled counter shows up only once incremented, so
    pair a 'not increased' assertion with one that the same counter does increase)."""
    import re
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)", text, re.M):
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


TEST_HASH_SEED_KEY = b"support-test-hash-seed-key......"


def injected_pod(case="01-deployment-vllm-serve", name="p-1", uid="u-1", ip="127.64.0.9"):
    """A Running, Ready pod as the webhook injects it from golden case `case` (a peer)."""
    import yaml
    from kvmesh.core import workloads
    from kvmesh.core.inject import Context, decide
    doc = yaml.safe_load((REPO / "tests" / "golden" / "cases" / f"{case}.yaml").read_text())
    # With a seed key, as the webhook (not the offline CLI) injects: PYTHONHASHSEED is set.
    pod = decide(workloads.pod_for(doc), Context(doc["metadata"]["namespace"],
                                                 hash_seed_key=TEST_HASH_SEED_KEY)).pod
    pod["metadata"].update(name=name, uid=uid)
    cname = pod["spec"]["containers"][0]["name"]
    pod["status"] = {"phase": "Running", "podIP": ip,
                     "conditions": [{"type": "Ready", "status": "True"}],
                     "containerStatuses": [{"name": cname, "restartCount": 0}]}
    return pod


class ApiProxy:
    """A loopback proxy in front of the real API server that can misbehave, as an overloaded
    one does: `fault(request)` is awaited for every request; it may sleep (a slow answer) and
    return an aiohttp Response to send instead of forwarding (a 429 or 5xx), or None to
    forward. Point a Kube at it with `kube.api.configuration.host = proxy.url` (plain HTTP
    to the proxy; the proxy speaks TLS with `kube`'s client certificate upstream).

        async with ApiProxy(kube, fault) as proxy: ...
    """

    def __init__(self, kube, fault):
        cfg = kube.api.configuration
        self.target = cfg.host
        self.ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        self.ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        self.fault = fault
        self.faulted = self.passed = 0

    @staticmethod
    def status(code: int, reason: str) -> "object":
        """An API Status answer, as the API server sends one (429 with Retry-After)."""
        from aiohttp import web
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
             "reason": reason, "message": f"{reason} (injected by the test's proxy)"},
            status=code, headers={"Retry-After": "1"} if code == 429 else {})

    async def handle(self, req):
        from aiohttp import web
        instead = await self.fault(req)
        if instead is not None:
            self.faulted += 1
            return instead
        self.passed += 1
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host",
                                                                             "authorization")}
        async with self.session.request(req.method, self.target + req.path_qs,
                                        data=await req.read(), headers=headers,
                                        ssl=self.ctx) as up:
            return web.Response(body=await up.read(), status=up.status,
                                content_type=up.content_type)

    async def __aenter__(self):
        import aiohttp
        from aiohttp import web
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()
        await self.session.close()


def mp_pod(name="p-1", uid="u-1", ip="127.64.0.9", sidecar_restarts=0):
    """A Running, Ready mp-mode pod as the webhook injects it (golden case 31: the
    `lmcache server` native sidecar with its kvm-mp-* ports), with the sidecar's
    initContainerStatuses as the kubelet reports a running native sidecar."""
    pod = injected_pod("31-mp-annotation", name=name, uid=uid, ip=ip)
    pod["status"]["initContainerStatuses"] = [
        {"name": "fetch-model", "restartCount": 0,
         "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
        {"name": MP_SIDECAR, "restartCount": sidecar_restarts, "started": True,
         "state": {"running": {"startedAt": "2026-11-30T10:00:00Z"}}}]
    return pod
