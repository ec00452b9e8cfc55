"""LMCache 0.5.6 (controller generation) engines and the real `lmcache_controller` as REAL PODS
on the real node, sharing KV through kvmesh (issue 10, item 4).

What is real: the shipped manifests' webhook admits a Deployment of `lmcache/vllm-openai:v0.3.9`
pods in controller mode; the kubelet starts them with the env the API server stored and expands
`$(KVMESH_POD_IP)` itself; kvmesh's controller (the shipped Deployment's pod) creates the group's
lookup StatefulSet, whose pod runs `lmcache_controller` (LMCache 0.5.6's own server) under the
StatefulSet's PodSecurity-`restricted` settings (uid 65532); the engines reach it by the Service
name kvmesh injects (`kvmesh-lmcache-default.<ns>.svc`), resolved by CoreDNS to the real
Service, and register their pod IPs (LMCache's own `get_ip()` in the pod's network namespace);
A's chunks move to B over the pod network by NIXL (UCX over TCP, eth0); `kubectl delete pod` is
a real deletion. Then the same deletion with kvmesh's controller scaled to 0.

TEST-ONLY ARRANGEMENTS, named as such:
  - Engine image: kvmesh's own image (Debian python runtime libraries) imported under the name
    `lmcache/vllm-openai:v0.3.9`, so admission sees the LMCache image a user would run. The
    `vllm-0.33.0` env (LMCache 0.5.6), its NIXL overlay `nixl-1.5.1-cu13`, the Python they were
    made from and tests/ are mounted read-only by hostPath at their host paths; a `vllm`
    launcher (mounted at /usr/local/bin; it sets PYTHONPATH to the NIXL overlay, i.e. image
    contents) runs tests/node/pod_bridge.py, which hands the test's control connection to
    tests/p2p/engine_node_ctrl.py. Engine pods run as root (the envs sit under /root).
  - The engines' own pod spec (the user's part, stored as is) adds UCX_TLS=tcp,self and
    UCX_NET_DEVICES=eth0 (no RDMA here), KVMESH_TEST_LOOP_WAKE_MS=2 (STAND-IN 4 below) and the
    annotation kvmesh.dev/cpu-cache-gb=1 (the 5 GB default costs ~20 s of allocation each).
  - The lookup StatefulSet uses the group's image (kvmesh's choice, docs/images.md) and command
    `lmcache_controller`; that image has no LMCache. After kvmesh's controller creates the
    StatefulSet, the test adds hostPath volumes and mounts (the env's lib/, the Python home, a
    venv skeleton and a launcher at /usr/local/bin/lmcache_controller running
    `python -m lmcache.v1.api_server` with kvmesh's arguments) by server-side apply under its
    OWN field manager `kvmesh-test-hostpath`, without force (so it owns no field kvmesh owns),
    and replaces the pod that started before them. The mounts are not at the host paths: the
    pod runs as uid 65532, which cannot enter /root. Why not another way: kvmesh's lookup spec
    has no volumes to configure and the env is ~10 GB, so baking it into an image is out; the
    apply shows, as a fact about kvmesh, that its own forced apply (drift repair) leaves fields
    of other managers alone (asserted after a leader change).
Stand-ins that remain (tests/p2p/engine_node_ctrl.py), and why: 1 (a CPU KV connector) and 2
(the scheduler's lookup answers) stand for vLLM's GPU side, absent on this CPU-only machine; 4
(the loop waker) works around a suspected LMCache 0.5.6 bug (docs/controller-mode-on-cpu.md),
not a kvmesh matter. Gone here: 3 (the pod network namespace of the worker's RPC endpoint), the
/etc/hosts stand-in for cluster DNS and the kubelet-expansion emulation; LMCache is unpatched.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvmesh.backends import lmcache_controller as lmcache_ctrl
from kvmesh.core import names
from kvmesh.local import node as realnode

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "p2p"))
import ctrlrunner  # noqa: E402
from ctrlrunner import CALL_S, CHUNKS, IMAGE, TOKENS, assert_share, clean_miss, wait_warm  # noqa: E402
from support import wait_for as wait  # noqa: E402
from test_manifests_real import cluster, deployed, dns_a, in_node_netns, tenant_namespace  # noqa: E402,F401  (fixtures)
from test_p2p_real import CONTROL_PORT, PodEngine, consumers_module  # noqa: E402

NS = "p2pctrl"
GROUP = "default"
GID = f"{names.MODE_CONTROLLER}-{GROUP}"  # the KVMeshPeerGroup's name, the lookup label's value
LOOKUP = names.lookup_service_name(names.MODE_CONTROLLER, GROUP)  # StatefulSet and Service
ENGINE_IMAGE = "docker.io/" + IMAGE
TEST_MANAGER = "kvmesh-test-hostpath"
MNT = "/opt/kvmesh-test"  # where the lookup pod sees the test's mounts
ENGINES = 3  # B; the A deleted with kvmesh; the A deleted without it
DEREGISTER_BOUND_S = 10.0
WARM_BOUND_S = 300.0  # three engines starting together on a loaded 2-core node
ENGINE_START_S = 1200.0  # three engines importing at once: 10 min was not enough at load 17, nice 15
REAPER_WATCH_S = 75.0  # LMCache's own health check, kvmesh's arguments: every 5 s, timeout 30 s


# --- paths and launchers ---------------------------------------------------------------------

def engine_paths() -> tuple[Path, Path, Path]:
    """(the vllm-0.33.0 venv, the Python installation it was made from, the NIXL overlay's
    site-packages)."""
    consumers = consumers_module()
    try:
        ctrlrunner.nixl_site()
        py = consumers.env_python(ctrlrunner.ENGINE_ENV)
    except consumers.ConsumerEnvMissing as e:
        pytest.fail(str(e))  # `make test` builds the envs first
    venv = py.parent.parent
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    return venv, Path(cfg["home"]).resolve().parent, ctrlrunner.nixl_site()


def engine_launcher(work: Path, venv: Path, nixl: Path) -> Path:
    d = work / "engine-bin"
    d.mkdir(parents=True, exist_ok=True)
    script = d / "vllm"
    # `vllm serve ... <kvmesh's --kv-transfer-config>`: the arguments are vLLM's, not ours.
    script.write_text("#!/bin/sh\n# TEST-ONLY stand-in for vLLM (tests/node/test_p2p_ctrl_real.py);\n"
                      "# NIXL is image contents, not configuration: its overlay on the path.\n"
                      f"export PYTHONPATH={nixl}\n"
                      f"exec {venv}/bin/python -s {REPO}/tests/node/pod_bridge.py "
                      f"{CONTROL_PORT} {ctrlrunner.NODE_SCRIPT}\n")
    script.chmod(0o755)
    return d


def controller_mounts(work: Path, venv: Path, pyhome: Path) -> list[tuple[str, Path, str]]:
    """(volume name, host path, mount path) of the lookup pod's test-only mounts: under MNT a
    venv skeleton (pyvenv.cfg pointing at the mounted Python, bin/python, lib/ = the env's
    lib/) and the launcher, which is also mounted as /usr/local/bin."""
    root = work / "lmcache-controller"
    for d in ("python", "venv/bin", "venv/lib", "bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    version = next(line.split(" = ", 1)[1] for line in (venv / "pyvenv.cfg").read_text().splitlines()
                   if line.startswith("version = "))
    (root / "venv" / "pyvenv.cfg").write_text(f"home = {MNT}/python/bin\ninclude-system-site-packages = false\n"
                                              f"version = {version}\n")
    (root / "venv" / "bin" / "python").unlink(missing_ok=True)
    (root / "venv" / "bin" / "python").symlink_to(f"{MNT}/python/bin/python3")  # dangles on the host
    launcher = root / "bin" / "lmcache_controller"
    launcher.write_text("#!/bin/sh\n# TEST-ONLY (tests/node/test_p2p_ctrl_real.py): LMCache 0.5.6's own\n"
                        "# lmcache_controller from the mounted vllm-0.33.0 env, with kvmesh's arguments.\n"
                        f"export LD_LIBRARY_PATH={MNT}/python/lib\n"
                        f"exec {MNT}/venv/bin/python -s -m lmcache.v1.api_server \"$@\"\n")
    launcher.chmod(0o755)
    root.chmod(0o755)  # pytest's tmp dirs are 0700; the pod's uid 65532 must enter them
    return [("kvmesh-test-root", root, MNT), ("kvmesh-test-python", pyhome, f"{MNT}/python"),
            ("kvmesh-test-venv-lib", venv / "lib", f"{MNT}/venv/lib"),
            ("kvmesh-test-bin", root / "bin", "/usr/local/bin")]


def engine_deployment(mounts: list[tuple[str, Path, str]]) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "engines", "namespace": NS},
        "spec": {"replicas": ENGINES, "selector": {"matchLabels": {"app": "engines"}},
                 "template": {
                     "metadata": {"labels": {"app": "engines", names.LABEL_INJECT: "enabled"},
                                  "annotations": {names.ANN_CPU_CACHE_GB: "1"}},
                     "spec": {
                         "nodeSelector": {"kvmesh.dev/real-node": "true"},
                         "terminationGracePeriodSeconds": 2,
                         "containers": [{
                             "name": "vllm", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                             "command": ["vllm", "serve"], "args": ["Qwen/Qwen2.5-0.5B-Instruct"],
                             "env": [{"name": "UCX_TLS", "value": "tcp,self"},
                                     {"name": "UCX_NET_DEVICES", "value": "eth0"},
                                     {"name": "KVMESH_TEST_LOOP_WAKE_MS", "value": "2"}],
                             "securityContext": {"runAsUser": 0, "runAsGroup": 0},
                             "ports": [{"name": "control", "containerPort": CONTROL_PORT}],
                             "volumeMounts": [{"name": n, "mountPath": p, "readOnly": True} for n, _, p in mounts]}],
                         "volumes": [{"name": n, "hostPath": {"path": str(h), "type": "Directory"}}
                                     for n, h, _ in mounts]}}}}


def mounts_apply_body(mounts: list[tuple[str, Path, str]]) -> dict:
    """The server-side apply body of TEST_MANAGER: only the mounts, nothing kvmesh sets."""
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": LOOKUP, "namespace": NS},
            "spec": {"template": {"spec": {
                "volumes": [{"name": n, "hostPath": {"path": str(h), "type": "Directory"}} for n, h, _ in mounts],
                "containers": [{"name": "lmcache-controller",
                                "volumeMounts": [{"name": n, "mountPath": p, "readOnly": True}
                                                 for n, _, p in mounts]}]}}}}




# --- the lookup tier, seen from the node ----------------------------------------------------

class Lookup:
    """The group's lookup Service as the test reaches it: `lmcache_controller`'s HTTP API at the
    Service's ClusterIP (kube-proxy's rules send it to the real pod), through kvmesh's client."""

    def __init__(self, c):
        self.c = c
        svc = c.kubectl_json("-n", NS, "get", "service", LOOKUP)
        self.cluster_ip = svc["spec"]["clusterIP"]
        port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
        self.http_url = f"http://{self.cluster_ip}:{port}"

    def workers(self, instance: str):
        """Fresh registrations of `instance` ([] = none), None if the controller did not answer."""
        try:
            return in_node_netns(self.c, lambda: asyncio.run(lmcache_ctrl.workers(self.http_url, instance, timeout=2.0)))
        except Exception:  # noqa: BLE001 - "did not answer" is what the callers wait out
            return None

    def answers(self) -> bool:
        return self.workers("__probe__") is not None


