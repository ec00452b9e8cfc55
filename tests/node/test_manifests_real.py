"""The shipped manifests/ on a real node, as a user applies them (only the image line changed).

The kvmesh image built by images/build.py runs as the webhook and controller Deployments under
the namespace's PodSecurity `restricted`; the controller bootstraps the CA and writes the
caBundle; the API server calls the webhook through its Service (at the pod IPs); a labelled
Deployment is injected on admission and its pods run.

Test-only stand-ins, named as such: the "vLLM" image is the pause binary installed as
/usr/local/bin/vllm and imported as `docker.io/lmcache/vllm-openai:v0.5.6` (and tagged `:v0.3.6`),
so that admission sees a real LMCache image name while the node runs a few-MB process instead of a
CUDA image; Debian's redis-server image (images/build.py redis) is tagged as the controller's
default `redis:7.2-alpine`, since the node cannot pull from Docker Hub.
Skipped unless `make node` has built everything (fails instead under `make test`: see require()).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
import tarfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from kvmesh.core import names
from kvmesh.local import node as realnode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import wait_for as wait  # noqa: E402
from test_real_node import require  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHIPPED_IMAGE = "ghcr.io/kvmesh/kvmesh:0.1.0"
STANDIN_REF = "docker.io/lmcache/vllm-openai:v0.5.6"


def standin_vllm_image(pause: Path, work: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kvmesh_images_build", REPO / "images" / "build.py")
    image_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(image_build)  # by path: `build` is also a PyPI package's name
    layer = work / "standin.tar"
    with tarfile.open(layer, "w") as t:
        for d in ("usr", "usr/local", "usr/local/bin"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        info = t.gettarinfo(str(pause), arcname="usr/local/bin/vllm")
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o755, 0, 0, "", ""
        with open(pause, "rb") as f:
            t.addfile(info, f)
    out = work / "standin-vllm.tar"
    image_build.pack(layer, out, STANDIN_REF,
                     {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "WorkingDir": "/"},
                     "tests/node: stand-in for a vLLM image (pause as /usr/local/bin/vllm)")
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    require(("kvmesh", "redis"))
    c = realnode.RealNodeCluster(images=("kvmesh", "redis"), verbose=True)
    c.start()
    failed = request.session.testsfailed
    try:
        yield c
    finally:
        if request.session.testsfailed > failed:
            c.mark_failed()
        c.stop()


def rendered_manifests(ref: str) -> str:
    docs = []
    for f in sorted((REPO / "manifests").glob("*.yaml")):
        text = f.read_text()
        docs.append(text.replace(SHIPPED_IMAGE, ref))
    out = "\n---\n".join(docs)
    assert SHIPPED_IMAGE not in out
    return out


def deploy_manifests(c) -> None:
    """manifests/ applied as a user would (namespace first), both Deployments rolled out, the
    stand-in vLLM image imported."""
    ref = c.image_refs["kvmesh"]
    t0 = time.monotonic()
    c.kubectl("apply", "-f", str(REPO / "manifests" / "00-namespace.yaml"))
    c.kubectl("apply", "-f", "-", input=rendered_manifests(ref), timeout=120)
    try:
        for d in ("kvmesh-webhook", "kvmesh-controller"):
            c.kubectl("-n", "kvmesh-system", "rollout", "status", f"deployment/{d}", "--timeout=240s", timeout=250)
    except Exception:
        print(c.kubectl("-n", "kvmesh-system", "get", "pods,events", "-o", "wide", check=False).stdout, file=sys.stderr)
        for p in c.kubectl_json("-n", "kvmesh-system", "get", "pods")["items"]:
            print(c.kubectl("-n", "kvmesh-system", "logs", p["metadata"]["name"], "--tail=40", check=False).stdout,
                  file=sys.stderr)
        raise
    c.rollout_seconds = time.monotonic() - t0
    c.import_image(standin_vllm_image(c.node_bin / "pause", Path(c.workdir)))


@pytest.fixture(scope="module")
def deployed(cluster):
    deploy_manifests(cluster)
    return cluster


def tenant_namespace(c, ns: str) -> None:
    """A namespace whose peer groups kvmesh may manage: the admin's per-namespace grant the
    README documents (the controller's tenant ClusterRole bound in that namespace)."""
    c.kubectl("create", "namespace", ns)
    c.kubectl("create", "rolebinding", "kvmesh-controller-tenant", "-n", ns, "--clusterrole=kvmesh-controller-tenant",
              "--serviceaccount=kvmesh-system:kvmesh-controller")


def webhook_pods(c) -> list[dict]:
    return c.kubectl_json("-n", "kvmesh-system", "get", "pods", "-l",
                          "app.kubernetes.io/name=kvmesh-webhook")["items"]


def standin_pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "burst", "kvmesh.dev/inject": "enabled"}},
            "spec": {"containers": [{"name": "vllm", "image": STANDIN_REF.removeprefix("docker.io/"),
                                     "command": ["vllm", "serve"], "args": ["Qwen/Qwen2.5-0.5B-Instruct"]}]}}


