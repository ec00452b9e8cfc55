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
pods run as root (the venv sits under /root) in a namespace without PodSecurity labels.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmesh.local import node as realnode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import wait_for as wait  # noqa: E402
from test_manifests_real import cluster, deployed, tenant_namespace  # noqa: E402,F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
ENGINE_ENV = "lmcache-0.3.6-engine"
ENGINE_IMAGE = "docker.io/lmcache/vllm-openai:v0.3.6"
REDIS_IMAGE = "docker.io/library/redis:7.2-alpine"  # the controller's default, see lookup.py
NS = "p2p"
CONTROL_PORT = 7700
CHUNK, CHUNKS = 256, 8
TOKENS = CHUNK * CHUNKS


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

    def __init__(self, c, ip: str, timeout: float = 180):
        self.ip = ip
        self.ready: dict = {}
        self._ids = 0
        self.sock = connect_in_netns(c, ip, CONTROL_PORT, deadline=time.monotonic() + 60)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rwb")
        self.ready = self._read()
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
        out: dict = {}

        def dial():
            try:
                realnode._setns(c.netns_path)
                out["sock"] = socket.create_connection((ip, port), timeout=5)
            except OSError as e:
                out["error"] = e

        t = threading.Thread(target=dial)
        t.start()
        t.join()
        if "sock" in out:
            return out["sock"]
        if time.monotonic() > deadline:
            raise out["error"]
        time.sleep(0.5)


def launcher(work: Path, venv: Path) -> Path:
    d = work / "engine-bin"
    d.mkdir(parents=True, exist_ok=True)
    script = d / "vllm"
    # `vllm serve ... <kvmesh's --kv-transfer-config>`: the arguments are vLLM's, not ours.
    script.write_text("#!/bin/sh\n# TEST-ONLY stand-in for vLLM (tests/node/test_p2p_real.py)\n"
                      f"exec setarch \"$(uname -m)\" -R {venv}/bin/python -s {REPO}/tests/node/pod_bridge.py "
                      f"{CONTROL_PORT} {REPO}/tests/p2p/engine_node.py\n")
    script.chmod(0o755)
    return d


def engine_deployment(venv: Path, pyhome: Path, bin_dir: Path) -> dict:
    mounts = [("engine-env", venv, str(venv)), ("engine-python", pyhome, str(pyhome)),
              ("tests", REPO / "tests", str(REPO / "tests")), ("launcher", bin_dir, "/usr/local/bin")]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "engines", "namespace": NS},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "engines"}},
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
                             "ports": [{"name": "control", "containerPort": CONTROL_PORT}],
                             "volumeMounts": [{"name": n, "mountPath": p, "readOnly": True} for n, _, p in mounts]}],
                         "volumes": [{"name": n, "hostPath": {"path": str(h), "type": "Directory"}}
                                     for n, h, _ in mounts]}}}}


