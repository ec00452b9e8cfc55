"""Mesh.resync_once: a pod event's pass reconciles only the groups that changed; the periodic
pass covers every group (drift repair)."""

from fake_api import FakeMeshClient
from kvmesh.core import groups
from kvmesh.controller.mesh import Mesh
from kvmesh.core.policy import PolicyDefaults
from support import injected_pod


async def test_event_pass_touches_only_dirty_groups(monkeypatch):
    m = Mesh(FakeMeshClient(), PolicyDefaults())
    for ns in ("a", "b"):
        pod = injected_pod(name=f"p-{ns}", uid=f"u-{ns}")
        pod["metadata"]["namespace"] = ns
        mem = groups.member_from_pod(pod)
        m.members[mem.key] = mem
    seen = []

    async def reconcile_group(gkey, g):
        seen.append(gkey[0])
    monkeypatch.setattr(m, "reconcile_group", reconcile_group)
    m.dirty.add(m.members[("a", "p-a")].group_key)
    await m.resync_once(full=False)
    assert seen == ["a"] and not m.dirty
    seen.clear()
    await m.resync_once(full=False)  # nothing changed since
    assert seen == []
    await m.resync_once(full=True)
    assert sorted(seen) == ["a", "b"]