def test_shipped_manifests_ready_and_inject_through_the_service(deployed):
    c = deployed
    ref = c.image_refs["kvmesh"]
    ns = c.kubectl_json("get", "namespace", "kvmesh-system")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = c.kubectl_json("-n", "kvmesh-system", "get", "pods")["items"]
    assert len([p for p in pods if p["status"].get("phase") == "Running"]) == 4
    for p in pods:
        assert p["spec"]["containers"][0]["image"] == ref
        assert p["status"]["podIP"].startswith("10.244.0.")
    # The webhook is reached through its Service, with the caBundle the controller wrote.
    mwc = c.kubectl_json("get", "mutatingwebhookconfigurations")["items"]
    entries = [w for m in mwc for w in m["webhooks"] if "kvmesh" in m["metadata"]["name"]]
    assert entries and all(w["clientConfig"].get("service", {}).get("name") == "kvmesh-webhook" for w in entries)
    wait("caBundle written", lambda: all(
        w["clientConfig"].get("caBundle")
        for m in c.kubectl_json("get", "mutatingwebhookconfigurations")["items"]
        if "kvmesh" in m["metadata"]["name"] for w in m["webhooks"]), timeout=60)
    eps = c.kubectl_json("-n", "kvmesh-system", "get", "endpointslices", "-l",
                         "kubernetes.io/service-name=kvmesh-webhook")["items"]
    assert sum(len(e.get("endpoints") or []) for e in eps) == 2

    # A labelled Deployment, injected on admission by the webhook pods.
    tenant_namespace(c, "serving")
    deploy = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "qwen", "namespace": "serving"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "qwen"}},
                 "template": {"metadata": {"labels": {"app": "qwen", "kvmesh.dev/inject": "enabled"}},
                              "spec": {"containers": [{
                                  "name": "vllm", "image": STANDIN_REF.removeprefix("docker.io/"),
                                  "imagePullPolicy": "IfNotPresent",
                                  "command": ["vllm", "serve"], "args": ["Qwen/Qwen2.5-0.5B-Instruct", "--port", "8000"],
                                  "ports": [{"name": "http", "containerPort": 8000}]}]}}}}
    t1 = time.monotonic()
    c.kubectl("apply", "-f", "-", input=json.dumps(deploy))
    c.kubectl("-n", "serving", "rollout", "status", "deployment/qwen", "--timeout=120s", timeout=130)
    injected_ready = time.monotonic() - t1
    pods = c.kubectl_json("-n", "serving", "get", "pods", "-l", "app=qwen")["items"]
    assert len(pods) == 2
    for p in pods:
        status = json.loads(p["metadata"]["annotations"]["kvmesh.dev/status"])
        assert status.get("injected") is not False, status
        env = {e["name"]: e for e in p["spec"]["containers"][0].get("env", [])}
        assert "LMCACHE_P2P_HOST" in env or "LMCACHE_DISTRIBUTED_URL" in env, sorted(env)
        assert "--kv-transfer-config" in p["spec"]["containers"][0]["args"]
        assert p["metadata"]["labels"].get("kvmesh.dev/peer-group")
    print(f"\nreal node: cluster up {c.startup_seconds:.1f}s {json.dumps({k: round(v, 1) for k, v in c.timings.items()})}; "
          f"manifests applied -> both Deployments rolled out {c.rollout_seconds:.1f}s; "
          f"labelled Deployment -> 2 injected pods Ready {injected_ready:.1f}s", file=sys.stderr)


