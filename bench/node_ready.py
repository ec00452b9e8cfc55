"""Pod create -> Ready on the real node, with and without kvmesh's webhook in the admission
chain, and the size of the images the node runs. Prints figures; not a test.

Set-up (kvmesh/local/node.py, tests/node/test_manifests_real.py): the dev control plane and one
real node (kubelet + containerd + runc + CNI bridge) in a network namespace of their own,
`manifests/` applied as a user would (image line aside), both Deployments rolled out, the
webhook reached through its Service. The pods: the test-only "vLLM" stand-in image (the pause
binary as /usr/local/bin/vllm, a few MB), so the figure is the control plane + kubelet path,
not an image pull or a model load.

Baseline and subject in the same run, alternating (i even: baseline first), N each, one pod
at a time, each deleted and gone before the next:
  without   a pod without the `kvmesh.dev/inject` label: the API server never calls kvmesh;
  with      the same pod labelled `kvmesh.dev/inject: enabled`: the webhook mutates it (env,
            args, labels), so it is admitted through the Service and injected.
Timed from the POST to the Pod's Ready condition as the API server reports it (polled every
50 ms), so each figure includes up to one poll interval.

Needs: `make node` (control plane, node pieces, kvmesh image), root with unshare --net --mount.
About 1-2 minutes on 2 idle cores (longer under load: the manifests' rollout dominates).
Not part of `make bench`: run it directly, `sudo .venv/bin/python bench/node_ready.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from kvmesh.local import node as realnode  # noqa: E402


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The set-up the node tests use, in one place: rendered manifests, the stand-in image, pods.
manifests_real = _load(REPO / "tests" / "node" / "test_manifests_real.py", "kvmesh_node_manifests_real")


def image_sizes(node_bin: Path) -> list[tuple[str, dict]]:
    out = []
    for name, extra in (("kvmesh", ()), ("redis", ()), ("pause", ("--binary", str(node_bin / "pause")))):
        res = subprocess.run([sys.executable, str(realnode.IMAGE_BUILD), name, "--check", "--json", *extra],
                             capture_output=True, text=True)
        if res.returncode == 0:
            out.append((name, json.loads(res.stdout.strip().splitlines()[-1])))
    return out


def ready(c, ns: str, name: str) -> bool:
    p = c.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
    return any(x.get("type") == "Ready" and x.get("status") == "True"
               for x in p.get("status", {}).get("conditions", []))


def gone(c, ns: str, name: str) -> bool:
    try:
        c.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
    except realnode.DevClusterError as e:
        if "HTTP 404" in str(e):
            return True
        raise
    return False


def one_pod(c, ns: str, name: str, opted: bool, timeout: float) -> float:
    pod = manifests_real.standin_pod(name)
    if not opted:
        pod["metadata"]["labels"] = {"app": "bench"}
    t0 = time.monotonic()
    created = c.api("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    injected = "kvmesh.dev/status" in created["metadata"].get("annotations", {})
    if injected != opted:
        raise SystemExit(f"pod {ns}/{name}: expected injected={opted}, the API server stored "
                         f"annotations {created['metadata'].get('annotations')}")
    while not ready(c, ns, name):
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"pod {ns}/{name} not Ready after {timeout:.0f}s: "
                             f"{c.api('GET', f'/api/v1/namespaces/{ns}/pods/{name}').get('status')}")
        time.sleep(0.05)
    took = time.monotonic() - t0
    c.api("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0")
    t1 = time.monotonic()
    while not gone(c, ns, name):
        if time.monotonic() - t1 > timeout:
            raise SystemExit(f"pod {ns}/{name} still present {timeout:.0f}s after its delete")
        time.sleep(0.1)
    return took


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=12, help="pods per variant (default 12)")
    ap.add_argument("--timeout", type=float, default=90, help="per pod Ready / gone bound, s")
    args = ap.parse_args(argv)
    why = realnode.platform_unsupported()
    if why:
        print(f"bench/node_ready.py: the real node cannot run here: {why}", file=sys.stderr)
        return 2
    missing = realnode.prerequisites(("kvmesh",))
    if missing:
        print("bench/node_ready.py: missing " + "; ".join(missing) + " (run `make node`)", file=sys.stderr)
        return 2

    c = realnode.RealNodeCluster(images=("kvmesh",))
    t0 = time.monotonic()
    c.start()
    try:
        started = time.monotonic() - t0
        manifests_real.deploy_manifests(c)
        rolled = c.rollout_seconds
        ns = "bench"
        manifests_real.tenant_namespace(c, ns)
        realnode_wait_sa(c, ns)
        # One of each first, not counted: the first pod of a kind pays one-off costs (the
        # image's first unpack into a snapshot, the webhook's first connection).
        one_pod(c, ns, "warm-without", False, args.timeout)
        one_pod(c, ns, "warm-with", True, args.timeout)
        times: dict[str, list[float]] = {"without": [], "with": []}
        for i in range(args.n):
            order = ("without", "with") if i % 2 == 0 else ("with", "without")
            for kind in order:
                times[kind].append(one_pod(c, ns, f"{kind}-{i}", kind == "with", args.timeout))
        load = os.getloadavg()
    finally:
        c.stop()

    print(f"\nreal node up {started:.1f}s; manifests applied -> both Deployments rolled out {rolled:.1f}s; "
          f"load average during the run {load[0]:.1f} / {load[1]:.1f} (1 / 5 min), {os.cpu_count()} cores")
    print(f"\npod create -> Ready on the real node, {args.n} pods each, alternating, one at a time (s):")
    print(f"{'':<34} {'p50':>6} {'p95':>6} {'min':>6} {'max':>6} {'mean':>6}")
    for kind, label in (("without", "without kvmesh webhook (baseline)"), ("with", "with kvmesh webhook (injected)")):
        xs = times[kind]
        print(f"{label:<34} {pct(xs, .5):6.2f} {pct(xs, .95):6.2f} {min(xs):6.2f} {max(xs):6.2f} "
              f"{statistics.mean(xs):6.2f}")
    d50 = pct(times["with"], .5) - pct(times["without"], .5)
    print(f"{'difference of p50':<34} {d50:+6.2f}")
    print("\nimages (images/build.py metadata):")
    print(f"{'image':<44} {'compressed MB':>13} {'unpacked MB':>11}")
    for name, meta in image_sizes(c.node_bin):
        print(f"{meta['ref']:<44} {meta['tarball_bytes'] / 1e6:13.1f} {meta['uncompressed_bytes'] / 1e6:11.1f}")
    return 0


def realnode_wait_sa(c, ns: str) -> None:
    """The ServiceAccount admission plugin rejects pods until the namespace's default SA exists."""
    deadline = time.monotonic() + 60
    while not c._exists(f"/api/v1/namespaces/{ns}/serviceaccounts/default"):
        if time.monotonic() > deadline:
            raise SystemExit(f"no default ServiceAccount in {ns} after 60s")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
