from __future__ import annotations

import json

import yaml

from kvmesh.core import names
from support import wait_for  # noqa: F401  (re-exported for the e2e tests)


def vllm_deployment(name: str, namespace: str, replicas: int = 2, labels: dict | None = None,
                    image: str = "lmcache/vllm-openai:v0.3.9", extra_args=()) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name, **(labels or {})}},
                              "spec": {"containers": [{
                                  "name": "vllm", "image": image,
                                  "command": ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct",
                                              *extra_args]}]}}}}


def apply(cluster, obj: dict, *flags: str) -> str:
    return cluster.kubectl("apply", *flags, "-f", "-", input=yaml.safe_dump(obj)).stdout


def pods(cluster, namespace: str, selector: str) -> list[dict]:
    return cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]


def running_pods(cluster, namespace, selector, n):
    def probe():
        ps = [p for p in pods(cluster, namespace, selector)
              if p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")
              and not p["metadata"].get("deletionTimestamp")]
        return ps if len(ps) == n else None
    return wait_for(f"{n} running pods {selector} in {namespace}", probe)


def status(pod: dict) -> dict:
    return json.loads((pod["metadata"].get("annotations") or {}).get(names.ANN_STATUS, "{}"))


def env(pod: dict, container: str = "vllm") -> dict:
    c = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def publish_keys(client, owner: str, address: str, n: int, tag: str = "") -> list[str]:
    """Write n chunk keys the way LMCache 0.3.x does (plain SET <key> "<podIP>:<port>", no
    TTL) and return them."""
    # LMCache's key name: fmt@model@world size@worker id@chunk hash (hex); the owner and tag
    # go into the model name, which kvmesh never interprets.
    keys = [f"vllm@m-{owner}-{tag}@1@0@{i:x}" for i in range(n)]
    with client.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.set(k, address)
        pipe.execute()
    return keys
