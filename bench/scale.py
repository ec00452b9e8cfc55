"""The controller at scale: memory, status convergence and purge latency with thousands of
injected pods on the local control plane (KWOK fake nodes), kvmesh's real webhook and
controller processes, and one real redis-server as every group's lookup Redis (policy
`redisAddress`).

    .venv/bin/python bench/scale.py                      # 500 -> 2,500 -> 5,000 pods, 50 groups
    .venv/bin/python bench/scale.py --pods 1000          # the same ramp, scaled to 1,000 pods
    .venv/bin/python bench/scale.py --pods 1000 --soak 20m
    .venv/bin/python bench/scale.py --memory-only        # per-pod cost of the pod cache

Each ramp step creates bare pods opted in by label (through the webhook), 50 redis-mode groups
round robin, waits until all are Running and Ready, and gives each pod K keys in Redis under
its address (as LMCache does). It then records the controller's RSS and how long after the
last pod became Ready every KVMeshPeerGroup's status was right. At the top step pods are
deleted at --rate per second; for each deletion the bench records when its group's status
stopped listing it (status convergence), when its keys were gone (purge), and, as the floor
any controller can reach, when its own watch saw the deletion. The baseline columns come from
the same run: the controller's RSS before any pod existed, and a naive purge (SCAN the whole
keyspace, GET every value) of one address at that size.

--soak DURATION follows the deletion phase with continuous churn at --rate (a create and a
delete alternately) for that long, then checks that no key or lmcache_controller registration
of a departed pod is left, that every group's status lists exactly the Ready pods the API
server has, and the RSS growth over the soak.

--controller-groups N (default 2) of the 50 groups run in controller mode: a real
lmcache_controller process per group bound to its lookup pod's IP (KWOK hands out loopback
addresses), and a simulated LMCache worker process per group registering each member as an
engine does; their purge is the time until lmcache_controller's listing no longer has the
deleted pod's workers. Each pair is ~0.5 GB and a core-second per registration burst, so not
all 50 groups run this way on a small machine.

The tables also show where the controller's time goes (its own metrics over the churn: work
queue wait, reconcile, purge, event-loop lag, lease renewal, API latency by verb and resource,
API requests per pod event) next to two baselines measured in the same run with no kvmesh
controller in the path: when the bench's own watch sees a deletion, and when a status write
the bench makes at that moment shows in its own watch (the floor for status convergence on
this API server at this load).

--controller-tree DIR runs the webhook and controller from another checkout's sources (e.g.
`git archive <commit> | tar -x -C DIR`), for a before/after comparison on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from kvmesh.core import groups, names  # noqa: E402

NS = "scale"
GROUP_COUNT = 50
KEYS_PER_POD = 20
IMAGE = "lmcache/vllm-openai:v0.3.6"  # a redis-mode (0.3.x) image
CONTROLLER_IMAGE = "lmcache/vllm-openai:v0.3.9"  # controller mode (LMCache >= 0.3.7)


# --------------------------------------------------------------------------- helpers


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(x: float) -> str:
    if x == float("inf"):
        return "> 30 s"  # past the top histogram bucket
    return "—" if x != x else f"{x * 1000:.0f} ms"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 20m, 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def group_of_pod(i: int, controller_groups: int) -> tuple[str, str]:
    """(mode, group) of the i-th pod: 50 groups round robin, the first `controller_groups` of
    them in controller mode."""
    g = i % GROUP_COUNT
    if g < controller_groups:
        return names.MODE_CONTROLLER, f"c{g:02d}"
    return names.MODE_REDIS, f"g{g:02d}"


def pod_manifest(name: str, group: str, mode: str = names.MODE_REDIS) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"app": "scale", names.LABEL_INJECT: names.INJECT_ENABLED},
                         "annotations": {names.ANN_GROUP: group, names.ANN_MODE: mode}},
            "spec": {"containers": [{"name": "vllm", "image": IMAGE if mode == names.MODE_REDIS
                                     else CONTROLLER_IMAGE,
                                     "command": ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct"]}]}}


class LookupControllers:
    """Controller-mode groups: a real lmcache_controller per group on its lookup pod's IP
    (KWOK gives the pod a loopback address; the ports are the StatefulSet's), and a simulated
    LMCache worker process registering each member's ranks the way an engine does
    (tests/backends/lmc_worker_sim.py). A member's purge is done when lmcache_controller's
    fresh per-instance listing no longer has it."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.ctrl: dict[str, object] = {}  # group label -> LMCacheController
        self.sim: dict[str, object] = {}
        self.starting: set[str] = set()
        self.lock: dict[str, asyncio.Lock] = {}
        self.failed: list[str] = []
        self.failed_labels: set[str] = set()

    async def start(self, label: str, ip: str) -> None:
        from lmcache_controller import LMCacheController, child_env
        sys.path.insert(0, str(HERE.parent / "tests" / "backends"))
        from lmc_worker_sim import WorkerSim
        self.starting.add(label)
        try:
            ctrl = await asyncio.to_thread(LMCacheController, ip, self.log_dir / label)
            self.ctrl[label] = ctrl
            await asyncio.to_thread(ctrl.wait_up, 180)
            sim = WorkerSim(ctrl.python, ctrl.pull_url, ctrl.reply_url, child_env(),
                            self.log_dir / f"{label}-sim.stderr")
            await asyncio.to_thread(sim.wait_ready, 180)
            self.lock[label] = asyncio.Lock()
            self.sim[label] = sim
            print(f"  lmcache_controller for {label} up on {ip}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported with the run's errors
            self.failed.append(f"lmcache_controller for {label} on {ip}: {e}")
            self.failed_labels.add(label)
            print(f"  lmcache_controller for {label} did not start: {e}", flush=True)

    async def register(self, label: str, m) -> None:
        async with self.lock[label]:
            for wid, port in enumerate(m.worker_ports or (8500,)):
                await asyncio.to_thread(self.sim[label].register, m.instance_id, wid, m.ip,
                                        port, f"{m.ip}:8200")

    async def registered(self, label: str, instance: str) -> Optional[bool]:
        from kvmesh.backends import lmcache_controller as lmc
        try:
            return bool(await lmc.workers(self.ctrl[label].http_url, instance, timeout=5))
        except Exception:  # noqa: BLE001 - asked again at the next poll
            return None

    def stop(self) -> None:
        for sim in self.sim.values():
            sim.close()
        for ctrl in self.ctrl.values():
            ctrl.stop()


def member(pod: dict):
    try:
        return groups.member_from_pod(pod)
    except Exception:  # noqa: BLE001 - a pod the webhook did not inject
        return None


def keys_of(name: str) -> list[str]:
    """The pod's lookup keys in LMCache 0.3.x's format (`<fmt>@<model>@<world size>@<worker>@<chunk
    hash in hex>`): the purge deletes only keys of that shape (issue 12), so a name in the hash
    field would never be purged and the bench would measure nothing."""
    h = hashlib.blake2b(name.encode(), digest_size=6).hexdigest()
    return [f"vllm@m@1@0@{h}{i:02x}" for i in range(KEYS_PER_POD)]


def parse_metrics(text: str) -> dict[tuple, float]:
    """Prometheus text -> {(name, (label, value)...): value}."""
    out: dict[tuple, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        name, _, rest = k.partition("{")
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', rest)))
        out[(name, labels)] = out.get((name, labels), 0.0) + float(v)
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def hist(d: dict, name: str, **want: str) -> tuple[float, list[tuple[float, float]]]:
    """(count, [(le, cumulative count)]) of a histogram over the series whose labels include
    `want` (summed)."""
    buckets: dict[float, float] = {}
    count = 0.0
    for (n, labels), v in d.items():
        lab = dict(labels)
        if any(lab.get(k) != x for k, x in want.items()):
            continue
        if n == name + "_bucket":
            le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
            buckets[le] = buckets.get(le, 0.0) + v
        elif n == name + "_count":
            count += v
    return count, sorted(buckets.items())


def hist_q(d: dict, name: str, q: float, **want: str) -> float:
    """Quantile q of a histogram as the upper bound of the bucket it falls in (an upper
    estimate, as coarse as the buckets)."""
    count, buckets = hist(d, name, **want)
    if not count:
        return float("nan")
    for le, c in buckets:
        if c >= q * count:
            return le
    return float("inf")


def counter(d: dict, name: str, **want: str) -> float:
    return sum(v for (n, labels), v in d.items() if n == name
               and all(dict(labels).get(k) == x for k, x in want.items()))


# --------------------------------------------------------------------------- per-pod memory


def memory_per_pod(n: int = 1000) -> None:
    """tracemalloc over n synthetic injected pods (the webhook's own output, with the fields a
    real API server adds): the full parsed pod (what each watch kept before) vs the compact
    record and Member the controller keeps now."""
    from support import injected_pod
    base = injected_pod(name="p", uid="u")
    base["metadata"].update(
        resourceVersion="123456", creationTimestamp="2026-01-01T00:00:00Z",
        generateName="m-7d9f8-", ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                    "name": "m-7d9f8", "uid": "r" * 36,
                                                    "controller": True,
                                                    "blockOwnerDeletion": True}],
        managedFields=[{"manager": m, "operation": "Update", "apiVersion": "v1",
                        "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:metadata": {"f:labels": {f"f:{k}": {} for k in "abcdef"}},
                                     "f:spec": {"f:containers": {f"k:{{\"name\":\"c{i}\"}}": {
                                         "f:env": {f"k:{{\"name\":\"E{j}\"}}": {} for j in range(12)}}
                                         for i in range(2)}}}}
                       for m in ("kube-controller-manager", "kubelet", "kvmesh")])
    base["spec"].update(nodeName="node-1", serviceAccountName="default", schedulerName="default",
                        tolerations=[{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                      "effect": "NoExecute", "tolerationSeconds": 300}] * 2,
                        volumes=[{"name": "kube-api-access", "projected": {"sources": [
                            {"serviceAccountToken": {"path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt"}}]}}])
    raw = json.dumps(base)

    def measure(keep) -> float:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        held = [keep(json.loads(raw.replace('"u"', f'"u{i}"'))) for i in range(n)]
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        del held
        return used / n

    full = measure(lambda p: p)
    compact = measure(groups.compact_pod)
    both = measure(lambda p: (lambda c: (c, groups.member_from_pod(c)))(groups.compact_pod(p)))
    print(f"\nper-pod memory (tracemalloc, {n} synthetic injected pods, "
          f"{len(raw)} bytes of JSON each, {len(json.dumps(base['metadata']['managedFields']))} "
          "of it managedFields):")
    print(f"  full parsed pod (kept by each of the two pod watches before): {full / 1024:.1f} KB")
    print(f"  compact record (the one pod watch now):                      {compact / 1024:.1f} KB")
    print(f"  compact record + Member (all the controller keeps per pod):   {both / 1024:.1f} KB")


