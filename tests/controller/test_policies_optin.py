"""Pure parts of cluster policies and workload opt-in."""

import pytest
from pydantic import ValidationError

from kvmesh.core import names
from kvmesh.controller import optin, policies
from kvmesh.core.policy import LabelSelector, Policy, policy_from_object, select_policy


@pytest.mark.parametrize("sel,labels,ok", [
    ({}, {}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"},
     True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "x"}, False),
])
def test_label_selector_semantics(sel, labels, ok):
    assert LabelSelector.model_validate(sel).matches(labels) is ok


def test_first_matching_policy_by_name_wins():
    a = Policy(name="b-team", namespace_selector={"matchLabels": {"t": "x"}})
    b = Policy(name="a-all")
    assert select_policy([a, b], {"t": "x"}, {}).name == "a-all"
    assert select_policy([a], {"t": "y"}, {}) is None


def test_invalid_policy_spec_is_rejected_with_field():
    with pytest.raises(ValidationError, match="heartbeat"):
        policy_from_object({"metadata": {"name": "p"},
                            "spec": {"defaults": {"heartbeatSeconds": 40}}})
    valid, invalid = policies.parse_all([
        {"metadata": {"name": "ok"}, "spec": {}},
        {"metadata": {"name": "bad"}, "spec": {"defaults": {"mode": "legacy"}}}])
    assert [p.name for p in valid] == ["ok"] and "defaults.mode" in invalid["bad"]


def test_ready_condition_keeps_its_transition_time_until_it_flips():
    first = policies.condition(True, "EntryWritten", "m", 1)
    again = policies.condition(True, "EntryWritten", "m", 2,
                               [{**first, "lastTransitionTime": "2020-01-01T00:00:00Z"}])
    assert again["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    flipped = policies.condition(False, "InvalidSpec", "m", 3, [again])
    assert flipped["lastTransitionTime"] != "2020-01-01T00:00:00Z"
    obj = {"status": {"conditions": [again], "injectedPods": 2, "other": "kept"}}
    assert not policies.status_changed(obj, {"conditions": [again], "injectedPods": 2})
    assert policies.status_changed(obj, {"conditions": [again], "injectedPods": 3})


class NoWatches:
    """A Kube whose informers are never run: the test feeds the handlers itself."""

    def informer(self, api_version, kind, *, handlers=(), name=None, **kw):
        from kvmesh.kube.informer import Informer
        return Informer(lambda **kw: None, handlers=handlers, name=name)


async def test_policy_cache_keeps_a_policy_across_status_updates():
    # Same spec: the same Policy object, so admission answers remembered under its defaults
    # stay valid; a spec change parses anew.
    from kvmesh.core.policy import PolicyDefaults
    from kvmesh.webhook.policy_cache import PolicyCache
    cache = PolicyCache(NoWatches(), PolicyDefaults())
    obj = {"metadata": {"name": "p"}, "spec": {"defaults": {"cpuCacheGb": 8}}}
    cache._on_policy("ADDED", obj, None)
    parsed = cache.policies["p"]
    cache._on_policy("MODIFIED", {**obj, "status": {"injectedPods": 1}}, obj)
    assert cache.policies["p"] is parsed
    changed = {"metadata": {"name": "p"}, "spec": {"defaults": {"cpuCacheGb": 9}}}
    cache._on_policy("MODIFIED", changed, obj)
    assert cache.policies["p"] is not parsed
    assert cache.policies["p"].defaults.cpu_cache_gb == 9


def test_policy_entry_never_matches_labelled_or_system_pods():
    p = Policy(name="ml", namespace_selector={"matchLabels": {"team": "ml"}},
               pod_selector={"matchLabels": {"app": "vllm"}}, failure_policy="Fail")
    e = policies.entry(p, None, "Q0E=")
    assert e["name"] == "ml.policies.kvmesh.dev" and e["failurePolicy"] == "Fail"
    assert {"key": names.LABEL_INJECT, "operator": "DoesNotExist"} in \
        e["objectSelector"]["matchExpressions"]
    assert e["objectSelector"]["matchLabels"] == {"app": "vllm"}
    excluded = e["namespaceSelector"]["matchExpressions"][-1]
    assert excluded["operator"] == "NotIn" and names.SYSTEM_NAMESPACE in excluded["values"]
    assert e["clientConfig"]["service"]["path"] == "/mutate/policy"
    assert policies.entry(p, "https://127.0.0.1:1", "")["clientConfig"] == {
        "url": "https://127.0.0.1:1/mutate/policy"}


def _deploy(annotation=None, label=None, owned=False):
    d = {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "d", "namespace": "n", "annotations": {}, "managedFields": []},
         "spec": {"template": {"metadata": {"labels": {}}}}}
    if annotation:
        d["metadata"]["annotations"][names.ANN_INJECT] = annotation
    if label:
        d["spec"]["template"]["metadata"]["labels"][names.LABEL_INJECT] = label
    if owned:
        d["metadata"]["managedFields"].append({"manager": optin.FIELD_MANAGER, "fieldsV1": {
            "f:spec": {"f:template": {"f:metadata": {"f:labels": {
                f"f:{names.LABEL_INJECT}": {}}}}}}})
    return d


def test_optin_decisions():
    assert optin.state(_deploy("enabled")) == "apply"
    assert optin.state(_deploy("enabled", "enabled", owned=True)) == "in-sync"
    assert optin.state(_deploy(None, "enabled", owned=True)) == "apply"  # release
    assert optin.state(_deploy(None, "enabled", owned=False)) == "in-sync"  # the user's label
    # The user's own, different value wins without an API call; the same value is co-owned.
    assert optin.state(_deploy("enabled", "disabled", owned=False)) == optin.USER_OWNED
    assert optin.state(_deploy("enabled", "enabled", owned=False)) == "apply"
    assert optin.apply_body(_deploy("enabled"))["spec"]["template"]["metadata"]["labels"] == \
        {names.LABEL_INJECT: "enabled"}
    assert "spec" not in optin.apply_body(_deploy(None))
    assert optin.wanted_label(_deploy("bogus")) is None
