"""Least privilege on the real API server (RBAC from manifests/, applied by the stack): what the
controller's ServiceAccount may do, asked with `kubectl auth can-i --as`. It can write workloads,
Services and NetworkPolicies only in namespaces an admin bound kvmesh-controller-tenant in;
never in kube-system, never in a namespace that did not opt in."""

from __future__ import annotations

import pytest

from kvmesh.core import names

SA = f"system:serviceaccount:{names.SYSTEM_NAMESPACE}:{names.CONTROLLER_SERVICE_ACCOUNT}"
WRITES = [(verb, res) for res in ("deployments.apps", "statefulsets.apps", "services",
                                  "networkpolicies.networking.k8s.io",
                                  "kvmeshpeergroups.kvmesh.dev")
          for verb in ("create", "patch", "delete")]
# Never, anywhere: things no kvmesh duty needs.
NEVER = [("create", "pods"), ("delete", "pods"), ("get", "secrets"), ("create", "daemonsets.apps"),
         ("create", "rolebindings.rbac.authorization.k8s.io"), ("create", "serviceaccounts/token"),
         ("patch", "nodes"), ("create", "jobs.batch"), ("update", "configmaps")]


def can(cluster, verb: str, resource: str, namespace: str | None) -> bool:
    ns = ["-n", namespace] if namespace else ["--all-namespaces"]
    got = cluster.kubectl("auth", "can-i", verb, resource, *ns, "--as", SA, check=False)
    assert got.stdout.strip() in ("yes", "no"), (got.stdout, got.stderr)
    return got.stdout.strip() == "yes"


def test_controller_cannot_write_outside_granted_namespaces(stack, devcluster, namespace):
    for ns in ("kube-system", namespace, "default"):
        for verb, res in WRITES + NEVER:
            assert not can(devcluster, verb, res, ns), f"{verb} {res} in {ns}"
    for verb, res in WRITES:  # nor cluster-wide
        assert not can(devcluster, verb, res, None), f"{verb} {res} cluster-wide"
    # What it needs everywhere is read-only (and Events).
    for verb, res in (("list", "pods"), ("watch", "pods"), ("list", "deployments.apps"),
                      ("list", "networkpolicies.networking.k8s.io"), ("create", "events"),
                      ("watch", "events"), ("get", "replicasets.apps"), ("get", "jobs.batch")):
        assert can(devcluster, verb, res, None), f"{verb} {res}"


def test_grant_allows_exactly_that_namespace(stack, devcluster, namespace):
    devcluster.kubectl(*names.grant_command(namespace).split()[1:])
    try:
        for verb, res in WRITES:
            assert can(devcluster, verb, res, namespace), f"{verb} {res} in {namespace}"
        for verb, res in NEVER:
            assert not can(devcluster, verb, res, namespace), f"{verb} {res} in {namespace}"
        for ns in ("kube-system", "default"):
            for verb, res in WRITES:
                assert not can(devcluster, verb, res, ns), f"{verb} {res} in {ns}"
    finally:
        devcluster.kubectl("delete", "rolebinding", "-n", namespace, names.TENANT_CLUSTER_ROLE,
                           check=False)


@pytest.mark.parametrize("resource", ["secrets", "leases.coordination.k8s.io"])
def test_own_namespace_only_named_objects(stack, devcluster, resource):
    # In kvmesh-system: its CA Secret and its Lease by name, not every Secret/Lease.
    assert not can(devcluster, "list", resource, names.SYSTEM_NAMESPACE)
    assert not can(devcluster, "delete", resource, names.SYSTEM_NAMESPACE)


def test_webhook_reads_only_its_two_secrets(stack, devcluster):
    # The per-group hash-seed key and its CA, by name; never the Redis master key (the webhook
    # needs no Redis password), nor any other Secret.
    webhook = f"system:serviceaccount:{names.SYSTEM_NAMESPACE}:kvmesh-webhook"

    def may(verb: str, what: str, ns: str = names.SYSTEM_NAMESPACE) -> bool:
        got = devcluster.kubectl("auth", "can-i", verb, what, "-n", ns, "--as", webhook,
                                 check=False)
        assert got.stdout.strip() in ("yes", "no"), (got.stdout, got.stderr)
        return got.stdout.strip() == "yes"

    assert may("get", f"secret/{names.HASH_SEED_SECRET}")
    assert may("get", f"secret/{names.CA_SECRET}")
    for verb, what in (("get", f"secret/{names.REDIS_AUTH_SECRET}"), ("list", "secrets"),
                       ("update", f"secret/{names.HASH_SEED_SECRET}"), ("create", "secrets")):
        assert not may(verb, what), f"{verb} {what}"
    assert not may("get", "secrets", "kube-system")
