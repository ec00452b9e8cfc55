"""kvmesh's decisions about a workload's pods, as Events on the workload itself.

The webhook records every decision in the pod's `kvmesh.dev/status` annotation, and its
admission warnings go to whoever created the pod: for a Deployment that is the ReplicaSet
controller, so nobody reads them. What matters is therefore said here, once, on the OWNING
workload (`kubectl describe deployment` shows it):

- InjectionSkipped: a status `{"injected": false, "reason", "message"}`;
- InjectionReduced: an injected pod whose status lists reductions (e.g. the LMCache CPU cache
  made smaller to fit the memory limit), one Event per reduction reason;
- InjectionWarning: an injected pod whose status carries warnings (all in one Event);
- InjectionDenied: the webhook refused a pod; the workload controller's FailedCreate Event
  (on a ReplicaSet, a Job, a LeaderWorkerSet's StatefulSet) holds the webhook's message.

Pods come from three watches, each holding a compact stub per pod: injected pods (the
membership watch, by kvmesh.dev/peer-group), skipped pods (run_skipped, by the
kvmesh.dev/skipped label the webhook stamps, so pods opted in by their namespace or a
KVMeshPolicy are seen too) and opted-in pods without either label (optin.watch_uninjected).

The owner is found by walking controller ownerReferences up through the objects a workload
creates (Pod -> ReplicaSet -> Deployment, Pod -> StatefulSet -> LeaderWorkerSet, Pod -> Job ->
CronJob), one cached GET per intermediate object. One Event per (workload, kind, reason) per
REPEAT_SECONDS (the API server keeps Events for an hour by default: a condition that lasts is
said again about once per hour, never per pod), and at most RATE Events per second overall
(BURST at once); what the rate limit drops is counted, and said when the next pod comes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from kvmesh.core import names
from kvmesh.kube.api import EVENT_SOURCE

log = logging.getLogger("kvmesh.workload-events")

REPEAT_SECONDS = 3600.0
RATE = 2.0  # Events per second, all workloads together
BURST = 20
MAX_KEYS = 20_000  # remembered (workload, kind, reason) and owner lookups, each
CONCURRENCY = 4
# An intermediate object kvmesh looks through to the workload that made it.
WALK_UP = {"ReplicaSet": "apps/v1", "StatefulSet": "apps/v1", "Job": "batch/v1", "Pod": "v1"}
MAX_DEPTH = 3
EVENT_REASON = {"skipped": "InjectionSkipped", "reduced": "InjectionReduced",
                "warned": "InjectionWarning", "denied": "InjectionDenied"}
DENIED_MARK = "denied the request: kvmesh: "
# Where a status lists what kvmesh injected with less than asked ("adjusted": the CPU cache
# made to fit the memory limit); a string, an object or a list of either.
REDUCTION_FIELDS = ("adjusted", "reductions", "reduced")
_LABEL = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")


@dataclass(frozen=True)
class Finding:
    kind: str  # skipped | reduced | warned | denied
    reason: str  # the status's reason (a metrics label: bounded, see label())
    message: str
    key: str = ""  # what tells two findings of one kind apart; the reason by default

    @property
    def dedupe(self) -> str:
        return self.key or self.reason


def label(reason: object) -> str:
    """A metrics-safe reason: kvmesh's own reasons are short kebab-case; anything else is
    "other" (a status written by another version must not grow the label set)."""
    return reason if isinstance(reason, str) and _LABEL.match(reason) else "other"


def findings(status_json: Optional[str]) -> list[Finding]:
    """What in a pod's kvmesh.dev/status deserves an Event (pure). Tolerant: unknown fields are
    ignored, a reduction may be a string or an object with reason/what/message."""
    try:
        st = json.loads(status_json or "")
    except ValueError:
        return []
    if not isinstance(st, dict):
        return []
    if st.get("injected") is False:
        return [Finding("skipped", label(st.get("reason")), str(st.get("message") or ""))]
    out = []
    for field in REDUCTION_FIELDS:
        reductions = st.get(field) or []
        for r in reductions if isinstance(reductions, list) else [reductions]:
            if isinstance(r, dict):
                why = r.get("reason") or r.get("what") or field
                msg = r.get("message") or ", ".join(f"{k}: {v}" for k, v in sorted(r.items()))
            else:
                why, msg = field, str(r)
            out.append(Finding("reduced", label(why), str(msg)))
    warnings = st.get("warnings") or []
    if isinstance(warnings, list) and warnings:
        out.append(Finding("warned", "warnings", "; ".join(str(w) for w in warnings)))
    return out


def denial(event: dict) -> Optional[Finding]:
    """The webhook's denial in a workload controller's FailedCreate Event, if it is one."""
    msg = event.get("message") or ""
    at = msg.find(DENIED_MARK)
    if event.get("reason") != "FailedCreate" or at < 0:
        return None
    text = msg[at + len(DENIED_MARK):]
    # The webhook's reason is not in the API server's message: one Event per distinct text.
    return Finding("denied", "denied", text, hashlib.sha256(text.encode()).hexdigest()[:16])


class _Expiring:
    """A bounded map whose entries lapse after `ttl` seconds (oldest dropped first)."""

    def __init__(self, ttl: float, size: int, now: Callable[[], float]):
        self.ttl, self.size, self.now = ttl, size, now
        self.d: OrderedDict = OrderedDict()

    def get(self, key):
        hit = self.d.get(key)
        if hit is None or self.now() - hit[0] > self.ttl:
            self.d.pop(key, None)
            return None
        return hit[1]

    def put(self, key, value=True) -> None:
        self.d[key] = (self.now(), value)
        self.d.move_to_end(key)
        while len(self.d) > self.size:
            self.d.popitem(last=False)

    def drop(self, key) -> None:
        self.d.pop(key, None)


class WorkloadEvents:
    """Feed it pods (`on_pod`, an informer handler) and FailedCreate Events (`on_event`)."""

    def __init__(self, kube, metrics=None, *, now: Callable[[], float] = time.monotonic,
                 repeat: float = REPEAT_SECONDS, rate: float = RATE, burst: int = BURST):
        self.kube, self.metrics, self.now = kube, metrics, now
        self.rate, self.burst = rate, burst
        self._tokens, self._at = float(burst), now()
        self._seen = _Expiring(repeat, MAX_KEYS, now)  # by the pod's direct owner: no API call
        self._said = _Expiring(repeat, MAX_KEYS, now)  # by the workload
        self._owner = _Expiring(repeat, MAX_KEYS, now)  # intermediate uid -> workload ref
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._tasks: set[asyncio.Task] = set()

    # --- inputs (informer handlers: never block the watch) ------------------------------------

    async def on_pod(self, type_: str, obj: dict, old: Optional[dict]) -> None:
        if type_ != "ADDED":
            return  # a pod's decision is made once, at admission
        meta = obj.get("metadata") or {}
        found = findings((meta.get("annotations") or {}).get(names.ANN_STATUS))
        owner = _controller(meta)
        for f in found:  # a bare pod is its own workload
            self._note(owner or _pod_ref(meta), f, f"pod {meta.get('name')}",
                       walk=owner is not None)

    async def on_event(self, type_: str, obj: dict, old: Optional[dict]) -> None:
        if type_ == "DELETED":
            return
        f = denial(obj)
        involved = obj.get("involvedObject") or {}
        if f is None or involved.get("kind") not in WALK_UP or not involved.get("uid"):
            return
        ref = {k: involved.get(k) for k in ("apiVersion", "kind", "name", "namespace", "uid")}
        self._note(ref, f, f"{involved['kind']} {involved.get('name')}", walk=True,
                   above_only=True)

    # --- the work -------------------------------------------------------------------------------

    def _note(self, start: dict, f: Finding, who: str, walk: bool,
              above_only: bool = False) -> None:
        """`start`: the pod's direct owner (or the pod); `above_only`: say nothing when nothing
        owns `start` (a FailedCreate Event is already on the workload that failed)."""
        key = (start.get("uid"), f.kind, f.dedupe)
        if self._seen.get(key):
            return  # the common case, each further replica: no API call at all
        self._seen.put(key)
        task = asyncio.create_task(self._say(start, key, f, who, walk, above_only))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _say(self, start: dict, key: tuple, f: Finding, who: str, walk: bool,
                   above_only: bool) -> None:
        try:
            async with self._slots:
                target = await self.workload(start) if walk else start
                if above_only and target.get("uid") == start.get("uid"):
                    return
                wkey = (target.get("uid"), f.kind, f.dedupe)
                if self._said.get(wkey):
                    return  # e.g. a rollout's new ReplicaSet, same Deployment
                if await self._on_record(target, f):
                    self._said.put(wkey)  # said before a restart or by the previous leader
                    return
                if not self._take():
                    self._seen.drop(key)  # said when the next pod of it comes
                    if self.metrics:
                        self.metrics.workload_events_dropped.inc()
                    log.warning("rate limit: not recording %s (%s) on %s %s/%s now", f.kind,
                                f.reason, target["kind"], target["namespace"], target["name"])
                    return
                self._said.put(wkey)
                await self.kube.event(target, EVENT_REASON[f.kind], _message(f, who),
                                      "Warning")
                if self.metrics:
                    self.metrics.workload_events.labels(f.kind, f.reason).inc()
        except Exception as e:  # best effort: never raised into the watch
            log.warning("could not report %s (%s) for %s: %s", f.kind, f.reason, who, e)

    def _take(self) -> bool:
        now = self.now()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _on_record(self, target: dict, f: Finding) -> bool:
        """Whether the API server still holds this Event on `target` (it keeps Events about
        as long as REPEAT_SECONDS): one LIST per new (workload, kind, reason) in this
        process, so a restarted controller or a new leader does not say it all again."""
        sel = f"involvedObject.uid={target.get('uid')},reason={EVENT_REASON[f.kind]}"
        try:
            items = await self.kube.list("v1", "Event", target["namespace"],
                                         field_selector=sel)
        except Exception as e:  # unknown: say it (a duplicate beats silence)
            log.debug("could not list Events of %s %s/%s: %s", target["kind"],
                      target["namespace"], target["name"], e)
            return False
        mark = _marker(f)
        return any((e.get("source") or {}).get("component") == EVENT_SOURCE
                   and mark in (e.get("message") or "") for e in items)

    async def workload(self, start: dict) -> dict:
        """The top of `start`'s controller chain: `start` itself when nothing is above it or
        the API server does not say (403, 404, timeout)."""
        cur = start
        for _ in range(MAX_DEPTH):
            if cur.get("kind") not in WALK_UP:
                break  # a workload kind nothing creates (Deployment, LeaderWorkerSet, ...)
            hit = self._owner.get(cur.get("uid"))
            if hit is None:
                hit = await self._owner_of(cur)
                self._owner.put(cur.get("uid"), hit)
            if not hit:
                break
            cur = hit
        return cur

    async def _owner_of(self, ref: dict) -> dict:
        """The controller owner of `ref` as an Event's involvedObject, or {} for none."""
        try:
            obj = await self.kube.get(WALK_UP[ref["kind"]], ref["kind"], ref["name"],
                                      ref["namespace"])
        except Exception as e:  # 403 (not granted), timeouts: report on what we have
            log.debug("could not read %s %s/%s: %s", ref["kind"], ref["namespace"],
                      ref["name"], e)
            return {}
        up = _controller((obj or {}).get("metadata") or {})
        if up is None:
            return {}
        return {**up, "namespace": ref["namespace"]}

    async def drain(self) -> None:
        """Wait for the Events in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _pod_ref(meta: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "name": meta.get("name"),
            "namespace": meta.get("namespace"), "uid": meta.get("uid")}


def _controller(meta: dict) -> Optional[dict]:
    o = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    if o is None:
        return None
    return {"apiVersion": o.get("apiVersion"), "kind": o.get("kind"), "name": o.get("name"),
            "uid": o.get("uid"), "namespace": meta.get("namespace")}


def _marker(f: Finding) -> str:
    """The part of an Event's message that tells which finding it reports."""
    return f.message[:200] if f.kind == "denied" else f"({f.reason})" \
        if f.kind != "warned" else ""


