"""mp mode in the controller: the group's `lmcache coordinator` (docs/mp-mode.md §2, §5).

Each member's `lmcache server` sidecar registers as `kvm-<pod uid>-<incarnation>`
(names.mp_instance_id), the incarnation being the sidecar's own start count, normally its
`restartCount + 1`. So every registration names one pod incarnation, and the controller can
tell the dead ones from the live one without asking the pod:

- the pod is gone, its IP changed, the pod Failed/Succeeded or the sidecar terminated: every
  registration of that pod is dead;
- the sidecar's restartCount rose to r: every registration of that pod below r + 1 is dead.

Those are DELETEd at once (`DELETE /instances/{id}`, idempotent) and confirmed gone through a
fresh `GET /instances` (kvmesh.backends.coordinator.deregister_and_confirm). Survivors then
drop the dead peer after about 4 of their 1 s polls instead of the coordinator's eviction plus
4 default 5 s polls, and a server restarted in place never sees its predecessor's entry, which
would wedge its transfer server (docs/mp-mode.md §5).

Not at deletionTimestamp or readiness loss: the sidecar outlives vLLM and deregisters itself on
SIGTERM, and a live server that is deleted re-registers at its next heartbeat anyway, so a
DELETE then would only cost it a poll. A purge that cannot reach the coordinator fails and is
retried by the mesh's resync loop (mesh.pending), with the same metrics as the other modes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable, Optional

from kvmesh.backends import coordinator as coord
from kvmesh.core import groups, names
from kvmesh.core.groups import PeerGroupId

log = logging.getLogger("kvmesh.mp")

# Departure reasons that mean the registered server incarnation is dead.
DEAD_REASONS = frozenset({"deleted", "ip-changed", "restarted", "server-stopped",
                          "departed-while-unwatched"})
CONFIRM_SECONDS = 10.0  # per id: DELETE, then GET /instances until it is absent
CALL_SECONDS = 5.0  # one coordinator call
# Registrations listed in a KVMeshPeerGroup's status (the count is always exact).
STATUS_MAX_INSTANCES = 256


def deletes_on(reason: str) -> bool:
    return reason in DEAD_REASONS


def parse_instance_id(instance_id: str) -> Optional[tuple[str, int]]:
    """`kvm-<uid>-<n>` -> (uid, n); None for ids kvmesh did not give (not its to delete)."""
    if not instance_id.startswith("kvm-"):
        return None
    uid, _, n = instance_id[4:].rpartition("-")
    if not uid or not n.isdigit() or len(n) > 9 or int(n) < 1:
        return None
    return uid, int(n)


def dead_ids(listed: Iterable[str], uid: str, live_incarnation: Optional[int],
             departed: Optional[str]) -> list[str]:
    """The ids to DELETE for pod `uid`: its listed registrations below `live_incarnation`
    (all of them when None: the pod has no live server), plus the departed incarnation's own
    id even if not listed (a registration may land between the listing and the DELETE)."""
    out = set()
    for iid in listed:
        p = parse_instance_id(iid)
        if p and p[0] == uid and (live_incarnation is None or p[1] < live_incarnation):
            out.add(iid)
    if departed:
        p = parse_instance_id(departed)
        if p and (live_incarnation is None or p[1] < live_incarnation):
            out.add(departed)
    return sorted(out, key=lambda i: parse_instance_id(i)[1])  # type: ignore[index]


async def coordinator_url(mesh, namespace: str, group: str) -> str:
    """The group's coordinator, reached at its pod as the Service would (mesh.endpoints)."""
    eps = await mesh.endpoints(namespace, PeerGroupId(names.MODE_MP, group), "http")
    if not eps:
        raise LookupError(f"no ready pod of the lmcache coordinator {namespace}/"
                          f"{names.lookup_service_name(names.MODE_MP, group)}")
    return f"http://{eps[0][0]}:{eps[0][1]}"


def _live_incarnation(mesh, m: groups.Member, uid: str) -> Optional[int]:
    """The incarnation the pod's server runs now (restartCount + 1), None if none runs."""
    cur = mesh.members.get(m.key) if m.name else None
    if cur is None or cur.uid != uid or cur.server_stopped:
        return None
    return cur.restarts + 1


def _count(mesh, result: str, n: int = 1) -> None:
    c = getattr(mesh.metrics, "coordinator_deletes", None) if mesh.metrics else None
    if c is not None and n:
        c.labels(result).inc(n)


async def purge(mesh, d: groups.Departure) -> int:
    """DELETE the dead registrations of `d`'s pod and confirm each; the number that were
    registered. Raises when the coordinator cannot be reached (the mesh retries)."""
    m = d.member
    parsed = parse_instance_id(m.instance_id or "")
    uid = m.uid or (parsed[0] if parsed else "")
    if not uid:
        return 0
    live = _live_incarnation(mesh, m, uid)
    url = await coordinator_url(mesh, m.namespace, m.group)
    async with coord.Coordinator(url, timeout=CALL_SECONDS) as c:
        listed = {i.instance_id for i in await c.instances()}
        ids = dead_ids(listed, uid, live, m.instance_id)
        results = await asyncio.gather(
            *(c.deregister_and_confirm(i, timeout=CONFIRM_SECONDS) for i in ids),
            return_exceptions=True)
    removed = 0
    for iid, r in zip(ids, results):
        if isinstance(r, coord.DeregistrationNotConfirmed):
            # Re-registered: that server runs (the sidecar's start counter and the kubelet's
            # restartCount disagree). Deleting it again would only cost it a poll each time.
            _count(mesh, "alive")
            log.warning("pod %s/%s: registration %s at %s came back after DELETE, so its "
                        "server still runs; leaving it (%s)", m.namespace, m.name, iid, url, r)
        elif isinstance(r, BaseException):
            _count(mesh, "failed")
            raise r
        else:
            _count(mesh, "confirmed")
            removed += iid in listed
    return removed


async def instances_status(mesh, namespace: str, gid: PeerGroupId,
                           g: Optional[groups.Group]) -> dict:
    """The status fields of an mp group: `coordinator` (where it answered), `registered` (how
    many registrations) and `instances` (each with the pod it belongs to, if a member's)."""
    url = await coordinator_url(mesh, namespace, gid.group)
    async with coord.Coordinator(url, timeout=CALL_SECONDS) as c:
        listed = await c.instances()
    health = getattr(mesh, "health", None)
    if health is not None:  # every id (the status lists at most STATUS_MAX_INSTANCES)
        health.mp_listed[(namespace, gid)] = frozenset(i.instance_id for i in listed)
    by_uid = {m.uid: m.name for m in (g.members.values() if g else [])}
    rows = []
    for i in sorted(listed, key=lambda i: i.instance_id)[:STATUS_MAX_INSTANCES]:
        p = parse_instance_id(i.instance_id)
        row = {"id": i.instance_id, "ip": i.ip, "p2p": i.p2p}
        if p and p[0] in by_uid:
            row.update(pod=by_uid[p[0]], incarnation=p[1])
        rows.append(row)
    return {"coordinator": url.removeprefix("http://"), "registered": len(listed),
            "instances": rows}
