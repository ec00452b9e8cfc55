"""LMCache 0.3.6 engines as REAL PODS on the real node, sharing KV through kvmesh (issue 10).

The tests/p2p scenario with its stand-ins for Kubernetes gone: the kubelet starts the engine
containers with the env the API server stored after kvmesh's admission, and expands
`$(KVMESH_POD_IP)` itself (no kubelet_expand emulation); pods get bridge IPs from the CNI (no
loopback pod-network stand-in); the lookup address kvmesh injects
(`kvmesh-redis-default.<ns>.svc`) is resolved by the pod's resolver through CoreDNS to the
controller's in-cluster Redis Deployment, a real pod behind a real Service (no /etc/hosts
stand-in, no external Redis); the controller is the shipped Deployment's pod; KV moves between
pods over the bridge; `kubectl delete pod` is a real deletion (container killed by the kubelet).

TEST-ONLY ARRANGEMENT, named as such: the engine image is kvmesh's own image (Debian python
runtime libraries) imported under the name `lmcache/vllm-openai:v0.3.6`, so admission sees the
LMCache image a user would run; the engine venv (tests/consumers/setup_envs.sh), the Python it
was made from, and tests/ are mounted read-only by hostPath at their host paths, and a `vllm`
launcher (mounted at /usr/local/bin) runs tests/node/pod_bridge.py, which hands the test's
control connection to tests/p2p/engine_node.py as its stdin/stdout. The engine keeps its three
stand-ins for vLLM's GPU side (tests/p2p/engine_node.py); LMCache is unpatched. The engine
pods run as root (the venv sits under /root) in a namespace without PodSecurity labels. The
`vllm` launcher also answers `GET /health` (pod_bridge.py) for the pod's readiness probe, as
vLLM does.

Each kind of peer death tests/p2p emulated with status patches is done here by the node itself:
`kubectl delete pod` (deleted); the container's task SIGKILLed in containerd, restarted in place
by the kubelet with the same IP (restarted); the pod sandbox's pause process SIGKILLed, so the
kubelet re-creates the sandbox and the CNI gives the pod a new IP (ip-changed); the container
frozen (`ctr tasks pause`, the cgroup freezer), so its readiness probe times out and the kubelet
marks it not Ready while its kernel still accepts connections (not-ready). With kvmesh's
controller each one is a clean miss for the surviving peer; with the controller Deployment
scaled to zero (webhook and lookup Redis untouched) each one leaves a stale hit whose retrieve
fails or hangs (the last test of the module; it scales the controller back).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from kvmesh.local import node as realnode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import wait_for as wait  # noqa: E402
from test_manifests_real import cluster, deployed, in_node_netns, tenant_namespace, webhook_pods  # noqa: E402,F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
ENGINE_ENV = "lmcache-0.3.6-engine"
ENGINE_IMAGE = "docker.io/lmcache/vllm-openai:v0.3.6"
REDIS_IMAGE = "docker.io/library/redis:7.2-alpine"  # the controller's default, see lookup.py
NS = "p2p"
CONTROL_PORT = 7700
HEALTH_PORT = 8000  # vLLM's default port, where it serves /health
CHUNK, CHUNKS = 256, 8
TOKENS = CHUNK * CHUNKS
# B and ready spares: every kind of death takes a fresh A (the ReplicaSet replaces retired ones).
REPLICAS = 5
KINDS = ("deleted", "restarted", "ip-changed", "not-ready")
CLEAN_MISS_BOUND_S = 60.0  # generous for a loaded 2-core box: the kubelet notices first
CONTROLLER = ("-n", "kvmesh-system", "deployment/kvmesh-controller")


def consumers_module():
    spec = importlib.util.spec_from_file_location("kvmesh_consumers", REPO / "tests" / "consumers" / "consumers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # by path: "consumers" may already be a namespace package
    return mod


def engine_paths() -> tuple[Path, Path]:
    """(engine venv, the Python installation it was made from): both are mounted into the pod."""
    consumers = consumers_module()
    try:
        py = consumers.env_python(ENGINE_ENV)
    except consumers.ConsumerEnvMissing as e:
        pytest.fail(str(e))  # `make test` builds the envs first
    venv = py.parent.parent
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    return venv, Path(cfg["home"]).resolve().parent


class PodEngine:
    """The JSON-lines protocol of tests/p2p/node_protocol.py over TCP to a pod's control port.
    The socket is opened inside the node's network namespace (so it reaches the pod IP)."""

    def __init__(self, c, ip: str, timeout: float = 180, ready_timeout: float = 300):
        self.ip = ip
        self.ready: dict = {}
        self._ids = 0
        deadline = time.monotonic() + 60
        while True:
            self.sock = connect_in_netns(c, ip, CONTROL_PORT, deadline=deadline)
            self.sock.settimeout(ready_timeout)  # the engine imports torch and LMCache first
            self.f = self.sock.makefile("rwb")
            self.ready = self._read()
            self.sock.settimeout(timeout)
            # A replaced driver's engine may still be exiting (it leaves on EOF): ask again.
            if self.ready.get("error") != "engine already driven" or time.monotonic() > deadline:
                break
            self.close()
            time.sleep(0.5)
        assert self.ready.get("event") == "ready", self.ready

    def _read(self) -> dict:
        line = self.f.readline()
        if not line:
            raise RuntimeError(f"engine at {self.ip} closed the connection")
        return json.loads(line)

    def call(self, cmd: str, timeout: float | None = None, **args) -> dict:
        self._ids += 1
        req = {"id": self._ids, "cmd": cmd, **args, **({"timeout": timeout} if timeout else {})}
        self.f.write((json.dumps(req) + "\n").encode())
        self.f.flush()
        reply = self._read()
        assert reply.get("id") == self._ids, reply
        return reply

    def close(self) -> None:
        for x in (self.f, self.sock):
            try:
                x.close()
            except OSError:
                pass


