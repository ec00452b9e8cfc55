import base64
import json

import jsonpatch
import pytest
from hypothesis import given, settings, strategies as st

from kvmesh.webhook import admission
from kvmesh.core.policy import PolicyDefaults

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text("a/~b", max_size=3), c,
                                                          max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_diff_produces_a_patch_that_turns_before_into_after(before, after):
    doc = {"root": before}
    ops = admission.diff(doc, {"root": after})
    assert jsonpatch.apply_patch(doc, ops) == {"root": after}


def test_insertion_at_list_head_is_one_add():
    ops = admission.diff({"l": [1, 2, 3]}, {"l": [0, 1, 2, 3]})
    assert ops == [{"op": "add", "path": "/l/0", "value": 0}]


def test_keys_with_slash_and_tilde_are_escaped():
    ops = admission.diff({"a": {}}, {"a": {"kvmesh.dev/status": 1, "x~y": 2}})
    assert {o["path"] for o in ops} == {"/a/kvmesh.dev~1status", "/a/x~0y"}


def review(obj, **req):
    base = {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "ns", "object": obj}
    base.update(req)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": base}


@pytest.mark.parametrize("body,fragment", [
    ([], "JSON object"),
    ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1"}, "v1beta1"),
    ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}, "no request"),
    ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": 3}},
     "uid"),
])
def test_bad_reviews_raise_with_reason(body, fragment):
    with pytest.raises(admission.BadReview, match=fragment):
        admission.review(body, PolicyDefaults())


