"""A cluster-wide KVMeshPolicy enables injection without touching workloads: the controller
reflects it into a webhook entry, the webhook applies its defaults from a watch-fed cache, and
status reports readiness, invalid specs and counts."""

from __future__ import annotations

import json

from kvmesh.core import names
from helpers import apply, env, running_pods, status, vllm_deployment, wait_for
from test_admission_chain import webhook_requests


def policy(name, ns_labels, **defaults) -> dict:
    return {"apiVersion": f"{names.API_GROUP}/{names.API_VERSION}", "kind": "KVMeshPolicy",
            "metadata": {"name": name},
            "spec": {"namespaceSelector": {"matchLabels": ns_labels}, "failurePolicy": "Ignore",
                     "defaults": defaults}}


def policy_status(cluster, name):
    r = cluster.kubectl("get", "kvmeshpolicies.kvmesh.dev", name, "-o", "json", check=False)
    return json.loads(r.stdout).get("status", {}) if r.returncode == 0 else None


def entries(cluster):
    mwc = cluster.kubectl_json("get", "mutatingwebhookconfiguration",
                               names.WEBHOOK_CONFIGURATION)
    return {w["name"]: w for w in mwc["webhooks"]}


def test_policy_enables_unlabelled_pods_with_its_defaults(stack, devcluster, namespace):
    devcluster.kubectl("label", "namespace", namespace, "team=ml-" + namespace[-6:])
    pname = "ml-" + namespace[-6:]
    apply(devcluster, policy(pname, {"team": pname}, mode="redis", cpuCacheGb=12))
    try:
        st = wait_for("policy ready", lambda: (policy_status(devcluster, pname) or {})
                      .get("conditions"), 30)
        assert st[0]["status"] == "True", st
        entry = wait_for("policy entry", lambda: entries(devcluster).get(
            pname + names.POLICY_ENTRY_SUFFIX), 10)
        assert entry["matchConditions"][0]["name"] == "looks-like-vllm"
        assert entry["clientConfig"].get("caBundle")
        wait_for("webhook ready", stack.webhook_ready, 30)
        start = webhook_requests(stack)

        apply(devcluster, vllm_deployment("byns", namespace, replicas=1))
        [p] = running_pods(devcluster, namespace, "app=byns", 1)
        st = status(p)
        assert st["injected"] and st["policy"] == pname and st["mode"] == "redis"
        assert env(p)["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "12"
        # A labelled pod in the same namespace gets the same policy's defaults.
        apply(devcluster, vllm_deployment("bylabel", namespace, replicas=1,
                                          labels={names.LABEL_INJECT: "enabled"}))
        [q] = running_pods(devcluster, namespace, "app=bylabel", 1)
        assert status(q)["policy"] == pname and env(q)["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "12"
        # A non-vLLM pod in the namespace never reaches the webhook (CEL matchCondition).
        before = webhook_requests(stack)
        assert before >= start + 2  # the counter counts: both pods above went through it
        other = vllm_deployment("web", namespace, replicas=1)
        other["spec"]["template"]["spec"]["containers"][0].update(image="nginx:1.27",
                                                                   command=["nginx"])
        apply(devcluster, other)
        running_pods(devcluster, namespace, "app=web", 1)
        assert webhook_requests(stack) == before
        wait_for("status counts the policy's pods", lambda: (policy_status(devcluster, pname)
                                                            or {}).get("injectedPods") == 2, 30)
    finally:
        devcluster.kubectl("delete", "kvmeshpolicies.kvmesh.dev", pname)
    wait_for("entry removed with the policy", lambda: pname + names.POLICY_ENTRY_SUFFIX
             not in entries(devcluster), 30)


def test_invalid_policy_is_reported_not_applied(stack, devcluster):
    bad = policy("bad-heartbeat", {"x": "y"}, heartbeatSeconds=60, workerTimeoutSeconds=30)
    apply(devcluster, bad)
    try:
        cond = wait_for("invalid status", lambda: ((policy_status(devcluster, "bad-heartbeat")
                                                    or {}).get("conditions") or [None])[0], 30)
        assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
        assert "heartbeatSeconds" in cond["message"]
        assert "bad-heartbeat" + names.POLICY_ENTRY_SUFFIX not in entries(devcluster)
    finally:
        devcluster.kubectl("delete", "kvmeshpolicies.kvmesh.dev", "bad-heartbeat")
