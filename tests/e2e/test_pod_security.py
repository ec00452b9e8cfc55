"""Everything kvmesh creates for a peer group is admitted by a namespace that enforces the
PodSecurity `restricted` level (the real API server's PodSecurity admission; server-side dry
run, so nothing is scheduled)."""

from __future__ import annotations

import json

import pytest

from kvmesh.core import lookup, names
from kvmesh.core.groups import PeerGroupId
from kvmesh.core.policy import PolicyDefaults

LEVEL = "pod-security.kubernetes.io/enforce"


def _dry_run_create(cluster, obj: dict):
    return cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                           input=json.dumps(obj), check=False)


@pytest.mark.parametrize("mode", names.MODES)
def test_restricted_namespace_admits_lookup_objects(devcluster, namespace, mode):
    devcluster.kubectl("label", "namespace", namespace, f"{LEVEL}=restricted",
                       "pod-security.kubernetes.io/warn=restricted")
    cr = {**lookup.peer_group(namespace, PeerGroupId(mode, "default"))}
    cr["metadata"] = {**cr["metadata"], "uid": "00000000-0000-0000-0000-000000000001"}
    workloads = 0
    for obj in lookup.desired(cr, PolicyDefaults()):
        obj = {**obj, "metadata": {k: v for k, v in obj["metadata"].items()
                                   if k != "ownerReferences"}}  # no live owner in a dry run
        got = _dry_run_create(devcluster, obj)
        assert got.returncode == 0, got.stderr
        assert "would violate PodSecurity" not in got.stderr, got.stderr  # the warn level
        if obj["kind"] in ("Deployment", "StatefulSet"):
            # Enforcement applies to Pods: the pod its controller would create.
            tmpl = obj["spec"]["template"]
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"{obj['metadata']['name']}-0", "namespace": namespace,
                                "labels": tmpl["metadata"]["labels"]},
                   "spec": tmpl["spec"]}
            got = _dry_run_create(devcluster, pod)
            assert got.returncode == 0, got.stderr
            workloads += 1
    assert workloads == 1
    # The control: the same namespace refuses a pod without a restricted securityContext.
    bare = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare", "namespace": namespace},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    got = _dry_run_create(devcluster, bare)
    assert got.returncode != 0 and "violates PodSecurity" in got.stderr, got.stderr
