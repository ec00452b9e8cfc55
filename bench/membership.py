"""Membership convergence: time from a pod's deletion (or readiness loss) through the real
API server to its lookup state being gone from a real Redis, with kvmesh's controller.

Runs the local control plane (kvmesh.local.devcluster), kvmesh's webhook and controller as local
processes, a redis-mode Deployment, and a real redis-server bound to the group's lookup pod
IP. Each trial: every pod publishes K keys (plain SET, as LMCache does), one pod is deleted,
and the clock runs until no key with its address is left (polled every 2 ms).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import yaml

HERE = Path(__file__).resolve().parent
# tests/e2e for its helpers, and tests/ for support.py, which those helpers import
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))

from helpers import publish_keys, running_pods, vllm_deployment  # noqa: E402
from support import wait_for  # noqa: E402
from test_mesh import lookup_pod  # noqa: E402

from kvmesh.core import names  # noqa: E402
from kvmesh.local.devcluster import DevCluster, build_binaries  # noqa: E402
from kvmesh.local.localstack import LocalStack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--keys", type=int, default=10000, help="keys per pod")
    ap.add_argument("--replicas", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-") as tmp:
        cluster = DevCluster(build_binaries(), nodes=2, workdir=Path(tmp) / "c")
        cluster.start()
        stack = LocalStack(cluster, Path(tmp) / "s")
        server = None
        try:
            stack.apply_manifests()
            stack.restart(controller_args=("--resync-seconds", "1"))  # up(), with one flag
            cluster.create_namespace("bench")
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(vllm_deployment(
                "m", "bench", args.replicas, {names.LABEL_INJECT: "enabled"},
                "lmcache/vllm-openai:v0.3.6")))
            rpod = wait_for("the group's lookup pod",
                            lambda: lookup_pod(cluster, "bench", "redis-default"), 60, 0.2)
            ip = rpod["status"]["podIP"]
            server = subprocess.Popen(["redis-server", "--bind", ip, "--port", "6379",
                                       "--save", "", "--appendonly", "no", "--dir", tmp],
                                      stdout=subprocess.DEVNULL)
            r = redis.Redis(ip, 6379)
            wait_for("redis-server", lambda: _ping(r), 10, 0.05)
            times = []
            for t in range(args.trials):
                pods = running_pods(cluster, "bench", "app=m", args.replicas)
                published = {p["metadata"]["name"]: publish_keys(
                    r, p["metadata"]["name"], f"{p['status']['podIP']}:8200", args.keys,
                    f"{t}-") for p in pods}
                time.sleep(1.0)  # let the index catch up, as in steady state
                victim = pods[0]
                mine = published[victim["metadata"]["name"]]
                t0 = time.monotonic()
                cluster.kubectl("delete", "pod", "-n", "bench", victim["metadata"]["name"],
                                "--wait=false")
                while r.exists(*mine):  # one EXISTS over the victim's keys per poll
                    time.sleep(0.002)
                times.append(time.monotonic() - t0)
                others = sum(1 for k in r.scan_iter(count=5000) if not k.startswith(b"kvmesh:"))
                assert others == (args.replicas - 1) * args.keys, others  # live keys intact
                r.flushdb()
            print(f"\npod deletion -> all {args.keys} of its keys purged (real API server, "
                  f"real Redis, {args.replicas} pods x {args.keys} keys, {args.trials} trials)")
            print(f"  median {statistics.median(times) * 1000:.0f} ms, "
                  f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")
            print("  baseline without kvmesh's controller: the keys never go (no TTL) until "
                  "Redis is flushed")
            print(f"  goal < 1 s: {'met' if max(times) < 1 else 'MISSED'}")
        finally:
            if server:
                server.kill()
            stack.down()
            cluster.stop()
    return 0


def _ping(r):
    try:
        return r.ping()
    except redis.ConnectionError:
        return False


if __name__ == "__main__":
    sys.exit(main())
