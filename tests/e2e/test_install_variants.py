"""Install variants on a fresh real API server: the kustomize base (`kubectl apply -k
manifests/`) and the overlays of docs/kustomize/, built by kubectl's own kustomize.

A fresh control plane of its own (not the session's): the session's stack has already pointed
the webhook configuration at a local process by `url:`, and a dry run of the shipped
configuration on top of that would be judged against the patched object, not the install."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvmesh.core import names
from kvmesh.local.devcluster import DevCluster, find_bin_dir

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = REPO / "docs" / "kustomize"


def identity(doc: dict) -> tuple:
    m = doc["metadata"]
    return doc["kind"], m.get("namespace", ""), m["name"]


def plain_files() -> list[dict]:
    """What `kubectl apply -f manifests/` applies: every top-level *.yaml document."""
    return [d for f in sorted(MANIFESTS.glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]


@pytest.fixture(scope="module")
def fresh():
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("control-plane binaries not built: run cluster/build.sh")
    with DevCluster(bin_dir, nodes=1) as c:
        yield c


def build(cluster: DevCluster, path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(path)).stdout) if d]


def server_dry_run(cluster: DevCluster, docs: list[dict]) -> list[str]:
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                          input=yaml.safe_dump_all(docs)).stdout.splitlines()
    assert out and all(line.endswith("(server dry run)") for line in out), out
    return out


def test_base_lists_every_manifest_and_nothing_else(fresh):
    """A file added to manifests/ but not to its Kustomization (or the reverse) fails here,
    so `apply -f` and `apply -k` can never install different things."""
    assert sorted(map(identity, build(fresh, MANIFESTS))) == sorted(map(identity, plain_files()))


def test_apply_k_server_dry_run_then_apply(fresh):
    # A dry run cannot place objects in a namespace that does not exist yet (a real
    # `apply -k` creates it first: kustomize orders the Namespace first).
    fresh.kubectl("apply", "-f", str(MANIFESTS / "00-namespace.yaml"))
    out = fresh.kubectl("apply", "--server-side", "--dry-run=server", "-k",
                        str(MANIFESTS)).stdout.splitlines()
    assert len(out) == len(plain_files())
    assert all(line.endswith("(server dry run)") for line in out), out
    assert "kvmesh" not in fresh.kubectl("get", "mutatingwebhookconfigurations",
                                         "-o", "name").stdout  # a dry run wrote nothing
    fresh.kubectl("apply", "--server-side", "-k", str(MANIFESTS))
    mwc = fresh.kubectl_json("get", "mutatingwebhookconfiguration", names.WEBHOOK_CONFIGURATION)
    assert all("caBundle" not in w["clientConfig"] for w in mwc["webhooks"])
    fresh.kubectl("get", "deployment", "-n", names.SYSTEM_NAMESPACE, "kvmesh-webhook",
                  "kvmesh-controller")


def test_image_overlay_changes_every_kvmesh_image(fresh):
    docs = build(fresh, OVERLAYS / "image")
    images = {c["image"] for d in docs if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/kvmesh:0.1.0"}
    server_dry_run(fresh, docs)


def test_cert_manager_overlay(fresh):
    docs = build(fresh, OVERLAYS / "cert-manager")
    by_kind = {d["kind"]: d for d in docs}
    webhook = next(d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "kvmesh-webhook")
    controller = next(d for d in docs if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "kvmesh-controller")
    spec = webhook["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    assert "--cert-source=files" in args and not any(a.startswith("--cert-dir") for a in args)
    assert spec["volumes"] == [{"name": "certs", "secret": {"secretName": "kvmesh-webhook-tls"}}]
    assert "--cert-source=files" in controller["spec"]["template"]["spec"]["containers"][0]["args"]
    cert = by_kind["Certificate"]
    assert cert["spec"]["secretName"] == "kvmesh-webhook-tls"
    assert "kvmesh-webhook.kvmesh-system.svc" in cert["spec"]["dnsNames"]
    ann = by_kind["MutatingWebhookConfiguration"]["metadata"]["annotations"]
    assert ann["cert-manager.io/inject-ca-from"] == \
        f"{cert['metadata']['namespace']}/{cert['metadata']['name']}"
    # cert-manager's own kinds need its CRDs, which this cluster lacks; the rest must pass.
    server_dry_run(fresh, [d for d in docs if not d["apiVersion"].startswith("cert-manager.io/")])
