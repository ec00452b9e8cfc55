"""TEST CODE: the P2P sharing scenario on the real control plane with KWOK pods, used by
bench/p2p.py (which times) and tests/p2p/test_p2p_controller_mode.py (its Kubernetes side). The
asserting 0.3.6 test runs on the real node instead (tests/node/test_p2p_real.py: a kubelet,
CoreDNS and the pod network in place of the stand-ins below, each kind of death done by the node).

Pieces, all real except the engines' three labelled stand-ins (see engine_node.py):
  - a redis-server on 127.0.0.1 (free port) = the external lookup Redis of the policy
    (`redisAddress`), handed to kvmesh's webhook and controller with `--policy`;
  - an opted-in Deployment of `lmcache/vllm-openai:v0.3.6` pods, admitted by the API server
    through kvmesh's webhook, scheduled, given loopback pod IPs by KWOK;
  - one LMCache 0.3.6 engine process per pod (podrunner), configured only by what kvmesh
    injected, expanded as the kubelet would.

Pod B (the first pod) is the long-lived reader; each "fresh A" is another pod of the Deployment
(the ReplicaSet replaces each A that is deleted). The three kinds of peer death are done the way
Kubernetes shows them: deletion; readiness loss (Ready condition False, patched in the status
subresource as the kubelet would) while A's process is frozen; a container restart with a new IP
(status patch of podIP/podIPs and restartCount) after A's process is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import podrunner  # noqa: E402
from support import free_port  # noqa: E402
from support import wait_for  # noqa: E402,F401  (re-exported for the p2p tests)

from kvmesh.core import names  # noqa: E402

IMAGE = "lmcache/vllm-openai:v0.3.6"  # the webhook injects the Redis (legacy) generation
CHUNK = 256
# New pod IPs for the "restarted with a new IP" case: inside KWOK's 127.64.0.0/16 pod CIDR, far
# from the addresses it hands out first, so it is a loopback address an engine can bind.
NEW_IP_BASE = "127.64.254."


class RedisServer:
    """redis-server on 127.0.0.1 (free port, no persistence), in its own process group."""

    def __init__(self, workdir: Path):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server missing: `make system-packages` installs it")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.client = redis.Redis("127.0.0.1", self.port, decode_responses=True)
        wait_for("redis-server", self._ping, 10)

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def values(self) -> dict[str, int]:
        """LMCache's keys by value (the address that holds the chunk); kvmesh's own keys
        (its reverse index, prefix `kvmesh:`) are left out."""
        out: dict[str, int] = {}
        for k in self.client.scan_iter(count=1000):
            if k.startswith("kvmesh:"):
                continue
            v = self.client.get(k)
            if v is not None:
                out[v] = out.get(v, 0) + 1
        return out

    def delete_address(self, addr: str) -> int:
        """What an operator does without kvmesh: DEL every key whose value is `addr`."""
        dead = [k for k in self.client.scan_iter(count=1000)
                if not k.startswith("kvmesh:") and self.client.get(k) == addr]
        return self.client.delete(*dead) if dead else 0

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@dataclass
class Peer:
    """A pod of the Deployment and the engine running it."""

    pod: dict
    engine: podrunner.EngineProcess

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def ip(self) -> str:
        return self.pod["status"]["podIP"]

    @property
    def address(self) -> str:
        return self.engine.ready["distributed_url"]


@dataclass
class Death:
    kind: str  # deleted | not-ready | ip-changed
    t0: float  # monotonic time of the Kubernetes action
    address: str  # the dead incarnation's address (its keys' value)
    detail: dict = field(default_factory=dict)


class DeploymentViews:
    """The scenario's view of its Deployment's pods through the real API server (needs
    `cluster`, `namespace` and `deployment`); shared by the legacy and mp scenarios."""

    def pods(self) -> list[dict]:
        return self.cluster.kubectl_json("get", "pods", "-n", self.namespace, "-l",
                                         f"app={self.deployment}")["items"]

    def pod(self, name: str) -> Optional[dict]:
        r = self.cluster.kubectl("get", "pod", "-n", self.namespace, name, "-o", "json",
                                 check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    @staticmethod
    def is_ready(p: dict) -> bool:
        st = p.get("status") or {}
        cond = {c["type"]: c["status"] for c in st.get("conditions") or []}
        return (st.get("phase") == "Running" and bool(st.get("podIP"))
                and cond.get("Ready") == "True" and not p["metadata"].get("deletionTimestamp"))

    def _ready_pods(self, n: int) -> Optional[list[dict]]:
        ps = [p for p in self.pods() if self.is_ready(p)]
        return ps if len(ps) >= n else None


class P2PScenario(DeploymentViews):
    def __init__(self, cluster, stack, workdir: Path, deployment: str = "llm"):
        self.cluster, self.stack, self.workdir = cluster, stack, workdir
        self.deployment = deployment
        self.namespace = f"p2p-{os.getpid()}-{int(time.time()) % 100000}"
        self.runner = podrunner.PodRunner(workdir / "engines")
        self.redis: Optional[RedisServer] = None
        self.b: Optional[Peer] = None
        self.used: set[str] = set()
        self.new_ips = 0
        self.controller_args: tuple = ()
        self.webhook_args: tuple = ()

    # -- set-up / tear-down

    def start(self, replicas: int = 2) -> "P2PScenario":
        podrunner.engine_python()  # fail early with the setup command if the venv is missing
        self.redis = RedisServer(self.workdir / "redis")
        policy = self.workdir / "policy.yaml"
        policy.write_text(f"redisAddress: {self.redis.address}\ncpuCacheGb: 1\n")
        self.controller_args = ("--policy", str(policy), "--resync-seconds", "1")
        self.webhook_args = ("--policy", str(policy))
        self.stack.restart(controller_args=self.controller_args, webhook_args=self.webhook_args)
        self.cluster.create_namespace(self.namespace, labels={"kvmesh-test": "true"})
        dep = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": self.deployment, "namespace": self.namespace},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": self.deployment}},
                     "template": {"metadata": {"labels": {"app": self.deployment,
                                                          names.LABEL_INJECT: "enabled"}},
                                  "spec": {"containers": [{
                                      "name": "vllm", "image": IMAGE,
                                      "command": ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct"]
                                  }]}}}}
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(dep))
        pods = wait_for(f"{replicas} ready pods", lambda: self._ready_pods(replicas), 60, 0.2)
        first = sorted(pods, key=lambda p: p["metadata"]["name"])[0]
        self.used.add(first["metadata"]["name"])
        self.b = Peer(first, self.runner.start(first))
        return self

    def stop(self) -> None:
        self.runner.close()
        self.cluster.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)
        if self.redis:
            self.redis.stop()

    # -- Kubernetes views

    # -- peers

    def unused_pod(self, timeout: float = 60) -> dict:
        """A ready pod of the Deployment never used before (then marked used)."""
        def probe():
            for p in self.pods():
                if self.is_ready(p) and p["metadata"]["name"] not in self.used:
                    return p
            return None
        pod = wait_for("a fresh ready pod", probe, timeout, 0.2)
        self.used.add(pod["metadata"]["name"])
        return pod

    def fresh_a(self, timeout: float = 60) -> Peer:
        """A ready pod of the Deployment never used before, with its engine started."""
        pod = self.unused_pod(timeout)
        return Peer(pod, self.runner.start(pod))

    def replace_b(self) -> None:
        """B's engine after a wedged call: the same pod, a new engine process."""
        assert self.b is not None
        self.b.engine.close()
        self.b = Peer(self.pod(self.b.name) or self.b.pod, self.runner.start(self.b.pod))

    # -- peer deaths, as Kubernetes shows them

    def kill_deleted(self, a: Peer) -> Death:
        a.engine.kill()  # the container is gone with its pod; nothing closes LMCache cleanly
        t0 = time.monotonic()
        self.cluster.kubectl("delete", "pod", "-n", self.namespace, a.name, "--wait=false")
        return Death("deleted", t0, a.address)

    def kill_not_ready(self, a: Peer) -> Death:
        """A hangs: its process is frozen (SIGSTOP; its kernel still accepts connections) and
        the kubelet's readiness probe fails, which shows as Ready=False in the pod status."""
        a.engine.freeze()
        t0 = time.monotonic()
        patch = {"status": {"conditions": [
            {"type": "Ready", "status": "False", "reason": "ReadinessProbeFailed"},
            {"type": "ContainersReady", "status": "False", "reason": "ReadinessProbeFailed"}]}}
        self.cluster.kubectl("patch", "pod", "-n", self.namespace, a.name,
                             "--subresource=status", "--type=strategic", "-p", json.dumps(patch))
        return Death("not-ready", t0, a.address)

    def kill_ip_changed(self, a: Peer) -> Death:
        """A's container crashes (SIGKILL) and comes back with a new IP: podIP/podIPs and the
        container's restartCount change in the pod status, as the kubelet reports them."""
        a.engine.kill()
        pod = self.pod(a.name)
        assert pod is not None
        idx = next(i for i, cs in enumerate(pod["status"]["containerStatuses"])
                   if cs["name"] == "vllm")
        restarts = pod["status"]["containerStatuses"][idx].get("restartCount", 0) + 1
        self.new_ips += 1
        new_ip = f"{NEW_IP_BASE}{10 + self.new_ips}"
        ops = [{"op": "replace", "path": "/status/podIP", "value": new_ip},
               {"op": "replace", "path": "/status/podIPs", "value": [{"ip": new_ip}]},
               {"op": "replace", "path": f"/status/containerStatuses/{idx}/restartCount",
                "value": restarts}]
        t0 = time.monotonic()
        self.cluster.kubectl("patch", "pod", "-n", self.namespace, a.name,
                             "--subresource=status", "--type=json", "-p", json.dumps(ops))
        return Death("ip-changed", t0, a.address, {"new_ip": new_ip})

    def kill(self, kind: str, a: Peer) -> Death:
        return {"deleted": self.kill_deleted, "not-ready": self.kill_not_ready,
                "ip-changed": self.kill_ip_changed}[kind](a)

    def retire(self, a: Peer) -> None:
        """Done with an A: its engine stops and its pod goes (the ReplicaSet makes the next A)."""
        a.engine.close()
        self.cluster.kubectl("delete", "pod", "-n", self.namespace, a.name, "--wait=false",
                             check=False)

    # -- B's view

    def b_call(self, cmd: str, seed: int, tokens: int, timeout: Optional[float] = None) -> dict:
        assert self.b is not None
        return self.b.engine.call(cmd, seed=seed, tokens=tokens, timeout=timeout)

    def wait_clean_miss(self, seed: int, tokens: int, t0: float, bound: float = 10.0
                        ) -> tuple[Optional[float], list[dict]]:
        """Poll B's lookup until it is a clean miss (hit 0, no exception).
        Returns (seconds since t0 or None if not within `bound`, the lookups seen)."""
        seen = []
        while time.monotonic() - t0 < bound:
            r = self.b_call("lookup", seed, tokens, timeout=5)
            seen.append(r)
            if r.get("ok") and r["hit"] == 0:
                return time.monotonic() - t0, seen
            time.sleep(0.01)
        return None, seen