@pytest.mark.parametrize("req", [{"operation": "UPDATE"},
                                 {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
                                 {"subResource": "status"}])
def test_non_pod_create_is_allowed_untouched_with_warning(req):
    resp, out = admission.review(review({}, **req), PolicyDefaults())
    assert resp["response"]["allowed"] is True and "patch" not in resp["response"]
    assert out.action == "ignore" and resp["response"]["warnings"]


def test_deny_carries_code_reason_and_uid():
    pod = {"metadata": {"labels": {"kvmesh.dev/inject": "enabled"},
                        "annotations": {"kvmesh.dev/mode": "x"}},
           "spec": {"containers": [{"name": "v", "image": "i", "command": ["vllm", "serve"]}]}}
    resp, out = admission.review(review(pod), PolicyDefaults())
    r = resp["response"]
    assert r["uid"] == "u1" and r["allowed"] is False
    assert r["status"]["code"] == 403 and r["status"]["reason"] == "invalid-annotation"
    assert "kvmesh.dev/mode" in r["status"]["message"]


def test_patch_is_base64_json_patch():
    pod = {"metadata": {"generateName": "a-", "labels": {"kvmesh.dev/inject": "enabled"}},
           "spec": {"containers": [{"name": "v", "image": "lmcache/vllm-openai:v0.3.9",
                                    "command": ["vllm", "serve", "m"]}]}}
    resp, out = admission.review(review(pod), PolicyDefaults())
    r = resp["response"]
    ops = json.loads(base64.b64decode(r["patch"]))
    assert r["patchType"] == "JSONPatch" and len(ops) == out.patch_ops > 0
    patched = jsonpatch.apply_patch(pod, ops)
    assert patched["spec"]["containers"][0]["args"][0] == "--kv-transfer-config"


POD = {"metadata": {"generateName": "a-", "labels": {"kvmesh.dev/inject": "enabled"}},
       "spec": {"containers": [{"name": "v", "image": "lmcache/vllm-openai:v0.3.9",
                                "command": ["vllm", "serve", "m"]}]}}


def test_memo_answers_identical_pods_like_a_fresh_decision():
    memo, pol = admission.Memo(), PolicyDefaults()
    first, out1 = admission.review(review(POD, uid="u1"), pol, memo=memo)
    second, out2 = admission.review(review(POD, uid="u2", dryRun=True), pol, memo=memo)
    fresh, _ = admission.review(review(POD, uid="u2"), pol)
    assert (memo.hits, memo.misses) == (1, 1)
    assert second == fresh  # same bytes as deciding anew, with this request's uid
    assert first["response"]["uid"] == "u1" and out1.uid == "u1"  # first answer untouched
    assert (out2.uid, out2.dry_run, out2.action, out2.patch_ops) == \
        ("u2", True, out1.action, out1.patch_ops)


@pytest.mark.parametrize("change", [
    lambda b: b["request"]["object"]["metadata"]["labels"].update(app="other"),
    lambda b: b["request"].update(namespace="other-ns"),
])
def test_memo_misses_when_the_object_or_namespace_differs(change):
    memo, pol = admission.Memo(), PolicyDefaults()
    admission.review(review(POD), pol, memo=memo)
    body = json.loads(json.dumps(review(POD)))
    change(body)
    got, _ = admission.review(body, pol, memo=memo)
    assert memo.misses == 2 and got == admission.review(body, pol)[0]


def test_memo_misses_on_new_defaults_and_on_selection():
    memo = admission.Memo()
    unlabelled = {**POD, "metadata": {"generateName": "a-"}}
    admission.review(review(unlabelled), PolicyDefaults(), selected=False, memo=memo)
    skipped, _ = admission.review(review(unlabelled), PolicyDefaults(), selected=False,
                                  memo=memo)
    assert "patch" not in skipped["response"] and memo.misses == 2  # a new defaults object
    selected, out = admission.review(review(unlabelled), PolicyDefaults(), selected=True,
                                     memo=memo)
    assert out.action == "inject" and selected["response"]["patch"]
    big = PolicyDefaults(cpu_cache_gb=40)
    a, _ = admission.review(review(POD), big, memo=memo)
    b, _ = admission.review(review(POD), PolicyDefaults(), memo=memo)
    assert a["response"]["patch"] != b["response"]["patch"]


def test_memo_is_bounded():
    memo, pol = admission.Memo(max_entries=3, max_key_bytes=2000), PolicyDefaults()
    for i in range(5):
        pod = json.loads(json.dumps(POD))
        pod["metadata"]["labels"]["i"] = str(i)
        admission.review(review(pod), pol, memo=memo)
    assert len(memo) == 3
    huge = json.loads(json.dumps(POD))
    huge["metadata"]["annotations"] = {"note": "x" * 5000}
    admission.review(review(huge), pol, memo=memo)
    admission.review(review(huge), pol, memo=memo)
    assert len(memo) == 3 and memo.hits == 0  # too large to remember


def test_memo_is_bounded_in_bytes():
    memo, pol = admission.Memo(max_bytes=200_000), PolicyDefaults()
    for i in range(40):  # distinct pods of ~20 KB each: the byte budget binds, not the count
        pod = json.loads(json.dumps(POD))
        pod["metadata"]["annotations"] = {"big": f"{i}" + "x" * 20_000}
        admission.review(review(pod), pol, memo=memo)
    assert 0 < len(memo) < 40 and memo.bytes <= 200_000
    assert memo.bytes == sum(memo._cost.values())


def test_mp_pod_in_a_cluster_without_native_sidecars_is_admitted_untouched_with_reason():
    mp_pod = {"metadata": {"generateName": "a-", "labels": {"kvmesh.dev/inject": "enabled"},
                           "annotations": {"kvmesh.dev/mode": "mp"}},
              "spec": {"containers": [{"name": "v", "image": "lmcache/vllm-openai:v0.5.6",
                                       "command": ["vllm", "serve", "m"]}]}}
    resp, out = admission.review(review(mp_pod), PolicyDefaults(), native_sidecars=False)
    assert resp["response"]["allowed"] is True
    assert (out.action, out.reason) == ("skip", "native-sidecars-unsupported")
    patched = jsonpatch.apply_patch(mp_pod, json.loads(base64.b64decode(resp["response"]["patch"])))
    assert "initContainers" not in patched["spec"]  # only the status annotation was written
    resp, out = admission.review(review(mp_pod), PolicyDefaults(), native_sidecars=True)
    assert (out.action, out.mode) == ("inject", "mp")
