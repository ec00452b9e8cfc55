"""`kvmesh check`'s verdicts (pure: API objects in, one result out), each failure with a fix;
the e2e tier breaks a real cluster (tests/e2e/test_check.py)."""

from __future__ import annotations

import base64
import datetime as dt
import json

from kvmesh import check
from kvmesh.certs import authority
from kvmesh.core import health, names

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def mwc(bundle: bytes, n: int = 2) -> dict:
    return {"webhooks": [{"name": f"e{i}", "clientConfig": {"caBundle": b64(bundle)}}
                         for i in range(n)]}


def test_crds_missing_unestablished_or_unserved():
    ok = {"spec": {"versions": [{"name": "v1alpha1", "served": True}]},
          "status": {"conditions": [{"type": "Established", "status": "True"}]}}
    assert check.crds_result({"a": ok, "b": ok}).status == check.OK
    bad = {"spec": {"versions": [{"name": "v1alpha1", "served": False}]}, "status": {}}
    r = check.crds_result({"a": None, "b": bad})
    assert r.status == check.FAIL and "a missing" in r.message
    assert "b not established" in r.message and "not v1alpha1" in r.message
    assert "kubectl apply -k manifests/" in r.fix


def test_ca_bundle_against_secret_and_served_leaf():
    ca = authority.new_ca(NOW - dt.timedelta(hours=1))
    other = authority.new_ca(NOW - dt.timedelta(hours=1))
    leaf = authority.issue_leaf(ca, ["127.0.0.1"], NOW - dt.timedelta(minutes=5),
                                dt.timedelta(days=1)).cert_pem
    secret = {"data": {"ca.crt": b64(ca.cert_pem)}}
    ok = check.bundle_result(mwc(ca.cert_pem), secret, {"127.0.0.1:8443": leaf}, NOW)
    assert ok.status == check.OK and "leaf served at 127.0.0.1:8443 chains to it" in ok.message
    r = check.bundle_result(mwc(other.cert_pem), secret, {}, NOW)
    assert r.status == check.FAIL and "does not hold the CA in Secret" in r.message
    r = check.bundle_result(mwc(other.cert_pem), None, {"127.0.0.1:8443": leaf}, NOW)
    assert r.status == check.FAIL and "does not chain to the caBundle" in r.message
    r = check.bundle_result(mwc(ca.cert_pem), secret, {"localhost:8443": leaf}, NOW)
    assert r.status == check.FAIL and "does not name localhost" in r.message
    disagree = {"webhooks": mwc(ca.cert_pem, 1)["webhooks"] + mwc(other.cert_pem, 1)["webhooks"]}
    assert "do not all carry one caBundle" in check.bundle_result(disagree, None, {}, NOW).message
    r = check.bundle_result(mwc(ca.cert_pem), None, {"10.0.0.1:8443": "cannot connect"}, NOW)
    assert r.status == check.OK and "not checked (cannot connect)" in r.message


def test_lease_fresh_stale_free_missing():
    def lease(holder, ago, duration=15):
        t = (NOW - dt.timedelta(seconds=ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"spec": {"holderIdentity": holder, "renewTime": t,
                         "leaseDurationSeconds": duration}}
    assert check.lease_result(lease("c-1", 3), NOW).status == check.OK
    r = check.lease_result(lease("c-1", 60), NOW)
    assert r.status == check.FAIL and "last renewed 60 s ago (lease 15 s)" in r.message
    assert check.lease_result(lease("", 1), NOW).message.endswith("no controller leads")
    assert "no controller ever led" in check.lease_result(None, NOW).message
    assert check.lease_result(lease("c-1", 18), NOW).status == check.OK  # within the slack


def test_probe_answers():
    def pod(status):
        return {"metadata": {"annotations": {names.ANN_STATUS: json.dumps(status)}}}
    assert check.probe_result(pod({"injected": True, "mode": "controller"}), None).status \
        == check.OK
    assert check.probe_result(pod({"injected": False, "reason": "x"}), None).status == check.WARN
    r = check.probe_result({"metadata": {}}, None)
    assert r.status == check.FAIL and "without kvmesh.dev/status" in r.message
    r = check.probe_result(None, "500 failed calling webhook")
    assert r.status == check.FAIL and "refused" in r.message


def group(name, sharing=None, degraded=None):
    conds = []
    if sharing:
        conds.append({"type": health.SHARING, "status": sharing[0], "reason": sharing[1],
                      "message": "m"})
    if degraded:
        conds.append({"type": health.DEGRADED, "status": degraded[0], "reason": degraded[1],
                      "message": "why"})
    return {"metadata": {"namespace": "ns", "name": name},
            "status": {"conditions": conds, "members": 2, "readyPeers": 2}}


def test_groups_each_a_line_with_the_reasons_fix():
    rs = check.groups_result([
        group("ok", ("True", health.HEALTHY), ("False", health.HEALTHY)),
        group("bad", ("False", health.VERSION_MISMATCH), ("True", health.VERSION_MISMATCH)),
        group("alone", ("False", health.NO_PEERS), ("False", health.HEALTHY)),
        group("new")])
    by = {r.name: r for r in rs}
    assert by["group ns/ok"].status == check.OK
    assert by["group ns/bad"].status == check.FAIL
    assert by["group ns/bad"].fix == health.FIXES[health.VERSION_MISMATCH]
    assert by["group ns/alone"].status == check.WARN
    assert by["group ns/new"].status == check.WARN
    assert check.groups_result([])[0].status == check.OK


def test_text_and_json_rendering():
    rs = [check.Result("crds", check.OK, "fine"),
          check.Result("webhook-pods", check.FAIL, "down", "start it")]
    text = check.render_text(rs, "https://x")
    assert "[FAIL] webhook-pods" in text and "fix: start it" in text
    assert text.endswith("1 check(s) failed")
    data = json.loads(check.render_json(rs, "https://x"))
    assert data["ok"] is False and data["checks"][1]["fix"] == "start it"


def test_probe_lines_from_peers_with_chunks():
    def group(i, mode, ready, n=None):
        st = {"readyPeers": ready, **({"peersWithChunks": n} if n is not None else {})}
        return {"metadata": {"namespace": "ns", "name": f"g{i}"}, "spec": {"mode": mode},
                "status": st}
    ok, none_yet, alone, unknown, mp = check.probe_groups([
        group(1, "controller", 3, 2), group(2, "redis", 2, 0), group(3, "redis", 1, 1),
        group(4, "controller", 2), group(5, "mp", 2, 5)])
    assert (ok.name, ok.status) == ("probe ns/g1", check.OK)
    assert "lmcache_controller holds chunks of 2 of 3 ready peers" in ok.message
    assert none_yet.status == check.WARN and none_yet.fix == check.PROBE_FIX
    assert "none of 2 ready peers has a chunk in the lookup Redis" in none_yet.message
    assert alone.status == check.WARN and alone.fix == health.FIXES[health.NO_PEERS]
    assert unknown.status == check.SKIP and "not probed" in unknown.message
    assert mp.status == check.SKIP and "--coordinator-event-reporting" in mp.message
    # SKIP and WARN never fail the run
    assert json.loads(check.render_json([ok, none_yet, unknown], "s"))["ok"] is True
    assert "[SKIP]" in check.render_text([unknown], "s")