# --------------------------------------------------------------------------- the run


class Run:
    def __init__(self, args, cluster, stack, kube, redis_client):
        self.args, self.cluster, self.stack, self.kube, self.r = args, cluster, stack, kube, redis_client
        self.pods: dict[str, dict] = {}  # name -> compact pod (the bench's own watch)
        self.ready_at: dict[str, float] = {}
        self.published: set[str] = set()
        self.status: dict[str, set[str]] = {}  # group label -> peer names in its status
        self.deleted_at: dict[str, float] = {}  # name -> when the delete was sent
        self.group_of: dict[str, str] = {}
        self.seen_gone: dict[str, float] = {}  # the bench's watch saw terminating/deleted
        self.status_gone: dict[str, float] = {}
        self.purged: dict[str, float] = {}
        self.errors: list[str] = []
        self.created = 0
        self.uninjected: list[str] = []  # pods the webhook timed out on (replaced)
        self.inflight: set[asyncio.Task] = set()
        # The floor for status convergence with no kvmesh controller in the path: the bench's
        # own watch sees the deletion, the bench writes one status (of a peer group only it
        # uses), its own watch sees that status.
        self.echo = groups.PeerGroupId(names.MODE_REDIS, "bench-echo")
        self.echoed: dict[str, float] = {}
        self.status_changed_at = 0.0  # when a group's peers in status last changed
        self.lookups = LookupControllers(Path(args.work) / "lmcache")
        self.ctrl_members: dict[str, tuple[str, str]] = {}  # name -> (group label, instance)
        self.waiting_registration: dict[str, list] = {}  # group label -> members
        # Members of a controller-mode group whose lmcache_controller failed to start: never
        # registered, so never deleted by the bench (reported with the errors).
        self.unregistrable: set[str] = set()

    # -- watches

    async def on_pod(self, type_, obj, old):
        name = obj["metadata"]["name"]
        if type_ == "DELETED" or obj["metadata"].get("deletionTimestamp"):
            if name in self.deleted_at and name not in self.seen_gone:
                self.seen_gone[name] = time.monotonic()
                self.spawn(self.echo_write(name))
            if type_ == "DELETED":
                self.pods.pop(name, None)
                return
        labels = obj["metadata"].get("labels") or {}
        lookup_for = labels.get(names.LABEL_LOOKUP_FOR)
        if lookup_for:
            ip = (obj.get("status") or {}).get("podIP")
            if ip and lookup_for.startswith(names.MODE_CONTROLLER) and \
                    lookup_for not in self.lookups.starting:
                self.spawn(self.start_lookup(lookup_for, ip))
            return
        self.pods[name] = obj
        m = member(obj)
        if m is not None and m.is_peer and name not in self.ready_at:
            self.ready_at[name] = time.monotonic()
            self.group_of[name] = m.peer_group.label
            if name not in self.deleted_at:
                if m.mode == names.MODE_CONTROLLER:
                    self.ctrl_members[name] = (m.peer_group.label, m.instance_id)
                    if m.peer_group.label in self.lookups.failed_labels:
                        self.unregistrable.add(name)
                    elif m.peer_group.label in self.lookups.sim:
                        self.spawn(self.register(name, m))
                    else:
                        self.waiting_registration.setdefault(m.peer_group.label, []).append(m)
                else:
                    self.spawn(self.publish(name, m.address))

    async def echo_write(self, name: str):
        from kvmesh.core import lookup
        try:
            await self.kube.apply({**lookup.peer_group(NS, self.echo),
                                   "status": {"lookupAddress": name}},
                                  manager="bench-echo", subresource="status")
        except Exception as e:  # noqa: BLE001 - a baseline sample lost, not a failed run
            print(f"  (echo write for {name} failed: {e})", flush=True)

    def leadership_lost(self) -> int:
        text = self.stack.controller.log_path.read_text(errors="replace")
        return text.count("lost leadership")

    def on_group(self, type_, obj, old):
        label = obj["metadata"]["name"]
        if label == self.echo.label:
            echoed = (obj.get("status") or {}).get("lookupAddress")
            if echoed and echoed not in self.echoed:
                self.echoed[echoed] = time.monotonic()
            return
        peers = {p.split("=", 1)[0] for p in (obj.get("status") or {}).get("peers") or []}
        if type_ == "DELETED":
            peers = set()
        now = time.monotonic()
        if self.status.get(label) != peers:
            self.status_changed_at = now
        self.status[label] = peers
        for name, t0 in self.deleted_at.items():
            if name not in self.status_gone and self.group_of.get(name) == label \
                    and name not in peers:
                self.status_gone[name] = now

    def spawn(self, coro):
        t = asyncio.create_task(coro)
        self.inflight.add(t)
        t.add_done_callback(self.inflight.discard)

    async def start_lookup(self, label: str, ip: str):
        await self.lookups.start(label, ip)
        for m in self.waiting_registration.pop(label, []):
            if label in self.lookups.failed_labels:
                self.unregistrable.add(m.name)
            else:
                self.spawn(self.register(m.name, m))

    async def register(self, name: str, m):
        try:
            await self.lookups.register(m.peer_group.label, m)
            self.published.add(name)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"register {name} with lmcache_controller: {e}")

    async def publish(self, name: str, address: str):
        async with self.r.pipeline(transaction=False) as p:
            for k in keys_of(name):
                p.set(k, address)
            await p.execute()
        self.published.add(name)

    # -- actions

    async def create(self, n: int, slots: asyncio.Semaphore):
        async def one(i):
            async with slots:
                mode, group = group_of_pod(i, self.args.controller_groups)
                for attempt in range(3):
                    name = f"p-{i:05d}" + (f"-r{attempt}" if attempt else "")
                    try:
                        got = await self.kube.create(pod_manifest(name, group, mode))
                    except Exception as e:  # noqa: BLE001
                        self.errors.append(f"create {name}: {e}")
                        return
                    if names.LABEL_PEER_GROUP in (got["metadata"].get("labels") or {}):
                        return
                    # Admitted without injection: the API server gave up on the webhook
                    # (failurePolicy Ignore, 3 s timeout) on an overloaded machine. Replaced,
                    # as kvmesh tells users to, and counted.
                    self.uninjected.append(name)
                    try:
                        await self.kube.delete("v1", "Pod", name, NS)
                    except Exception as e:  # noqa: BLE001 - it is no member: only noted
                        self.errors.append(f"delete uninjected {name}: {e!r}")
                self.errors.append(f"create p-{i:05d}: admitted without injection 3 times")
        start = self.created
        self.created += n
        await asyncio.gather(*(one(i) for i in range(start, start + n)))

    async def delete(self, name: str):
        self.deleted_at[name] = time.monotonic()
        try:
            await self.kube.delete("v1", "Pod", name, NS)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"delete {name}: {e}")

    async def wait(self, what, probe, timeout):
        deadline = time.monotonic() + timeout
        while not probe():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            if not self.stack.controller.alive():
                raise RuntimeError(f"the controller exited:\n{self.stack.controller.tail()}")
            await asyncio.sleep(0.05)
        return time.monotonic()

    def live_peers(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for name, p in self.pods.items():
            m = member(p)
            if m is not None and m.is_peer:
                out.setdefault(m.peer_group.label, set()).add(name)
        return out

    def status_right(self) -> bool:
        want = self.live_peers()
        return all(self.status.get(g, set()) == want.get(g, set())
                   for g in set(want) | {g for g, s in self.status.items() if s})

    async def controller_metrics(self) -> dict[tuple, float]:
        import aiohttp
        url = f"http://127.0.0.1:{self.stack.controller_metrics_port}/metrics"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return parse_metrics(await r.text())

    async def apiserver_calls(self) -> float:
        """Requests the API server served on the kinds only kvmesh's controller writes here
        (its own metrics: the same count with any controller version)."""
        try:
            resp = await self.kube._raw("GET", "/metrics", timeout=120)
            try:
                text = (await resp.read()).decode()
            finally:
                resp.release()
        except Exception as e:  # noqa: BLE001 - a figure missing, not a failed run
            print(f"  (API server metrics unreadable: {type(e).__name__} {e}; calls per event "
                  "left out)", flush=True)
            return float("nan")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels.get("verb") in ("WATCH", "CONNECT"):
                continue
            res, grp = labels.get("resource"), labels.get("group", "")
            if res in ("kvmeshpeergroups", "networkpolicies", "replicasets") or \
                    (res == "events" and grp == ""):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def naive_scan_seconds(self) -> float:
        """The baseline purge: SCAN everything, GET each value, delete what matches."""
        target = next(iter(self.published), None)
        t0 = time.perf_counter()
        cursor, n = 0, 0
        while True:
            cursor, ks = await self.r.scan(cursor=cursor, count=1000)
            if ks:
                vals = await self.r.mget(ks)
                n += sum(1 for v in vals if v == target)
            if cursor == 0:
                break
        return time.perf_counter() - t0

    async def poll_purges(self, stop: asyncio.Event):
        while not stop.is_set() or any(n not in self.purged for n in self.deleted_at
                                       if n in self.published):
            waiting = [n for n in self.deleted_at if n in self.published and n not in self.purged]
            ctrl = [n for n in waiting if n in self.ctrl_members]
            waiting = [n for n in waiting if n not in self.ctrl_members]
            if ctrl:
                found = await asyncio.gather(*(self.lookups.registered(*self.ctrl_members[n])
                                               for n in ctrl))
                now = time.monotonic()
                for n, reg in zip(ctrl, found):
                    if reg is False:
                        self.purged[n] = now
            if waiting:
                # One key per pod per poll (the bench must not load the Redis it measures);
                # a pod whose first key is gone is confirmed with all of them.
                async with self.r.pipeline(transaction=False) as p:
                    for n in waiting:
                        p.exists(keys_of(n)[0])
                    first = await p.execute()
                gone = [n for n, c in zip(waiting, first) if c == 0]
                if gone:
                    async with self.r.pipeline(transaction=False) as p:
                        for n in gone:
                            p.exists(*keys_of(n))
                        counts = await p.execute()
                    now = time.monotonic()
                    for n, c in zip(gone, counts):
                        if c == 0:
                            self.purged[n] = now
            await asyncio.sleep(0.01)
            if stop.is_set() and time.monotonic() > self.purge_deadline:
                return

    # -- phases

    async def ramp(self, targets: list[int]) -> list[dict]:
        slots = asyncio.Semaphore(self.args.create_concurrency)
        rows = []
        for target in targets:
            t_create = time.monotonic()
            await self.create(target - self.created, slots)
            created = time.monotonic() - t_create
            await self.wait(f"{target} Ready pods",
                            lambda: sum(1 for n in self.ready_at if n in self.pods) >= target
                            and len(self.published) + len(self.unregistrable) >= target,
                            # + starting lmcache_controller and the worker simulators (each
                            # imports LMCache; minutes on a loaded machine)
                            timeout=60 + target * 0.2 + (300 if self.args.controller_groups
                                                         and target == targets[0] else 0))
            last_ready = max(self.ready_at.values())
            if self.status_right():  # right already: since the status write that made it so
                t_ok = max(last_ready, self.status_changed_at)
            else:
                t_ok = await self.wait("every group's status right", self.status_right, 120)
            rows.append({"pods": target, "rss": rss_mb(self.stack.controller.proc.pid),
                         "converged": t_ok - last_ready, "create_s": created,
                         "naive": await self.naive_scan_seconds(), "load": load()})
            print(f"  step {target} pods: created in {created:.0f}s, status right "
                  f"{rows[-1]['converged']:.2f}s after the last pod Ready, RSS "
                  f"{rows[-1]['rss']:.0f} MB, load {load()}", flush=True)
        return rows

    async def churn(self, deletions: int, rate: float, soak: float = 0.0) -> dict:
        stop = asyncio.Event()
        self.purge_deadline = float("inf")
        poller = asyncio.create_task(self.poll_purges(stop))
        m0 = await self.controller_metrics()
        a0 = await self.apiserver_calls()
        rss0 = rss_mb(self.stack.controller.proc.pid)
        t_start = time.monotonic()
        t_end = time.monotonic() + soak
        slots = asyncio.Semaphore(self.args.create_concurrency)
        n = 0
        next_at = time.monotonic()
        while (n < deletions) if not soak else (time.monotonic() < t_end):
            if soak and n % 2 == 1:
                self.spawn(self.create(1, slots))
            else:
                victims = [p for p in self.published if p in self.pods
                           and p not in self.deleted_at]
                if victims:
                    self.spawn(self.delete(random.choice(victims)))
            n += 1
            next_at += 1.0 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*list(self.inflight), return_exceptions=True)
        stop.set()
        self.purge_deadline = time.monotonic() + 30
        done = lambda: all(x in self.status_gone and (x in self.purged or x not in self.published)  # noqa: E731
                           for x in self.deleted_at)
        try:
            await self.wait("every deletion's status and purge", done, 30)
        except TimeoutError as e:
            self.errors.append(str(e))
        await poller
        m1 = await self.controller_metrics()
        a1 = await self.apiserver_calls()
        d = list(self.deleted_at)
        status = [self.status_gone[x] - self.deleted_at[x] for x in d if x in self.status_gone]
        purge = [self.purged[x] - self.deleted_at[x] for x in d if x in self.purged
                 and x not in self.ctrl_members]
        purge_ctrl = [self.purged[x] - self.deleted_at[x] for x in d if x in self.purged
                      and x in self.ctrl_members]
        seen = [self.seen_gone[x] - self.deleted_at[x] for x in d if x in self.seen_gone]
        share = [self.status_gone[x] - self.seen_gone[x] for x in d
                 if x in self.seen_gone and x in self.status_gone]
        missing = [x for x in d if x not in self.status_gone]
        calls = a1 - a0
        events = 2 * len(d) + (len(d) if soak else 0)  # terminating + deleted (+ a creation)
        return {"deletions": len(d), "status": status, "purge": purge, "seen": seen,
                "purge_ctrl": purge_ctrl,
                "share": share,
                "missing": missing, "unpurged": [x for x in d if x in self.published
                                                 and x not in self.purged],
                "ctrl_errors": counter(delta(m1, m0), "kvmesh_controller_errors_total"),
                "metrics": delta(m1, m0), "ctrl_calls": counter(
                    delta(m1, m0), "kvmesh_controller_api_requests_total"),
                "events": events, "seconds": time.monotonic() - t_start,
                "echo": [self.echoed[x] - self.seen_gone[x] for x in d
                         if x in self.echoed and x in self.seen_gone],
                "leadership_lost": self.leadership_lost(),
                "calls_per_event": calls / events if events else float("nan"),
                "rss0": rss0, "rss1": rss_mb(self.stack.controller.proc.pid), "load": load()}

    async def soak_checks(self) -> dict:
        """After the churn: stale keys of departed pods, status vs the API server."""
        await asyncio.sleep(3)
        departed = [x for x in self.deleted_at if x not in self.pods]
        stale = 0
        for i in range(0, len(departed), 200):
            async with self.r.pipeline(transaction=False) as p:
                for x in departed[i:i + 200]:
                    p.exists(*keys_of(x))
                stale += sum(await p.execute())
        stale_workers = 0
        for x in departed:
            if x in self.ctrl_members and x in self.published:
                stale_workers += bool(await self.lookups.registered(*self.ctrl_members[x]))
        pods = await self.kube.list("v1", "Pod", NS)
        want: dict[str, set[str]] = {}
        for p in pods:
            m = member(p)
            if m is not None and m.is_peer:
                want.setdefault(m.peer_group.label, set()).add(p["metadata"]["name"])
        crs = await self.kube.list(f"{names.API_GROUP}/{names.API_VERSION}",
                                   names.PEER_GROUP_KIND, NS)
        mismatched = 0
        for cr in crs:
            if cr["metadata"]["name"] == self.echo.label:
                continue
            have = {x.split("=", 1)[0] for x in (cr.get("status") or {}).get("peers") or []}
            mismatched += have != want.get(cr["metadata"]["name"], set())
        return {"departed": len(departed), "stale_keys": stale, "groups": len(crs) - 1,
                "stale_workers": stale_workers,
                "status_mismatches": mismatched}


