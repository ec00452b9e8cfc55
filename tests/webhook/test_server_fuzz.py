"""Property-based: malformed and adversarial AdmissionReviews and pod specs at /mutate always
get a well-formed answer, never a 500 or an unhandled exception (in-process aiohttp app)."""

import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmesh.core.policy import PolicyDefaults
from kvmesh.webhook.server import Metrics, make_app

# No NaN/Infinity: not JSON, never sent by the API server, and answered 400 (test below).
scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
anything = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=12), c, max_size=5), max_leaves=25)
words = st.sampled_from(["vllm", "serve", "m", "-tp", "2", "--port", "x", "sh", "-c",
                         "python3", "-m", "vllm.entrypoints.openai.api_server", "'", '"',
                         "--kv-transfer-config", "{", '{"kv_connector":1}', "$(X)", "&&",
                         "--kv-transfer-config.kv_connector", "<<", "`", "--data-parallel-size"])
container = st.fixed_dictionaries(
    {"name": st.sampled_from(["vllm", "side", "v", ""]) | st.integers()},
    optional={"image": st.sampled_from(["lmcache/vllm-openai:v0.3.6", "vllm/vllm-openai:v1",
                                        "x:y", ""]) | anything,
              "command": st.lists(words, max_size=6) | anything,
              "args": st.lists(words | st.text(max_size=40), max_size=6),
              "env": st.lists(st.fixed_dictionaries(
                  {"name": st.sampled_from(["LMCACHE_P2P_HOST", "POD_IP", "PYTHONHASHSEED",
                                            "LMCACHE_CHUNK_SIZE", "X"]) | anything},
                  optional={"value": st.text(max_size=10) | anything,
                            "valueFrom": anything}), max_size=5) | anything,
              "ports": st.lists(st.fixed_dictionaries({}, optional={
                  "containerPort": st.integers(0, 70000) | anything,
                  "hostPort": st.integers(0, 70000), "name": st.text(max_size=16)}),
                  max_size=3) | anything,
              "envFrom": anything})
annotations = st.dictionaries(
    st.sampled_from(["kvmesh.dev/mode", "kvmesh.dev/container", "kvmesh.dev/allow-parallel",
                     "kvmesh.dev/group", "kvmesh.dev/cpu-cache-gb", "kvmesh.dev/status",
                     "kvmesh.dev/x", "other"]),
    st.sampled_from(["redis", "controller", "true", "vllm", "1", ""]) | anything, max_size=3)
pod = st.fixed_dictionaries({}, optional={
    "metadata": st.fixed_dictionaries({}, optional={
        "labels": st.dictionaries(st.sampled_from(["kvmesh.dev/inject", "app"]),
                                  st.sampled_from(["enabled", "disabled", "x"]) | anything,
                                  max_size=2) | anything,
        "annotations": annotations | anything, "generateName": anything,
        "name": anything, "ownerReferences": anything}),
    "spec": st.fixed_dictionaries({}, optional={
        "containers": st.lists(container, max_size=3) | anything,
        "initContainers": st.lists(container, max_size=2) | anything,
        "hostNetwork": anything}) | anything})
review = st.fixed_dictionaries({
    "apiVersion": st.sampled_from(["admission.k8s.io/v1"]) | anything,
    "kind": st.sampled_from(["AdmissionReview"]) | anything,
}, optional={"request": st.fixed_dictionaries({}, optional={
    "uid": st.sampled_from(["u"]) | anything,
    "kind": st.just({"group": "", "version": "v1", "kind": "Pod"}) | anything,
    "operation": st.sampled_from(["CREATE"]) | anything,
    "namespace": anything, "dryRun": anything, "subResource": anything,
    "object": pod | anything}) | anything})


@pytest.fixture
async def client():
    metrics = Metrics()
    app = make_app(PolicyDefaults(), metrics)
    async with TestClient(TestServer(app)) as c:
        c.metrics = metrics
        yield c


async def _check(client, body: bytes):
    r = await client.post("/mutate/namespace", data=body,
                          headers={"Content-Type": "application/json"})
    assert r.status in (200, 400), (r.status, await r.text())
    data = await r.json()
    if r.status == 200:
        resp = data["response"]
        assert isinstance(resp["allowed"], bool)
        assert isinstance(resp["uid"], str) and resp["uid"]
        if not resp["allowed"]:
            assert resp["status"]["message"].startswith("kvmesh: ")
    else:
        assert data["error"]
    return r.status


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=review)
async def test_structured_garbage_never_500(client, body):
    await _check(client, json.dumps(body).encode())


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(p=pod)
async def test_adversarial_pods_get_an_answer(client, p):
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "CREATE", "namespace": "ns", "object": p}}
    assert await _check(client, json.dumps(body).encode()) == 200


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
async def test_random_bytes_never_500(client, raw):
    await _check(client, raw)


async def test_internal_errors_are_counted_and_admit(client, monkeypatch):
    from kvmesh.webhook import admission
    monkeypatch.setattr(admission.inject, "decide", lambda *a, **k: 1 / 0)
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "CREATE", "object": {}}}
    r = await client.post("/mutate", json=body)
    data = await r.json()
    assert r.status == 200 and data["response"]["allowed"] is True
    assert "internal error" in data["response"]["warnings"][0]
    text = generate_latest(client.metrics.registry).decode()
    assert 'kvmesh_webhook_errors_total{kind="internal"} 1.0' in text
    assert (await client.get("/metrics")).status == 404  # only on the ops port


@pytest.mark.parametrize("raw", [
    b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": NaN}',
    b'{"request": {"uid": "u", "object": {"spec": Infinity}}}',
    b"[" * 5000 + b"]" * 5000,
])
async def test_not_json_is_a_clear_400(client, raw):
    # NaN/Infinity are not JSON and absurd nesting is no Kubernetes object: refused with the
    # parser's reason, never a crash.
    r = await client.post("/mutate", data=raw, headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert (await r.json())["error"].startswith("body is not valid JSON: ")
