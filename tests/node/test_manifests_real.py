"""The shipped manifests/ on a real node, as a user applies them (only the image line changed).

The kvmesh image built by images/build.py runs as the webhook and controller Deployments under
the namespace's PodSecurity `restricted`; the controller bootstraps the CA and writes the
caBundle; the API server calls the webhook through its Service (at the pod IPs); a labelled
Deployment is injected on admission and its pods run.

Test-only stand-in, named as such: the "vLLM" image is the pause binary installed as
/usr/local/bin/vllm and imported as `docker.io/lmcache/vllm-openai:v0.5.6`, so that admission sees
a real LMCache image name while the node runs a few-MB process instead of a CUDA image.
Skipped unless `make node` has built everything (KVMESH_REQUIRE_NODE=1: fail instead).
"""

from __future__ import annotations

import json
import sys
import tarfile
import time
from pathlib import Path

import pytest

from kvmesh.local import node as realnode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_real_node import require, wait  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHIPPED_IMAGE = "ghcr.io/kvmesh/kvmesh:0.1.0"
STANDIN_REF = "docker.io/lmcache/vllm-openai:v0.5.6"


def standin_vllm_image(pause: Path, work: Path) -> Path:
    sys.path.insert(0, str(REPO / "images"))
    try:
        import build as image_build  # noqa: PLC0415
    finally:
        sys.path.pop(0)
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
    require(("kvmesh",))
    c = realnode.RealNodeCluster(images=("kvmesh",), verbose=True)
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


def test_shipped_manifests_ready_and_inject_through_the_service(cluster, tmp_path):
    c = cluster
    ref = c.image_refs["kvmesh"]
    t0 = time.monotonic()
    c.kubectl("apply", "-f", str(REPO / "manifests" / "00-namespace.yaml"))
    c.kubectl("apply", "-f", "-", input=rendered_manifests(ref), timeout=120)
    ns = c.kubectl_json("get", "namespace", "kvmesh-system")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    try:
        for d in ("kvmesh-webhook", "kvmesh-controller"):
            c.kubectl("-n", "kvmesh-system", "rollout", "status", f"deployment/{d}", "--timeout=240s", timeout=250)
    except Exception:
        print(c.kubectl("-n", "kvmesh-system", "get", "pods,events", "-o", "wide", check=False).stdout, file=sys.stderr)
        for p in c.kubectl_json("-n", "kvmesh-system", "get", "pods")["items"]:
            print(c.kubectl("-n", "kvmesh-system", "logs", p["metadata"]["name"], "--tail=40", check=False).stdout,
                  file=sys.stderr)
        raise
    rollout = time.monotonic() - t0
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
    c.import_image(standin_vllm_image(c.node_bin / "pause", tmp_path))
    c.kubectl("create", "namespace", "serving")
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
          f"manifests applied -> both Deployments rolled out {rollout:.1f}s; "
          f"labelled Deployment -> 2 injected pods Ready {injected_ready:.1f}s", file=sys.stderr)
