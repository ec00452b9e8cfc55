"""A real kubelet node (kvmesh/local/node.py): pods really run, and nothing of the run is left.

Skipped, with what is missing, unless every prerequisite is built (`make node`); under
KVMESH_REQUIRE_CLUSTER=1 (`make test`) or KVMESH_REQUIRE_NODE=1 a missing piece fails instead.
Skipped in every case where the machine itself cannot (not root, no namespaces). The harness puts everything in a network namespace
it creates, so these tests never touch the machine's own network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmesh.local import node as realnode
from support import wait_for as wait

REPO = Path(__file__).resolve().parents[2]


def require(images: tuple[str, ...] = ()) -> None:
    """Skip only where the machine cannot run a node at all (no root, no namespaces). A missing
    build is a skip for a partial run, but a failure under `make test` / `make test-node`
    (KVMESH_REQUIRE_CLUSTER=1 / KVMESH_REQUIRE_NODE=1), which build everything first."""
    why = realnode.platform_unsupported()
    if why:
        pytest.skip(f"real node cannot run on this machine: {why}")
    missing = realnode.prerequisites(images)
    if missing:
        msg = "real node not available, missing: " + "; ".join(missing) + " (run `make node`)"
        if "1" in (os.environ.get("KVMESH_REQUIRE_CLUSTER"), os.environ.get("KVMESH_REQUIRE_NODE")):
            pytest.fail(msg)
        pytest.skip(msg)


def pod(name: str, image: str, command: list[str], **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": image, "command": command,
                                     "imagePullPolicy": "Never"}],
                     "nodeSelector": {"kvmesh.dev/real-node": "true"}, **spec}}


def pod_ready(c, name: str, ns: str = "default") -> bool:
    p = c.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
    return any(x.get("type") == "Ready" and x.get("status") == "True"
               for x in p.get("status", {}).get("conditions", []))


def test_a_pod_runs_and_teardown_leaves_nothing(tmp_path):
    """Start, run a pod on the bridge, stop: sysctls as before, namespace, cgroups, record and
    processes gone, no mount of the run visible on the machine."""
    require()
    before = realnode._read_sysctls()
    mounts_before = Path("/proc/self/mountinfo").read_text()
    dirs_before = {d: os.path.exists(d) for d in realnode.MOUNTPOINTS}
    c = realnode.RealNodeCluster(images=(), workdir=tmp_path / "w", verbose=True)
    c.start()
    netns, cgroot, mntns = c.netns, c.cgroup_root, c._mntns
    try:
        assert netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert "default" not in c.ns_run("ip", "route", "show").stdout  # no route out
        pause = c.image_refs["pause"]
        t0 = time.monotonic()
        c.api("POST", "/api/v1/namespaces/default/pods", pod("p1", pause, ["/pause"]))
        wait("pod p1 Ready", lambda: pod_ready(c, "p1"), timeout=90)
        first_ready = time.monotonic() - t0
        ip = c.api("GET", "/api/v1/namespaces/default/pods/p1")["status"]["podIP"]
        assert ip.startswith("10.244.0."), ip
        print(f"\nreal node: up {c.startup_seconds:.1f}s {json.dumps({k: round(v, 1) for k, v in c.timings.items()})}; "
              f"first pod Ready {first_ready:.1f}s at {ip}", file=sys.stderr)
        # The kubelet changed the machine-wide sysctls it manages (that is why they are restored).
        during = realnode._read_sysctls()
        print(f"sysctls before {before} during {during}", file=sys.stderr)
    finally:
        c.stop()
    print(f"teardown {c.timings['teardown']:.1f}s", file=sys.stderr)
    assert c.teardown_problems == []
    assert realnode._read_sysctls() == before
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for mount in realnode._cgroup_mounts():
        assert not (mount / cgroot.lstrip("/")).exists(), mount
    assert realnode._processes_in_mntns(mntns) == []
    assert not (realnode.RECORDS / f"{netns}.json").exists()
    assert Path("/proc/self/mountinfo").read_text().count("kvmesh-node") == mounts_before.count("kvmesh-node")
    assert {d: os.path.exists(d) for d in realnode.MOUNTPOINTS} == dirs_before  # mount points it made: gone


CRASHER = """
import json, os, sys, time
from kvmesh.local.node import RealNodeCluster
c = RealNodeCluster(images=(), workdir=sys.argv[1])
c.start()
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
       "spec": {"containers": [{"name": "c", "image": c.image_refs["pause"], "command": ["/pause"]}]}}
c.api("POST", "/api/v1/namespaces/default/pods", pod)
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    st = c.api("GET", "/api/v1/namespaces/default/pods/p").get("status", {})
    if st.get("phase") == "Running":
        break
    time.sleep(0.3)
print(json.dumps({"netns": c.netns, "cgroup_root": c.cgroup_root, "phase": st.get("phase")}), flush=True)
os.kill(os.getpid(), 9)  # no teardown at all: kubelet, containerd, shims and the pod keep running
"""


def test_a_crashed_run_is_cleaned_up_by_the_next(tmp_path):
    """SIGKILL of the process that owns a running node (pod included): the next run's
    cleanup_stale() stops what was left, removes namespace and cgroups, restores sysctls."""
    require()
    before = realnode._read_sysctls()
    res = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path / "w")], capture_output=True,
                         text=True, timeout=240, cwd=REPO)
    assert res.returncode == -9, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["phase"] == "Running"
    ns_file = Path("/run/netns") / info["netns"]
    assert ns_file.exists()
    assert realnode._processes_in_netns(os.stat(ns_file).st_ino)  # the node outlived its owner
    done = realnode.cleanup_stale()
    assert any(info["netns"] in line for line in done), done
    assert not [line for line in done if "problem" in line or "left" in line], done
    assert not ns_file.exists()
    for mount in realnode._cgroup_mounts():
        assert not (mount / info["cgroup_root"].lstrip("/")).exists(), mount
    assert realnode._read_sysctls() == before
