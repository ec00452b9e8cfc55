"""The real `kvmesh webhook` process over TLS: probes, metrics, bad input, dry run."""

import json

import pytest

from support import metric_sum


def metric(webhook, name, **labels):
    return metric_sum(webhook.get("/metrics")[1].decode(), name, **labels)


POD = {"metadata": {"generateName": "q-", "namespace": "ns",
                    "labels": {"kvmesh.dev/inject": "enabled"}},
       "spec": {"containers": [{"name": "vllm", "image": "lmcache/vllm-openai:v0.3.6",
                                "command": ["vllm", "serve", "m"]}]}}


def test_probes(webhook):
    assert webhook.get("/healthz")[0] == 200
    assert webhook.get("/readyz")[0] == 200


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[]", 400, "JSON object"),
    (b'{"kind":"Pod"}', 400, "AdmissionReview"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                 "request": {"uid": ""}}).encode(), 400, "uid"),
])
def test_malformed_bodies_get_400_with_reason(webhook, body, status, fragment):
    before = metric(webhook, "kvmesh_webhook_errors_total", kind="bad_request")
    code, out = webhook.request("/mutate", body)
    assert code == status and fragment in json.loads(out)["error"]
    assert metric(webhook, "kvmesh_webhook_errors_total", kind="bad_request") == before + 1


def test_oversized_body_is_413_without_reading_it(webhook):
    # Only the head is sent: the answer must come from Content-Length alone.
    import http.client
    c = http.client.HTTPSConnection("127.0.0.1", webhook.port, context=webhook.ctx, timeout=10)
    c.putrequest("POST", "/mutate")
    c.putheader("Content-Type", "application/json")
    c.putheader("Content-Length", str(4 * 1024 * 1024))
    c.endheaders()
    r = c.getresponse()
    assert r.status == 413 and b"larger than" in r.read()
    c.close()


def test_probes_and_metrics_are_not_on_the_admission_port(webhook):
    for path in ("/metrics", "/healthz", "/readyz"):
        assert webhook.request(path, None, method="GET", headers={})[0] == 404


def test_wrong_content_type_is_415(webhook):
    code, out = webhook.request("/mutate", b"{}", headers={"Content-Type": "text/plain"})
    assert code == 415 and b"application/json" in out


def test_get_on_mutate_is_405_not_500(webhook):
    assert webhook.request("/mutate", None, method="GET", headers={})[0] == 405


def test_injection_counts_and_latency_histogram(webhook):
    before = metric(webhook, "kvmesh_webhook_injections_total", mode="redis")
    n_before = metric(webhook, "kvmesh_webhook_request_duration_seconds_count")
    r = webhook.review(POD)
    assert r["allowed"] and r["patch"]
    assert metric(webhook, "kvmesh_webhook_injections_total", mode="redis") == before + 1
    assert metric(webhook, "kvmesh_webhook_request_duration_seconds_count") == n_before + 1
    text = webhook.get("/metrics")[1].decode()
    assert 'kvmesh_webhook_request_duration_seconds_bucket{le="0.0001"}' in text


def test_skip_and_denial_counted_by_reason(webhook):
    tp2 = json.loads(json.dumps(POD))
    tp2["spec"]["containers"][0]["command"] += ["-tp", "2"]
    s0 = metric(webhook, "kvmesh_webhook_skips_total", reason="parallelism-unsupported")
    webhook.review(tp2)
    assert metric(webhook, "kvmesh_webhook_skips_total",
                  reason="parallelism-unsupported") == s0 + 1
    bad = json.loads(json.dumps(POD))
    bad["metadata"]["annotations"] = {"kvmesh.dev/mode": "nope"}
    d0 = metric(webhook, "kvmesh_webhook_denials_total", reason="invalid-annotation")
    r = webhook.review(bad)
    assert r["allowed"] is False
    assert metric(webhook, "kvmesh_webhook_denials_total", reason="invalid-annotation") == d0 + 1


def test_dry_run_gets_the_same_answer(webhook):
    assert webhook.review(POD, dry_run=True)["patch"] == webhook.review(POD)["patch"]


def test_identical_pods_are_answered_from_the_memo_and_counted(webhook):
    pod = json.loads(json.dumps(POD))
    pod["metadata"]["labels"]["memo-test"] = "1"  # an object no other test sends
    h0 = metric(webhook, "kvmesh_webhook_decision_memo_total", result="hit")
    m0 = metric(webhook, "kvmesh_webhook_decision_memo_total", result="miss")
    i0 = metric(webhook, "kvmesh_webhook_injections_total", mode="redis")
    answers = [webhook.review(pod) for _ in range(3)]
    assert answers[0]["patch"] and all(a["patch"] == answers[0]["patch"] for a in answers)
    assert metric(webhook, "kvmesh_webhook_decision_memo_total", result="miss") == m0 + 1
    assert metric(webhook, "kvmesh_webhook_decision_memo_total", result="hit") == h0 + 2
    # every admission still counts as an injection, memo or not
    assert metric(webhook, "kvmesh_webhook_injections_total", mode="redis") == i0 + 3


def test_unlabelled_pod_only_injected_when_api_server_selected_it(webhook):
    pod = json.loads(json.dumps(POD))
    del pod["metadata"]["labels"]
    assert "patch" not in webhook.review(pod)
    assert webhook.review(pod, query="/namespace")["patch"]
