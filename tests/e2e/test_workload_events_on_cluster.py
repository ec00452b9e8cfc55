"""What kvmesh decided about a workload's pods is said on the workload, once (real API server,
KWOK nodes, the real webhook and controller processes): a Deployment of 20 skipped replicas
gets one InjectionSkipped Event naming the reason, not twenty, also when the pods are opted in
only by their namespace's label; a Deployment whose pods the webhook refuses gets an
InjectionDenied Event on the Deployment (the API server puts the refusal only on the
ReplicaSet)."""

from __future__ import annotations

import time
import urllib.request

from kvmesh.core import names

from helpers import apply, pods, vllm_deployment, wait_for

SOURCE = "kvmesh-controller"


def kvmesh_events(cluster, namespace: str) -> list[dict]:
    return [e for e in cluster.kubectl_json("get", "events", "-n", namespace)["items"]
            if (e.get("source") or {}).get("component") == SOURCE
            or e.get("reportingComponent") == SOURCE]


def on(events: list[dict], kind: str, name: str, reason: str) -> list[dict]:
    return [e for e in events if e["involvedObject"]["kind"] == kind
            and e["involvedObject"]["name"] == name and e["reason"] == reason]


def controller_metric(stack, line_start: str) -> float | None:
    url = f"http://127.0.0.1:{stack.controller_metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for ln in text.splitlines():
        if ln.startswith(line_start):
            return float(ln.rsplit(" ", 1)[1])
    return None


def seen_by_webhook(cluster, namespace: str, selector: str, n: int, timeout: float = 240):
    """n pods the webhook decided on. On a busy machine the webhook can miss its deadline and
    the API server admits the pod untouched (failurePolicy Ignore): such pods are deleted for
    their ReplicaSet to create them again, as the NotInjected Event tells a user to do."""
    def probe():
        ps = [p for p in pods(cluster, namespace, selector)
              if not p["metadata"].get("deletionTimestamp")]
        missed = [p["metadata"]["name"] for p in ps
                  if names.ANN_STATUS not in (p["metadata"].get("annotations") or {})]
        if missed:
            cluster.kubectl("delete", "pod", "-n", namespace, "--wait=false", *missed)
            return None
        return ps if len(ps) == n else None
    return wait_for(f"{n} pods {selector} decided by the webhook", probe, timeout, 1)


def test_twenty_skipped_replicas_make_one_event_on_the_deployment(stack, devcluster, namespace):
    d = vllm_deployment("tp2", namespace, replicas=20, labels={names.LABEL_INJECT: "enabled"},
                        extra_args=("--tensor-parallel-size", "2"))
    apply(devcluster, d)
    got = seen_by_webhook(devcluster, namespace, "app=tp2", 20)
    reason = {p["metadata"]["annotations"][names.ANN_STATUS] for p in got}
    assert len(reason) == 1 and '"injected":false' in next(iter(reason)), reason
    ev = wait_for("an InjectionSkipped Event on the Deployment", lambda: on(
        kvmesh_events(devcluster, namespace), "Deployment", "tp2", "InjectionSkipped"), 30)
    assert "parallelism-unsupported" in ev[0]["message"], ev[0]["message"]
    assert ev[0]["type"] == "Warning"
    # The controller has seen every pod (all ADDED by now): still one Event, none per pod.
    time.sleep(5)
    events = kvmesh_events(devcluster, namespace)
    mine = [e for e in events if e["reason"].startswith("Injection")]
    assert len(mine) == 1 and mine[0].get("count", 1) == 1, [
        (e["reason"], e["involvedObject"]["kind"], e["involvedObject"]["name"],
         e["firstTimestamp"], e["message"][:120]) for e in mine]
    assert controller_metric(stack, 'kvmesh_controller_workload_events_total{kind="skipped",'
                                    'reason="parallelism-unsupported"}') >= 1


def test_pods_opted_in_by_their_namespace_are_reported_too(stack, devcluster, namespace):
    """No kvmesh.dev/inject label on the pods: the namespace's label opts them in. The webhook
    stamps kvmesh.dev/skipped on the pods it skips, which is how the controller finds them."""
    devcluster.kubectl("label", "namespace", namespace, f"{names.LABEL_INJECT}=enabled")
    apply(devcluster, vllm_deployment("nsopt", namespace, replicas=3,
                                      extra_args=("--tensor-parallel-size", "2")))
    got = seen_by_webhook(devcluster, namespace, "app=nsopt", 3)
    for p in got:
        labels = p["metadata"]["labels"]
        assert names.LABEL_INJECT not in labels, labels
        assert labels.get(names.LABEL_SKIPPED) == "parallelism-unsupported", labels
    ev = wait_for("an InjectionSkipped Event on the Deployment", lambda: on(
        kvmesh_events(devcluster, namespace), "Deployment", "nsopt", "InjectionSkipped"), 30)
    assert "parallelism-unsupported" in ev[0]["message"], ev[0]["message"]
    time.sleep(3)  # every pod seen: still one Event, none on the pods
    mine = [e for e in kvmesh_events(devcluster, namespace)
            if e["reason"].startswith("Injection")]
    assert len(mine) == 1 and mine[0].get("count", 1) == 1, [
        (e["reason"], e["involvedObject"]["kind"], e["involvedObject"]["name"]) for e in mine]


def test_denied_pods_are_reported_on_the_deployment(stack, devcluster, namespace):
    d = vllm_deployment("refused", namespace, replicas=3, labels={names.LABEL_INJECT: "enabled"})
    d["spec"]["template"]["metadata"]["annotations"] = {names.ANN_CONTAINER: "no-such"}
    apply(devcluster, d)

    def denied():
        # (pods the webhook missed under load are admitted untouched: delete them, see above)
        missed = [p["metadata"]["name"] for p in pods(devcluster, namespace, "app=refused")]
        if missed:
            devcluster.kubectl("delete", "pod", "-n", namespace, "--wait=false", *missed)
        return on(kvmesh_events(devcluster, namespace), "Deployment", "refused",
                  "InjectionDenied")
    ev = wait_for("an InjectionDenied Event on the Deployment", denied, 120, 1)
    assert "no-such" in ev[0]["message"], ev[0]["message"]
    time.sleep(3)  # the ReplicaSet controller keeps retrying (and updating its Event)
    assert len(on(kvmesh_events(devcluster, namespace), "Deployment", "refused",
                  "InjectionDenied")) == 1