def lookup_pod(c) -> dict | None:
    pods = c.kubectl_json("-n", NS, "get", "pods", "-l", f"{names.LABEL_LOOKUP_FOR}={GID}")["items"]
    return pods[0] if pods else None


def statefulset(c) -> dict:
    return c.kubectl_json("-n", NS, "get", "statefulset", LOOKUP)


def ready(pod: dict | None) -> bool:
    return bool(pod) and not pod["metadata"].get("deletionTimestamp") and any(
        x["type"] == "Ready" and x["status"] == "True" for x in pod["status"].get("conditions", []))


def start_to_ready_s(pod: dict) -> float:
    """Container start -> pod Ready, from the kubelet's own timestamps (1 s resolution)."""
    from datetime import datetime
    t = lambda v: datetime.fromisoformat(v.replace("Z", "+00:00"))  # noqa: E731
    started = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    ready_at = next(x["lastTransitionTime"] for x in pod["status"]["conditions"] if x["type"] == "Ready")
    return (t(ready_at) - t(started)).total_seconds()


def add_test_mounts(c, mounts) -> float:
    """Apply the test's mounts to kvmesh's StatefulSet and replace its pod (started without
    them: a StatefulSet does not roll a pod that never became Ready). Returns seconds until the
    lookup pod with the mounts is Ready."""
    t0 = time.monotonic()
    c.api("PATCH", f"/apis/apps/v1/namespaces/{NS}/statefulsets/{LOOKUP}?fieldManager={TEST_MANAGER}&force=false",
          mounts_apply_body(mounts), content_type="application/apply-patch+yaml")
    sts = wait("the StatefulSet controller saw the new template", lambda: (
        s := statefulset(c))["status"].get("observedGeneration") == s["metadata"]["generation"] and s, timeout=60)
    revision = sts["status"]["updateRevision"]

    def new_pod_ready():
        p = lookup_pod(c)
        if p and p["metadata"]["labels"].get("controller-revision-hash") != revision \
                and not p["metadata"].get("deletionTimestamp"):
            c.kubectl("-n", NS, "delete", "pod", p["metadata"]["name"], "--wait=false", check=False)
            return False
        return ready(p) and p

    wait("the lookup pod with the test mounts Ready", new_pod_ready, timeout=240, interval=1)
    return time.monotonic() - t0


