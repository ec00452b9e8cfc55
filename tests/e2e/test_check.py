"""`kvmesh check` against the real control plane, each failure produced by really breaking the
thing (a stopped webhook, a corrupted caBundle, a SIGKILLed leader whose lease goes stale, the
Service-backed webhook scaled to zero), and the cluster repaired afterwards."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys

from kvmesh.certs import authority
from kvmesh.core import names
from helpers import wait_for


def check(devcluster, *extra: str) -> tuple[int, dict]:
    """The report for the cluster, its peer groups limited to a namespace with none (other
    tests' groups, whose fake lookup pods never answer, are not this test's subject)."""
    r = subprocess.run([sys.executable, "-m", "kvmesh.cli", "check", "--kubeconfig",
                        devcluster.kubeconfig, "-o", "json", "-n", "kube-public", *extra],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def by_name(report: dict) -> dict:
    return {c["name"]: c for c in report["checks"]}


def failed(report: dict) -> set[str]:
    return {c["name"] for c in report["checks"] if c["status"] == "fail"}


def test_healthy_stack_passes_every_check(stack, devcluster):
    rc, report = check(devcluster)
    assert rc == 0 and report["ok"], report
    c = by_name(report)
    assert "leaf served at 127.0.0.1:" in c["webhook-trust"]["message"]
    assert "caBundle holds the kvmesh CA" in c["webhook-trust"]["message"]
    assert c["webhook-injects"]["message"].startswith("dry-run probe pod injected")
    assert "kvmesh-controller-local leads" in c["controller-leader"]["message"]
    assert c["peer-groups"]["message"] == "no KVMeshPeerGroup yet (no injected pod)"
    # The text form: a line per check, exit 0.
    r = subprocess.run([sys.executable, "-m", "kvmesh.cli", "check", "--kubeconfig",
                        devcluster.kubeconfig, "-n", "kube-public", "--probe-namespace",
                        "default"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("all checks passed"), r.stdout
    assert "[OK  ] webhook-injects" in r.stdout


def test_stopped_webhook_fails_reachability_and_injection(stack, devcluster):
    stack.webhook.stop()
    try:
        rc, report = check(devcluster)
        assert rc == 1 and not report["ok"]
        assert {"webhook-pods", "webhook-injects"} <= failed(report)
        c = by_name(report)
        assert "cannot connect" in c["webhook-pods"]["message"]
        assert "start it there" in c["webhook-pods"]["fix"]
        assert "failurePolicy Ignore" in c["webhook-injects"]["message"]
    finally:
        stack.start_webhook()
        stack.wait("webhook ready again", stack.webhook_ready, 60)


def test_service_backed_webhook_scaled_to_zero(stack, devcluster):
    """The shipped configuration (entries -> Service) with the Deployment at zero replicas,
    then at two (KWOK makes them Ready, but nothing answers behind the Service)."""
    mwc = devcluster.kubectl_json("get", "mutatingwebhookconfiguration",
                                  names.WEBHOOK_CONFIGURATION)
    ops = []
    for i, w in enumerate(mwc["webhooks"]):
        ops += [{"op": "remove", "path": f"/webhooks/{i}/clientConfig/url"},
                {"op": "add", "path": f"/webhooks/{i}/clientConfig/service",
                 "value": {"name": names.WEBHOOK_SERVICE, "namespace": names.SYSTEM_NAMESPACE,
                           "path": "/mutate", "port": 443}}]
    devcluster.kubectl("patch", "mutatingwebhookconfiguration", names.WEBHOOK_CONFIGURATION,
                       "--type=json", "-p", json.dumps(ops))
    scale = ("-n", names.SYSTEM_NAMESPACE, "scale", "deployment", "kvmesh-webhook")
    try:
        devcluster.kubectl(*scale, "--replicas=0")
        rc, report = check(devcluster)
        assert rc == 1 and "webhook-pods" in failed(report)
        c = by_name(report)
        assert "0 of 0 replicas ready" in c["webhook-pods"]["message"]
        assert "--replicas=2" in c["webhook-pods"]["fix"]
        assert "webhook-injects" in failed(report)
        devcluster.kubectl(*scale, "--replicas=2")
        wait_for("2 ready webhook replicas (KWOK)", lambda: (devcluster.kubectl_json(
            "get", "deployment", "-n", names.SYSTEM_NAMESPACE, "kvmesh-webhook")
            .get("status") or {}).get("readyReplicas") == 2, 60)
        rc, report = check(devcluster)
        c = by_name(report)
        assert c["webhook-pods"]["status"] == "ok", c["webhook-pods"]
        assert rc == 1 and failed(report) == {"webhook-injects"}
    finally:
        devcluster.kubectl(*scale, "--replicas=0")
        stack.point_webhook_at_local(stack.webhook_port)
    assert check(devcluster)[0] == 0


def test_corrupted_ca_bundle_and_stale_leader(stack, devcluster):
    """SIGKILL the leader (no lease release, nobody repairs the caBundle), corrupt the
    caBundle, wait for the lease to go stale."""
    stack.controller.proc.kill()
    stack.controller.proc.wait()
    stranger = authority.new_ca(dt.datetime.now(dt.timezone.utc))
    ops = [{"op": "replace", "path": f"/webhooks/{i}/clientConfig/caBundle",
            "value": base64.b64encode(stranger.cert_pem).decode()} for i in range(2)]
    devcluster.kubectl("patch", "mutatingwebhookconfiguration", names.WEBHOOK_CONFIGURATION,
                       "--type=json", "-p", json.dumps(ops))
    try:
        rc, report = check(devcluster)
        assert rc == 1 and {"webhook-trust", "webhook-injects"} <= failed(report)
        c = by_name(report)
        assert "does not hold the CA in Secret" in c["webhook-trust"]["message"]
        assert "controller-leader" in c["webhook-trust"]["fix"]

        def stale():
            return "controller-leader" in failed(check(devcluster)[1])
        wait_for("the leader lease to go stale", stale, timeout=60, interval=2)
        c = by_name(check(devcluster)[1])
        assert "last renewed" in c["controller-leader"]["message"]
        assert "no other replica took over" in c["controller-leader"]["message"]
    finally:
        stack.restart()  # the controller leads again and repairs the caBundle
    wait_for("every check passing after the repair", lambda: check(devcluster)[0] == 0,
             timeout=60, interval=2)