def test_leader_election_between_the_two_real_controller_pods(deployed):
    """One controller pod holds the Lease; delete it and another one takes over: the other
    pod, or the ReplicaSet's replacement, which may start before the other's next retry and
    win the released Lease (CI saw that once)."""
    c = deployed
    lease = lambda: c.kubectl_json("-n", "kvmesh-system", "get", "lease", "kvmesh-controller")["spec"]  # noqa: E731
    pods = {p["metadata"]["name"] for p in c.kubectl_json("-n", "kvmesh-system", "get", "pods", "-l",
                                                             "app.kubernetes.io/name=kvmesh-controller")["items"]}
    leader = wait("a controller pod holds the lease", lambda: lease().get("holderIdentity") in pods and
                  lease()["holderIdentity"], timeout=60)
    t0 = time.monotonic()
    c.kubectl("-n", "kvmesh-system", "delete", "pod", leader, "--wait=false")
    new = wait("another pod takes the lease", lambda: lease().get("holderIdentity") not in (None, "", leader)
               and lease()["holderIdentity"], timeout=60)
    took = time.monotonic() - t0
    now = {p["metadata"]["name"] for p in c.kubectl_json("-n", "kvmesh-system", "get", "pods", "-l",
                                                          "app.kubernetes.io/name=kvmesh-controller")["items"]}
    assert new in now, (new, now)
    print(f"\nleader {leader} deleted -> {new} ({'the other pod' if new in pods else 'its replacement'}) "
          f"leads after {took:.1f}s", file=sys.stderr)
    c.kubectl("-n", "kvmesh-system", "rollout", "status", "deployment/kvmesh-controller", "--timeout=120s", timeout=130)


def test_webhook_pod_killed_during_a_burst_of_pod_creations(deployed):
    """`kubectl delete pod --grace-period=0` of one webhook replica while opted-in pods are
    being admitted: every one of them is still injected (server-side dry run: the whole
    admission chain runs, nothing is scheduled)."""
    c = deployed
    c.kubectl("-n", "kvmesh-system", "rollout", "status", "deployment/kvmesh-webhook", "--timeout=120s", timeout=130)
    victim = webhook_pods(c)[0]["metadata"]["name"]
    results: list[tuple[float, bool, str]] = []
    t0 = time.monotonic()
    killed_at = None
    for i in range(60):
        if i == 10:
            killed_at = time.monotonic() - t0
            c.kubectl("-n", "kvmesh-system", "delete", "pod", victim, "--grace-period=0", "--wait=false")
        out = c.api("POST", "/api/v1/namespaces/default/pods?dryRun=All", standin_pod(f"burst-{i}"))
        ann = out["metadata"].get("annotations", {})
        injected = "kvmesh.dev/status" in ann and json.loads(ann["kvmesh.dev/status"]).get("injected") is not False
        results.append((time.monotonic() - t0, injected, ann.get("kvmesh.dev/status", "")))
        time.sleep(0.1)
    lost = [(round(t, 2), s) for t, ok, s in results if not ok]
    print(f"\nburst: {len(results)} admissions over {results[-1][0]:.1f}s, webhook {victim} deleted at "
          f"{killed_at:.1f}s, not injected: {lost}", file=sys.stderr)
    assert lost == []


