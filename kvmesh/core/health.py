"""Is a peer group actually sharing? (pure: members in, problems and conditions out)

P2P sharing fails silently: every pod keeps serving, only slower. What breaks it without an
error anywhere, and how kvmesh sees it from the members alone:

- LMCache versions that differ (from the image tag): the controller<->worker messages are not a
  stable protocol across releases (production-stack#1060: a 0.3.x lmcache_controller rejects a
  0.4+ worker's RegisterMsg, the worker never registers, every lookup misses), and the group's
  lookup tier runs ONE version (core.lookup.controller_image: the newest the members name);
- PYTHONHASHSEED or LMCACHE_CHUNK_SIZE that differ: chunk keys differ, so peers never find
  each other's chunks (LMCache#1799);
- two members advertising one address: lookups for one land on the other (production-stack
  #1062);
- the lookup tier not reachable, or (controller and mp modes) a member it never registered.

kvmesh does not mix incompatible versions silently: the group is marked Degraded with reason
VersionMismatch naming the members that cannot share with the group's version, and an Event
says how to split them (a kvmesh.dev/group annotation on one workload). Automatic splitting at
admission would need the stateless webhook to know the group's other members; see README.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

from kvmesh.core import contract, names
from kvmesh.core.groups import Member

SHARING, DEGRADED = "Sharing", "Degraded"

VERSION_MISMATCH = "VersionMismatch"
HASH_SEED_MISMATCH = "HashSeedMismatch"
CHUNK_SIZE_MISMATCH = "ChunkSizeMismatch"
DUPLICATE_ADDRESS = "DuplicateAddress"
LOOKUP_NOT_READY = "LookupNotReady"
NOT_REGISTERED = "NotRegistered"
NO_PEERS = "NotEnoughPeers"
HEALTHY = "PeersCompatible"

# Reasons that are no fault (a group of one cannot share yet): `kvmesh check` warns only.
BENIGN = frozenset({NO_PEERS})

FIXES = {
    VERSION_MISMATCH: "run one LMCache version per group: finish the rollout, or give the "
                      f"other workload its own group (annotation {names.ANN_GROUP}=NAME on its "
                      "pod template)",
    HASH_SEED_MISMATCH: "remove PYTHONHASHSEED from the workloads' env (kvmesh sets one per "
                        "group) or set the same value everywhere, or split them by "
                        f"{names.ANN_GROUP}",
    CHUNK_SIZE_MISMATCH: "remove LMCACHE_CHUNK_SIZE from the workloads' env or set one value "
                         f"(policy chunkSize), or split them by {names.ANN_GROUP}",
    DUPLICATE_ADDRESS: "two pods advertise one P2P address (hostNetwork pods on one node, or a "
                       "fixed IP): drop hostNetwork or spread them one per node",
    LOOKUP_NOT_READY: "kubectl -n NAMESPACE get pods -l kvmesh.dev/lookup-for=GROUP; for "
                      "redisAddress policies, check that Redis answers",
    NOT_REGISTERED: "the pod never registered with the group's lookup tier (controller mode: "
                    "the engine with the lmcache_controller; mp mode: the lmcache server "
                    "sidecar with the lmcache coordinator): read that container's log for "
                    "LMCache controller/coordinator errors; usual causes are a version the "
                    "lookup tier cannot decode (see VersionMismatch) or a NetworkPolicy "
                    "between them",
    NO_PEERS: "scale the workload to 2+ replicas (or wait for them to become ready)",
}


def fix_for(reason: Optional[str]) -> str:
    return FIXES.get(reason or "", "kubectl describe kvmeshpeergroup; the controller's log")


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str
    pods: tuple[str, ...] = ()


def _version(m: Member) -> Optional[tuple[int, int, int]]:
    return contract.lmcache_version_from_image(m.image)


def _odd_ones(members: list[Member], value, what: str, reason: str) -> list[Problem]:
    """Members whose `value` differs from the group's (the most common; ties: the smallest)."""
    seen = {m.name: value(m) for m in members if value(m) is not None}
    counts = Counter(seen.values())
    if len(counts) < 2:
        return []
    ref = sorted(counts, key=lambda v: (-counts[v], v))[0]
    odd = sorted(n for n, v in seen.items() if v != ref)
    others = sorted({str(v) for v in seen.values() if v != ref})
    return [Problem(reason, f"{what} {', '.join(others)} on {', '.join(odd)} differs from the "
                            f"group's {ref}", tuple(odd))]