def printed(fn, *args) -> None:
    """A report table; a bug in printing must not cost the run (the raw figures are dumped)."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        print(f"(could not print {fn.__name__}: {e!r}; raw figures in --keep-logs)", flush=True)


def dump(args, phase: str, rows, churn, soak=None) -> None:
    """The raw figures as JSON next to the logs (--keep-logs), written before printing."""
    if not args.keep_logs:
        return
    args.keep_logs.mkdir(parents=True, exist_ok=True)
    c = {k: v for k, v in churn.items() if k != "metrics"}
    c["metrics"] = [[k[0], dict(k[1]), v] for k, v in churn["metrics"].items() if v]
    (args.keep_logs / f"{phase}.json").write_text(json.dumps(
        {"ramp": rows, "churn": c, "soak": soak}, default=str))


def print_ramp(args, idle_rss, rows):
    print(f"\n=== kvmesh controller at scale: {rows[-1]['pods']:,} pods, {GROUP_COUNT} groups "
          f"({GROUP_COUNT - args.controller_groups} redis mode on one real redis-server with "
          f"{KEYS_PER_POD} keys/pod, {args.controller_groups} controller mode each with a real "
          f"lmcache_controller), pod events at {args.rate:g}/s (load average now: {load()}, "
          f"{os.cpu_count()} cores)")
    print(f"\n| pods | controller RSS (baseline: idle {idle_rss:.0f} MB) | status right after "
          "the last pod Ready | naive purge of one address (SCAN+GET) | load avg |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pods']:,} | {r['rss']:.0f} MB | {r['converged']:.2f} s | "
              f"{ms(r['naive'])} | {r['load']} |")


def print_churn(args, rows, churn, soak_result=None):
    c = churn
    label = (f"soak: {args.soak / 60:g} min of creations and deletions at {args.rate:g}/s"
             if soak_result else f"{c['deletions']} deletions at {args.rate:g}/s")
    print(f"\n| {label}, {rows[-1]['pods']:,} pods (load average at the end: {c['load']}) "
          "| p50 | p99 | max |")
    print("|---|---|---|---|")
    for what, xs in (("status convergence (pod gone from its group's status)", c["status"]),
                     ("purge, redis mode (all its keys gone from Redis)", c["purge"]),
                     (f"purge, controller mode (its workers gone from lmcache_controller; "
                      f"{args.controller_groups} groups)", c["purge_ctrl"]),
                     ("baseline: the bench's own watch sees the deletion", c["seen"]),
                     ("baseline, no controller: seen -> one status write -> seen by the "
                      "bench's watch", c["echo"]),
                     ("status convergence minus the bench's watch (per pod)", c["share"])):
        print(f"| {what} | {ms(pct(xs, 50))} | {ms(pct(xs, 99))} | {ms(max(xs) if xs else float('nan'))} |")
    print(f"\nAPI server: requests on kvmesh's kinds per pod event: {c['calls_per_event']:.2f}"
          f"   controller errors: {c['ctrl_errors']:.0f}   missed status: {len(c['missing'])}"
          f"   unpurged: {len(c['unpurged'])}   bench errors: {len(args.errors)}   pods "
          f"admitted without injection (webhook timeout, replaced): {len(args.uninjected)}   RSS "
          f"{c['rss0']:.0f} -> {c['rss1']:.0f} MB")
    m = c["metrics"]
    print(f"\nwhere the controller's time goes over the churn ({c['seconds']:.0f} s; its own "
          "metrics; p50/p99 are histogram bucket upper bounds):")
    print("| what | count | p50 | p99 |")
    print("|---|---|---|---|")
    trows = [("work-queue wait, event priority", "kvmesh_controller_queue_wait_seconds",
             {"priority": "event"}),
            ("work-queue wait, resync priority", "kvmesh_controller_queue_wait_seconds",
             {"priority": "resync"}),
            ("one group reconcile", "kvmesh_controller_reconcile_duration_seconds", {}),
            ("one purge", "kvmesh_controller_purge_duration_seconds", {}),
            ("event-loop lag (a 0.1 s timer)", "kvmesh_controller_event_loop_lag_seconds", {}),
            ("lease renewal (retries included)",
             "kvmesh_controller_lease_renew_duration_seconds", {})]
    calls = sorted({(dict(k[1]).get("verb"), dict(k[1]).get("resource")) for k in m
                    if k[0] == "kvmesh_controller_api_request_duration_seconds_count"})
    trows += [(f"API {verb} {res}", "kvmesh_controller_api_request_duration_seconds",
              {"verb": verb, "resource": res}) for verb, res in calls]
    for what, name, want in trows:
        n = hist(m, name, **want)[0]
        if n:
            print(f"| {what} | {n:.0f} | {ms(hist_q(m, name, 0.5, **want))} | "
                  f"{ms(hist_q(m, name, 0.99, **want))} |")
    failed = sum(v for (n, lab), v in m.items() if n == "kvmesh_controller_api_requests_total"
                 and not dict(lab).get("code", "").startswith("2") and v)
    print(f"controller API requests per pod event: {c['ctrl_calls'] / max(1, c['events']):.2f} "
          f"({c['ctrl_calls']:.0f} for {c['events']} events; non-2xx or no answer: {failed:.0f});"
          f" lease renewal errors {counter(m, 'kvmesh_controller_lease_renew_errors_total'):.0f};"
          f" leadership lost {c['leadership_lost']} times in the whole run")
    if soak_result:
        s = soak_result
        print(f"soak {args.soak:.0f}s: {s['departed']} departed pods, stale keys {s['stale_keys']}, "
              f"stale lmcache_controller registrations {s['stale_workers']}, "
              f"groups {s['groups']}, status mismatches {s['status_mismatches']}, RSS growth "
              f"{c['rss1'] - c['rss0']:+.1f} MB")
    for e in args.errors[:10] + args.lookup_failures:
        print("  error:", e)


async def run_async(args, cluster, stack, redis_port):
    import redis.asyncio as aredis
    from kvmesh.kube import connect
    from kvmesh.kube.api import CRD_API
    kube = await connect.api_client(cluster.kubeconfig)
    r = aredis.Redis(host="127.0.0.1", port=redis_port, decode_responses=True)
    run = Run(args, cluster, stack, kube, r)
    args.errors = run.errors
    args.lookup_failures = run.lookups.failed
    args.uninjected = run.uninjected
    pods_inf = kube.informer("v1", "Pod", namespace=NS, handlers=[run.on_pod],
                             name="bench pods", transform=groups.compact_pod)
    crs_inf = kube.informer(CRD_API, names.PEER_GROUP_KIND, namespace=NS,
                            handlers=[run.on_group], name="bench peer groups")
    tasks = [asyncio.create_task(pods_inf.run()), asyncio.create_task(crs_inf.run())]
    try:
        from kvmesh.core import lookup
        await kube.apply(lookup.peer_group(NS, run.echo), manager="bench-echo")
        await pods_inf.has_synced.wait()
        await crs_inf.has_synced.wait()
        await asyncio.sleep(5)  # the controller leads and settles
        idle = rss_mb(stack.controller.proc.pid)
        top = args.pods
        targets = sorted({max(1, top // 10), max(1, top // 2), top})
        print(f"controller idle: RSS {idle:.0f} MB, load {load()}", flush=True)
        rows = await run.ramp(targets)
        churn = await run.churn(args.deletions or max(10, top * 600 // 5000), args.rate)
        dump(args, "deletions", rows, churn)
        print_ramp(args, idle, rows)
        printed(print_churn, args, rows, churn)
        soak = None
        if args.soak:
            print(f"\nsoak: {args.soak:.0f} s of churn at {args.rate:g}/s ...", flush=True)
            churn = await run.churn(0, args.rate, soak=args.soak)
            soak = await run.soak_checks()
            dump(args, "soak", rows, churn, soak)
            printed(print_churn, args, rows, churn, soak)
        bad = churn["missing"] or churn["unpurged"] or run.errors or churn["ctrl_errors"] \
            or (soak and (soak["stale_keys"] or soak["status_mismatches"]
                          or soak["stale_workers"])) or run.lookups.failed
        return 1 if bad else 0
    finally:
        run.lookups.stop()
        for i in (pods_inf, crs_inf):
            i.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await r.aclose()
        await kube.close()


def stage_tree(src: Path, dst: Path) -> Path:
    """A checkout's sources as an importable `kvmesh` package (the repo maps kvmesh.webhook,
    .controller and .certs to top-level folders, see pyproject.toml)."""
    import shutil
    shutil.copytree(src / "kvmesh", dst / "kvmesh")
    for sub in ("webhook", "controller", "certs"):
        shutil.copytree(src / sub, dst / "kvmesh" / sub)
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=5000, help="top of the ramp (steps at 1/10, "
                    "1/2 and all of it)")
    ap.add_argument("--deletions", type=int, default=0,
                    help="deletions at the top (default: 600 per 5,000 pods)")
    ap.add_argument("--rate", type=float, default=10.0, help="pod events sent per second")
    ap.add_argument("--soak", type=duration, default=0.0, help="churn this long (e.g. 20m)")
    ap.add_argument("--create-concurrency", type=int, default=16)
    ap.add_argument("--controller-tree", type=Path, help="run webhook/controller from here")
    ap.add_argument("--keep-logs", type=Path, help="copy the webhook/controller logs here")
    ap.add_argument("--controller-groups", type=int, default=2,
                    help="how many of the 50 groups run in controller mode, each with a real "
                         "lmcache_controller process (and a simulated worker process)")
    ap.add_argument("--kwok-parallelism", type=int, default=16,
                    help="pod stages KWOK plays at once (its default, 4, cannot keep up)")
    ap.add_argument("--memory-only", action="store_true", help="only the per-pod memory figure")
    args = ap.parse_args()
    memory_per_pod()
    if args.memory_only:
        return 0
    from kvmesh.local.devcluster import DevCluster, build_binaries
    from kvmesh.local.localstack import LocalStack
    from support import RedisServer
    with tempfile.TemporaryDirectory(prefix="kvmesh-scale-") as tmp:
        tmp = Path(tmp)
        args.work = tmp
        redis_server = RedisServer(tmp, "--maxmemory", "0")
        redis_server.start()
        policy = tmp / "policy.yaml"
        policy.write_text(f"redisAddress: 127.0.0.1:{redis_server.port}\nmode: redis\n")
        if args.controller_tree:
            os.environ["PYTHONPATH"] = str(stage_tree(args.controller_tree.resolve(),
                                                      tmp / "tree"))
            os.chdir(tmp)  # `python -m` puts the working directory first on the path
        # KWOK plays pod stages 4 at a time by default: on a busy machine (API writes of
        # ~0.5 s) that is ~5 pods/s, below the churn rate. KWOK reads ~/.kwok/kwok.yaml and
        # DevCluster gives it the cluster's work directory as HOME; a configuration file
        # replaces all options, so the others get KWOK's defaults back.
        (tmp / "c" / ".kwok").mkdir(parents=True)
        (tmp / "c" / ".kwok" / "kwok.yaml").write_text(
            "apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\noptions:\n"
            f"  podPlayStageParallelism: {args.kwok_parallelism}\n"
            "  nodePlayStageParallelism: 4\n  nodeLeaseParallelism: 4\n"
            "  podsOnNodeSyncParallelism: 4\n")
        # A generous start timeout: on a machine shared with other work the API server alone
        # has taken minutes to become ready.
        cluster = DevCluster(build_binaries(), nodes=max(2, args.pods // 100 + 1),
                             workdir=tmp / "c", start_timeout=600)
        cluster.start()
        stack = LocalStack(cluster, tmp / "s")
        try:
            for attempt in range(3):  # kubectl gives up after 60 s on a slow API server
                try:
                    stack.apply_manifests()
                    break
                except Exception as e:  # noqa: BLE001 - retried, then raised
                    if attempt == 2:
                        raise
                    print(f"  applying the manifests failed ({type(e).__name__}); again",
                          flush=True)
            # LocalStack.restart, with minutes (not 90 s) for the webhook to become ready: its
            # certificate needs the controller to lead first, on a slow API server.
            stack.down()
            stack.start_controller("--policy", str(policy))
            stack.start_webhook("--policy", str(policy))
            stack.wait("the webhook to be ready (its certificate trusted by the API server)",
                       stack.webhook_ready, timeout=600)
            cluster.create_namespace(NS)
            return asyncio.run(run_async(args, cluster, stack, redis_server.port))
        finally:
            stack.down()
            cluster.stop()
            redis_server.stop()
            if args.keep_logs:
                import shutil
                shutil.copytree(tmp / "s", args.keep_logs, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("certs"))
                print(f"webhook and controller logs: {args.keep_logs}")


if __name__ == "__main__":
    sys.exit(main())