def dns_a(c, name: str, server: str = realnode.NODE_IP) -> list[str]:
    """One A query to CoreDNS on the node's bridge, sent from inside the node's namespace."""
    import random
    import socket
    import struct

    qid = random.randrange(65536)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)

    def ask() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(q, (server, 53))
            return s.recv(4096)

    r = in_node_netns(c, ask)
    an = struct.unpack(">H", r[6:8])[0]
    i = 12
    while r[i]:
        i += r[i] + 1
    i += 5
    ips = []
    for _ in range(an):
        i += 2 if r[i] & 0xC0 == 0xC0 else len(r[i:].split(b"\0", 1)[0]) + 1
        rtype, _, _, rdlen = struct.unpack(">HHIH", r[i:i + 10])
        i += 10
        if rtype == 1:
            ips.append(".".join(map(str, r[i:i + 4])))
        i += rdlen
    return ips


def test_services_resolve_through_coredns(deployed):
    """The names kvmesh injects resolve through the cluster DNS to real Service addresses:
    the webhook Service, and the peer group's lookup Service the controller created."""
    c = deployed
    svc = c.kubectl_json("-n", "kvmesh-system", "get", "service", "kvmesh-webhook")
    assert dns_a(c, "kvmesh-webhook.kvmesh-system.svc.cluster.local") == [svc["spec"]["clusterIP"]]
    pods = c.kubectl_json("-n", "serving", "get", "pods", "-l", "app=qwen")["items"]
    if not pods:
        pytest.skip("needs the serving Deployment of the first test")
    env = {e["name"]: e.get("value", "") for e in pods[0]["spec"]["containers"][0].get("env", [])}
    lookup = next(v for k, v in env.items() if k.endswith("_URL") and ".svc" in v)
    host = lookup.split("://")[-1].rsplit(":", 1)[0]
    svc_name, ns = host.split(".")[:2]
    wait(f"lookup Service {svc_name}", lambda: c.kubectl("-n", ns, "get", "service", svc_name, check=False).returncode == 0,
         timeout=60)
    ip = c.kubectl_json("-n", ns, "get", "service", svc_name)["spec"]["clusterIP"]
    fqdn = host if host.endswith(".cluster.local") else host + ".cluster.local"
    assert dns_a(c, fqdn) == [ip], (lookup, fqdn)
    print(f"\nCoreDNS: {fqdn} -> {ip} (injected as {lookup})", file=sys.stderr)


def in_node_netns(c, fn):
    """fn() in a thread that entered the node's network namespace (sockets it opens live
    there; a socket keeps the namespace it was created in); its exception is re-raised here."""
    import threading

    out: dict = {}

    def run():
        try:
            realnode._setns(c.netns_path)
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def resp_ping(c, ip: str, port: int) -> bytes:
    """PING over TCP from inside the node namespace (so through kube-proxy's Service rules)."""
    import socket

    def ask() -> bytes:
        with socket.create_connection((ip, port), timeout=5) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64)

    return in_node_netns(c, ask)


def pod_spec_redis_cli(image: str, args: list[str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "redis-cli"},
            "spec": {"restartPolicy": "Never", "nodeSelector": {"kvmesh.dev/real-node": "true"},
                     "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never",
                                     "command": ["redis-cli"], "args": args}]}}