def version_problems(members: list[Member], mode: str) -> list[Problem]:
    """In controller mode the group's version is its lookup tier's (the newest named); in the
    other modes the most common one."""
    versions = {m.name: v for m in members if (v := _version(m)) is not None}
    if len(set(versions.values())) < 2:
        return []
    if mode == names.MODE_CONTROLLER:
        ref = max(versions.values())
        odd = sorted(n for n, v in versions.items() if v != ref)
        olds = sorted({contract.fmt_version(v) for v in versions.values() if v != ref})
        return [Problem(VERSION_MISMATCH,
                        f"LMCache {', '.join(olds)} on {', '.join(odd)} cannot talk to the "
                        f"group's lmcache_controller ({contract.fmt_version(ref)})", tuple(odd))]
    return _odd_ones(members, lambda m: (contract.fmt_version(v) if (v := _version(m)) else None),
                     "LMCache", VERSION_MISMATCH)


def duplicate_addresses(members: list[Member]) -> list[Problem]:
    """Peers advertising one address (redis: the published podIP:port; others: an IP:port of
    their P2P ports)."""
    owners: dict[str, list[str]] = {}
    for m in members:
        if not m.is_peer:
            continue
        addrs = {m.address} if m.address else {f"{m.ip}:{p}" for p in m.p2p_ports}
        for a in addrs:
            owners.setdefault(a, []).append(m.name)
    dup = {a: sorted(ns) for a, ns in owners.items() if len(ns) > 1}
    if not dup:
        return []
    pods = tuple(sorted({n for ns in dup.values() for n in ns}))
    shown = "; ".join(f"{a} by {', '.join(ns)}" for a, ns in sorted(dup.items())[:5])
    return [Problem(DUPLICATE_ADDRESS, f"one address advertised by several pods: {shown}", pods)]


def assess(members: Iterable[Member], mode: str, lookup_ready: Optional[bool]) -> list[Problem]:
    """Every problem of one group (`lookup_ready` None: not known, not judged)."""
    ms = sorted(members, key=lambda m: m.name)
    out = version_problems(ms, mode)
    out += _odd_ones(ms, lambda m: m.hash_seed, "PYTHONHASHSEED", HASH_SEED_MISMATCH)
    out += _odd_ones(ms, lambda m: m.chunk_size, "LMCACHE_CHUNK_SIZE", CHUNK_SIZE_MISMATCH)
    out += duplicate_addresses(ms)
    if lookup_ready is False and ms:
        out.append(Problem(LOOKUP_NOT_READY, "the group's lookup service does not answer"))
    return out


def _condition(type_: str, status: bool, reason: str, message: str, now: str,
               previous: dict[str, dict]) -> dict:
    s = "True" if status else "False"
    old = previous.get(type_) or {}
    since = old["lastTransitionTime"] if old.get("status") == s and \
        old.get("lastTransitionTime") else now
    return {"type": type_, "status": s, "reason": reason, "message": message[:1000],
            "lastTransitionTime": since}


def conditions(problems: list[Problem], ready_peers: int, now: str,
               previous: Iterable[dict] = ()) -> list[dict]:
    """Sharing (True only with 2+ ready peers and no problem) and Degraded (True with any
    problem; reason: the first one's). lastTransitionTime kept from `previous` while a
    condition's status holds, so an unchanged group writes an unchanged status."""
    prev = {c.get("type"): c for c in previous if isinstance(c, dict)}
    if problems:
        first = problems[0]
        msg = "; ".join(p.message for p in problems)
        return [_condition(SHARING, False, first.reason, msg, now, prev),
                _condition(DEGRADED, True, first.reason, msg, now, prev)]
    degraded = _condition(DEGRADED, False, HEALTHY, "no incompatible member found", now, prev)
    if ready_peers < 2:
        return [_condition(SHARING, False, NO_PEERS, f"{ready_peers} ready peer(s): sharing "
                           "needs two", now, prev), degraded]
    return [_condition(SHARING, True, HEALTHY, f"{ready_peers} ready peers, compatible", now,
                       prev), degraded]
