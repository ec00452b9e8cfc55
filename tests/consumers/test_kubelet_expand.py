"""kubelet_expand must model the kubelet's env expansion exactly (cases from the
semantics of kubernetes third_party/forked/golang/expansion + kubelet_pods.go)."""

import pytest

from consumers import _expand, kubelet_expand

POD = {
    "metadata": {
        "name": "vllm-0",
        "namespace": "ml",
        "uid": "0b5c-uid",
        "labels": {"app": "vllm", "kvmesh.io/group": "g1"},
        "annotations": {"kvmesh.io/enabled": "true"},
    },
    "spec": {"nodeName": "node-7"},
    "status": {"podIP": "10.1.2.3", "hostIP": "192.0.2.10"},
}


def e(name, value=None, field=None):
    d = {"name": name}
    if field is not None:
        d["valueFrom"] = {"fieldRef": {"fieldPath": field}}
    else:
        d["value"] = value
    return d


def test_reference_to_earlier_var_and_fieldref():
    env = kubelet_expand(
        [e("POD_IP", field="status.podIP"), e("LMCACHE_P2P_HOST", "$(POD_IP)")], POD
    )
    assert env == {"POD_IP": "10.1.2.3", "LMCACHE_P2P_HOST": "10.1.2.3"}


def test_reference_to_later_var_stays_literal():
    env = kubelet_expand(
        [e("LMCACHE_P2P_HOST", "$(POD_IP)"), e("POD_IP", field="status.podIP")], POD
    )
    assert env["LMCACHE_P2P_HOST"] == "$(POD_IP)"
    assert env["POD_IP"] == "10.1.2.3"


def test_undefined_reference_stays_literal_and_embedded():
    env = kubelet_expand([e("URL", "http://$(NOPE):$(PORT)"), e("PORT", "1")], POD)
    assert env["URL"] == "http://$(NOPE):$(PORT)"


def test_escape_double_dollar():
    env = kubelet_expand([e("A", "x"), e("B", "$$(A)-$(A)-$$A-$$$(A)")], POD)
    assert env["B"] == "$(A)-x-$A-$x"


def test_fieldref_values_are_not_expanded_and_values_are_not_re_expanded():
    pod = {"metadata": {"name": "$(A)"}}
    env = kubelet_expand(
        [e("A", "a"), e("N", field="metadata.name"), e("R", "$(N)"), e("S", "$$(A)"), e("T", "$(S)")],
        pod,
    )
    assert env["N"] == "$(A)"  # downward API value is literal
    assert env["R"] == "$(A)"  # single pass: the substituted text is not expanded again
    assert env["T"] == "$(A)"


def test_redefinition_uses_previous_value():
    env = kubelet_expand([e("P", "a"), e("P", "$(P):b"), e("Q", "$(P)")], POD)
    assert env == {"P": "a:b", "Q": "a:b"}


def test_all_supported_fieldrefs():
    paths = {
        "metadata.name": "vllm-0",
        "metadata.namespace": "ml",
        "metadata.uid": "0b5c-uid",
        "spec.nodeName": "node-7",
        "status.hostIP": "192.0.2.10",
        "status.podIP": "10.1.2.3",
        "metadata.labels['kvmesh.io/group']": "g1",
        "metadata.annotations['kvmesh.io/enabled']": "true",
        "metadata.labels['missing']": "",
    }
    env = kubelet_expand([e(f"V{i}", field=p) for i, p in enumerate(paths)], POD)
    assert list(env.values()) == list(paths.values())


def test_other_valuefrom_kinds_skipped_and_empty_value_kept():
    env = kubelet_expand(
        [
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "EMPTY", "value": ""},
            {"name": "NOVALUE"},
            e("X", "[$(S)][$(EMPTY)]"),
        ],
        POD,
    )
    assert "S" not in env
    assert env["EMPTY"] == "" and env["NOVALUE"] == ""
    assert env["X"] == "[$(S)][]"


def test_preset_stands_for_envfrom():
    env = kubelet_expand([e("A", "$(FROM_CM)")], POD, preset={"FROM_CM": "cm"})
    assert env["A"] == "cm"


def test_unsupported_fieldpath_rejected():
    with pytest.raises(ValueError):
        kubelet_expand([e("X", field="spec.containers[0].name")], POD)


@pytest.mark.parametrize(
    "raw, want",
    [
        ("$(A)", "A"),
        ("$(A)-$(A)", "A-A"),
        ("$$(B)_$(A)", "$(B)_A"),
        ("f-$$A", "f-$A"),
        ("$(A$(B))", "$(A$(B))"),  # name is up to the first ')': "A$(B" undefined
        ("$(A$(B)", "$(A$(B)"),
        ("$(EMPTY)x", "x"),
        ("foo$(Awhoops!", "foo$(Awhoops!"),
        ("$?_$!", "$?_$!"),
        ("$$$$$$(NOPE)", "$$$(NOPE)"),
        ("$$$$$$$(NOPE)", "$$$$(NOPE)"),
        ("$$$$$$$(A)", "$$$A"),
        ("${A}", "${A}"),
        ("$(B)___$(", "B___$("),
        ("x$", "x$"),
        ("--$($($(--", "--$($($(--"),
        ("$(foo$$var)", "$(foo$$var)"),
        ("$()", "$()"),
        ("\\$(A)", "\\A"),
    ],
)
def test_expand_edge_cases(raw, want):
    ctx = {"A": "A", "B": "B", "EMPTY": ""}
    assert _expand(raw, ctx.get) == want