def test_redis_lookup_service_runs_as_a_real_pod(deployed):
    """A redis-generation group: the controller's Redis Deployment runs (Debian's redis-server
    image), its Service routes through kube-proxy to the real pod and answers PING, and the
    peer group counts both real vLLM pods as ready peers."""
    c = deployed
    c._ctr("images", "tag", "--force", c.image_refs["redis"], "docker.io/library/redis:7.2-alpine")
    c._ctr("images", "tag", "--force", STANDIN_REF, "docker.io/lmcache/vllm-openai:v0.3.6")
    tenant_namespace(c, "legacy")
    deploy = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "old", "namespace": "legacy"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "old"}},
                 "template": {"metadata": {"labels": {"app": "old", "kvmesh.dev/inject": "enabled"}},
                              "spec": {"containers": [{
                                  "name": "vllm", "image": "lmcache/vllm-openai:v0.3.6",
                                  "command": ["vllm", "serve"], "args": ["Qwen/Qwen2.5-0.5B-Instruct"]}]}}}}
    c.kubectl("apply", "-f", "-", input=json.dumps(deploy))
    c.kubectl("-n", "legacy", "rollout", "status", "deployment/old", "--timeout=120s", timeout=130)
    for p in c.kubectl_json("-n", "legacy", "get", "pods", "-l", "app=old")["items"]:
        assert json.loads(p["metadata"]["annotations"]["kvmesh.dev/status"])["mode"] == "redis"
    t0 = time.monotonic()
    wait("the lookup Deployment", lambda: c.kubectl("-n", "legacy", "get", "deployment", "kvmesh-redis-default",
                                                     check=False).returncode == 0, timeout=60)
    c.kubectl("-n", "legacy", "rollout", "status", "deployment/kvmesh-redis-default", "--timeout=120s", timeout=130)
    ready = time.monotonic() - t0
    svc = c.kubectl_json("-n", "legacy", "get", "service", "kvmesh-redis-default")
    ip, port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["port"]
    assert dns_a(c, "kvmesh-redis-default.legacy.svc.cluster.local") == [ip]
    # kube-proxy REJECTs a Service until its endpoints reach it: retry for a bounded time.
    def pong():
        try:
            return resp_ping(c, ip, port) == b"+PONG\r\n"
        except OSError:
            return False

    wait("PONG through the Service", pong, timeout=30)
    # From a pod on the bridge, by the Service's name through the kubelet's resolv.conf and
    # CoreDNS: Redis must accept a pod IP (protected mode off by the controller's arguments,
    # the image runs plain redis-server).
    client = pod_spec_redis_cli(c.image_refs["redis"], ["-h", "kvmesh-redis-default", "-p", str(port), "ping"])
    c.api("POST", "/api/v1/namespaces/legacy/pods", client)
    wait("redis-cli pod done", lambda: c.api("GET", "/api/v1/namespaces/legacy/pods/redis-cli")
         .get("status", {}).get("phase") in ("Succeeded", "Failed"), timeout=90)
    # Through the API server's logs proxy to the kubelet (dialled at the node's InternalIP).
    out = c.kubectl("-n", "legacy", "logs", "redis-cli", "-c", "c").stdout.splitlines()
    assert out == ["PONG"], out
    # And exec into the running Redis pod, through the same path (SPDY/WebSocket upgrade).
    (redis_pod,) = [p["metadata"]["name"] for p in c.kubectl_json("-n", "legacy", "get", "pods")["items"]
                    if p["metadata"]["name"].startswith("kvmesh-redis-default-")
                    and p["status"].get("phase") == "Running"]
    ex = c.kubectl("-n", "legacy", "exec", redis_pod, "--", "redis-server", "--version", check=False)
    assert ex.returncode == 0 and "Redis server" in ex.stdout, (ex.returncode, ex.stdout, ex.stderr)
    group = wait("peer group sees 2 ready peers", lambda: (
        g := c.kubectl_json("-n", "legacy", "get", "kvmeshpeergroups", "redis-default", check=False)
    ).get("status", {}).get("readyPeers") == 2 and g, timeout=60)
    print(f"\nredis lookup: Deployment Ready {ready:.1f}s after the group's pods; {ip}:{port} PONG; "
          f"group status {group['status'].get('members')} members", file=sys.stderr)


def injected_dry_run(c, ns: str, name: str) -> tuple[bool, str]:
    """(injected, what happened) for one opted-in pod admitted with dryRun=All."""
    try:
        out = c.api("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", standin_pod(name))
    except Exception as e:  # noqa: BLE001 - an admission error is what the caller counts
        return False, str(e)
    ann = out["metadata"].get("annotations", {})
    ok = "kvmesh.dev/status" in ann and json.loads(ann["kvmesh.dev/status"]).get("injected") is not False
    return ok, "" if ok else f"not injected: {ann}"


