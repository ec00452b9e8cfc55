"""/mutate throughput and latency over TLS on loopback, next to a bare aiohttp TLS handler
measured in the same run, plus the pure core's own cost per pod.

Servers are pinned to CPU 0 and the load generators to CPU 1 (taskset), so "one core" means
one core. Load: wrk (8 connections, keep-alive) for peak throughput and latency; a paced
asyncio client at a fixed 1,000 requests/s for the latency goal.

Goals (issue #2): kvmesh >= 0.5 x the bare handler's throughput; p99 < 2 ms at 1,000 req/s;
pure core < 100 us per pod.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import aiohttp
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from kvmesh import workloads  # noqa: E402
from kvmesh.webhook import admission, inject  # noqa: E402
from kvmesh.webhook.policy import PolicyDefaults  # noqa: E402
from support import review_for  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def realistic_pod() -> dict:
    doc = yaml.safe_load((REPO / "tests/golden/cases/05-shell-script-sidecar-init.yaml").read_text())
    return workloads.pod_for(doc)


def wait_ready(port: int, ca: str) -> None:
    ctx = ssl.create_default_context(cafile=ca)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on {port} did not start")


def start(cmd: list[str], port: int, ca: str) -> subprocess.Popen:
    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    p = subprocess.Popen(taskset + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, ca)
    return p


def wrk(url: str, body_file: Path, seconds: int, conns: int) -> dict:
    lua = body_file.with_suffix(".lua")
    lua.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                   f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*all")\nf:close()\n')
    taskset = ["taskset", "-c", "1"] if shutil.which("taskset") else []
    out = subprocess.run(taskset + ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
                                    "-s", str(lua), url],
                         capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([0-9.]+)(us|ms|s)", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),
            "p50": ms("50"), "p99": ms("99"),
            "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": sock_err.group(1) if sock_err else ""}


async def paced(url: str, body: bytes, ca: str, rate: int, seconds: float, conns: int) -> dict:
    ctx = ssl.create_default_context(cafile=ca)
    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(ssl=ctx, limit=conns)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one():
            nonlocal errors
            t0 = time.perf_counter()
            async with s.post(url, data=body,
                              headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            lat.append(time.perf_counter() - t0)

        for _ in range(50):  # warm the connection pool
            await one()
        lat.clear()
        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    lat.sort()
    return {"rps": n / elapsed, "p50": lat[len(lat) // 2] * 1000,
            "p99": lat[int(len(lat) * 0.99)] * 1000, "errors": errors}


def core_timing(pod: dict) -> dict:
    policy = PolicyDefaults()
    ctx = inject.Context(namespace="team-a", policy=policy)
    n = 2000
    decide_us = min(timeit.repeat(lambda: inject.decide(pod, ctx), number=n, repeat=5)) / n * 1e6
    body = review_for(pod)
    review_us = min(timeit.repeat(lambda: admission.review(body, policy), number=n,
                                  repeat=5)) / n * 1e6
    return {"decide_us": decide_us, "review_us": review_us}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rate", type=int, default=1000)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench needs wrk (apt-get install wrk); `make bench` installs it")
    pod = realistic_pod()
    core = core_timing(pod)
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-") as tmp:
        subprocess.run([sys.executable, "-m", "kvmesh.cli", "certs", "--out", tmp,
                        "--host", "127.0.0.1"], check=True, capture_output=True)
        ca, cert, key = f"{tmp}/ca.crt", f"{tmp}/tls.crt", f"{tmp}/tls.key"
        body_file = Path(tmp) / "review.json"
        body_file.write_bytes(json.dumps(review_for(pod)).encode())
        results = {}
        for name, cmd in (
            ("bare aiohttp", [sys.executable, str(HERE / "bare_server.py")]),
            ("kvmesh", [sys.executable, "-m", "kvmesh.cli", "webhook", "--host", "127.0.0.1"]),
        ):
            port = free_port()
            full = cmd + ([str(port), cert, key] if name.startswith("bare") else
                          ["--port", str(port), "--cert", cert, "--key", key])
            proc = start(full, port, ca)
            try:
                url = f"https://127.0.0.1:{port}/mutate"
                wrk(url, body_file, 2, args.connections)  # warm-up
                peak = wrk(url, body_file, args.seconds, args.connections)
                fixed = asyncio.run(paced(url, body_file.read_bytes(), ca, args.rate,
                                          args.seconds, args.connections))
            finally:
                proc.terminate()
                proc.wait()
            results[name] = (peak, fixed)
    bare, kv = results["bare aiohttp"][0], results["kvmesh"][0]
    ratio = kv["rps"] / bare["rps"]
    p99_fixed = results["kvmesh"][1]["p99"]
    print(f"\n/mutate over TLS on loopback, server on 1 core, {args.connections} connections, "
          f"{args.seconds}s per run, pod: golden 05 (shell script, sidecar, init container)")
    print(f"{'server':<14}{'peak req/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}   "
          f"{'at ' + str(args.rate) + '/s: p50 ms':>18}{'p99 ms':>9}")
    for name, (peak, fixed) in results.items():
        print(f"{name:<14}{peak['rps']:>12.0f}{peak['p50']:>9.2f}{peak['p99']:>9.2f}"
              f"{peak['errors']:>8}   {fixed['p50']:>18.2f}{fixed['p99']:>9.2f}")
    print(f"\nthroughput ratio kvmesh / bare: {ratio:.2f}   (goal >= 0.50: "
          f"{'met' if ratio >= 0.5 else 'MISSED'})")
    print(f"kvmesh p99 at {args.rate} req/s: {p99_fixed:.2f} ms   (goal < 2 ms: "
          f"{'met' if p99_fixed < 2 else 'MISSED'})")
    print(f"pure core: decide {core['decide_us']:.1f} us/pod, review+diff "
          f"{core['review_us']:.1f} us/pod   (goal < 100 us: "
          f"{'met' if core['decide_us'] < 100 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