@pytest.fixture(scope="module")
def engines(deployed, tmp_path_factory):
    c = deployed
    venv, pyhome = engine_paths()
    c._ctr("images", "tag", "--force", c.image_refs["kvmesh"], ENGINE_IMAGE)
    c._ctr("images", "tag", "--force", c.image_refs["redis"], REDIS_IMAGE)
    tenant_namespace(c, NS)
    c.kubectl("apply", "-f", "-", input=json.dumps(engine_deployment(venv, pyhome, launcher(
        tmp_path_factory.mktemp("p2p-node"), venv))))
    c.kubectl("-n", NS, "rollout", "status", "deployment/engines", "--timeout=180s", timeout=190)
    wait("the group's lookup Redis Deployment", lambda: c.kubectl(
        "-n", NS, "get", "deployment", "kvmesh-redis-default", check=False).returncode == 0, timeout=60)
    c.kubectl("-n", NS, "rollout", "status", "deployment/kvmesh-redis-default", "--timeout=120s", timeout=130)
    pods = sorted(c.kubectl_json("-n", NS, "get", "pods", "-l", "app=engines")["items"],
                  key=lambda p: p["metadata"]["name"])
    conns = {}
    try:
        t0 = time.monotonic()
        for p in pods:
            conns[p["metadata"]["name"]] = PodEngine(c, p["status"]["podIP"])
        print(f"\nengine pods connected, both ready {time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield c, pods, conns
    except Exception:
        for p in pods:
            print(c.kubectl("-n", NS, "logs", p["metadata"]["name"], "--tail=60", check=False).stdout, file=sys.stderr)
        raise
    finally:
        for e in conns.values():
            e.close()


def test_engine_pods_share_kv_over_the_pod_network_and_a_deleted_peer_is_a_clean_miss(engines):
    c, pods, conns = engines
    (b_pod, a_pod), (b, a) = pods, (conns[pods[0]["metadata"]["name"]], conns[pods[1]["metadata"]["name"]])
    # What the kubelet did with what admission stored: $(KVMESH_POD_IP) expanded to each pod's
    # own bridge IP, and the engine listens there and nowhere else.
    for p, e in ((a_pod, a), (b_pod, b)):
        stored = {x["name"]: x for x in p["spec"]["containers"][0]["env"]}
        assert "$(" in json.dumps(stored), "expected a $(VAR) reference for the kubelet to expand"
        ip = p["status"]["podIP"]
        assert ip.startswith("10.244.0."), ip
        assert e.ready["enable_p2p"] and e.ready["bound"], e.ready
        assert e.ready["distributed_url"].startswith(ip + ":"), (e.ready, ip)
        assert e.ready["listen"] == [e.ready["distributed_url"]], e.ready
        assert e.ready["lookup_url"] == stored["LMCACHE_LOOKUP_URL"]["value"]
        assert ".svc" in e.ready["lookup_url"]  # a Service name, resolved by CoreDNS in the pod
    assert a.ready["hash_none"] == b.ready["hash_none"], "chunk keys would differ (setarch -R in the pod?)"

    # A stores a long prefix; B finds it through the in-cluster Redis and pulls it from A.
    stored = a.call("store", seed=101, tokens=TOKENS)
    assert stored["ok"] and stored["local_hit"] == TOKENS and len(stored["keys"]) == CHUNKS, stored
    assert b.call("keys", seed=101, tokens=TOKENS)["keys"] == stored["keys"]
    look = b.call("lookup", seed=101, tokens=TOKENS, timeout=10)
    assert look["ok"] and look["local_hit"] == 0 and look["hit"] == TOKENS, look
    served = a.call("stats")["served_connections"]
    got = b.call("retrieve", seed=101, tokens=TOKENS, timeout=20)
    assert got["ok"] and got["local_hit_before"] == 0, got
    assert got["retrieved"] == TOKENS and got["equal"], got
    assert got["sha256"] == got["expected_sha256"] == stored["sha256"]
    assert a.call("stats")["served_connections"] - served == CHUNKS  # over TCP from A's pod

    # A second prefix from A, then A's pod is deleted: the controller (a real pod) purges A's
    # keys from the group's Redis, and B's next lookups become a clean miss.
    assert a.call("store", seed=202, tokens=TOKENS)["ok"]
    assert b.call("lookup", seed=202, tokens=TOKENS, timeout=10)["hit"] == TOKENS
    t0 = time.monotonic()
    c.kubectl("-n", NS, "delete", "pod", a_pod["metadata"]["name"], "--wait=false")
    seen: list[dict] = []

    def clean_miss():
        r = b.call("lookup", seed=202, tokens=TOKENS, timeout=10)
        seen.append(r)
        return r["ok"] and r["hit"] == 0

    wait("B's clean miss after A's deletion", clean_miss, timeout=60, interval=0.2)
    elapsed = time.monotonic() - t0
    assert all(r["ok"] for r in seen), seen  # never an error while the keys went
    miss = b.call("retrieve", seed=202, tokens=TOKENS, timeout=10)
    assert miss["ok"] and miss["retrieved"] == 0, miss  # no exception, no hang
    print(f"\nreal pods: {CHUNKS} chunks A->B byte-identical over the bridge; A deleted -> B's clean miss "
          f"after {elapsed:.1f}s ({len(seen)} lookups), retrieve then {miss['ms']:.1f} ms", file=sys.stderr)
