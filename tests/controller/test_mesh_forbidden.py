"""A namespace whose admin has not granted kvmesh-controller-tenant: the API server answers 403
to the first write of a peer group. The controller says so once (log + Warning Event naming
the namespace and the exact kubectl command), does not retry in a hot loop, keeps serving the
other namespaces, and picks the group up once the grant exists."""

import logging

from fake_api import FakeMeshClient
from kvmesh.controller.mesh import Mesh
from kvmesh.core import groups, names
from kvmesh.core.policy import PolicyDefaults
from kvmesh.kube.api import ApiError
from support import injected_pod


class Forbidding(FakeMeshClient):
    def __init__(self, forbidden: set[str]):
        super().__init__()
        self.forbidden = forbidden

    async def apply(self, obj, subresource=None):
        ns = obj["metadata"].get("namespace")
        if ns in self.forbidden:
            raise ApiError(status=403, reason="Forbidden")
        return await super().apply(obj, subresource)


async def test_forbidden_namespace_reported_once_with_the_grant_command(caplog):
    api = Forbidding({"team-b"})
    m = Mesh(api, PolicyDefaults())
    for ns in ("team-a", "team-b"):
        pod = injected_pod(name=f"p-{ns}", uid=f"u-{ns}")
        pod["metadata"]["namespace"] = ns
        await m._on_pod("ADDED", pod, None)
    with caplog.at_level(logging.WARNING, logger="kvmesh"):
        await m.resync_once(full=True)
        await m.resync_once(full=True)
    said = [r.getMessage() for r in caplog.records if "403 Forbidden" in r.getMessage()]
    assert len(said) == 1, said  # once per namespace per FORBIDDEN_REPORT_SECONDS
    assert "namespace team-b" in said[0] and names.grant_command("team-b") in said[0]
    assert names.grant_command("team-b") == (
        "kubectl create rolebinding kvmesh-controller-tenant -n team-b --clusterrole="
        "kvmesh-controller-tenant --serviceaccount=kvmesh-system:kvmesh-controller")
    warnings = [e for e in api.events if e[1] == "LookupForbidden"]
    assert len(warnings) == 1 and warnings[0][3] == "Warning"
    assert not m.failures  # no hot retry with backoff: the next full pass tries again
    # team-a was served regardless.
    assert any(o["metadata"].get("namespace") == "team-a" for o in api.applied)
    # The admin grants it: the next full pass creates the group's objects.
    api.forbidden.clear()
    await m.resync_once(full=True)
    assert any(o["metadata"].get("namespace") == "team-b" for o in api.applied)