# --- engines ----------------------------------------------------------------------------------

class CtrlPodEngine(PodEngine):
    """PodEngine (tests/node/test_p2p_real.py) for an engine_node_ctrl.py engine in a pod."""

    @property
    def pod_ip(self) -> str:
        return self.ip


def dump_logs(c, names_: list[str]) -> None:
    for n in names_:
        print(f"--- {n}\n" + c.kubectl("-n", NS, "logs", n, "--tail=60", check=False).stdout[-6000:], file=sys.stderr)


@pytest.fixture(scope="module")
def mesh(deployed, tmp_path_factory):
    """The engines Deployment admitted in controller mode, the lookup pod running the real
    lmcache_controller, all engines connected, registered and past LMCache's startup sync."""
    c = deployed
    t_start = time.monotonic()
    venv, pyhome, nixl = engine_paths()
    work = tmp_path_factory.mktemp("p2p-ctrl-node")
    c._ctr("images", "tag", "--force", c.image_refs["kvmesh"], ENGINE_IMAGE)
    tenant_namespace(c, NS)
    mounts = [("engine-env", venv, str(venv)), ("engine-python", pyhome, str(pyhome)),
              ("nixl", nixl.parents[2], str(nixl.parents[2])), ("tests", REPO / "tests", str(REPO / "tests")),
              ("launcher", engine_launcher(work, venv, nixl), "/usr/local/bin")]
    c.kubectl("apply", "-f", "-", input=json.dumps(engine_deployment(mounts)))
    engines: dict[str, CtrlPodEngine] = {}
    pods: list[dict] = []
    try:
        c.kubectl("-n", NS, "rollout", "status", "deployment/engines", "--timeout=180s", timeout=190)
        wait("kvmesh's lookup StatefulSet", lambda: c.kubectl(
            "-n", NS, "get", "statefulset", LOOKUP, check=False).returncode == 0, timeout=90)
        lookup_ready_s = add_test_mounts(c, controller_mounts(work, venv, pyhome))
        lk = Lookup(c)
        wait("lmcache_controller's HTTP API through the Service", lk.answers, timeout=120, interval=1)
        pods = sorted(c.kubectl_json("-n", NS, "get", "pods", "-l", "app=engines")["items"],
                      key=lambda p: p["metadata"]["name"])
        assert len(pods) == ENGINES, [p["metadata"]["name"] for p in pods]
        t0 = time.monotonic()
        with ThreadPoolExecutor(ENGINES) as ex:  # the engines start on connection: all at once
            conns = list(ex.map(lambda p: CtrlPodEngine(c, p["status"]["podIP"], timeout=ENGINE_START_S), pods))
        engines = {p["metadata"]["name"]: e for p, e in zip(pods, conns)}
        ready_s = time.monotonic() - t0
        warm_s = wait_warm(*conns, bound=WARM_BOUND_S)
        timing = {"lookup_pod_ready_s": lookup_ready_s, "lmcache_controller_start_s": start_to_ready_s(lookup_pod(c)),
                  "engines_ready_s": ready_s, "warm_s": warm_s, "fixture_s": time.monotonic() - t_start}
        print(f"\nlookup pod (real lmcache_controller) Ready {lookup_ready_s:.1f}s after the test mounts; "
              f"{ENGINES} engine pods connected and ready {ready_s:.1f}s, past LMCache's startup full sync "
              f"{warm_s:.1f}s later; fixture {timing['fixture_s']:.1f}s", file=sys.stderr)
        yield c, pods, engines, lk, timing
    except Exception:
        dump_logs(c, [p["metadata"]["name"] for p in pods] + [f"{LOOKUP}-0"])
        raise
    finally:
        for e in engines.values():
            e.close()