def _message(f: Finding, who: str) -> str:
    head = {"skipped": f"kvmesh did not inject LMCache P2P {_marker(f)}",
            "reduced": f"kvmesh injected LMCache P2P with less than asked {_marker(f)}",
            "warned": "kvmesh injected LMCache P2P with warnings",
            "denied": "kvmesh refused to admit a pod"}[f.kind]
    return f"{head}, first seen on {who}: {f.message}"


async def run_skipped(kube, events: WorkloadEvents) -> None:
    """Watch the pods the webhook skipped, by the kvmesh.dev/skipped label it stamps on them:
    this sees pods opted in by their namespace's label or a KVMeshPolicy too, which carry no
    kvmesh.dev/inject label of their own. Skipped pods are few and each is cached as a stub
    of a few hundred bytes (pod_stub). optin.watch_uninjected leaves labelled pods to this
    watch, so no pod is held or reported twice."""
    await kube.informer("v1", "Pod", label_selector=names.LABEL_SKIPPED,
                        handlers=[events.on_pod], name="skipped pods",
                        transform=pod_stub).run()


def pod_stub(pod: dict) -> dict:
    """What on_pod reads of a pod, and no more (the informer caches this, not the pod)."""
    meta = pod.get("metadata") or {}
    ann = meta.get("annotations") or {}
    return {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                         "uid": meta.get("uid"),
                         "annotations": {k: ann[k] for k in (names.ANN_STATUS,) if k in ann},
                         "ownerReferences": [o for o in meta.get("ownerReferences") or []
                                             if o.get("controller")]}}


async def run_denials(kube, events: WorkloadEvents) -> None:
    """Watch the workload controllers' FailedCreate Events for the webhook's denials."""
    await kube.informer("v1", "Event", field_selector="reason=FailedCreate",
                        handlers=[events.on_event], name="FailedCreate events",
                        transform=_event_stub).run()


def _event_stub(ev: dict) -> dict:
    meta = ev.get("metadata") or {}
    return {"metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")},
            "involvedObject": ev.get("involvedObject") or {}, "reason": ev.get("reason"),
            "message": (ev.get("message") or "")[:2000]}
