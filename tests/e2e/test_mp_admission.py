"""mp mode against the real API server: the webhook's native-sidecar check reads its /version,
and the pods kvmesh injects in mp mode pass its validation with the server sidecar kept as a
native sidecar (server-side dry run; nothing is scheduled)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kvmesh.core import names, workloads
from kvmesh.kube import connect
from kvmesh.webhook import main as webhook_main

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "expected"


async def test_webhook_reads_native_sidecar_support_from_the_api_server(devcluster):
    api = await connect.api_client(devcluster.kubeconfig)
    try:
        v = await api.server_version()
        assert await webhook_main.native_sidecars(api) is (
            (int(v["major"]), int(v["minor"].rstrip("+"))) >= (1, 29))
    finally:
        await api.close()


def _mp_pods(namespace: str) -> list[dict]:
    out = []
    for f in sorted(GOLDEN.glob("*-mp-*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            pod = workloads.pod_for(doc)
            pod["metadata"] = {"name": f"mp-{len(out)}", "namespace": namespace,
                               "labels": pod["metadata"].get("labels", {}),
                               "annotations": pod["metadata"].get("annotations", {})}
            pod["spec"].pop("resourceClaims", None)  # no DRA claim template here
            for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
                (c.get("resources") or {}).pop("claims", None)
            out.append(pod)
    return out


def test_injected_mp_pods_pass_api_validation_with_a_native_sidecar(devcluster, namespace):
    pods = _mp_pods(namespace)
    assert len(pods) >= 3
    for pod in pods:
        got = devcluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                                 input=json.dumps(pod), check=False)
        assert got.returncode == 0, got.stderr
        created = json.loads(got.stdout)
        [server] = [c for c in created["spec"]["initContainers"] if c["name"] == names.MP_SIDECAR]
        assert server["restartPolicy"] == "Always"  # kept: native sidecars are on
        assert server["startupProbe"]["exec"]["command"][0] == "python3"
    # The control: without restartPolicy: Always the same sidecar is an ordinary init
    # container, which may not have a startupProbe: the API server really validates it.
    pod = pods[0]
    for c in pod["spec"]["initContainers"]:
        c.pop("restartPolicy", None)
    # Opted out, so the webhook leaves it as it is (opted in, it would put the sidecar back).
    pod["metadata"].setdefault("labels", {})[names.LABEL_INJECT] = names.INJECT_DISABLED
    got = devcluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                             input=json.dumps(pod), check=False)
    assert got.returncode != 0 and "startupProbe" in got.stderr, got.stderr