def test_certificate_rotation_through_the_service_while_pods_are_admitted(deployed):
    """The shipped Deployments with short lifetimes (CA 45 s, leaves 15 s, checked every second):
    the controller pod rotates the CA with overlap and rewrites the caBundle, the webhook pods
    renew their leaves, while opted-in pods are admitted through the Service; none fails or goes
    uninjected. Last in the module: it leaves the short lifetimes in place."""
    c = deployed
    for deploy, args in (("kvmesh-controller", ["--ca-validity-seconds=45", "--cert-check-seconds=1"]),
                         ("kvmesh-webhook", ["--leaf-validity-seconds=15", "--cert-check-seconds=1"])):
        patch = [{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": a} for a in args]
        c.kubectl("-n", "kvmesh-system", "patch", "deployment", deploy, "--type=json", "-p", json.dumps(patch))
    for deploy in ("kvmesh-controller", "kvmesh-webhook"):
        c.kubectl("-n", "kvmesh-system", "rollout", "status", f"deployment/{deploy}", "--timeout=240s", timeout=250)
    # Only now: a controller with the default lifetime would re-create a CA valid for a year.
    c.kubectl("-n", "kvmesh-system", "delete", "secret", names.CA_SECRET)
    secret = lambda: c.kubectl("-n", "kvmesh-system", "get", "secret", names.CA_SECRET, "-o", "json",  # noqa: E731
                               check=False)

    def short_lived_ca():
        got = secret()
        if got.returncode != 0:
            return None
        pem = json.loads(got.stdout)["data"]["ca.crt"]
        ca = x509.load_pem_x509_certificate(base64.b64decode(pem))
        if ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(minutes=1):
            # A controller pod of the old ReplicaSet, still terminating, re-created it with the
            # default lifetime: that CA would not rotate within the loop. Delete it again.
            c.kubectl("-n", "kvmesh-system", "delete", "secret", names.CA_SECRET, check=False)
            return None
        return pem
    first_ca = wait("the controller pod wrote a new 45 s CA", short_lived_ca, timeout=90)
    c.kubectl("create", "namespace", "rotation")
    wait("ServiceAccount rotation/default", lambda: c.kubectl(
        "-n", "rotation", "get", "serviceaccount", "default", check=False).returncode == 0, timeout=60)
    # The secret's deletion is a bootstrap, not a rotation: the loop starts once the webhook pods
    # serve leaves of the new CA.
    wait("admission with the new CA", lambda: injected_dry_run(c, "rotation", "warm")[0], timeout=60)
    created, failures = 0, []
    t0 = time.monotonic()
    # The whole 55 s: the CA rotates at 2/3 of its 45 s life, whatever the pace of admissions.
    while time.monotonic() - t0 < 55 and created < 400:
        name = f"rot-{created}"
        created += 1
        ok, what = injected_dry_run(c, "rotation", name)
        if not ok:
            failures.append(f"{name} at {time.monotonic() - t0:.1f}s: {what}")
        time.sleep(0.2)
    now_ca = json.loads(secret().stdout)["data"]["ca.crt"]
    issued = sum(c.kubectl("-n", "kvmesh-system", "logs", p["metadata"]["name"], check=False).stdout
                 .count("issued serving certificate") for p in webhook_pods(c))
    print(f"\nrotation: {created} admissions over {time.monotonic() - t0:.0f}s, CA rotated: {now_ca != first_ca}, "
          f"leaves issued (current webhook pods): {issued}, failures: {failures[:3]}", file=sys.stderr)
    assert failures == [], failures[:3]
    assert created >= 30
    assert now_ca != first_ca, "the CA never rotated during the loop"
    assert issued >= 6, "the webhook pods did not renew their leaves"
