"""Group health on the controller's side: what core.health judges, fed with what only the
controller can see (is the lookup tier answering, did each member register with it), turned
into the KVMeshPeerGroup's conditions, Events on transitions, and `kvmesh_group_*` metrics.

A group's lookup tier is judged only once the group is REGISTER_GRACE_RESYNCS resync periods
old (its lookup pod is still starting before that). Probes of the lookup tier run at most
once per resync period per group (the event path reuses the last answer), so a busy group
costs no extra requests per pod event:

- redis mode: the controller's own subscription to the group's Redis (its address index),
  and `peersWithChunks` from that index: the peers whose address some lookup key names;
- controller mode: the lmcache_controller's fresh per-instance listing
  (backends.lmcache_controller.workers) for every peer that has been Ready for
  REGISTER_GRACE_RESYNCS resync periods and was not listed before (once listed, never asked
  again): an engine registers at start, before it is Ready, so one still missing then never
  will (a version the controller cannot decode, a NetworkPolicy or address it cannot reach);
  and then its all-instances listing (one request, the controller's 30 s cache): whether it
  answers at all, and `peersWithChunks`, how many ready peers it holds chunks for (read-only,
  shown by `kvmesh check --probe`);
- mp mode: the coordinator's `GET /instances`, read once per reconcile by
  controller.mp.instances_status (no extra request: it hands the ids over in `mp_listed`):
  answering or not, and every peer Ready for REGISTER_GRACE_RESYNCS resync periods whose
  current incarnation (names.mp_instance_id) is absent. Asked afresh each time, not
  confirmed once: the coordinator evicts a server that stops heartbeating, and the server
  registers again at its next heartbeat (docs/mp-mode.md §5), so one absent for a whole grace
  period is not coming back by itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import weakref
from typing import Optional

from kvmesh.core import health, names
from kvmesh.core.groups import Group, Member, PeerGroupId

log = logging.getLogger("kvmesh.health")

GroupKey = tuple[str, PeerGroupId]
REGISTER_GRACE_RESYNCS = 4  # 60 s with the default 15 s resync
PROBE_TIMEOUT_S = 3.0

_METRICS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class GroupMetrics:
    """`kvmesh_group_*`: one series per group (and reason), removed with the group."""

    def __init__(self, registry) -> None:
        from prometheus_client import Gauge
        labels = ["namespace", "group"]
        self.sharing = Gauge("kvmesh_group_sharing", "1 while the peer group shares (2+ ready "
                             "peers, no problem found)", labels, registry=registry)
        self.degraded = Gauge("kvmesh_group_degraded", "1 while the peer group has a problem "
                              "that silently breaks sharing, by reason", labels + ["reason"],
                              registry=registry)
        self.problem_pods = Gauge("kvmesh_group_problem_members", "Members named by a "
                                  "problem (version, hash seed, chunk size, address, "
                                  "registration), by reason", labels + ["reason"],
                                  registry=registry)
        self.ready_peers = Gauge("kvmesh_group_ready_peers", "Ready peers of the group",
                                 labels, registry=registry)
        self.with_chunks = Gauge("kvmesh_group_peers_with_chunks", "Ready peers the group's "
                                 "lookup tier holds chunks for (controller and redis modes; "
                                 "absent when not known)", labels, registry=registry)

    def clear(self) -> None:
        for g in (self.sharing, self.degraded, self.problem_pods, self.ready_peers,
                  self.with_chunks):
            g.clear()


def metrics_for(registry) -> Optional[GroupMetrics]:
    """One set per registry (a Mesh is built anew at each leadership; the registry lives on)."""
    if registry is None:
        return None
    m = _METRICS.get(registry)
    if m is None:
        m = _METRICS[registry] = GroupMetrics(registry)
    return m


class GroupHealth:
    def __init__(self, mesh, metrics=None) -> None:
        self.mesh = mesh
        self.metrics = metrics_for(getattr(metrics, "registry", None))
        if self.metrics:
            self.metrics.clear()  # a new leadership: the last leader's view is gone
        # per group: member uid -> monotonic time it was first seen a peer (this incarnation)
        self.peer_since: dict[GroupKey, dict[str, float]] = {}
        self.probed: dict[GroupKey, tuple[float, Optional[bool], tuple[str, ...]]] = {}
        self.first_seen: dict[GroupKey, float] = {}
        # per group: member uids the lmcache_controller listed once (never asked again, so a
        # steady group costs one request per resync, not one per peer)
        self.registered: dict[GroupKey, set[str]] = {}  # monotonic, per group with members
        self.reported: dict[GroupKey, tuple] = {}  # the problems last told in an Event
        self.series: dict[GroupKey, set[str]] = {}  # reasons with a series, per group
        # mp mode: the ids this reconcile's GET /instances listed (set by mp.instances_status,
        # taken by _probe; absent: the coordinator did not answer), and per instance id the
        # monotonic time it was first seen a peer (a new incarnation gets its own grace)
        self.mp_listed: dict[GroupKey, frozenset[str]] = {}
        # ready peers the lookup tier holds chunks for (controller mode: the lmcache_controller's
        # key_count, None before LMCache 0.4; redis mode: kvmesh's address index), shown as
        # status.peersWithChunks by `kvmesh check --probe`
        self.chunks: dict[GroupKey, Optional[int]] = {}
        self.chunks_at: dict[GroupKey, float] = {}  # redis mode: when last counted
        self.mp_since: dict[GroupKey, dict[str, float]] = {}

    # --- probes ----------------------------------------------------------------------------

    def _grace(self) -> float:
        return REGISTER_GRACE_RESYNCS * self.mesh.resync_seconds

    async def _probe_controller(self, gkey: GroupKey, g: Group
                                ) -> tuple[Optional[bool], tuple[str, ...]]:
        """(lookup tier answering, peers past the grace that it does not list)."""
        from kvmesh.backends import lmcache_controller as lmcache_ctrl
        ns, gid = gkey
        eps = await self.mesh.endpoints(ns, gid, "http",
                                        defaults=self.mesh.group_defaults(g))
        if eps is None:
            return False, ()
        url = f"http://{eps[0][0]}:{eps[0][1]}"
        now, missing, asked = time.monotonic(), [], False
        since = self.peer_since.get(gkey, {})
        confirmed = self.registered.setdefault(gkey, set())
        confirmed &= set(since)  # incarnations that are still peers
        self.chunks.pop(gkey, None)  # known again only from an answer
        try:
            for m in sorted(g.peers, key=lambda m: m.name):
                if not m.instance_id or m.uid in confirmed or \
                        now - since.get(m.uid, now) < self._grace():
                    continue
                asked = True
                if await lmcache_ctrl.workers(url, m.instance_id, timeout=PROBE_TIMEOUT_S):
                    confirmed.add(m.uid)  # registered once: not asked again
                else:
                    missing.append(m.name)
            # Is it answering at all, and which peers have chunks in it (the all-instances
            # listing: one request, served from the controller's 30 s cache)?
            listing = await lmcache_ctrl.workers(url, None, timeout=PROBE_TIMEOUT_S)
            self.chunks[gkey] = peers_with_chunks(g, listing)
        except lmcache_ctrl.ControllerUnreachable:
            return False, ()
        except lmcache_ctrl.LMCacheControllerError as e:
            log.warning("group %s/%s: cannot read lmcache_controller's worker listing: %s",
                        ns, gid, e)
            return None, ()
        return True, tuple(missing)

    def _probe_mp(self, gkey: GroupKey, g: Group, listed: Optional[frozenset[str]]
                  ) -> tuple[Optional[bool], tuple[str, ...]]:
        """(coordinator answered, peers past the grace whose registration it does not list)."""
        if listed is None:
            return False, ()
        now, since = time.monotonic(), self.mp_since.get(gkey, {})
        return True, tuple(m.name for m in sorted(g.peers, key=lambda m: m.name)
                           if m.instance_id and m.instance_id not in listed
                           and now - since.get(m.instance_id, now) >= self._grace())

    async def _redis_chunks(self, gkey: GroupKey, g: Group, idx) -> None:
        """redis mode's `peersWithChunks`: peers with keys in kvmesh's own address index (one
        EXISTS over their index sets, once per resync), known only while the index is
        complete (it catches up after a gap in notifications)."""
        if idx is None or not idx.index_complete:
            self.chunks.pop(gkey, None)
            return
        if time.monotonic() - self.chunks_at.get(gkey, -1e9) < self.mesh.resync_seconds:
            return
        self.chunks_at[gkey] = time.monotonic()
        from kvmesh.backends.redis_scripts import index_key
        addrs = sorted({m.address for m in g.peers if m.address})
        try:
            self.chunks[gkey] = int(await asyncio.wait_for(
                idx.redis.exists(*(index_key(a) for a in addrs)), PROBE_TIMEOUT_S)) \
                if addrs else 0
        except Exception as e:  # a probe never fails the group's reconcile
            log.debug("group %s/%s: cannot count the peers in the address index: %s",
                      gkey[0], gkey[1], e)
            self.chunks.pop(gkey, None)

    async def _probe(self, gkey: GroupKey, g: Group, status: dict
                     ) -> tuple[Optional[bool], tuple[str, ...]]:
        ns, gid = gkey
        listed = self.mp_listed.pop(gkey, None)  # this reconcile's, never a stale one
        if time.monotonic() - self.first_seen.setdefault(gkey, time.monotonic()) < self._grace():
            return None, ()  # a new group's lookup service is still starting: not judged
        if gid.mode == names.MODE_REDIS:
            idx = self.mesh.redis.get(status.get("lookupAddress"))
            await self._redis_chunks(gkey, g, idx)
            return idx is not None and idx.subscribed, ()
        if gid.mode == names.MODE_MP:  # fresh each reconcile, and no request of its own
            return self._probe_mp(gkey, g, listed)
        last = self.probed.get(gkey)
        if last and time.monotonic() - last[0] < self.mesh.resync_seconds:
            return last[1], last[2]
        got: tuple[Optional[bool], tuple[str, ...]] = (None, ())
        if gid.mode == names.MODE_CONTROLLER:
            try:
                got = await self._probe_controller(gkey, g)
            except Exception as e:  # a probe never fails the group's reconcile
                log.warning("group %s/%s: lookup probe failed: %s", ns, gid, e)
        self.probed[gkey] = (time.monotonic(), *got)
        return got

    # --- the hook ---------------------------------------------------------------------------

    async def status(self, gkey: GroupKey, g: Optional[Group], status: dict,
                     cr: Optional[dict]) -> dict:
        """The `conditions` to merge into the group's status (and Events, metrics)."""
        members: list[Member] = list(g.members.values()) if g else []
        now, old = time.monotonic(), self.peer_since.get(gkey, {})
        self.peer_since[gkey] = {m.uid: old.get(m.uid, now) for m in members if m.is_peer}
        if gkey[1].mode == names.MODE_MP:
            old = self.mp_since.get(gkey, {})
            self.mp_since[gkey] = {m.instance_id: old.get(m.instance_id, now)
                                   for m in members if m.is_peer and m.instance_id}
        problems: list[health.Problem] = []
        if members:
            lookup_ready, unregistered = await self._probe(gkey, g, status)
            problems = health.assess(members, gkey[1].mode, lookup_ready)
            if unregistered and lookup_ready:
                problems.append(health.Problem(
                    health.NOT_REGISTERED, f"{', '.join(unregistered)} not registered with the "
                    f"group's {_TIER.get(gkey[1].mode, 'lookup tier')}", unregistered))
        previous = ((self.mesh.status_written.get(gkey) or {}).get("conditions")
                    or ((cr or {}).get("status") or {}).get("conditions") or [])
        conds = health.conditions(problems, status.get("readyPeers", 0),
                                  _now_iso(), previous)
        self._metrics(gkey, conds, problems, status.get("readyPeers", 0))
        self._events(gkey, members, problems, cr)
        out: dict = {"conditions": conds}
        if members and self.chunks.get(gkey) is not None:
            out["peersWithChunks"] = self.chunks[gkey]
        return out

    def _metrics(self, gkey: GroupKey, conds: list[dict], problems: list[health.Problem],
                 ready: int) -> None:
        if not self.metrics:
            return
        ns, gid = gkey
        lbl = (ns, gid.label)
        sharing = next(c for c in conds if c["type"] == health.SHARING)["status"] == "True"
        self.metrics.sharing.labels(*lbl).set(1 if sharing else 0)
        self.metrics.ready_peers.labels(*lbl).set(ready)
        chunks = self.chunks.get(gkey)
        if chunks is not None:
            self.metrics.with_chunks.labels(*lbl).set(chunks)
        else:
            _remove(self.metrics.with_chunks, lbl)
        now = {p.reason: p for p in problems}
        for reason in self.series.get(gkey, set()) - set(now):
            self.metrics.degraded.remove(*lbl, reason)
            self.metrics.problem_pods.remove(*lbl, reason)
        for reason, p in now.items():
            self.metrics.degraded.labels(*lbl, reason).set(1)
            self.metrics.problem_pods.labels(*lbl, reason).set(len(p.pods))
        self.series[gkey] = set(now)

    def _events(self, gkey: GroupKey, members: list[Member], problems: list[health.Problem],
                cr: Optional[dict]) -> None:
        told = tuple((p.reason, p.pods) for p in problems)
        if self.reported.get(gkey, ()) == told:
            return
        before = self.reported.get(gkey)
        self.reported[gkey] = told
        meta = (cr or {}).get("metadata") or {}
        if not meta.get("uid"):
            return
        target = {"apiVersion": f"{names.API_GROUP}/{names.API_VERSION}",
                  "kind": names.PEER_GROUP_KIND, "name": meta["name"],
                  "namespace": meta["namespace"], "uid": meta["uid"]}
        if problems:
            for p in problems:
                self.mesh.background(self.mesh.api.event(
                    target, p.reason, f"{p.message}. Fix: {health.fix_for(p.reason)}",
                    "Warning"))
            # The workloads of the members that cannot share hear it too.
            by_name = {m.name: m for m in members}
            for p in problems:
                for name in p.pods[:10]:
                    if name in by_name:
                        self.mesh.background(self.mesh.event(
                            by_name[name], "PeerIncompatible",
                            f"pod {name} cannot share KV cache with peer group {gkey[1]}: "
                            f"{p.message}. Fix: {health.fix_for(p.reason)}", "Warning"))
        elif before:
            self.mesh.background(self.mesh.api.event(
                target, "SharingRestored", "no incompatible member left", "Normal"))

    def forget(self, gkey: GroupKey) -> None:
        """The group is gone: drop its state and its series."""
        self.probed.pop(gkey, None)
        self.peer_since.pop(gkey, None)
        self.first_seen.pop(gkey, None)
        self.registered.pop(gkey, None)
        self.mp_listed.pop(gkey, None)
        self.mp_since.pop(gkey, None)
        self.chunks.pop(gkey, None)
        self.chunks_at.pop(gkey, None)
        self.reported.pop(gkey, None)
        reasons = self.series.pop(gkey, set())
        if self.metrics:
            lbl = (gkey[0], gkey[1].label)
            for reason in reasons:
                self.metrics.degraded.remove(*lbl, reason)
                self.metrics.problem_pods.remove(*lbl, reason)
            for g in (self.metrics.sharing, self.metrics.ready_peers,
                      self.metrics.with_chunks):
                _remove(g, lbl)


def _remove(gauge, labels: tuple) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


def peers_with_chunks(g: Group, listing: list[dict]) -> Optional[int]:
    """How many of `g`'s ready peers the lmcache_controller's worker listing shows holding
    keys (its registry's admitted chunks: what another peer's BatchedP2PLookupMsg resolves);
    None when the listing carries no key_count (LMCache before 0.4's /query_worker_info)."""
    if any(isinstance(w, dict) and "key_count" not in w for w in listing):
        return None
    holding = {w.get("instance_id") for w in listing if isinstance(w, dict)
               and isinstance(w.get("key_count"), int) and w["key_count"] > 0}
    return sum(1 for m in g.peers if m.instance_id and m.instance_id in holding)


_TIER = {names.MODE_CONTROLLER: "lmcache_controller",
         names.MODE_MP: "lmcache coordinator (GET /instances)"}


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
