"""Hostile inputs and connections against a real `kvmesh webhook` process, on loopback only.

Shared by tests/webhook/test_adversarial.py (each attack bounded in count and time, asserting
the webhook stays healthy) and bench/adversarial.py (the same attacks, measured). Every helper
bounds its own work: a count, a size and a socket timeout.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from support import REPO, free_port, review_for

NORMAL_POD = {"metadata": {"generateName": "q-", "namespace": "ns",
                           "labels": {"kvmesh.dev/inject": "enabled"}},
              "spec": {"containers": [{"name": "vllm", "image": "lmcache/vllm-openai:v0.3.6",
                                       "command": ["vllm", "serve", "m"]}]}}


@dataclass
class Target:
    """One webhook process (from `root`: this checkout, or an older tree for a comparison)."""

    proc: subprocess.Popen
    port: int
    metrics_port: Optional[int]
    ca: str
    log_path: Path
    ctx: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.ctx = ssl.create_default_context(cafile=self.ca)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mib(self) -> float:
        return _status_kib(self.pid, "VmRSS") / 1024

    def peak_mib(self) -> float:
        return _status_kib(self.pid, "VmHWM") / 1024

    def group_pids(self) -> list[int]:
        """The webhook and its children (the large-review worker): its process group, from
        start_webhook's setpgrp."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.pid and fields[0] != "Z":
                    pids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
        return pids

    def group_rss_mib(self) -> float:
        """RSS of the webhook and its worker: what the container's memory limit counts
        (pages they share counted twice: an overestimate)."""
        return sum(_status_kib(pid, "VmRSS") for pid in self.group_pids()) / 1024

    def lag_buckets(self) -> dict[float, int]:
        """The webhook's own event-loop lag histogram (its 50 ms timer), from the ops port:
        cumulative tick counts by upper bound in seconds (+Inf = every tick)."""
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            text = r.read().decode()
        out: dict[float, int] = {}
        for line in text.splitlines():
            if line.startswith("kvmesh_webhook_event_loop_lag_seconds_bucket"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[float(le)] = int(float(line.split()[-1]))
        return out

    def connect(self, timeout: float = 10) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx,
                                           timeout=timeout)

    def post(self, path: str, body: bytes, headers: Optional[dict] = None,
             timeout: float = 10) -> tuple[int, bytes, float]:
        """One request on a fresh connection: (status, body, seconds); status 0 = no answer."""
        c = self.connect(timeout)
        t0 = time.perf_counter()
        try:
            c.request("POST", path, body, headers or {"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read(), time.perf_counter() - t0
        except (OSError, http.client.HTTPException):
            return 0, b"", time.perf_counter() - t0
        finally:
            c.close()

    def review(self, pod: dict, timeout: float = 10) -> tuple[int, bytes, float]:
        return self.post("/mutate", json.dumps(review_for(pod)).encode(), timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> float:
        """SIGTERM, then wait; returns the seconds it took to exit (SIGKILL after `timeout`)."""
        t0 = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return time.monotonic() - t0


def _status_kib(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone meanwhile
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def start_webhook(tmp: Path, root: Path = REPO, extra: tuple[str, ...] = (),
                  separate_metrics: bool = True, log_level: str = "WARNING",
                  rlimit_nofile: Optional[int] = None) -> Target:
    """A `kvmesh webhook` from `root` on loopback with a fresh CA under `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KVMESH_LOG_LEVEL": log_level, "PYTHONPATH": str(root)}
    cli = [sys.executable, "-m", "kvmesh.cli"]
    r = subprocess.run(cli + ["certs", "--out", str(tmp), "--host", "127.0.0.1", "--days", "1"],
                       capture_output=True, text=True, timeout=60, cwd=root, env=env)
    assert r.returncode == 0, r.stderr
    port = free_port()
    metrics_port = free_port() if separate_metrics else None
    args = ["webhook", "--host", "127.0.0.1", "--port", str(port),
            "--cert", str(tmp / "tls.crt"), "--key", str(tmp / "tls.key"), *extra]
    if metrics_port:
        args += ["--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port)]
    log_path = tmp / "webhook.log"

    def limit() -> None:
        os.setpgrp()
        if rlimit_nofile:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (rlimit_nofile, rlimit_nofile))

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cli + args, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                env=env, preexec_fn=limit)
    t = Target(proc, port, metrics_port, str(tmp / "ca.crt"), log_path)
    deadline = time.monotonic() + 180  # a busy 2-core machine takes its time to import
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            t.stop()
            raise RuntimeError("webhook did not start: " + t.log())
        if t.review(NORMAL_POD, timeout=2)[0] == 200:
            return t
        time.sleep(0.1)


class Prober(threading.Thread):
    """Sends normal reviews back to back (one keep-alive connection, re-opened when closed)
    and records each one's latency: what any other pod's admission sees meanwhile."""

    def __init__(self, target: Target, timeout: float = 10):
        super().__init__(daemon=True)
        self.target, self.timeout = target, timeout
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._halt = threading.Event()
        self._body = json.dumps(review_for(NORMAL_POD)).encode()

    def run(self) -> None:
        conn = None
        while not self._halt.is_set():
            if conn is None:
                conn = self.target.connect(self.timeout)
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/mutate", self._body,
                             {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                dt = time.perf_counter() - t0
                if r.status != 200:
                    self.failures.append(f"HTTP {r.status}")
                self.latencies.append(dt)
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                self.latencies.append(time.perf_counter() - t0)
                conn.close()
                conn = None
            time.sleep(0.005)
        if conn is not None:
            conn.close()

    def stop(self) -> "Prober":
        self._halt.set()
        self.join(self.timeout + 5)
        return self

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    def __enter__(self) -> "Prober":
        self.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- hostile pods ----------------------------------------------------------------------------

def parallel_pod(ranks: int) -> dict:
    pod = json.loads(json.dumps(NORMAL_POD))
    pod["metadata"]["annotations"] = {"kvmesh.dev/allow-parallel": "true",
                                      "kvmesh.dev/mode": "controller"}
    pod["spec"]["containers"][0]["command"] += ["--tensor-parallel-size", str(ranks)]
    return pod


def script_pod(size: int) -> dict:
    """`sh -c SCRIPT` of about `size` bytes: many harmless commands, then vLLM."""
    line = "echo preparing the model cache; test -d /models || mkdir -p /models\n"
    script = line * max(1, size // len(line)) + "exec vllm serve m --port 8000\n"
    pod = json.loads(json.dumps(NORMAL_POD))
    pod["spec"]["containers"][0]["command"] = ["sh", "-c", script]
    return pod


def env_pod(entries: int) -> dict:
    pod = json.loads(json.dumps(NORMAL_POD))
    pod["spec"]["containers"][0]["env"] = [{"name": f"V{i}", "value": "x"}
                                           for i in range(entries)]
    return pod


def annotated_pod(key: str, value: str) -> dict:
    pod = json.loads(json.dumps(NORMAL_POD))
    pod["metadata"]["annotations"] = {key: value}
    return pod


# --- hostile bodies --------------------------------------------------------------------------

def gzip_bomb(unpacked_mib: int) -> bytes:
    """A gzip body that unpacks to `unpacked_mib` MiB of spaces (about 1,000:1)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * (1 << 20)
    out = [z.compress(block) for _ in range(unpacked_mib)]
    out.append(z.flush())
    data = b"".join(out)
    return data


def deep_kind(depth: int) -> bytes:
    """An AdmissionReview-shaped body whose `kind` is `depth` nested objects."""
    return b'{"apiVersion":"admission.k8s.io/v1","kind":' + b'{"kind":' * depth + b"1" + \
        b"}" * depth + b"}"


def deep_object(depth: int) -> bytes:
    """A valid AdmissionReview whose pod carries an env value nested `depth` deep."""
    r = review_for(NORMAL_POD)
    text = json.dumps(r)
    marker = '"command": ["vllm", "serve", "m"]'
    deep = '"env": [{"name": "X", "value": ' + "[" * depth + "]" * depth + "}], "
    return text.replace(marker, deep + marker).encode()


# --- hostile connections ---------------------------------------------------------------------

def tls_socket(target: Target, timeout: float = 10) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", target.port), timeout=timeout)
    try:
        return target.ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def aborted_upload(target: Target, sent: int = 1000, declared: int = 100_000) -> None:
    """Headers promising `declared` bytes, `sent` bytes of body, then a reset."""
    s = tls_socket(target)
    s.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % declared + b"{" + b" " * (sent - 1))
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def open_idle(target: Target, n: int, handshake: bool = True,
              deadline_s: float = 120) -> list[socket.socket]:
    """Up to n connections that then say nothing (TLS handshake done when `handshake`).
    Connections the server refuses or closes are not returned."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + deadline_s
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        try:
            if handshake:
                socks.append(tls_socket(target, timeout=5))
            else:
                socks.append(socket.create_connection(("127.0.0.1", target.port), timeout=5))
        except (OSError, ssl.SSLError):
            continue
    return socks


def slowloris(target: Target, n: int) -> list[socket.socket]:
    """n TLS connections that send an incomplete request head and stop."""
    socks = open_idle(target, n)
    for s in socks:
        try:
            s.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nX-a: ")
        except OSError:
            pass
    return socks


def still_open(socks: list[socket.socket], wait: float = 0.0) -> int:
    """How many of `socks` the server has not closed (a closed one reads EOF or errors)."""
    n = 0
    for s in socks:
        try:
            s.settimeout(wait)
            data = s.recv(1)
            if data:
                n += 1  # answered something (e.g. 408) but not closed yet
        except (socket.timeout, ssl.SSLWantReadError, TimeoutError):
            n += 1
        except (OSError, ssl.SSLError):
            pass
    return n


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def tls_accepts(target: Target, ciphers: str, version: ssl.TLSVersion) -> bool:
    """Whether the server completes a handshake offering only `ciphers` at `version`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(target.ca)
    ctx.minimum_version = ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_3:
        ctx.set_ciphers(ciphers)
    try:
        with socket.create_connection(("127.0.0.1", target.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                return True
    except (OSError, ssl.SSLError):
        return False


def tracebacks(log: str) -> int:
    return log.count("Traceback (most recent call last)")
