"""controller/workload_events.py: which statuses become Events, on which workload, how often.
The API is a small in-memory stand-in here (GETs counted);
tests/e2e/test_workload_events_on_cluster.py runs the same code against the real API server."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, Counter

from kvmesh.controller import workload_events as we
from kvmesh.core import names

NS = "team-a"


class Api:
    def __init__(self, objects: dict | None = None, fail: bool = False):
        self.objects = objects or {}  # (kind, name) -> object
        self.gets: list[tuple[str, str]] = []
        self.events: list[tuple[dict, str, str, str]] = []  # every Event recorded
        self.kept: list[tuple[dict, str, str, str]] = []  # those the API server still holds
        self.fail = fail

    async def get(self, api_version, kind, name, namespace=None):
        self.gets.append((kind, name))
        if self.fail:
            raise RuntimeError("403 Forbidden")
        return self.objects.get((kind, name))

    async def event(self, involved, reason, message, type_="Normal"):
        self.events.append((involved, reason, message, type_))
        self.kept.append((involved, reason, message, type_))

    async def list(self, api_version, kind, namespace=None, field_selector=None):
        """Events as the API server lists them for `involvedObject.uid=...,reason=...`."""
        sel = dict(kv.split("=", 1) for kv in field_selector.split(","))
        return [{"involvedObject": i, "reason": r, "message": m,
                 "source": {"component": "kvmesh-controller"}} for i, r, m, _ in self.kept
                if i["uid"] == sel["involvedObject.uid"] and r == sel["reason"]]


class Metrics:
    def __init__(self):
        r = CollectorRegistry()
        self.workload_events = Counter("e", "", ["kind", "reason"], registry=r)
        self.workload_events_dropped = Counter("d", "", registry=r)


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def owned(kind: str, name: str, owner_kind: str | None = None, owner: str | None = None,
          api_version: str = "apps/v1") -> dict:
    meta = {"name": name, "namespace": NS, "uid": f"uid-{kind}-{name}"}
    if owner_kind:
        meta["ownerReferences"] = [{"apiVersion": api_version, "kind": owner_kind,
                                    "name": owner, "uid": f"uid-{owner_kind}-{owner}",
                                    "controller": True}]
    return {"kind": kind, "metadata": meta}


def pod(name: str, status: dict | str | None, owner_kind="ReplicaSet", owner="rs-1") -> dict:
    p = owned("Pod", name, owner_kind, owner)
    if status is not None:
        raw = status if isinstance(status, str) else json.dumps(status)
        p["metadata"]["annotations"] = {names.ANN_STATUS: raw}
    return p


SKIP = {"injected": False, "reason": "disaggregated-prefill", "container": "vllm",
        "message": "container 'vllm' is a kv_producer"}


def deployment_api() -> Api:
    return Api({("ReplicaSet", "rs-1"): owned("ReplicaSet", "rs-1", "Deployment", "d"),
                ("ReplicaSet", "rs-2"): owned("ReplicaSet", "rs-2", "Deployment", "d")})


def test_findings_from_status():
    assert we.findings(json.dumps(SKIP)) == [
        we.Finding("skipped", "disaggregated-prefill", "container 'vllm' is a kv_producer")]
    st = {"injected": True, "mode": "controller", "future-field": {"x": 1},
          "reductions": [{"reason": "cache-reduced-to-fit", "message": "5 GB -> 1.5 GB"},
                         "plain text"],
          "warnings": ["w1", "w2"]}
    assert we.findings(json.dumps(st)) == [
        we.Finding("reduced", "cache-reduced-to-fit", "5 GB -> 1.5 GB"),
        we.Finding("reduced", "reductions", "plain text"),
        we.Finding("warned", "warnings", "w1; w2")]
    single = {"injected": True, "reduced": {"what": "cpu-cache", "from": 5, "to": 1.5}}
    [f] = we.findings(json.dumps(single))
    assert (f.kind, f.reason) == ("reduced", "cpu-cache") and "to: 1.5" in f.message
    adjusted = {"injected": True, "adjusted": "LMCache CPU cache reduced from 5 GB to 1.5 GB"}
    assert we.findings(json.dumps(adjusted)) == [
        we.Finding("reduced", "adjusted", "LMCache CPU cache reduced from 5 GB to 1.5 GB")]
    assert we.findings(json.dumps({"injected": True, "mode": "redis"})) == []
    for garbage in (None, "", "{", "[1]", '"x"'):
        assert we.findings(garbage) == []
    # A reason that is not kvmesh's kind of label does not become a metrics label.
    odd = we.findings(json.dumps({"injected": False, "reason": "X" * 80, "message": "m"}))
    assert odd[0].reason == "other"


def test_denial_from_failed_create():
    ev = {"reason": "FailedCreate", "message": 'Error creating: admission webhook '
          '"pods.kvmesh.dev" denied the request: kvmesh: container \'x\' runs no vLLM server'}
    f = we.denial(ev)
    assert f.kind == "denied" and f.message == "container 'x' runs no vLLM server"
    assert we.denial({**ev, "reason": "SuccessfulCreate"}) is None
    assert we.denial({"reason": "FailedCreate", "message": "quota exceeded"}) is None


async def test_twenty_replicas_one_get_one_event_on_the_deployment():
    api, m = deployment_api(), Metrics()
    ev = we.WorkloadEvents(api, m)
    for i in range(20):
        await ev.on_pod("ADDED", pod(f"p{i}", SKIP), None)
        await ev.on_pod("MODIFIED", pod(f"p{i}", SKIP), None)  # decided once, at admission
    await ev.drain()
    assert api.gets == [("ReplicaSet", "rs-1")]
    [(involved, reason, message, type_)] = api.events
    assert (involved["kind"], involved["name"], involved["uid"]) == \
        ("Deployment", "d", "uid-Deployment-d")
    assert involved["namespace"] == NS and reason == "InjectionSkipped" and type_ == "Warning"
    assert "disaggregated-prefill" in message and "kv_producer" in message
    assert m.workload_events.labels("skipped", "disaggregated-prefill")._value.get() == 1
    # A rollout's new ReplicaSet: same Deployment, same reason -> nothing new.
    await ev.on_pod("ADDED", pod("q", SKIP, owner="rs-2"), None)
    await ev.drain()
    assert len(api.events) == 1
    # Another reason is another Event.
    other = {**SKIP, "reason": "image-unsupported", "message": "rocm"}
    await ev.on_pod("ADDED", pod("r", other, owner="rs-2"), None)
    await ev.drain()
    assert [e[2].split("(")[1].split(")")[0] for e in api.events] == \
        ["disaggregated-prefill", "image-unsupported"]


async def test_a_restarted_controller_does_not_say_it_again():
    api = deployment_api()
    first = we.WorkloadEvents(api)
    await first.on_pod("ADDED", pod("a", SKIP), None)
    await first.drain()
    again = we.WorkloadEvents(api)  # new process or new leader: the informer replays ADDED
    for name in ("a", "b"):
        await again.on_pod("ADDED", pod(name, SKIP), None)
    other = {**SKIP, "reason": "image-unsupported", "message": "rocm"}
    await again.on_pod("ADDED", pod("c", other), None)
    await again.drain()
    assert [e[1] for e in api.events] == ["InjectionSkipped", "InjectionSkipped"]
    assert "(image-unsupported)" in api.events[1][2]


async def test_said_again_after_the_repeat_period():
    api, clock = deployment_api(), Clock()
    ev = we.WorkloadEvents(api, now=clock, repeat=600)
    await ev.on_pod("ADDED", pod("a", SKIP), None)
    await ev.drain()
    clock.t += 599
    await ev.on_pod("ADDED", pod("b", SKIP), None)
    await ev.drain()
    assert len(api.events) == 1
    clock.t += 2
    api.kept.clear()  # the API server's event-ttl (1 h by default) has passed too
    await ev.on_pod("ADDED", pod("c", SKIP), None)
    await ev.drain()
    assert len(api.events) == 2


async def test_rate_limit_drops_and_says_it_with_a_later_pod():
    objs = {("ReplicaSet", f"rs{i}"): owned("ReplicaSet", f"rs{i}", "Deployment", f"d{i}")
            for i in range(5)}
    api, m, clock = Api(objs), Metrics(), Clock()
    ev = we.WorkloadEvents(api, m, now=clock, rate=1.0, burst=2)
    for i in range(5):
        await ev.on_pod("ADDED", pod(f"p{i}", SKIP, owner=f"rs{i}"), None)
    await ev.drain()
    assert len(api.events) == 2 and m.workload_events_dropped._value.get() == 3
    clock.t += 10  # tokens refill; the next pod of a dropped workload is reported
    await ev.on_pod("ADDED", pod("p4-again", SKIP, owner="rs4"), None)
    await ev.drain()
    assert api.events[-1][0]["name"] == "d4"


async def test_reductions_and_warnings_of_injected_pods():
    api = deployment_api()
    ev = we.WorkloadEvents(api)
    st = {"injected": True, "mode": "controller", "warnings": ["LMCACHE_USE_EXPERIMENTAL"],
          "reductions": [{"reason": "cache-reduced-to-fit", "message": "5 -> 1.5 GB"}]}
    for i in range(3):
        await ev.on_pod("ADDED", pod(f"p{i}", st), None)
    await ev.drain()
    assert sorted(e[1] for e in api.events) == ["InjectionReduced", "InjectionWarning"]
    assert all(e[0]["kind"] == "Deployment" for e in api.events)
    await ev.on_pod("ADDED", pod("plain", {"injected": True, "mode": "redis"}), None)
    await ev.drain()
    assert len(api.events) == 2


async def test_bare_pod_and_unreadable_owner():
    api = Api(fail=True)
    ev = we.WorkloadEvents(api)
    await ev.on_pod("ADDED", pod("bare", SKIP, owner_kind=None), None)
    await ev.on_pod("ADDED", pod("p", SKIP, owner="rs-x"), None)
    await ev.drain()
    # The bare pod is its own workload (no GET); the ReplicaSet that could not be read is
    # where the Event goes instead of nowhere.
    assert [(e[0]["kind"], e[0]["name"]) for e in api.events] == \
        [("Pod", "bare"), ("ReplicaSet", "rs-x")]
    assert api.gets == [("ReplicaSet", "rs-x")]


async def test_leaderworkerset_worker_walks_up_to_the_leaderworkerset():
    lws = ("LeaderWorkerSet", "lws")
    api = Api({("StatefulSet", "lws-0"): owned("StatefulSet", "lws-0", "Pod", "lws-0", "v1"),
               ("Pod", "lws-0"): owned("Pod", "lws-0", "StatefulSet", "lws"),
               ("StatefulSet", "lws"): owned("StatefulSet", "lws", *lws,
                                             api_version="leaderworkerset.x-k8s.io/v1")})
    ev = we.WorkloadEvents(api)
    await ev.on_pod("ADDED", pod("lws-0-1", SKIP, owner_kind="StatefulSet", owner="lws-0"), None)
    await ev.drain()
    [(involved, *_)] = api.events
    assert (involved["kind"], involved["name"], involved["apiVersion"]) == \
        ("LeaderWorkerSet", "lws", "leaderworkerset.x-k8s.io/v1")


@pytest.mark.parametrize("owned_rs,expect", [(True, [("Deployment", "d")]), (False, [])])
async def test_denial_goes_above_the_replicaset(owned_rs, expect):
    api = deployment_api() if owned_rs else Api({("ReplicaSet", "rs-1"):
                                                 owned("ReplicaSet", "rs-1")})
    ev = we.WorkloadEvents(api)
    failed = {"reason": "FailedCreate",
              "involvedObject": {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs-1",
                                 "namespace": NS, "uid": "uid-ReplicaSet-rs-1"},
              "message": 'Error creating: admission webhook "x" denied the request: kvmesh: '
                         "kvmesh.dev/container names 'sidecar', which runs no vLLM server"}
    for _ in range(5):  # the ReplicaSet controller retries: the Event is updated each time
        await ev.on_event("MODIFIED", failed, None)
    await ev.drain()
    assert [(e[0]["kind"], e[0]["name"]) for e in api.events] == expect
    if expect:
        assert api.events[0][1] == "InjectionDenied" and "'sidecar'" in api.events[0][2]


# --- which watch sees which pod: the skip label closes the namespace/policy opt-in gap --------

class Watches(Api):
    """Api plus informers that list a fixed set of pods through their label selector (the
    API server's `k`, `!k`, `k=v` forms) and transform, as kvmesh.kube.informer does once."""

    def __init__(self, pods: list[dict], objects: dict):
        super().__init__(objects)
        self.pods, self.cached = pods, {}  # watch name -> stubs it holds

    def informer(self, api_version, kind, *, label_selector, handlers, name, transform):
        def selected(labels: dict) -> bool:
            for term in label_selector.split(","):
                k, _, v = term.partition("=")
                if (k[1:] in labels if k.startswith("!") else
                        labels.get(k) != v if v else k not in labels):
                    return False
            return True

        async def run():
            held = self.cached[name] = [transform(p) for p in self.pods
                                        if selected(p["metadata"].get("labels") or {})]
            for stub in held:
                for h in handlers:
                    await h("ADDED", stub, None)
        return type("Informer", (), {"run": staticmethod(run)})()


async def test_a_pod_opted_in_by_its_namespace_is_reported_once_like_a_labelled_one():
    from kvmesh.controller import optin
    from kvmesh.core.inject import Context, decide

    def vllm_pod(name, owner, labels, *args):
        p = owned("Pod", name, "ReplicaSet", owner)
        p["metadata"]["labels"] = labels
        p["spec"] = {"containers": [{"name": "vllm", "image": "lmcache/vllm-openai:v0.3.9",
                                     "command": ["vllm", "serve", "m", *args]}]}
        return p

    # As the webhook admits them: the pods' own labels, or the namespace's (selected=True).
    by_ns, by_label = Context(NS, selected=True), Context(NS)
    enabled = {names.LABEL_INJECT: names.INJECT_ENABLED}
    admitted = [decide(vllm_pod("ns-0", "rs-ns", {"app": "a"}, "-tp", "2"), by_ns).pod,
                decide(vllm_pod("ns-1", "rs-ns", {"app": "a"}, "-tp", "2"), by_ns).pod,
                decide(vllm_pod("lab-0", "rs-lab", dict(enabled), "-tp", "2"), by_label).pod,
                vllm_pod("missed", "rs-lab", dict(enabled)),  # the webhook never saw it
                decide(vllm_pod("ok", "rs-ok", dict(enabled)), by_label).pod]
    assert names.LABEL_INJECT not in admitted[0]["metadata"]["labels"]
    assert names.LABEL_PEER_GROUP in admitted[-1]["metadata"]["labels"]  # injected
    objs = {("ReplicaSet", rs): owned("ReplicaSet", rs, "Deployment", d)
            for rs, d in (("rs-ns", "by-namespace"), ("rs-lab", "by-label"), ("rs-ok", "ok"))}
    api, m = Watches(admitted, objs), Metrics()
    m.uninjected = Counter("u", "", registry=CollectorRegistry())
    ev = we.WorkloadEvents(api, m)
    await optin.watch_uninjected(api, m, ev)
    await we.run_skipped(api, ev)
    await ev.drain()
    held = {w: [s["metadata"]["name"] for s in stubs] for w, stubs in api.cached.items()}
    assert held == {"opted-in pods not injected": ["missed"],
                    "skipped pods": ["ns-0", "ns-1", "lab-0"]}  # each pod in one watch
    # The stub is compact: name, namespace, uid, the status, the controller reference.
    assert set(api.cached["skipped pods"][0]["metadata"]) == {
        "name", "namespace", "uid", "annotations", "ownerReferences"}
    skipped = sorted((e[0]["kind"], e[0]["name"]) for e in api.events
                     if e[1] == "InjectionSkipped")
    assert skipped == [("Deployment", "by-label"), ("Deployment", "by-namespace")]
    assert all("(parallelism-unsupported)" in e[2] for e in api.events
               if e[1] == "InjectionSkipped")
    assert [e[0]["name"] for e in api.events if e[1] == "NotInjected"] == ["missed"]
    assert m.uninjected._value.get() == 1