def stored_env(pod: dict) -> dict:
    return {x["name"]: x for x in pod["spec"]["containers"][0]["env"]}


# --- the tests (in order: B = the first pod by name, A = the second, then the third) -----------

def test_engine_pods_share_kv_through_the_real_lmcache_controller_pod(mesh):
    c, pods, engines, lk, timing = mesh
    b_pod, a_pod, _ = pods
    b, a = engines[b_pod["metadata"]["name"]], engines[a_pod["metadata"]["name"]]
    # The lookup pod: kvmesh's StatefulSet with the group's image and command, its restricted
    # securityContext untouched; the test manager owns only its mounts.
    lp = lookup_pod(c)
    ctr = lp["spec"]["containers"][0]
    assert ctr["image"] == IMAGE and ctr["command"] == ["lmcache_controller"], ctr
    # started once: the startup probe keeps liveness off while LMCache imports
    assert lp["status"]["containerStatuses"][0]["restartCount"] == 0, lp["status"]["containerStatuses"]
    assert ctr["securityContext"]["runAsUser"] == 65532 and ctr["securityContext"]["runAsNonRoot"]
    sts = c.kubectl_json("-n", NS, "get", "statefulset", LOOKUP, "--show-managed-fields")
    managers = {m["manager"] for m in sts["metadata"]["managedFields"] if m["operation"] == "Apply"}
    assert {names.FIELD_MANAGER, TEST_MANAGER} <= managers, managers
    # The injected lookup address resolves through CoreDNS to the Service, whose only endpoint
    # is the lookup pod.
    fqdn = f"{LOOKUP}.{NS}.svc.cluster.local"
    assert dns_a(c, fqdn) == [lk.cluster_ip]
    eps = c.kubectl_json("-n", NS, "get", "endpointslices", "-l", f"kubernetes.io/service-name={LOOKUP}")["items"]
    assert [a_ for e in eps for ep in e.get("endpoints") or [] for a_ in ep["addresses"]] == [lp["status"]["podIP"]]

    for p in pods:
        e, ip, env = engines[p["metadata"]["name"]], p["status"]["podIP"], stored_env(p)
        r = e.ready
        # what the kubelet did with what admission stored: $(KVMESH_POD_IP) became the pod IP
        assert env["LMCACHE_P2P_HOST"]["value"].startswith("$("), env["LMCACHE_P2P_HOST"]
        assert ip.startswith("10.244.0.") and r["p2p_host"] == ip, (r, ip)
        assert r["pull_url"] == env["LMCACHE_CONTROLLER_PULL_URL"]["value"] == f"{LOOKUP}.{NS}.svc:8300"
        assert r["transfer_channel"] == "nixl" and r["enable_p2p"] and r["enable_controller"], r
        assert r["instance_id"] == p["metadata"]["name"], r  # from the pod's own metadata
        assert r["bound"] and f"{ip}:{r['init_ports'][0]}" in r["listen"], r
        assert r["netns_standin"] is False  # LMCache's own get_ip() in the pod's namespace
        assert e.call("stats")["loop_waker_ms"] > 0  # STAND-IN 4 (the user's pod env asked)
        # registered with the lmcache_controller pod at its pod IP, found by LMCache itself
        w = lk.workers(r["instance_id"])
        assert w and w[0]["ip"] == ip and w[0]["peer_init_url"] == f"{ip}:8200", w
    assert len({p["status"]["podIP"] for p in pods}) == ENGINES

    got = assert_share(a, b, seed=101)  # A stores; B: controller names A; NIXL read; sha256
    lookups = [assert_share(a, b, seed=110 + i)["lookup_ms"] for i in range(3)]
    print(f"\nreal pods, controller mode: {CHUNKS} chunks A->B byte-identical over NIXL/UCX on the pod "
          f"network; lookup + NIXL read {got['lookup_ms']:.0f} ms, then {[round(x) for x in lookups]} ms; "
          f"timings {json.dumps({k: round(v, 1) for k, v in timing.items()})}", file=sys.stderr)


