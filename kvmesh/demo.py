"""`kvmesh demo`: the webhook on loopback over TLS, a sample vLLM Deployment injected through
both the offline CLI path and a real HTTPS AdmissionReview, and what the pod received."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import tempfile
import urllib.request
import uuid
from pathlib import Path

import jsonpatch
import yaml

from kvmesh import workloads
from kvmesh.webhook import server
from kvmesh.webhook.policy import PolicyDefaults

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "manifests" / "samples" / "vllm-deployment.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admission_review(pod: dict) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()),
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "namespace": pod["metadata"].get("namespace", "default"),
                        "operation": "CREATE", "object": pod, "dryRun": False}}


def _post(url: str, body: dict, ca: Path) -> dict:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
        return json.loads(r.read())


def run(args) -> int:
    from kvmesh.cli import cmd_certs
    import argparse

    sample = Path(args.sample) if args.sample else SAMPLE
    doc = yaml.safe_load(sample.read_text())
    policy = PolicyDefaults()
    with tempfile.TemporaryDirectory(prefix="kvmesh-demo-") as tmp:
        cmd_certs(argparse.Namespace(out=tmp, host=["127.0.0.1", "localhost"], days=1))
        port = _free_port()

        async def main() -> dict:
            started = asyncio.Event()
            task = asyncio.create_task(server.serve(
                "127.0.0.1", port, f"{tmp}/tls.crt", f"{tmp}/tls.key", lambda: policy,
                started=started))
            await started.wait()
            pod = workloads.pod_for(doc)
            resp = await asyncio.to_thread(_post, f"https://127.0.0.1:{port}/mutate",
                                           admission_review(pod), Path(tmp) / "ca.crt")
            task.cancel()
            return {"pod": pod, "resp": resp["response"]}

        got = asyncio.run(main())
    resp, pod = got["resp"], got["pod"]
    patch = json.loads(base64.b64decode(resp["patch"])) if resp.get("patch") else []
    injected = jsonpatch.apply_patch(pod, patch)
    offline = workloads.process(doc, policy).doc["spec"]["template"]["spec"]
    same = offline == injected["spec"]
    c = injected["spec"]["containers"][0]
    print(f"\nkvmesh demo: webhook on https://127.0.0.1:{port}/mutate "
          f"(allowed={resp['allowed']}, {len(patch)} patch operations)")
    print(f"pod {pod['metadata']['generateName']}* received, in container {c['name']!r}:")
    for e in c["env"]:
        val = e.get("value") if "value" in e else f"<fieldRef {e['valueFrom']['fieldRef']['fieldPath']}>"
        print(f"  env   {e['name']}={val}")
    for p in c.get("ports", []):
        print(f"  port  {p.get('name')}={p['containerPort']}")
    print(f"  args  {' '.join(c.get('args', []))}")
    print(f"  status {injected['metadata']['annotations']['kvmesh.dev/status']}")
    for w in resp.get("warnings", []):
        print(f"  warning {w}")
    print(f"offline `kvmesh inject` renders the same pod spec: {same}")
    return 0 if same and resp["allowed"] else 1
