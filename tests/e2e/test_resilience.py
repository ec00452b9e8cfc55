"""Reinvocation, webhook outages under both failure policies, certificate rotation under a
pod-creation loop, and caBundle drift repair — all through the real API server."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import threading
import time

import yaml
from aiohttp import web
from cryptography import x509

from kvmesh.core import names
from kvmesh.certs import authority
from helpers import apply, env, status, wait_for
from support import free_port


def labelled_pod(name: str, namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {names.LABEL_INJECT: "enabled"}},
            "spec": {"containers": [{"name": "vllm", "image": "lmcache/vllm-openai:v0.3.9",
                                     "command": ["vllm", "serve", "m"]}]}}


def create(cluster, obj):
    return cluster.kubectl("create", "-o", "json", "-f", "-", input=yaml.safe_dump(obj),
                           check=False)


# --- a second mutating webhook that adds a sidecar (for reinvocation) ---------------------

class SidecarWebhook:
    """Adds a `proxy` container listening on 8200 (kvmesh's default P2P port) to every pod
    it sees; registered AFTER kvmesh, so kvmesh must be reinvoked and re-pick its ports."""

    def __init__(self, tmp):
        now = dt.datetime.now(dt.timezone.utc)
        self.ca = authority.new_ca(now)
        leaf = authority.issue_leaf(self.ca, ["127.0.0.1"], now)
        (tmp / "s.crt").write_bytes(leaf.cert_pem)
        (tmp / "s.key").write_bytes(leaf.key_pem)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tmp / "s.crt", tmp / "s.key")
        self.port = free_port()
        self.calls = 0
        self._loop = None
        threading.Thread(target=self._serve, daemon=True).start()
        wait_for("sidecar webhook", lambda: self._loop is not None, 10)

    def _serve(self):
        import asyncio

        async def mutate(request):
            self.calls += 1
            review = await request.json()
            pod = review["request"]["object"]
            patch = []
            if not any(c["name"] == "proxy" for c in pod["spec"]["containers"]):
                patch = [{"op": "add", "path": "/spec/containers/-",
                          "value": {"name": "proxy", "image": "envoy:1",
                                    "ports": [{"containerPort": 8200}]}}]
            resp = {"uid": review["request"]["uid"], "allowed": True}
            if patch:
                resp.update(patchType="JSONPatch",
                            patch=base64.b64encode(json.dumps(patch).encode()).decode())
            return web.json_response({"apiVersion": "admission.k8s.io/v1",
                                      "kind": "AdmissionReview", "response": resp})

        async def main():
            app = web.Application()
            app.router.add_post("/mutate", mutate)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()
            self._loop = asyncio.get_running_loop()
            await asyncio.Event().wait()

        asyncio.run(main())

    def configuration(self) -> dict:
        return {"apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "zz-test-sidecar"},
                "webhooks": [{
                    "name": "sidecar.test.kvmesh.dev", "admissionReviewVersions": ["v1"],
                    "sideEffects": "None", "failurePolicy": "Fail", "timeoutSeconds": 5,
                    "reinvocationPolicy": "Never",
                    "clientConfig": {"url": f"https://127.0.0.1:{self.port}/mutate",
                                     "caBundle": base64.b64encode(self.ca.cert_pem).decode()},
                    "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                               "resources": ["pods"]}],
                    "objectSelector": {"matchLabels": {names.LABEL_INJECT: "enabled"}}}]}


def test_reinvocation_after_another_webhook_adds_a_container(stack, devcluster, namespace,
                                                             tmp_path):
    side = SidecarWebhook(tmp_path)
    apply(devcluster, side.configuration())
    try:
        r = create(devcluster, labelled_pod("reinvoked", namespace))
        assert r.returncode == 0, r.stderr
        pod = json.loads(r.stdout)
        assert [c["name"] for c in pod["spec"]["containers"]] == ["vllm", "proxy"]
        e = env(pod)
        assert len(e) == len(pod["spec"]["containers"][0]["env"])  # injected once
        assert pod["spec"]["containers"][0]["args"].count("--kv-transfer-config") == 1
        ports = [p["containerPort"] for c in pod["spec"]["containers"]
                 for p in c.get("ports", [])]
        assert len(ports) == len(set(ports)), ports  # re-picked around the sidecar's 8200
        assert e["LMCACHE_P2P_INIT_PORTS"] != "8200"
        assert status(pod)["injected"] is True
        assert side.calls >= 1
    finally:
        devcluster.kubectl("delete", "mutatingwebhookconfiguration", "zz-test-sidecar")


# --- webhook outages ---------------------------------------------------------------------

def test_webhook_down_with_ignore_creates_uninjected_pods(stack, devcluster, namespace):
    stack.webhook.stop()
    try:
        r = create(devcluster, labelled_pod("while-down", namespace))
        assert r.returncode == 0, r.stderr
        pod = json.loads(r.stdout)
        assert names.ANN_STATUS not in (pod["metadata"].get("annotations") or {})
        # The API server counts the fail-open call (metric operators alert on).
        metrics = devcluster.kubectl("get", "--raw", "/metrics").stdout
        assert 'apiserver_admission_webhook_fail_open_count{name="pods.kvmesh.dev"' in metrics
        # ...and kvmesh's controller says so on the pod.
        ev = wait_for("NotInjected Event", lambda: [
            e for e in devcluster.kubectl_json("get", "events", "-n", namespace)["items"]
            if e["reason"] == "NotInjected" and e["involvedObject"]["name"] == "while-down"], 20)
        assert "without LMCache P2P injection" in ev[0]["message"]
    finally:
        stack.start_webhook()
        stack.wait("webhook ready again", stack.webhook_ready, 60)


def test_webhook_down_with_fail_refuses_only_opted_in_pods(stack, devcluster, namespace):
    stack.point_webhook_at_local(stack.webhook_port, failure_policy="Fail")
    stack.webhook.stop()
    try:
        r = create(devcluster, labelled_pod("refused", namespace))
        assert r.returncode != 0
        assert 'failed calling webhook "pods.kvmesh.dev"' in r.stderr
        plain = labelled_pod("plain", namespace)
        del plain["metadata"]["labels"]
        assert create(devcluster, plain).returncode == 0  # never reaches the webhook
    finally:
        stack.point_webhook_at_local(stack.webhook_port)
        stack.start_webhook()
        stack.wait("webhook ready again", stack.webhook_ready, 60)


# --- certificates --------------------------------------------------------------------------

def test_ca_bundle_drift_is_repaired(stack, devcluster, namespace):
    stranger = authority.new_ca(dt.datetime.now(dt.timezone.utc))
    expired = authority.new_ca(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2),
                               validity=dt.timedelta(days=1))
    for bogus in (stranger.cert_pem, expired.cert_pem):
        ops = [{"op": "replace", "path": f"/webhooks/{i}/clientConfig/caBundle",
                "value": base64.b64encode(bogus).decode()} for i in range(2)]
        devcluster.kubectl("patch", "mutatingwebhookconfiguration", names.WEBHOOK_CONFIGURATION,
                           "--type=json", "-p", json.dumps(ops))
        secret = devcluster.kubectl_json("get", "secret", "-n", names.SYSTEM_NAMESPACE,
                                         names.CA_SECRET)
        want = secret["data"]["bundle.crt"]

        def repaired():
            mwc = devcluster.kubectl_json("get", "mutatingwebhookconfiguration",
                                          names.WEBHOOK_CONFIGURATION)
            return all(w["clientConfig"]["caBundle"] == want for w in mwc["webhooks"])
        wait_for("caBundle repaired by the controller", repaired, timeout=30)
    stack.wait("webhook ready", stack.webhook_ready, 30)
    r = create(devcluster, labelled_pod("after-repair", namespace))
    assert r.returncode == 0 and status(json.loads(r.stdout))["injected"] is True


def test_rotation_under_pod_creation_loop_drops_no_admission(stack, devcluster, namespace):
    """Short lifetimes (CA 45 s, leaves 15 s) so both leaf renewal and a CA rotation with
    overlap happen while pods are being created; every pod must be injected."""
    # Stop first: a running controller recreates a deleted CA within its check interval, with
    # its own (year-long) validity, which would then never rotate here (CI saw that once).
    stack.down()
    devcluster.kubectl("delete", "secret", "-n", names.SYSTEM_NAMESPACE, names.CA_SECRET)
    stack.restart(controller_args=("--ca-validity-seconds", "45", "--cert-check-seconds", "1"),
                  webhook_args=("--leaf-validity-seconds", "15", "--cert-check-seconds", "1"))
    first_ca = devcluster.kubectl_json("get", "secret", "-n", names.SYSTEM_NAMESPACE,
                                       names.CA_SECRET)["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(first_ca))
    assert ca.not_valid_after_utc - ca.not_valid_before_utc < dt.timedelta(minutes=1), \
        "the CA was not made by the restarted controller (45 s validity)"
    try:
        created, failures = 0, []
        deadline = time.monotonic() + 55
        # The whole 55 s: the CA (45 s) rotates at 2/3 of its life, ~30 s after the restart,
        # whatever the pace of admissions.
        while time.monotonic() < deadline and created < 120:
            r = create(devcluster, labelled_pod(f"rot-{created}", namespace))
            created += 1
            if r.returncode != 0:
                failures.append(r.stderr)
            elif not status(json.loads(r.stdout)).get("injected"):
                failures.append(f"rot-{created - 1} not injected")
            time.sleep(0.5)
        assert failures == [], failures[:3]
        assert created >= 40
        now_ca = devcluster.kubectl_json("get", "secret", "-n", names.SYSTEM_NAMESPACE,
                                         names.CA_SECRET)["data"]["ca.crt"]
        assert now_ca != first_ca, "the CA never rotated during the loop"
        log = stack.webhook.log_path.read_text()
        assert log.count("issued serving certificate") >= 3
    finally:
        stack.restart()