def test_deleted_peer_is_deregistered_by_kvmesh_and_b_misses_cleanly(mesh):
    c, pods, engines, lk, _ = mesh
    b_pod, a_pod, _ = pods
    b, a = engines[b_pod["metadata"]["name"]], engines[a_pod["metadata"]["name"]]
    a_name, a_id = a_pod["metadata"]["name"], a.ready["instance_id"]
    assert_share(a, b, seed=201)
    assert lk.workers(a_id)
    t0 = time.monotonic()
    c.kubectl("-n", NS, "delete", "pod", a_name, "--wait=false")
    wait("A deregistered by kvmesh's controller", lambda: lk.workers(a_id) == [], DEREGISTER_BOUND_S, 0.05)
    dereg = time.monotonic() - t0
    elapsed, seen = clean_miss(b, 201, t0, DEREGISTER_BOUND_S)
    assert elapsed is not None, f"B still hits deleted A {DEREGISTER_BOUND_S}s after the deletion: {seen[-1]}"
    assert all(r["ok"] for r in seen), seen  # no exception, no timeout
    assert lk.workers(b.ready["instance_id"])  # B stays registered
    group = wait("the peer group's lastPurge names A", lambda: (
        g := c.kubectl_json("-n", NS, "get", "kvmeshpeergroups", GID)).get("status", {})
        .get("lastPurge", {}).get("pod") == f"{NS}/{a_name}" and g, timeout=30)
    print(f"\nreal pods, deleted with kvmesh: A deregistered {dereg * 1000:.0f} ms after `kubectl delete pod`; "
          f"B's first clean miss at {elapsed * 1000:.0f} ms ({len(seen)} lookups, last "
          f"{seen[-1]['lookup_ms']:.1f} ms); lastPurge {json.dumps(group['status']['lastPurge'])}", file=sys.stderr)


