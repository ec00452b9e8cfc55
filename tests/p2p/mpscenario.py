"""TEST CODE: the mp-mode P2P scenario on the real control plane, shared by
tests/p2p/test_p2p_mp.py (which asserts) and bench/p2p.py (which times).

Pieces: kvmesh's webhook and controller (policy: chunkSize 16, a small L1); an opted-in
Deployment of `lmcache/vllm-openai:v0.5.6` pods with `kvmesh.dev/mode: mp`, admitted through
kvmesh's webhook, given loopback pod IPs by KWOK; the group's coordinator pod, created by
kvmesh's controller, run as the real `lmcache coordinator`; per member, its injected server
sidecar run as the real `lmcache server` and a driver with LMCache's own client classes
(tests/p2p/mprunner.py lists the stand-ins). Pod B is the long-lived reader; A pods come and go.

Measures, from the moment of the event:
  - clean miss: B's first lookup of a prefix only the dead A held that answers 0 tokens in
    under a second (before that, each lookup waits LMCache's hard-coded 3 s on the dead peer);
  - after a restart in place: the new incarnation registered, B peered with it, and B's first
    byte-identical hit on what the new A stored.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (support)
import mprunner  # noqa: E402
from mprunner import CoordinatorPod, DriverPod, ServerPod  # noqa: E402
from scenario import DeploymentViews  # noqa: E402
from support import wait_for  # noqa: E402

from kvmesh.core import names  # noqa: E402

IMAGE = "lmcache/vllm-openai:v0.5.6"
CHUNK = 16  # tokens per chunk = vLLM block size of the driver (512 KiB of KV per chunk)
KIB_PER_CHUNK = 512
GID = "mp-default"
SERVER_UP_S = 300  # a server starts in 30-90 s on a loaded 2-core machine
CLEAN_MISS_S = 1.0  # a lookup answered 0 faster than this is not waiting on a dead peer
LOOKUP_LIMIT_S = 15.0  # every lookup is bounded (a dead peer costs 3 s per lookup)
# The "without kvmesh" baseline: LMCache's own defaults where kvmesh sets something.
DEFAULT_COORDINATOR_DROP = ("--instance-timeout", "--health-check-interval")
DEFAULT_SERVER_DROP_ENV = ("LMCACHE_COORDINATOR_HEARTBEAT_INTERVAL",)


@dataclass
class Member:
    pod: dict
    server: ServerPod
    state: Path  # the pod's emptyDir (mprunner STAND-IN 4)
    driver: Optional[DriverPod] = None

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def ip(self) -> str:
        return self.pod["status"]["podIP"]


@dataclass
class Outcome:
    event: str
    clean_miss_s: Optional[float] = None
    slow_lookups: int = 0  # lookups that waited on the dead peer before the clean miss
    registered_s: Optional[float] = None
    peered_s: Optional[float] = None
    first_hit_s: Optional[float] = None
    detail: dict = field(default_factory=dict)


class MpScenario(DeploymentViews):
    def __init__(self, cluster, stack, workdir: Path, kvmesh: bool = True):
        self.cluster, self.stack, self.workdir = cluster, stack, workdir
        self.kvmesh = kvmesh  # False: LMCache defaults, kvmesh's controller stopped
        self.namespace = f"mp-{os.getpid()}-{int(time.time()) % 100000}"
        self.deployment = "llm"
        self.coordinator: Optional[CoordinatorPod] = None
        self.members: list[Member] = []
        self.used: set[str] = set()
        self.controller_args: tuple = ()

    # -- set-up / tear-down

    def start(self, replicas: int = 2) -> "MpScenario":
        mprunner.venv_bin()
        policy = self.workdir / "policy.yaml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        policy.write_text(f"chunkSize: {CHUNK}\ncpuCacheGb: 0.5\n")
        self.controller_args = ("--policy", str(policy), "--resync-seconds", "1",
                                "--group-grace-seconds", "5")
        self.stack.restart(controller_args=self.controller_args,
                           webhook_args=("--policy", str(policy)))
        self.cluster.create_namespace(self.namespace, labels={"kvmesh-test": "true"})
        dep = {"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": self.deployment, "namespace": self.namespace},
               "spec": {"replicas": replicas,
                        "selector": {"matchLabels": {"app": self.deployment}},
                        "template": {"metadata": {
                            "labels": {"app": self.deployment, names.LABEL_INJECT: "enabled"},
                            "annotations": {names.ANN_MODE: names.MODE_MP}},
                            "spec": {"containers": [{
                                "name": "vllm", "image": IMAGE,
                                "command": ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct"]}]}}}}
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(dep))
        pods = wait_for(f"{replicas} ready pods", lambda: self._ready_pods(replicas), 90, 0.2)
        cpod = wait_for("the coordinator pod kvmesh's controller created",
                        self._coordinator_pod, 90, 0.2)
        self.coordinator = CoordinatorPod(
            cpod, self.workdir / "coordinator",
            drop_flags=() if self.kvmesh else DEFAULT_COORDINATOR_DROP)
        if not self.kvmesh:
            self.stack.controller.stop()
        # servers start together (their start-up dominates), the coordinator meanwhile
        for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
            self.used.add(p["metadata"]["name"])
            self.members.append(self._member(p))
        self.coordinator.wait_up()
        for m in self.members:
            m.server.wait_registered(self.coordinator, SERVER_UP_S)
        self.connect(*self.members)
        return self

    def _member(self, pod: dict, state: Optional[Path] = None) -> Member:
        state = state or self.workdir / "state" / pod["metadata"]["uid"]
        return Member(pod, self._server(pod, state), state)

    def _server(self, pod: dict, state: Path) -> ServerPod:
        return ServerPod(pod, self.coordinator.ip, state, self.workdir / "pods",
                         drop_env=() if self.kvmesh else DEFAULT_SERVER_DROP_ENV,
                         bare=not self.kvmesh, listed=self.coordinator.listed())

    def connect(self, *members: Member) -> None:
        """Each member's driver (its vLLM side); every member peered with every other."""
        for m in members:
            if m.driver is not None:
                m.driver.stop()
            m.driver = DriverPod(m.pod, "vllm", self.workdir / "pods", CHUNK)
        for m in members:
            m.driver.wait_ready()
        ids = {m.server.instance_id for m in self.members}
        for m in self.members:
            m.server.wait_peers(ids - {m.server.instance_id}, 120)

    def b(self) -> Member:
        return self.members[0]

    def stop(self) -> None:
        for m in self.members:
            if m.driver:
                m.driver.stop()
            m.server.stop()
        if self.coordinator:
            self.coordinator.stop()
        self.cluster.kubectl("delete", "namespace", self.namespace, "--wait=false",
                             check=False)
        if not self.kvmesh:
            self.stack.start_controller(*self.controller_args)

    # -- Kubernetes views

    def _coordinator_pod(self) -> Optional[dict]:
        ps = [p for p in self.cluster.kubectl_json(
            "get", "pods", "-n", self.namespace, "-l",
            f"{names.LABEL_LOOKUP_FOR}={GID}")["items"] if self.is_ready(p)]
        return ps[0] if ps else None

    def peer_group(self) -> dict:
        return self.cluster.kubectl_json("get", "kvmeshpeergroup", "-n", self.namespace, GID)

    def fresh_member(self, timeout: float = 90) -> Member:
        """A ready pod of the Deployment not used before, with its server and driver up."""
        def probe():
            return next((p for p in self.pods() if self.is_ready(p)
                         and p["metadata"]["name"] not in self.used), None)
        pod = wait_for("a fresh ready pod", probe, timeout, 0.2)
        self.used.add(pod["metadata"]["name"])
        m = self._member(pod)
        self.members.append(m)
        m.server.wait_registered(self.coordinator, SERVER_UP_S)
        self.connect(m)
        return m

    # -- B's view

    def first_clean_miss(self, b: Member, seed: int, chunks: int, t0: float,
                         bound: float) -> tuple[Optional[float], list[dict]]:
        """B's lookups of `seed` (which B never fetched, so its own L1 cannot answer) until
        one is a clean miss; each lookup seen gets `t` (s since t0, when it was sent)."""
        seen = []
        while time.monotonic() - t0 < bound:
            sent = time.monotonic() - t0
            r = b.driver.call("lookup", seed=seed, chunks=chunks, limit=LOOKUP_LIMIT_S,
                              timeout=LOOKUP_LIMIT_S + 30)
            r["t"] = round(sent, 2)
            seen.append(r)
            if r["ok"] and r["hit"] == 0 and r["lookup_ms"] < CLEAN_MISS_S * 1000:
                return time.monotonic() - t0, seen
            time.sleep(0.05)
        return None, seen

    def prime(self, a: Member, b: Member, seed: int, chunks: int) -> dict:
        """Before an event: B fetches `seed` from A (peered, byte-identical), and A also holds
        `seed + 1`, which B never looked up: what B asks for after the event."""
        got = self.share(a, b, seed, chunks)
        assert got.get("hit") == chunks * CHUNK and got.get("equal"), got
        st = a.driver.call("store", seed=seed + 1, chunks=chunks)
        assert st["ok"], st
        return got

    def _kube(self, *args: str) -> threading.Thread:
        """A Kubernetes action in the background, as the kubelet reports a change on its own:
        B's lookups start at the event, not after kubectl's start-up on a loaded machine."""
        t = threading.Thread(target=self.cluster.kubectl, args=args, daemon=True)
        t.start()
        return t

    @staticmethod
    def _summary(out: "Outcome", seen: list[dict]) -> None:
        out.slow_lookups = sum(1 for r in seen if r.get("lookup_ms", 0) >= CLEAN_MISS_S * 1000)
        out.detail["lookups"] = [(r.get("t"), r.get("hit"), round(r.get("lookup_ms") or 0))
                                 for r in seen[-12:]]

    def share(self, a: Member, b: Member, seed: int, chunks: int, bound: float = 20) -> dict:
        """A stores; B fetches until it hits (bounded); returns B's fetch (checked by caller)."""
        st = a.driver.call("store", seed=seed, chunks=chunks)
        assert st["ok"], st
        t0 = time.monotonic()
        while True:
            got = b.driver.call("fetch", seed=seed, chunks=chunks, limit=LOOKUP_LIMIT_S,
                                timeout=LOOKUP_LIMIT_S + 60)
            if got.get("hit") or time.monotonic() - t0 > bound:
                got["store"] = st
                return got
            time.sleep(0.2)

    # -- events

    def delete_pod(self, a: Member, b: Member, seed: int, chunks: int,
                   bound: float) -> Outcome:
        """A's pod is deleted with its server crashed (nothing deregisters it, as on a node
        failure); B looks up what only A held."""
        a.driver.kill()
        a.server.kill()
        t0 = time.monotonic()
        action = self._kube("delete", "pod", "-n", self.namespace, a.name, "--wait=false")
        out = Outcome("pod deleted")
        out.clean_miss_s, seen = self.first_clean_miss(b, seed + 1, chunks, t0, bound)
        self._summary(out, seen)
        action.join(60)
        self.members.remove(a)
        return out

    def restart_in_place(self, a: Member, b: Member, seed: int, chunks: int,
                         bound: float) -> Outcome:
        """A's server crashes and comes back in the same pod (same IP and ports), as the
        kubelet restarts a native sidecar: the process group is killed, restartCount rises
        in the pod status, the same container starts again with the same emptyDir."""
        pod = self.pod(a.name)
        idx = next(i for i, cs in enumerate(pod["status"]["initContainerStatuses"])
                   if cs["name"] == names.MP_SIDECAR)
        count = pod["status"]["initContainerStatuses"][idx].get("restartCount", 0) + 1
        a.driver.kill()
        old_id = a.server.instance_id
        a.server.kill()
        t0 = time.monotonic()
        action = self._kube(
            "patch", "pod", "-n", self.namespace, a.name, "--subresource=status",
            "--type=json", "-p", json.dumps([{
                "op": "replace", "value": count,
                "path": f"/status/initContainerStatuses/{idx}/restartCount"}]))
        a.server = self._server(a.pod, a.state)
        out = Outcome("restart in place", detail={"old_id": old_id,
                                                  "new_id": a.server.instance_id})
        out.clean_miss_s, seen = self.first_clean_miss(b, seed + 1, chunks, t0, bound)
        self._summary(out, seen)
        action.join(60)
        a.server.wait_registered(self.coordinator, SERVER_UP_S)
        out.registered_s = time.monotonic() - t0
        out.detail["old_listed_after_restart"] = old_id in self.coordinator.listed()
        a.driver = DriverPod(a.pod, "vllm", self.workdir / "pods", CHUNK)
        a.driver.wait_ready()
        try:
            b.server.wait_peers({a.server.instance_id}, bound)
            out.peered_s = time.monotonic() - t0
        except mprunner.NotUp:  # (wait_peers stops nothing of B: B's process still runs)
            return out
        got = self.share(a, b, seed + 2, chunks, bound=bound)
        if got.get("hit") and got.get("equal"):
            out.first_hit_s = time.monotonic() - t0
        out.detail["fetch"] = {k: got.get(k) for k in ("hit", "equal", "lookup_ms")}
        return out
