"""Mesh._on_swept: keys a Redis reconcile removed are credited to the departure they belong
to, whichever of the reconcile and the departure's purge ran first."""

from fake_api import FakeMeshClient
from kvmesh.controller import mesh as M
from kvmesh.core.groups import PeerGroupId
from kvmesh.core.policy import PolicyDefaults

GKEY = ("team-a", PeerGroupId("redis", "default"))
DEAD, OTHER = "10.0.0.1:8200", "10.0.0.2:8200"


async def test_swept_after_the_purge_is_added_to_its_record():
    m = M.Mesh(FakeMeshClient(), PolicyDefaults())
    m.last_purge[GKEY] = M.PurgeRecord("team-a/a", "deleted", DEAD, 100, 0.1)
    m._on_swept({DEAD: 50, OTHER: 7})
    assert m.last_purge[GKEY].removed == 150 and GKEY in m.queue
    assert m.swept == {OTHER: 7}  # nobody purged OTHER yet: held for its departure


async def test_controller_mode_records_are_not_credited():
    m = M.Mesh(FakeMeshClient(), PolicyDefaults())
    m.last_purge[GKEY] = M.PurgeRecord("team-a/a", "deleted", DEAD, 1, 0.1, mode="controller")
    m._on_swept({DEAD: 5})
    assert m.last_purge[GKEY].removed == 1 and m.swept == {DEAD: 5}


async def test_held_sweeps_are_bounded_oldest_first(monkeypatch):
    monkeypatch.setattr(M, "SWEPT_MAX", 3)
    m = M.Mesh(FakeMeshClient(), PolicyDefaults())
    for i in range(5):
        m._on_swept({f"10.0.0.{i}:8200": i + 1})
    assert m.swept == {"10.0.0.2:8200": 3, "10.0.0.3:8200": 4, "10.0.0.4:8200": 5}
