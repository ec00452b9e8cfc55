"""End-to-end checks of the local control plane: controllers, scheduler, KWOK, admission."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest

pytestmark = pytest.mark.cluster


def _wait_for(what, probe, timeout=60.0, interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def _deployment(name, replicas):
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/kvmesh/app:1"}]},
            },
        },
    }


def _pods(cluster, ns, app):
    return cluster.api("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=app%3D{app}")["items"]


def _running_ready(pods, n):
    def ok(p):
        st = p.get("status", {})
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))
        return st.get("phase") == "Running" and ready and st.get("podIP") and not p["metadata"].get("deletionTimestamp")

    good = [p for p in pods if ok(p)]
    return good if len(good) == n and len(pods) == n else None


def _create_running_deployment(cluster, ns, name, replicas):
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_deployment(name, replicas)))
    return _wait_for(f"{replicas} running pods of {name}", lambda: _running_ready(_pods(cluster, ns, name), replicas))


def test_nodes_are_ready(devcluster):
    nodes = devcluster.kubectl_json("get", "nodes", "-l", "type=kwok")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == sorted(devcluster.node_names)
    assert len(nodes) == 3
    for n in nodes:
        ready = [c for c in n["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", n["status"]["conditions"]


def test_deployment_pods_run_with_loopback_ips(devcluster, namespace):
    pods = _create_running_deployment(devcluster, namespace, "web", 2)

    cidr = ipaddress.ip_network(devcluster.pod_cidr)
    ips = [ipaddress.ip_address(p["status"]["podIP"]) for p in pods]
    assert len(set(ips)) == 2, ips
    for ip in ips:
        assert ip.is_loopback and ip in cidr, (ip, cidr)
    for p in pods:
        assert p["spec"]["nodeName"] in devcluster.node_names  # bound by kube-scheduler
        assert p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"  # made by kube-controller-manager
        statuses = p["status"]["containerStatuses"]
        assert [s["name"] for s in statuses] == ["app"] and "running" in statuses[0]["state"]
    dep = devcluster.kubectl_json("get", "deployment", "web", "-n", namespace)
    _wait_for("deployment status", lambda: devcluster.kubectl_json("get", "deployment", "web", "-n", namespace)
              ["status"].get("readyReplicas") == 2)
    assert dep["spec"]["replicas"] == 2


def test_scale_to_zero_deletes_pods(devcluster, namespace):
    pods = _create_running_deployment(devcluster, namespace, "scaler", 2)
    names = {p["metadata"]["name"] for p in pods}

    devcluster.kubectl("scale", "deployment/scaler", "--replicas=0", "-n", namespace)

    _wait_for("pods gone", lambda: _pods(devcluster, namespace, "scaler") == [] or None)
    for name in names:
        res = devcluster.kubectl("get", "pod", name, "-n", namespace, check=False)
        assert res.returncode != 0 and "NotFound" in res.stderr, (res.returncode, res.stderr)


def test_server_side_dry_run_apply(devcluster, namespace):
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "dry", "namespace": namespace},
        "data": {"key": "value"},
    }
    res = devcluster.kubectl("apply", "--server-side", "--dry-run=server", "--show-managed-fields",
                             "-o", "json", "-f", "-",
                             input=json.dumps(cm))
    out = json.loads(res.stdout)
    assert out["kind"] == "ConfigMap" and out["data"] == {"key": "value"}
    assert out["metadata"]["uid"]  # filled by the apiserver, so it really went through admission/storage layers
    # The server computed field ownership for the apply: a real server-side apply.
    assert [(m["manager"], m["operation"]) for m in out["metadata"]["managedFields"]] == [("kubectl", "Apply")]

    missing = devcluster.kubectl("get", "configmap", "dry", "-n", namespace, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr  # dry run persisted nothing

    devcluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(cm))
    assert devcluster.kubectl_json("get", "configmap", "dry", "-n", namespace)["data"] == {"key": "value"}