def scale_kvmesh_controller(c, replicas: int) -> None:
    c.kubectl("-n", names.SYSTEM_NAMESPACE, "scale", "deployment/kvmesh-controller", f"--replicas={replicas}")
    if replicas:
        c.kubectl("-n", names.SYSTEM_NAMESPACE, "rollout", "status", "deployment/kvmesh-controller",
                  "--timeout=180s", timeout=190)
    else:
        wait("no kvmesh controller pod left", lambda: not c.kubectl_json(
            "-n", names.SYSTEM_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/name=kvmesh-controller")["items"],
            timeout=90, interval=0.5)


def test_without_kvmesh_a_deleted_peer_is_not_a_clean_miss(mesh):
    """The same deletion with kvmesh's controller scaled to 0: LMCache's controller still names
    dead A, and what B's next fetch does instead of a clean miss is recorded (bounded by
    CALL_S; a fetch that times out leaves B's engine unusable, so this test comes last of the
    data-path tests). Then how long LMCache's own health check (kvmesh's arguments: every 5 s,
    worker timeout 30 s) takes to drop A."""
    c, pods, engines, lk, _ = mesh
    b_pod, _, a_pod = pods
    b, a = engines[b_pod["metadata"]["name"]], engines[a_pod["metadata"]["name"]]
    a_name, a_id = a_pod["metadata"]["name"], a.ready["instance_id"]
    scale_kvmesh_controller(c, 0)
    try:
        assert_share(a, b, seed=301)
        t0 = time.monotonic()
        c.kubectl("-n", NS, "delete", "pod", a_name, "--wait=false")
        wait("A's pod gone", lambda: c.kubectl("-n", NS, "get", "pod", a_name, check=False).returncode != 0,
             timeout=60, interval=0.2)
        gone_s = time.monotonic() - t0
        assert lk.workers(a_id), "A was deregistered although kvmesh's controller is down"
        answers_before = len(b.call("stats")["controller_answers"])
        r = b.call("fetch", seed=301, tokens=TOKENS, timeout=CALL_S)
        summary = {k: r.get(k) for k in ("ok", "timeout", "hit", "retrieved", "controller", "lookup_ms",
                                          "exception", "error", "elapsed_s")}
        answers = b.call("stats")["controller_answers"][answers_before:]
        reaped = None  # recorded, not asserted: LMCache's behaviour, not kvmesh's
        while reaped is None and time.monotonic() - t0 < REAPER_WATCH_S:
            if lk.workers(a_id) == []:
                reaped = f"{time.monotonic() - t0:.1f}s"
            time.sleep(0.5)
        print(f"\nreal pods, deleted WITHOUT kvmesh: A's pod gone {gone_s:.1f}s after the deletion, still "
              f"registered; B's next fetch: {json.dumps(summary)}; the controller's answer to it: {answers}; "
              f"LMCache's own health check dropped A {reaped or f'not within {REAPER_WATCH_S:.0f}s'} after the deletion", file=sys.stderr)
        # Not a clean miss: LMCache's controller named dead A for every chunk ...
        assert answers and answers[0][0] == a_id and answers[0][2] == CHUNKS, answers
        # ... and B got none of the bytes, with no clean answer in place of them
        assert not r.get("retrieved"), summary
        clean = r.get("ok") and r.get("hit") == 0 and r.get("controller") and r["controller"][2] == 0
        assert not clean, summary
    finally:
        scale_kvmesh_controller(c, 2)


def test_kvmesh_drift_repair_leaves_the_test_managers_mounts(mesh):
    """A field kvmesh owns on the lookup StatefulSet is removed; the new leader after a leader
    change re-applies kvmesh's objects (forced server-side apply) and restores it, and the
    fields another manager owns (the test mounts) stay: no new template, no new lookup pod."""
    c, *_ = mesh
    label = "app.kubernetes.io/component"
    before, pod = statefulset(c), lookup_pod(c)
    want = before["metadata"]["labels"][label]
    c.kubectl("-n", NS, "label", "statefulset", LOOKUP, f"{label}-")
    lease = c.kubectl_json("-n", names.SYSTEM_NAMESPACE, "get", "lease", names.LEADER_LEASE)["spec"]
    t0 = time.monotonic()
    c.kubectl("-n", names.SYSTEM_NAMESPACE, "delete", "pod", lease["holderIdentity"], "--wait=false", check=False)
    after = wait("kvmesh restored its label", lambda: (s := statefulset(c))["metadata"]["labels"].get(label) == want
                 and s, timeout=180, interval=1)
    vols = {v["name"] for v in after["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"] for m in after["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert {"kvmesh-test-root", "kvmesh-test-python", "kvmesh-test-venv-lib", "kvmesh-test-bin"} <= vols & mounts
    assert after["metadata"]["generation"] == before["metadata"]["generation"]  # the template never changed
    now = lookup_pod(c)
    assert now["metadata"]["uid"] == pod["metadata"]["uid"]
    assert now["status"]["containerStatuses"][0]["restartCount"] == pod["status"]["containerStatuses"][0]["restartCount"]
    print(f"\ndrift repair: label restored by the new leader {time.monotonic() - t0:.1f}s after the old one's "
          f"deletion; the test manager's 4 volumes and mounts kept, generation "
          f"{after['metadata']['generation']}, lookup pod not replaced", file=sys.stderr)
