"""The real API server calls the real webhook: pods created by the ReplicaSet controller
through the admission chain carry the injected configuration."""

from __future__ import annotations

import base64
import json
import urllib.request

from kvmesh.core import hashseed, names
from helpers import apply, env, pods, running_pods, status, vllm_deployment
from support import metric_sum


def webhook_requests(stack) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.webhook_metrics_port}/metrics",
                                timeout=5) as r:
        return metric_sum(r.read().decode(), "kvmesh_webhook_requests_total")


def test_manifests_apply_and_ca_bundle_is_written(stack, devcluster):
    mwc = devcluster.kubectl_json("get", "mutatingwebhookconfiguration",
                                  names.WEBHOOK_CONFIGURATION)
    assert {w["name"] for w in mwc["webhooks"]} == {names.WEBHOOK_POD_ENTRY,
                                                    names.WEBHOOK_NAMESPACE_ENTRY}
    for w in mwc["webhooks"]:
        assert w["clientConfig"]["caBundle"]
        assert w["sideEffects"] == "None" and w["timeoutSeconds"] <= 5
        assert w["reinvocationPolicy"] == "IfNeeded"
    secret = devcluster.kubectl_json("get", "secret", "-n", names.SYSTEM_NAMESPACE,
                                     names.CA_SECRET)
    assert {"ca.crt", "ca.key", "bundle.crt"} <= set(secret["data"])
    # The caBundle is owned by kvmesh's field manager only.
    managed = devcluster.kubectl_json("get", "mutatingwebhookconfiguration",
                                      names.WEBHOOK_CONFIGURATION, "--show-managed-fields")
    owners = [m["manager"] for m in managed["metadata"]["managedFields"]
              if "caBundle" in json.dumps(m.get("fieldsV1", {}))]
    assert owners == [names.FIELD_MANAGER_CERTS]


def test_opted_in_deployment_pods_are_injected(stack, devcluster, namespace):
    apply(devcluster, vllm_deployment("qwen", namespace, labels={names.LABEL_INJECT: "enabled"}))
    ps = running_pods(devcluster, namespace, "app=qwen", 2)
    for p in ps:
        st = status(p)
        assert st["injected"] is True and st["mode"] == "controller"
        e = env(p)
        assert e["LMCACHE_P2P_HOST"] == f"$({names.POD_IP_VAR})"
        assert e["LMCACHE_LMCACHE_INSTANCE_ID"] == {"fieldRef": {"apiVersion": "v1",
                                                                 "fieldPath": "metadata.name"}}
        args = p["spec"]["containers"][0]["args"]
        assert args[-2] == "--kv-transfer-config"
        assert p["status"]["podIP"].startswith("127.")
    # Both replicas carry their group's own PYTHONHASHSEED, derived from the key the controller
    # keeps in kvmesh-system, not a cluster-wide constant.
    secret = devcluster.kubectl_json("get", "secret", "-n", names.SYSTEM_NAMESPACE,
                                     names.HASH_SEED_SECRET)
    key = base64.b64decode(secret["data"][hashseed.KEY_FIELD])
    assert {env(p)["PYTHONHASHSEED"] for p in ps} == {
        str(hashseed.derive(key, namespace, names.group_id("controller", "default")))}
    # The Deployment's own template is untouched: only pods are mutated.
    d = devcluster.kubectl_json("get", "deployment", "-n", namespace, "qwen")
    assert "env" not in d["spec"]["template"]["spec"]["containers"][0]


def test_unlabelled_pod_never_reaches_the_webhook(stack, devcluster, namespace):
    before = webhook_requests(stack)
    apply(devcluster, vllm_deployment("plain", namespace, replicas=1))
    [p] = running_pods(devcluster, namespace, "app=plain", 1)
    assert names.ANN_STATUS not in (p["metadata"].get("annotations") or {})
    assert "env" not in p["spec"]["containers"][0]
    assert webhook_requests(stack) == before
    # The counter really counts (a missing metric would read 0 == 0 above): a labelled pod moves it.
    apply(devcluster, vllm_deployment("labelled", namespace, replicas=1,
                                      labels={names.LABEL_INJECT: "enabled"}))
    running_pods(devcluster, namespace, "app=labelled", 1)
    assert webhook_requests(stack) > before


def test_opted_out_pod_in_enabled_namespace_is_untouched(stack, devcluster, namespace):
    devcluster.kubectl("label", "namespace", namespace, f"{names.LABEL_INJECT}=enabled")
    apply(devcluster, vllm_deployment("out", namespace, replicas=1,
                                      labels={names.LABEL_INJECT: "disabled"}))
    apply(devcluster, vllm_deployment("in", namespace, replicas=1))
    [out] = running_pods(devcluster, namespace, "app=out", 1)
    [inn] = running_pods(devcluster, namespace, "app=in", 1)
    assert "env" not in out["spec"]["containers"][0]
    assert status(inn)["injected"] is True  # selected by the namespace label alone


def test_server_dry_run_shows_mutation_without_side_effects(stack, devcluster, namespace):
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "dry", "namespace": namespace,
                        "labels": {names.LABEL_INJECT: "enabled"}},
           "spec": {"containers": [{"name": "vllm", "image": "lmcache/vllm-openai:v0.3.6",
                                    "command": ["vllm", "serve", "m"]}]}}
    import yaml
    out = devcluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                             input=yaml.safe_dump(pod)).stdout
    shown = json.loads(out)
    assert status(shown)["mode"] == "redis"
    assert env(shown)["LMCACHE_DISTRIBUTED_URL"].startswith(f"$({names.POD_IP_VAR}):")
    assert pods(devcluster, namespace, f"{names.LABEL_INJECT}=enabled") == []