def connect_in_netns(c, ip: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection made from inside the node's namespace, retried until `deadline` (the
    container may not listen yet). A socket keeps the namespace it was created in."""
    while True:
        try:
            return in_node_netns(c, lambda: socket.create_connection((ip, port), timeout=5))
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def launcher(work: Path, venv: Path) -> Path:
    d = work / "engine-bin"
    d.mkdir(parents=True, exist_ok=True)
    script = d / "vllm"
    # `vllm serve ... <kvmesh's --kv-transfer-config>`: the arguments are vLLM's, not ours.
    script.write_text("#!/bin/sh\n# TEST-ONLY stand-in for vLLM (tests/node/test_p2p_real.py)\n"
                      f"exec setarch \"$(uname -m)\" -R {venv}/bin/python -s {REPO}/tests/node/pod_bridge.py "
                      f"{CONTROL_PORT} {REPO}/tests/p2p/engine_node.py {HEALTH_PORT}\n")
    script.chmod(0o755)
    return d


def engine_deployment(venv: Path, pyhome: Path, bin_dir: Path) -> dict:
    mounts = [("engine-env", venv, str(venv)), ("engine-python", pyhome, str(pyhome)),
              ("tests", REPO / "tests", str(REPO / "tests")), ("launcher", bin_dir, "/usr/local/bin")]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "engines", "namespace": NS},
        "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": "engines"}},
                 "template": {
                     "metadata": {"labels": {"app": "engines", "kvmesh.dev/inject": "enabled"}},
                     "spec": {
                         "nodeSelector": {"kvmesh.dev/real-node": "true"},
                         "terminationGracePeriodSeconds": 2,
                         "containers": [{
                             "name": "vllm", "image": ENGINE_IMAGE.removeprefix("docker.io/"),
                             "imagePullPolicy": "IfNotPresent",
                             "command": ["vllm", "serve"], "args": ["Qwen/Qwen2.5-0.5B-Instruct"],
                             "securityContext": {"runAsUser": 0, "runAsGroup": 0},
                             "ports": [{"name": "control", "containerPort": CONTROL_PORT},
                                       {"name": "http", "containerPort": HEALTH_PORT}],
                             # As vLLM's: a hung engine stops answering, the kubelet marks the
                             # pod not Ready. Three missed 5 s answers: a loaded 2-core box must
                             # not make B look dead (kvmesh would rightly purge its keys).
                             "readinessProbe": {"httpGet": {"path": "/health", "port": HEALTH_PORT},
                                                "periodSeconds": 2, "timeoutSeconds": 5,
                                                "failureThreshold": 3},
                             "volumeMounts": [{"name": n, "mountPath": p, "readOnly": True} for n, _, p in mounts]}],
                         "volumes": [{"name": n, "hostPath": {"path": str(h), "type": "Directory"}}
                                     for n, h, _ in mounts]}}}}


@dataclass
class Peer:
    """A pod of the engines Deployment and the engine its container runs."""

    pod: dict
    engine: PodEngine

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def address(self) -> str:
        return self.engine.ready["distributed_url"]  # its keys' value in the lookup Redis


@dataclass
class Death:
    kind: str  # one of KINDS
    t0: float  # monotonic time of the action on the node
    address: str  # the dead incarnation's address
    before: dict  # the pod as it was: podIP, restartCount
    detail: dict = field(default_factory=dict)


def container_id(pod: dict) -> str:
    cs = next(s for s in pod["status"]["containerStatuses"] if s["name"] == "vllm")
    return cs["containerID"].split("://", 1)[1]


def restarts(pod: dict) -> int:
    return next(s.get("restartCount", 0) for s in pod["status"]["containerStatuses"] if s["name"] == "vllm")


def is_ready(p: Optional[dict]) -> bool:
    st = (p or {}).get("status") or {}
    cond = {x["type"]: x["status"] for x in st.get("conditions") or []}
    return (st.get("phase") == "Running" and bool(st.get("podIP")) and cond.get("Ready") == "True"
            and not p["metadata"].get("deletionTimestamp"))


class Mesh:
    """B, the long-lived reader, and fresh A's from the Deployment's other pods, on the real node."""

    def __init__(self, c):
        self.c = c
        self.b: Optional[Peer] = None
        self.spares: list[Peer] = []
        self.used: set[str] = set()
        self.peers: list[Peer] = []
        self.paused: dict[str, str] = {}  # pod name -> container frozen by a not-ready death

    # -- Kubernetes views

    def pods(self) -> list[dict]:
        return self.c.kubectl_json("-n", NS, "get", "pods", "-l", "app=engines")["items"]

    def pod(self, name: str) -> Optional[dict]:
        r = self.c.kubectl("-n", NS, "get", "pod", name, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    # -- engines

    def connect(self, pods: list[dict]) -> list[Peer]:
        """One engine per pod, started in parallel (each starts on the first connection)."""
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(pods)) as ex:
            engines = list(ex.map(lambda p: PodEngine(self.c, p["status"]["podIP"]), pods))
        peers = [Peer(p, e) for p, e in zip(pods, engines)]
        self.peers += peers
        self.used |= {p.name for p in peers}
        print(f"\n{len(peers)} engine(s) ready in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        return peers

    def fresh(self, n: int) -> list[Peer]:
        """n peers whose pods were never used before, engines started."""
        out, self.spares = self.spares[:n], self.spares[n:]
        if len(out) < n:
            def probe():
                ps = sorted((p for p in self.pods() if is_ready(p) and p["metadata"]["name"] not in self.used),
                            key=lambda p: p["metadata"]["name"])
                return ps[:n - len(out)] if len(ps) >= n - len(out) else None
            out += self.connect(wait(f"{n - len(out)} fresh ready engine pod(s)", probe, timeout=180, interval=0.5))
        return out

    def b_call(self, cmd: str, seed: int, tokens: int = TOKENS, timeout: Optional[float] = None) -> dict:
        return self.b.engine.call(cmd, seed=seed, tokens=tokens, timeout=timeout)

    def replace_b(self) -> None:
        """B's engine after a wedged call (a blocked LMCache call never returns): the same pod,
        a new engine process (the old one leaves on EOF)."""
        self.b.engine.close()
        (self.b,) = self.connect([self.pod(self.b.name)])

    # -- the group's lookup Redis, read as LMCache reads it (its `default` user may GET)

    def redis_get(self, keys: list[str]) -> list[Optional[str]]:
        (pod,) = [p for p in self.c.kubectl_json("-n", NS, "get", "pods", "-l", "kvmesh.dev/lookup-for")["items"]
                  if is_ready(p)]
        port = next(x["containerPort"] for x in pod["spec"]["containers"][0]["ports"] if x["name"] == "redis")
        out = self.c.kubectl("-n", NS, "exec", "-i", pod["metadata"]["name"], "--", "redis-cli", "-p", str(port),
                             input="".join(f"GET {k}\n" for k in keys)).stdout.splitlines()
        assert len(out) == len(keys), out
        return [v or None for v in out]

    # -- B fetches from A

    def share(self, a: Peer, seed: int) -> list[str]:
        """A stores a long prefix; B finds it through the group's Redis and pulls it from A's pod,
        byte-identical. Returns the chunk keys."""
        b = self.b.engine
        assert a.engine.ready["hash_none"] == b.ready["hash_none"], "chunk keys would differ (setarch -R in the pod?)"
        stored = a.engine.call("store", seed=seed, tokens=TOKENS)
        assert stored["ok"] and stored["local_hit"] == TOKENS and len(stored["keys"]) == CHUNKS, stored
        assert self.redis_get(stored["keys"]) == [a.address] * CHUNKS
        assert b.call("keys", seed=seed, tokens=TOKENS)["keys"] == stored["keys"]
        look = b.call("lookup", seed=seed, tokens=TOKENS, timeout=10)
        assert look["ok"] and look["local_hit"] == 0 and look["hit"] == TOKENS, look
        served = a.engine.call("stats")["served_connections"]
        got = b.call("retrieve", seed=seed, tokens=TOKENS, timeout=20)
        assert got["ok"] and got["local_hit_before"] == 0, got
        assert got["retrieved"] == TOKENS and got["equal"], got
        assert got["sha256"] == got["expected_sha256"] == stored["sha256"]
        assert a.engine.call("stats")["served_connections"] - served == CHUNKS  # over TCP from A's pod
        return stored["keys"]

    # -- peer deaths, done by the node

    def kill(self, kind: str, a: Peer) -> Death:
        pod = self.pod(a.name)
        cid = container_id(pod)
        before = {"ip": pod["status"]["podIP"], "restarts": restarts(pod)}
        if kind == "ip-changed":
            spec = json.loads(self.c._ctr("containers", "info", "--spec", cid).stdout)
            sandbox = spec["annotations"]["io.kubernetes.cri.sandbox-id"]  # set by containerd's CRI
        t0 = time.monotonic()
        if kind == "deleted":
            self.c.kubectl("-n", NS, "delete", "pod", a.name, "--wait=false")
        elif kind == "restarted":  # a crash: the kubelet restarts the container in place
            self.c._ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        elif kind == "ip-changed":  # the sandbox dies: the kubelet makes a new one, the CNI a new IP
            self.c._ctr("tasks", "kill", "--signal", "SIGKILL", sandbox)
        elif kind == "not-ready":  # a hang: frozen, the kernel still accepts, /health times out
            self.c._ctr("tasks", "pause", cid)
            self.paused[a.name] = cid
        else:
            raise ValueError(kind)
        return Death(kind, t0, a.address, before, {"container": cid})

    def shown(self, d: Death, a: Peer) -> Optional[dict]:
        """The pod as the API server shows it once the kubelet has reported `d` (else None)."""
        p = self.pod(a.name)
        st = (p or {}).get("status") or {}
        if d.kind == "deleted":
            return {"gone": True} if p is None else None  # containers stopped, sandbox torn down
        if d.kind == "restarted":
            return p if restarts(p) > d.before["restarts"] and st.get("podIP") == d.before["ip"] else None
        if d.kind == "ip-changed":
            return p if is_ready(p) and st["podIP"] != d.before["ip"] else None
        return p if not any(x["type"] == "Ready" and x["status"] == "True" for x in st.get("conditions") or []) else None

    def wait_clean_miss(self, seed: int, t0: float, bound: float = CLEAN_MISS_BOUND_S
                        ) -> tuple[Optional[float], list[dict]]:
        """Poll B's lookup until it is a clean miss (hit 0, no exception): (seconds since t0, or
        None if not within `bound`; the lookups seen)."""
        seen = []
        while time.monotonic() - t0 < bound:
            r = self.b_call("lookup", seed, timeout=10)
            seen.append(r)
            if r.get("ok") and r["hit"] == 0:
                return time.monotonic() - t0, seen
            time.sleep(0.05)
        return None, seen

    def retire(self, a: Peer) -> None:
        """Done with an A: thawed if frozen, its engine closed, its pod deleted (the ReplicaSet
        makes another)."""
        self.resume(a)
        a.engine.close()
        self.c.kubectl("-n", NS, "delete", "pod", a.name, "--wait=false", check=False)

    def resume(self, a: Optional[Peer] = None) -> None:
        for name in [a.name] if a else list(self.paused):
            if name in self.paused:
                self.c._ctr("tasks", "resume", self.paused.pop(name), check=False)

    def close(self) -> None:
        self.resume()
        for p in self.peers:
            p.engine.close()


@pytest.fixture(scope="module")
def mesh(deployed, tmp_path_factory):
    c = deployed
    venv, pyhome = engine_paths()
    c._ctr("images", "tag", "--force", c.image_refs["kvmesh"], ENGINE_IMAGE)
    c._ctr("images", "tag", "--force", c.image_refs["redis"], REDIS_IMAGE)
    tenant_namespace(c, NS)
    t0 = time.monotonic()
    c.kubectl("apply", "-f", "-", input=json.dumps(engine_deployment(venv, pyhome, launcher(
        tmp_path_factory.mktemp("p2p-node"), venv))))
    c.kubectl("-n", NS, "rollout", "status", "deployment/engines", "--timeout=240s", timeout=250)
    wait("the group's lookup Redis Deployment", lambda: c.kubectl(
        "-n", NS, "get", "deployment", "kvmesh-redis-default", check=False).returncode == 0, timeout=60)
    c.kubectl("-n", NS, "rollout", "status", "deployment/kvmesh-redis-default", "--timeout=120s", timeout=130)
    print(f"\nreal node up {c.startup_seconds:.1f}s, manifests rolled out {c.rollout_seconds:.1f}s, "
          f"{REPLICAS} engine pods and the lookup Redis Ready {time.monotonic() - t0:.1f}s later", file=sys.stderr)
    m = Mesh(c)
    pods = sorted((p for p in m.pods() if is_ready(p)), key=lambda p: p["metadata"]["name"])
    try:
        m.b, *m.spares = m.connect(pods[:2])  # B, and the first A
        yield m
    except Exception:
        for p in pods:
            print(c.kubectl("-n", NS, "logs", p["metadata"]["name"], "--tail=60", check=False).stdout, file=sys.stderr)
        raise
    finally:
        m.close()


def test_engine_pods_share_kv_over_the_pod_network_and_a_deleted_peer_is_a_clean_miss(mesh):
    c, b = mesh.c, mesh.b
    (a,) = mesh.fresh(1)
    # What the kubelet did with what admission stored: $(KVMESH_POD_IP) expanded to each pod's
    # own bridge IP, and the engine listens there and nowhere else.
    for p in (a, b):
        stored = {x["name"]: x for x in p.pod["spec"]["containers"][0]["env"]}
        assert "$(" in json.dumps(stored), "expected a $(VAR) reference for the kubelet to expand"
        ip, ready = p.pod["status"]["podIP"], p.engine.ready
        assert ip.startswith("10.244.0."), ip
        assert ready["enable_p2p"] and ready["bound"], ready
        assert ready["distributed_url"].startswith(ip + ":"), (ready, ip)
        assert ready["listen"] == [ready["distributed_url"]], ready
        assert ready["lookup_url"] == stored["LMCACHE_LOOKUP_URL"]["value"]
        assert ".svc" in ready["lookup_url"]  # a Service name, resolved by CoreDNS in the pod

    # A stores a long prefix; B finds it through the in-cluster Redis and pulls it from A.
    mesh.share(a, seed=101)

    # A second prefix from A, then A's pod is deleted: the controller (a real pod) purges A's
    # keys from the group's Redis, and B's next lookups become a clean miss.
    assert a.engine.call("store", seed=202, tokens=TOKENS)["ok"]
    assert mesh.b_call("lookup", 202, timeout=10)["hit"] == TOKENS
    death = mesh.kill("deleted", a)
    elapsed, seen = mesh.wait_clean_miss(202, death.t0)
    assert elapsed is not None, f"B still hits A's keys {CLEAN_MISS_BOUND_S}s after the deletion: {seen[-1]}"
    assert all(r["ok"] for r in seen), seen  # never an error while the keys went
    miss = mesh.b_call("retrieve", 202, timeout=10)
    assert miss["ok"] and miss["retrieved"] == 0, miss  # no exception, no hang
    a.engine.close()
    print(f"\nreal pods: {CHUNKS} chunks A->B byte-identical over the bridge; A deleted -> B's clean miss "
          f"after {elapsed:.1f}s ({len(seen)} lookups), retrieve then {miss['ms']:.1f} ms", file=sys.stderr)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "deleted"])  # deleted: the test above
def test_with_kvmesh_a_dead_peer_is_a_clean_miss(mesh, kind):
    seed = 200 + KINDS.index(kind)
    b_keys = mesh.b_call("store", 900 + seed, 4 * CHUNK)["keys"]  # a live peer's: must survive
    (a,) = mesh.fresh(1)
    keys = mesh.share(a, seed)

    death = mesh.kill(kind, a)
    elapsed, seen = mesh.wait_clean_miss(seed, death.t0)
    assert elapsed is not None, f"B still hits A's keys {CLEAN_MISS_BOUND_S}s after {kind}: {seen[-1]}"
    assert all(r["ok"] for r in seen), seen  # lookups never raise, stale hit or not
    miss = mesh.b_call("retrieve", seed, timeout=10)
    assert miss["ok"] and miss["retrieved"] == 0, miss  # no exception, no hang
    assert miss["ms"] < 2000, miss
    assert mesh.redis_get(keys) == [None] * CHUNKS  # A's lookup state is gone ...
    assert mesh.redis_get(b_keys) == [mesh.b.address] * len(b_keys)  # ... a live peer's is not
    # The death was the real thing, as the kubelet reports it.
    pod = wait(f"the kubelet reports {kind}", lambda: mesh.shown(death, a), timeout=90)
    shown = time.monotonic() - death.t0
    print(f"\n{kind}: B's first clean miss {elapsed:.1f}s after the action on the node ({len(seen)} lookups), "
          f"retrieve then {miss['ms']:.1f} ms; the API server showed it by {shown:.1f}s", file=sys.stderr)
    if kind == "ip-changed":
        # The re-created sandbox: the same stored env, expanded by the kubelet with the new IP.
        new_ip = pod["status"]["podIP"]
        assert new_ip.startswith("10.244.0.") and new_ip != death.before["ip"]
        a.engine.close()
        (again,) = mesh.connect([pod])
        assert again.engine.ready["listen"] == [f"{new_ip}:{death.address.rsplit(':', 1)[1]}"], again.engine.ready
        assert mesh.b_call("lookup", seed, timeout=10)["hit"] == 0
        a = again
    if kind == "restarted":
        assert pod["status"]["podIP"] == death.before["ip"]  # in place: same sandbox, same IP
    mesh.retire(a)


def controller_pods(c) -> list[dict]:
    return c.kubectl_json("-n", "kvmesh-system", "get", "pods", "-l",
                          "app.kubernetes.io/name=kvmesh-controller")["items"]


def test_without_kvmesh_controller_a_dead_peer_is_a_stale_hit_then_an_error_or_a_hang(mesh):
    """The same deaths with kvmesh's controller Deployment scaled to zero (the webhook and the
    group's lookup Redis stay): B keeps seeing A's keys, now stale; its retrieve fails (nothing
    listens at A's old address) or blocks (A frozen). Last in the module: the frozen peer wedges
    B's engine. The controller is scaled back at the end."""
    c = mesh.c
    replicas = c.kubectl_json("get", *CONTROLLER)["spec"]["replicas"]
    redis_pods = lambda: sorted(p["metadata"]["name"] for p in c.kubectl_json(  # noqa: E731
        "-n", NS, "get", "pods", "-l", "kvmesh.dev/lookup-for")["items"] if is_ready(p))
    lookup_before = redis_pods()
    b_keys = mesh.b_call("store", 990, 4 * CHUNK)["keys"]
    c.kubectl("scale", *CONTROLLER, "--replicas=0")
    stale: list[str] = []
    outcomes: dict[str, str] = {}
    peers: list[Peer] = []
    try:
        wait("no kvmesh controller pod left", lambda: not controller_pods(c), timeout=120)
        assert len([p for p in webhook_pods(c) if is_ready(p)]) == 2  # admission goes on
        assert redis_pods() == lookup_before  # the lookup tier stays
        for kind in KINDS:
            (a,) = mesh.fresh(1)  # one at a time: engines starting together starve a loaded box
            peers.append(a)
            seed = 300 + KINDS.index(kind)
            keys = mesh.share(a, seed)
            stale += keys
            death = mesh.kill(kind, a)
            wait(f"the kubelet reports {kind}", lambda: mesh.shown(death, a), timeout=90)
            shown = time.monotonic() - death.t0
            time.sleep(2.0)  # several times what kvmesh needs to purge (the tests above)
            look = mesh.b_call("lookup", seed, timeout=10)
            assert look["ok"] and look["hit"] == TOKENS, look  # a stale full hit
            assert mesh.redis_get(keys) == [death.address] * CHUNKS  # A's keys, still there
            bound = 5.0 if kind == "not-ready" else 20.0
            got = mesh.b_call("retrieve", seed, timeout=bound)
            assert not got["ok"], got  # nothing comes back ...
            if kind == "not-ready":  # ... the frozen peer's kernel accepts, nothing ever answers
                assert got.get("timeout") is True and got["elapsed_s"] >= bound, got
            elif kind == "restarted":  # ... same IP, the new container's engine not listening
                assert got.get("exception") == "ConnectionRefusedError", got
            else:  # ... the old IP is nobody's now: an error or a hang
                assert got.get("timeout") or got.get("exception"), got
            outcomes[kind] = (f"hung ({bound:.0f} s bound)" if got.get("timeout") else
                              f"{got['exception']}: {got['error'][:60]}")
            print(f"\nwithout kvmesh, {kind} (shown by the API server after {shown:.1f}s): lookup "
                  f"{look['hit']}/{TOKENS} (stale), retrieve -> {outcomes[kind]}", file=sys.stderr)
            mesh.retire(a)
            if got.get("timeout") and kind != KINDS[-1]:
                mesh.replace_b()
    finally:
        for a in peers:
            mesh.retire(a)
        c.kubectl("scale", *CONTROLLER, f"--replicas={replicas}")
        c.kubectl("rollout", "status", *CONTROLLER, "--timeout=180s", timeout=190)
    assert set(outcomes) == set(KINDS)
    # The controller back: its reconcile of the group's Redis purges only addresses it can prove
    # were kvmesh peers with keys there; peers that stored while it was away may stay stale. A
    # live peer's keys always stay.
    log = lambda: "\n".join(c.kubectl("-n", "kvmesh-system", "logs", p["metadata"]["name"], check=False).stdout  # noqa: E731
                            for p in controller_pods(c))
    line = wait("the restarted controller's index of the group's Redis", lambda: next(
        (x for x in log().splitlines() if "address index complete" in x), None), timeout=120)
    purges = [x.strip()[-160:] for x in log().splitlines() if "purged" in x]
    assert mesh.redis_get(b_keys) == [mesh.b.address] * len(b_keys), (mesh.pod(mesh.b.name)["status"], purges)
    left = sum(v is not None for v in mesh.redis_get(stale))
    print(f"\nrestarted controller: {len(stale) - left} of {len(stale)} stale keys purged; {line.strip()[-120:]}",
          file=sys.stderr)
