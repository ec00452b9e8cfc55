"""`kvmesh demo`: the main job on the embedded control plane.

Builds (cached) and starts a local Kubernetes control plane, installs manifests/, runs the
kvmesh webhook and controller against it, creates the sample vLLM Deployment opted in with
one label, and prints what its pods received through the real admission chain. Ctrl-C stops
everything it started.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import tempfile
import time
from pathlib import Path

import yaml

from kvmesh.core import names
from kvmesh.local.devcluster import DevCluster, build_binaries
from kvmesh.local.localstack import LocalStack

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "manifests" / "samples" / "vllm-deployment.yaml"


def _say(msg: str) -> None:
    print(f"kvmesh demo: {msg}", flush=True)


def _running(cluster: DevCluster, ns: str, selector: str, n: int, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = [p for p in cluster.kubectl_json("get", "pods", "-n", ns, "-l", selector)["items"]
                if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        if len(pods) >= n:
            return pods[:n]
        time.sleep(0.3)
    raise TimeoutError(f"pods {selector} in {ns} did not start within {timeout}s")


def show_pod(p: dict) -> None:
    ann = p["metadata"].get("annotations") or {}
    status = json.loads(ann.get(names.ANN_STATUS, "{}"))
    print(f"\npod {p['metadata']['name']}  IP {p['status']['podIP']}  "
          f"mode={status.get('mode')} ({status.get('modeReason')})")
    c = next(c for c in p["spec"]["containers"] if c["name"] == status.get("container"))
    ip_var = None
    for e in c.get("env", []):
        if "valueFrom" in e:
            path = e["valueFrom"].get("fieldRef", {}).get("fieldPath", "?")
            value = {"status.podIP": p["status"]["podIP"],
                     "metadata.name": p["metadata"]["name"],
                     "metadata.uid": p["metadata"].get("uid")}.get(path, f"<{path}>")
            if path == "status.podIP":
                ip_var = e["name"]
            print(f"  env  {e['name']}={value}   (downward API {path})")
        else:
            shown = e["value"]
            if ip_var and f"$({ip_var})" in shown:
                shown += f"   -> {shown.replace(f'$({ip_var})', p['status']['podIP'])}"
            print(f"  env  {e['name']}={shown}")
    for port in c.get("ports", []):
        print(f"  port {port.get('name', '')}={port['containerPort']}")
    print(f"  argv {' '.join((c.get('command') or []) + (c.get('args') or []))}")


def run(sample_file: str | None = None, exit_after_showing: bool = False) -> int:
    """Run the demo until Ctrl-C (or, with exit_after_showing, once the pods are shown)."""
    sample = Path(sample_file) if sample_file else SAMPLE
    doc = yaml.safe_load(sample.read_text())
    ns = doc["metadata"].get("namespace", "default")
    t0 = time.monotonic()
    _say("building the control plane (cached after the first run)...")
    bin_dir = build_binaries()
    with tempfile.TemporaryDirectory(prefix="kvmesh-demo-") as tmp:
        cluster = DevCluster(bin_dir, nodes=2, workdir=Path(tmp) / "cluster")
        cluster.start()
        stack = LocalStack(cluster, Path(tmp) / "stack")
        try:
            _say(f"control plane up at {cluster.server}; kubeconfig {cluster.kubeconfig}")
            stack.up()
            _say(f"manifests/ applied; webhook https://127.0.0.1:{stack.webhook_port} trusted "
                 "by the API server; controller leading")
            if ns != "default":
                cluster.create_namespace(ns)
            cluster.kubectl("apply", "-f", str(sample))
            sel = ",".join(f"{k}={v}" for k, v in
                           doc["spec"]["selector"]["matchLabels"].items())
            pods = _running(cluster, ns, sel, doc["spec"].get("replicas", 1))
            _say(f"{sample.name}: {len(pods)} pods created by the ReplicaSet controller "
                 f"through the admission chain ({time.monotonic() - t0:.1f}s since start)")
            for p in pods:
                show_pod(p)
            print()
            if exit_after_showing:
                return 0
            _say(f"running; try `KUBECONFIG={cluster.kubeconfig} kubectl get pods -A` in "
                 "another shell. Ctrl-C stops everything.")
            # Explicitly: a shell's `cmd &` (and so CI harnesses) start us with SIGINT ignored,
            # and Python then installs no KeyboardInterrupt for it (seen in the suite: the demo
            # slept through Ctrl-C).
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.default_int_handler)
            # `kill -USR1 <pid>` prints where every thread is (a stop that takes too long).
            faulthandler.register(signal.SIGUSR1, all_threads=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
        finally:
            _say("stopping webhook, controller and control plane")
            t = time.monotonic()
            stack.down()
            _say(f"webhook and controller stopped ({time.monotonic() - t:.1f}s)")
            t = time.monotonic()
            cluster.stop()
            _say(f"control plane stopped ({time.monotonic() - t:.1f}s)")
