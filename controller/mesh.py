"""The leader's mesh loop: peer membership from a pod watch, a purge the moment a member stops
being a peer, and one lookup service per peer group with its status.

Purges run on the watch path itself (no queue in between), so the time from a pod's deletion
to its lookup state being gone is one watch event plus the purge; the Event that reports it is
recorded in the background. Group work (KVMeshPeerGroup, lookup objects, NetworkPolicy, status)
goes through a coalescing work queue served by a few workers: a pod event queues its own group
urgently, and the periodic full pass queues every group at low priority, so a departure's status
waits only for the work in flight, never behind a pass over all groups. On the event path a
group's lookup objects and NetworkPolicy are applied only when what they derive from changed
(every REPAIR_EVERY-th pass re-applies them, repairing drift), and its status only when it
differs from what was last written.

A purge that fails (lookup service unreachable) is retried by the resync loop until it
succeeds; the Redis reverse index
additionally reconciles against the live membership on every (re)connection and periodically,
so a death nobody saw (controller down, watch gap) is still cleaned up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from kvmesh.core import groups, lookup, names
from kvmesh.core.groups import PeerGroupId
from kvmesh.core.policy import PolicyDefaults
from kvmesh.kube.api import ApiError
from kvmesh.controller import mp
from kvmesh.controller.health import GroupHealth
from kvmesh.controller.workqueue import WorkQueue
from kvmesh.kube import retry
from kvmesh.kube.facade import MeshClient

log = logging.getLogger("kvmesh.mesh")

RECONCILE_SECONDS = 300.0
SWEPT_MAX = 10_000
# Groups reconciled at once (each is a few sequential API calls): bounds the controller's
# request rate while one slow group does not hold up the others.
WORKERS = 8
URGENT_WORKERS = 2  # of those, reserved for groups a pod event changed
EVENT_CONCURRENCY = 4  # Events recorded at once, off the watch path
# The periodic pass checks every group's status and grace timer (no API call when nothing
# changed); every REPAIR_EVERY-th pass also re-applies each group's objects (drift repair, a
# few API calls per group: at 50 groups and a 15 s pass that alone was ~10 requests/s competing
# with the event path on a loaded API server).
REPAIR_EVERY = 10
PEER_GROUP_API = f"{names.API_GROUP}/{names.API_VERSION}"

GroupKey = tuple[str, PeerGroupId]  # (namespace, group)
PURGED_UNIT = {names.MODE_REDIS: "keys", names.MODE_MP: "registrations"}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


# A namespace where the controller may not write is reported at most this often.
FORBIDDEN_REPORT_SECONDS = 600.0

@dataclass
class PurgeRecord:
    pod: str
    reason: str
    what: str
    removed: int
    seconds: float
    mode: str = names.MODE_REDIS
    time: str = field(default_factory=_now)


class Mesh:
    def __init__(self, api: MeshClient, policy: PolicyDefaults, metrics=None,
                 grace_seconds: float = 300.0, resync_seconds: float = 15.0,
                 manage_lookup: bool = True, policies: Optional[dict] = None,
                 peer_policy: bool = True, workers: int = WORKERS):
        self.api, self.policy, self.metrics = api, policy, metrics
        # name -> core.policy.Policy, kept current by the policy loop
        self.policies: dict = policies if policies is not None else {}
        self.grace, self.resync_seconds = grace_seconds, resync_seconds
        self.manage_lookup = manage_lookup
        # Off where the network plugin lacks NetworkPolicy endPort (it would apply only `port`
        # and cut the pods' other ports): see reconcile_peer_policy.
        self.peer_policy = peer_policy
        self.pods = api.peer_pods(self._on_pod)
        self.members: dict[tuple[str, str], groups.Member] = {}
        # The members by group, kept in step with `members` (never rebuilt from all members).
        self.groups: dict[GroupKey, groups.Group] = {}
        self.owners: dict[tuple[str, str], list] = {}  # ownerReferences, kept past deletion
        # Incarnations already purged (uid, ip, restarts): "terminating" then "deleted" is one
        # departure, not two.
        self.purged: set[tuple[str, Optional[str], int]] = set()
        self.pending: dict[tuple[str, str], groups.Departure] = {}  # purges to retry
        self.redis: dict[str, object] = {}  # "host:port" -> purge.AddressIndex
        self.last_purge: dict[GroupKey, PurgeRecord] = {}
        # Keys of dead addresses a Redis reconcile removed before the departure's own purge
        # got there (it runs when an index (re)connects): credited to that purge's record.
        self.swept: dict[str, int] = {}
        self.empty_since: dict[GroupKey, float] = {}
        self.empty_at: dict[GroupKey, str] = {}  # the same moment, for the status
        # Per group: does a user's NetworkPolicy select its pods (last applied answer), and
        # which members none selects then (they lose every port but P2P from peers).
        self.user_isolated: dict[GroupKey, bool] = {}
        self.unselected: dict[GroupKey, list[str]] = {}
        self.forbidden_reported: dict[str, float] = {}  # namespace -> when last said
        self._redis_key: Optional[bytes] = None  # master key of the group Redis passwords
        self._seed_key: Optional[bytes] = None  # key of the per-group hash seeds
        self.queue = WorkQueue()
        self.workers = workers
        self.failures: dict[GroupKey, int] = {}  # consecutive failed reconciles, for backoff
        self.repair: set[GroupKey] = set()  # groups whose objects the next low-priority
        # reconcile re-applies (drift repair)
        # What was last applied for a group, so the event path writes only what changed: the
        # KVMeshPeerGroup (owner of the lookup objects), the inputs of its lookup objects and
        # NetworkPolicy, and its status.
        self.cr: dict[GroupKey, dict] = {}
        self.spec_applied: dict[GroupKey, tuple] = {}
        self.status_written: dict[GroupKey, dict] = {}
        self._event_slots = asyncio.Semaphore(EVENT_CONCURRENCY)
        self._background: set[asyncio.Task] = set()
        self.health = GroupHealth(self, metrics)  # conditions, Events, kvmesh_group_*

    # --- membership ---------------------------------------------------------------------------

    async def _on_pod(self, type_: str, obj: dict, old: Optional[dict]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        new_m = None if type_ == "DELETED" else groups.member_from_pod(obj)
        old_m = self.members.get(key)
        self.owners[key] = meta.get("ownerReferences") or []
        d = groups.departure(old_m, new_m)
        if old_m is not None:
            g = self.groups.get(old_m.group_key)
            if g is not None:
                g.members.pop(old_m.name, None)
                if not g.members:
                    del self.groups[old_m.group_key]
        if new_m is None:
            self.members.pop(key, None)
        else:
            self.members[key] = new_m
            self.groups.setdefault(new_m.group_key, groups.Group(
                new_m.namespace, new_m.peer_group)).members[new_m.name] = new_m
        for m in (old_m, new_m):
            if m is not None:
                self.queue.add(m.group_key)
        if d is not None:
            inc = (d.member.uid, d.member.ip, d.member.restarts)
            if inc not in self.purged and await self.purge(d):
                self.purged.add(inc)
        a = groups.arrival(old_m, new_m)
        if a is not None:
            await self.purge(a, quiet_if_empty=True)
        if new_m is None:
            self.owners.pop(key, None)
            if old_m is not None:
                self.purged = {i for i in self.purged if i[0] != old_m.uid}

    def live_addresses(self) -> set[str]:
        return groups.live_addresses(list(self.members.values()))

    async def _live_for_reconcile(self) -> set[str]:
        # Never reconcile (which purges everything not live) before the member view is
        # complete: an unsynced view would make live pods look dead.
        await self.pods.has_synced.wait()
        return self.live_addresses()

    def defaults(self, policy_name: Optional[str]) -> PolicyDefaults:
        """The defaults the webhook used for a member (its KVMeshPolicy), else the global."""
        p = self.policies.get(policy_name) if policy_name else None
        return p.defaults if p is not None else self.policy

    def group_defaults(self, g: Optional[groups.Group]) -> PolicyDefaults:
        names_ = sorted({m.policy or "" for m in (g.members.values() if g else [])})
        return self.defaults(names_[0] if names_ else None)

    # --- lookup endpoints -------------------------------------------------------------------

    async def endpoints(self, namespace: str, gid: PeerGroupId, *port_names: str,
                        defaults: Optional[PolicyDefaults] = None
                        ) -> Optional[list[tuple[str, int]]]:
        """(pod IP, port) for each named port of one ready pod of the group's lookup service,
        or None when no ready pod has them all (one pod listing for all ports).

        The controller talks to the lookup pod directly, as the Service's endpoints would:
        this needs neither cluster DNS nor kube-proxy in the controller's path, and works
        where EndpointSlices cannot list the address (the local control plane's loopback
        pod IPs)."""
        defaults = defaults or self.policy
        if gid.mode == names.MODE_REDIS and defaults.redis_address:
            host, port = defaults.redis_address.rsplit(":", 1)
            return [(host, int(port))]
        for pod in await self.api.lookup_pods(namespace, gid.label):
            status = pod.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in status.get("conditions") or [])
            ip = status.get("podIP")
            if not (ready and ip and not pod["metadata"].get("deletionTimestamp")):
                continue
            ports = {p.get("name"): p.get("containerPort")
                     for c in (pod.get("spec") or {}).get("containers") or []
                     for p in c.get("ports") or []}
            if all(n in ports for n in port_names):
                return [(ip, ports[n]) for n in port_names]
        return None

    async def redis_index(self, namespace: str, group: str,
                          defaults: Optional[PolicyDefaults] = None):
        from kvmesh.backends import redis_index as purge
        eps = await self.endpoints(namespace, PeerGroupId(names.MODE_REDIS, group), "redis",
                                   defaults=defaults)
        ep = eps[0] if eps else None
        if ep is None:
            raise LookupError(f"no ready endpoint for Service "
                              f"{namespace}/{names.lookup_service_name('redis', group)}")
        addr = f"{ep[0]}:{ep[1]}"
        idx = self.redis.get(addr)
        if idx is None:
            # kvmesh's own Redis enforces ACLs (lookup.redis_acl_args): log in as kvmesh's user.
            # An operator's Redis (redisAddress) is used as configured.
            auth = {} if (defaults or self.policy).redis_address else {
                "username": lookup.REDIS_KVMESH_USER,
                "password": await self._redis_password(namespace, group)}
            # Periodic reconciliation is the backstop for index sets lost to maxmemory
            # eviction (the lookup Redis is bounded with allkeys-lru) or missed events.
            idx = purge.AddressIndex(ep[0], ep[1], live_addrs=self._live_for_reconcile,
                                     reconcile_interval=RECONCILE_SECONDS,
                                     on_reconcile=self._on_swept, **auth)
            self.redis[addr] = idx
            await idx.start(wait=10)
        return idx

    async def _redis_password(self, namespace: str, group: str) -> str:
        if self._redis_key is None:
            self._redis_key = await self.api.redis_master_key()
        return lookup.redis_password(self._redis_key, namespace, group)

    async def hash_seed_key(self) -> bytes:
        """The webhook reads this key to give each group its own PYTHONHASHSEED; the leader
        creates it at start (it must exist before the first pod of any group arrives)."""
        if self._seed_key is None:
            self._seed_key = await self.api.hash_seed_key()
        return self._seed_key

    def _on_swept(self, stale: dict[str, int]) -> None:
        # A reconcile (index catch-up after a (re)connect) and a departure's purge can race
        # for the same dead address; each key goes once (check-and-delete in Redis). Keys swept
        # after the purge was recorded are added to that record, keys swept before it wait
        # here for it.
        recorded = {rec.what: (gkey, rec) for gkey, rec in self.last_purge.items()
                    if rec.mode == names.MODE_REDIS}
        for addr, n in stale.items():
            if addr in recorded:
                gkey, rec = recorded[addr]
                rec.removed += n
                self.queue.add(gkey)
                continue
            self.swept[addr] = self.swept.pop(addr, 0) + n
        while len(self.swept) > SWEPT_MAX:  # deaths nobody purged explicitly: oldest first
            self.swept.pop(next(iter(self.swept)))

    # --- purge --------------------------------------------------------------------------------

    async def purge(self, d: groups.Departure, quiet_if_empty: bool = False) -> bool:
        """Remove a departed member's lookup state; True when done.

        quiet_if_empty marks an arrival purge (stale state under an address a new pod takes):
        it is only valid at that moment, before the new engine can store, so it is never
        queued for a retry; and in controller mode a new instance id has nothing stale."""
        m = d.member
        if quiet_if_empty and m.mode != names.MODE_REDIS:
            return True
        if m.mode == names.MODE_MP and not mp.deletes_on(d.reason):
            # Not a death of its server (the sidecar outlives vLLM and deregisters itself):
            # not done either, so the incarnation's later death still purges.
            return False
        gkey = m.group_key
        t0 = time.perf_counter()
        try:
            if m.mode == names.MODE_REDIS:
                if not m.address:
                    return True
                idx = await self.redis_index(m.namespace, m.group, self.defaults(m.policy))
                res = await idx.purge_address(m.address)
                swept = self.swept.pop(m.address, 0)
                # Swept keys under a reused address predate the arriving pod: not its purge.
                removed = res.deleted + (0 if quiet_if_empty else swept)
            elif m.mode == names.MODE_MP:
                removed = await mp.purge(self, d)
            else:
                from kvmesh.backends import lmcache_controller as lmcache_ctrl
                eps = await self.endpoints(m.namespace, m.peer_group, "pull", "http")
                if eps is None:
                    raise LookupError(f"no ready pod of the lookup service {m.namespace}/"
                                      f"{names.lookup_service_name(m.mode, m.group)}")
                (pull, http), ranks = eps, max(1, len(m.worker_ports))
                # Confirmed through the controller's fresh per-instance listing: a pushed
                # message alone proves nothing (ZMQ accepts it before delivery).
                # Ranks, IPs and ports come from the controller's own records of the instance
                # (worker_ids=None), so every registered rank goes, whatever TP was used.
                await lmcache_ctrl.deregister_and_confirm(
                    f"{pull[0]}:{pull[1]}", f"http://{http[0]}:{http[1]}", m.instance_id,
                    None, timeout=10)
                removed = ranks
        except Exception as e:
            if quiet_if_empty:
                log.warning("could not check %s for state predating pod %s/%s: %s",
                            d.what, m.namespace, m.name, e)
                return False
            self.pending[m.key] = d
            if self.metrics:
                self.metrics.errors.labels("purge").inc()
            log.error("could not purge %s of pod %s/%s (%s): %s; retrying every %.0fs",
                      d.what, m.namespace, m.name, d.reason, e, self.resync_seconds)
            return False
        seconds = time.perf_counter() - t0
        self.pending.pop(m.key, None)
        if quiet_if_empty and removed == 0:
            return True
        rec = PurgeRecord(f"{m.namespace}/{m.name}", d.reason, d.what, removed, seconds,
                          m.mode)
        self.last_purge[gkey] = rec
        self.queue.add(gkey)
        if self.metrics:
            self.metrics.purges.labels(m.mode, d.reason).inc()
            self.metrics.purged.labels(m.mode).inc(removed)
            self.metrics.purge_seconds.labels(m.mode).observe(seconds)
        log.info("purged %s of pod %s/%s (%s): %d removed in %.1f ms", d.what, m.namespace,
                 m.name, d.reason, removed, seconds * 1000)
        self.background(self.event(m, "LookupStatePurged",
                         f"kvmesh removed the lookup state of pod {m.name} ({d.reason}): "
                         f"{d.what}, {removed} {PURGED_UNIT.get(m.mode, 'ranks')} "
                         f"in {seconds * 1000:.0f} ms, so peers miss cleanly instead of "
                         "fetching from a dead address", owners=list(self.owners.get(m.key) or [])))
        return True

    # --- events -------------------------------------------------------------------------------

    async def _workload_of(self, m: groups.Member, owners: Optional[list] = None
                           ) -> Optional[dict]:
        owners = owners if owners is not None else self.owners.get(m.key) or []
        ref = next((o for o in owners if o.get("controller")), None)
        if ref is None:
            return None
        if ref.get("kind") == "ReplicaSet":
            try:
                rs = await self.api.replica_set(m.namespace, ref["name"])
                up = next((o for o in ((rs or {}).get("metadata") or {})
                           .get("ownerReferences") or [] if o.get("controller")), None)
                if up is not None:
                    return {"apiVersion": up["apiVersion"], "kind": up["kind"],
                            "name": up["name"], "uid": up["uid"], "namespace": m.namespace}
            except Exception:
                pass
        return {"apiVersion": ref.get("apiVersion"), "kind": ref.get("kind"),
                "name": ref.get("name"), "uid": ref.get("uid"), "namespace": m.namespace}

    async def event(self, m: groups.Member, reason: str, message: str,
                    type_: str = "Normal", owners: Optional[list] = None) -> None:
        """`owners`: the pod's ownerReferences taken when the event was decided (a background
        event may run after the pod's DELETED has dropped them)."""
        async with self._event_slots:
            target = await self._workload_of(m, owners) or {
                "apiVersion": "v1", "kind": "Pod", "name": m.name, "uid": m.uid,
                "namespace": m.namespace}
            await self.api.event(target, reason, message, type_)

    def background(self, coro) -> None:
        """Run best-effort work (Events) off the watch path; bounded by its own semaphore."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- groups -------------------------------------------------------------------------------

    def group_view(self) -> dict[GroupKey, groups.Group]:
        return self.groups

    def _spec_inputs(self, g: groups.Group, defaults: PolicyDefaults) -> tuple:
        """Everything a group's lookup objects and NetworkPolicy are derived from."""
        ms = g.members.values()
        return (tuple(sorted({m.image for m in ms})), defaults.model_dump_json(), self.peer_policy,
                tuple(sorted({p for m in ms for p in m.p2p_ports})),
                tuple(sorted({p for m in ms if m.mode == names.MODE_CONTROLLER
                              for p in m.worker_ports})),
                tuple(sorted({m.labels for m in ms})))

    async def reconcile_group(self, gkey: GroupKey, g: Optional[groups.Group],
                              full: bool = True) -> None:
        """Converge one group's objects and status. `full` re-applies everything (drift
        repair); otherwise only what changed since it was last applied is written."""
        ns, gid = gkey
        # One view of the members for the whole pass: the live Group changes (or is replaced)
        # while this awaits the API, and a change re-queues the group. What spec_applied
        # records must be what was applied from, or a pass that saw the members differ midway
        # (a NetworkPolicy deleted for an "empty" group) is never corrected by the event path.
        g = replace(g, members=dict(g.members)) if g is not None else None
        if g is None or not g.members:
            since = self.empty_since.setdefault(gkey, time.monotonic())
            self.empty_at.setdefault(gkey, _now())
            if time.monotonic() - since >= self.grace:
                if await self.api.delete(PEER_GROUP_API, names.PEER_GROUP_KIND, ns, gid.label):
                    log.info("peer group %s/%s empty for %.0fs: lookup service removed",
                             ns, gid, self.grace)
                for d in (self.empty_since, self.empty_at, self.last_purge, self.user_isolated,
                          self.unselected, self.cr, self.spec_applied, self.status_written):
                    d.pop(gkey, None)
                self.health.forget(gkey)
                return
        else:
            self.empty_since.pop(gkey, None)
            self.empty_at.pop(gkey, None)
        cr = self.cr.get(gkey)
        if full or cr is None:
            cr = self.cr[gkey] = await self.api.apply(lookup.peer_group(ns, gid))
        defaults = self.group_defaults(g)
        if g is not None and g.members and self.manage_lookup:
            acl = None
            if gid.mode == names.MODE_REDIS and not defaults.redis_address:
                acl = lookup.password_sha256(await self._redis_password(ns, gid.group))
            inputs = self._spec_inputs(g, defaults) + (acl,)
            if full or self.spec_applied.get(gkey) != inputs:
                self.spec_applied.pop(gkey, None)
                images = [m.image for m in g.members.values()]
                seed_key = await self.hash_seed_key() if gid.mode == names.MODE_CONTROLLER \
                    else None  # lmcache_controller hashes tokens like its workers
                for obj in lookup.desired(cr, defaults, acl, images, seed_key):  # image: kvmesh's
                    await self.api.apply(obj)
                await self.reconcile_peer_policy(gkey, g, lookup.owner_ref(cr))
                self.spec_applied[gkey] = inputs
        peers = g.peers if g else []
        # name=token of every peer: a leader taking over compares it with what it sees, to
        # purge peers that died while nobody watched.
        status = {"members": len(g.members) if g else 0, "readyPeers": len(peers),
                  "peers": sorted(f"{m.name}={m.token}" for m in peers if m.token)}
        if gid.mode == names.MODE_REDIS and g is not None and g.members:
            # Index the group's Redis before anyone dies, so a purge is one index drain.
            try:
                idx = await self.redis_index(ns, gid.group, defaults)
                status["lookupAddress"] = f"{idx.host}:{idx.port}"
            except Exception as e:
                log.debug("lookup Redis of %s/%s not reachable yet: %s", ns, gid, e)
        if gid.mode == names.MODE_MP and g is not None and g.members:
            try:  # the coordinator's registrations, by pod and incarnation
                status.update(await mp.instances_status(self, ns, gid, g))
            except Exception as e:
                log.debug("lmcache coordinator of %s/%s not reachable yet: %s", ns, gid, e)
        if gkey in self.empty_at:
            status["emptySince"] = self.empty_at[gkey]
        rec = self.last_purge.get(gkey)
        if rec:
            status["lastPurge"] = {k: v for k, v in rec.__dict__.items() if k != "mode"}
        status.update(await self.health.status(gkey, g, status, cr))
        if self.status_written.get(gkey) == status:
            return
        self.status_written.pop(gkey, None)
        await self.api.apply({**lookup.peer_group(ns, gid), "status": status},
                             subresource="status")
        self.status_written[gkey] = status

    async def reconcile_peer_policy(self, gkey: GroupKey, g: groups.Group,
                                    owner: dict) -> None:
        """Apply `kvmesh-peers-<gid>` (see lookup.peer_network_policy), or delete it when the
        group declares no P2P ports or peer policies are switched off."""
        ns, gid = gkey
        ports = sorted({p for m in g.members.values() for p in m.p2p_ports})
        if not ports or not self.peer_policy:
            await self.api.delete(lookup.NETWORK_POLICY_API, "NetworkPolicy", ns,
                                  names.PEER_POLICY_PREFIX + gid.label)
            self.user_isolated.pop(gkey, None)
            self.unselected.pop(gkey, None)
            return
        try:
            policies = await self.api.network_policies(ns)
        except Exception as e:
            # Without the answer either rule set could be wrong: keep what is applied.
            log.warning("cannot list NetworkPolicies in %s, leaving NetworkPolicy %s%s as it "
                        "is this round: %s", ns, names.PEER_POLICY_PREFIX, gid, e)
            return
        isolating = lookup.isolating_policies(policies,
                                              [dict(m.labels) for m in g.members.values()])
        ctrl_ports = sorted({p for m in g.members.values() if m.mode == names.MODE_CONTROLLER
                             for p in m.worker_ports})
        await self.api.apply(lookup.peer_network_policy(
            ns, gid, owner, ports, bool(isolating), ctrl_ports,
            peers_any_port=gid.mode == names.MODE_MP))
        policy = f"{ns}/{names.PEER_POLICY_PREFIX}{gid}"
        unselected = sorted(m.name for m in g.members.values() if isolating
                            and not lookup.isolating_policies(policies, [dict(m.labels)]))
        if unselected and self.unselected.get(gkey) != unselected:
            log.warning("peer group %s/%s: NetworkPolicy %s selects only some of its pods; "
                        "pods %s are selected by no policy but %s, so they accept only P2P "
                        "connections from the group: select them in your policies too",
                        ns, gid, ", ".join(isolating), ", ".join(unselected), policy)
        self.unselected[gkey] = unselected
        if self.user_isolated.get(gkey) == bool(isolating):
            return
        self.user_isolated[gkey] = bool(isolating)
        if isolating:
            log.info("peer group %s/%s: its pods are already selected by NetworkPolicy %s, "
                     "so NetworkPolicy %s now only allows the P2P ports %s from the group's "
                     "pods and opens nothing else (allowing other ports would widen the "
                     "user's isolation)", ns, gid, ", ".join(isolating), policy, ports)
        else:
            log.info("peer group %s/%s: no other NetworkPolicy selects its pods, so "
                     "NetworkPolicy %s fences only the P2P ports %s to the group's pods and "
                     "allows all other TCP ports, UDP and SCTP from anywhere, as before",
                     ns, gid, policy, ports)

    async def recover(self) -> None:
        """After taking over: purge peers the previous leader recorded that are gone now.

        The listing is retried with backoff while the API server is overloaded or unreachable
        (429, 5xx, connection errors): a departure missed here would otherwise wait for the
        Redis reconcile backstop (RECONCILE_SECONDS)."""
        try:
            found = await retry.call("list KVMeshPeerGroups to recover departures",
                                     self.api.peer_groups)
        except Exception as e:
            log.error("cannot read KVMeshPeerGroups to recover departures: %s", e)
            return
        view = self.group_view()
        for cr in found:
            ns, gid = cr["metadata"]["namespace"], lookup.group_of(cr)
            gone = groups.departed_during_gap((cr.get("status") or {}).get("peers") or [],
                                              view.get((ns, gid)), gid, ns)
            for d in gone:
                log.info("peer %s/%s (%s) left while no controller was leading; purging",
                         ns, d.member.name, d.member.token)
                await self.purge(d)

    async def retry_purges(self) -> None:
        """Retry the purges that failed (lookup service unreachable)."""
        for key, d in list(self.pending.items()):
            owner = next((m for m in self.members.values() if m.token == d.member.token
                          and m.uid != d.member.uid), None)
            if owner is not None and d.member.mode == names.MODE_REDIS:
                # The address now belongs to a new pod: its keys can no longer be told apart
                # from the dead pod's, and deleting them would lose live state.
                log.warning("dropping the retry for %s of %s/%s: pod %s now uses that address",
                            d.what, d.member.namespace, d.member.name, owner.name)
                self.pending.pop(key, None)
                continue
            await self.purge(d)

    def queue_all(self, repair: bool = True) -> None:
        """The full pass: every known group, at low priority (status, grace timers; with
        `repair`, their objects re-applied too)."""
        keys = set(self.groups) | set(self.empty_since) | set(self.status_written)
        if repair:
            self.repair |= keys
        for gkey in keys:
            self.queue.add(gkey, urgent=False)

    async def work_one(self, urgent_only: bool = False) -> None:
        """Take one group off the queue and reconcile it; a failure is retried with backoff."""
        gkey, urgent = await self.queue.get(urgent_only)
        if self.metrics:
            self.metrics.queue_wait.labels("event" if urgent else "resync").observe(
                self.queue.waited)
        t0 = time.perf_counter()
        full = not urgent and gkey in self.repair
        try:
            await self.reconcile_group(gkey, self.groups.get(gkey), full=full)
            self.failures.pop(gkey, None)
            if full:
                self.repair.discard(gkey)
        except ApiError as e:
            if e.status != 403:
                self._retry_later(gkey, urgent, e)
            else:
                # Not allowed in this namespace (no RoleBinding): retried at the next full
                # pass only, said once per FORBIDDEN_REPORT_SECONDS, never a hot loop.
                for cache in (self.cr, self.spec_applied, self.status_written):
                    cache.pop(gkey, None)
                if self.metrics:
                    self.metrics.errors.labels("forbidden").inc()
                await self._report_forbidden(gkey, self.groups.get(gkey), e)
        except Exception as e:
            self._retry_later(gkey, urgent, e)
        finally:
            self.queue.done(gkey)
            if self.metrics:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - t0)
                self.metrics.queued_groups.labels("event").set(self.queue.urgent)
                self.metrics.queued_groups.labels("resync").set(len(self.queue) -
                                                                self.queue.urgent)

    def _retry_later(self, gkey: GroupKey, urgent: bool, e: Exception) -> None:
        """A failed reconcile: forget what was applied and queue it again with backoff."""
        # What we believe was applied may be gone (a user deleted the KVMeshPeerGroup):
        # the retry writes everything again.
        for cache in (self.cr, self.spec_applied, self.status_written):
            cache.pop(gkey, None)
        n = self.failures[gkey] = self.failures.get(gkey, 0) + 1
        delay = min(self.resync_seconds, retry.DEFAULT_BACKOFF(n))
        if self.metrics:
            self.metrics.errors.labels("group").inc()
        log.error("reconciling peer group %s/%s failed (attempt %d): %s; retrying in "
                  "%.1fs", gkey[0], gkey[1], n, e, delay)
        asyncio.get_running_loop().call_later(delay, self.queue.add, gkey, urgent)

    async def _worker(self, urgent_only: bool) -> None:
        while True:
            await self.work_one(urgent_only)

    async def resync_once(self, full: bool = True) -> None:
        """Retry failed purges and work the queue until it is empty (`full`: every group
        first queued at low priority). The running controller does this continuously with
        its workers; tests and one-shot callers use this."""
        await self.retry_purges()
        if full:
            self.queue_all()
        while len(self.queue):
            await self.work_one()
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.members.set(len(self.members))
            self.metrics.peers.set(sum(1 for m in self.members.values() if m.is_peer))

    async def _report_forbidden(self, gkey: GroupKey, g: Optional[groups.Group],
                                e: ApiError) -> None:
        ns = gkey[0]
        now = time.monotonic()
        if now - self.forbidden_reported.get(ns, -float("inf")) < FORBIDDEN_REPORT_SECONDS:
            return
        self.forbidden_reported[ns] = now
        msg = (f"kvmesh may not manage the lookup service of peer group {gkey[1]} in namespace "
               f"{ns} (the API server answered 403 Forbidden: {e.reason}); pods there run "
               f"without P2P lookup. An admin allows it with: {names.grant_command(ns)}")
        log.warning("%s", msg)
        member = next(iter(g.members.values()), None) if g else None
        if member is not None:
            try:
                await self.event(member, "LookupForbidden", msg, "Warning")
            except Exception as ee:  # noqa: BLE001 - the log line above says it already
                log.debug("could not record the LookupForbidden Event: %s", ee)

    async def run(self) -> None:
        informer = asyncio.create_task(self.pods.run())
        workers: list[asyncio.Task] = []
        try:
            await self.pods.has_synced.wait()
            log.info("peer membership synced: %d members in %d groups", len(self.members),
                     len(self.groups))
            await self.recover()
            # Some workers serve only pod events, so a departure never waits for the
            # low-priority full pass's work in flight (each group is several API calls).
            workers = [asyncio.create_task(self._worker(i < URGENT_WORKERS))
                       for i in range(max(self.workers, URGENT_WORKERS + 1))]
            passes = 0
            while True:
                try:
                    await self.hash_seed_key()
                except Exception as e:  # retried every pass; the webhook waits for it
                    log.error("cannot create or read Secret %s/%s (the per-group hash-seed "
                              "key the webhook waits for): %s: %s", names.SYSTEM_NAMESPACE,
                              names.HASH_SEED_SECRET, type(e).__name__, e)
                # Pod events queue their own group as they come (see _on_pod); this loop is
                # the low-priority backstop.
                await self.retry_purges()
                self.queue_all(repair=passes % REPAIR_EVERY == 0)
                passes += 1
                self._gauges()
                await asyncio.sleep(self.resync_seconds)
        finally:
            informer.cancel()
            self.pods.stop()
            for t in workers + list(self._background):
                t.cancel()
            for idx in self.redis.values():
                await idx.stop()
