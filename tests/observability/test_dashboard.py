"""manifests/observability against kvmesh's code: every metric a dashboard panel or an alert
queries is one the webhook or controller exports (with its suffix and labels), the dashboard is
well-formed, the alert rules pass Prometheus's own `promtool check rules`, and the kustomize
build ships the same dashboard. (The queries run in a real Prometheus in
tests/e2e/test_observability.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvmesh.controller import health as group_health
from kvmesh.controller.main import Metrics as ControllerMetrics
from kvmesh.local.devcluster import find_bin_dir
from kvmesh.webhook.server import Metrics as WebhookMetrics

OBS = Path(__file__).resolve().parents[2] / "manifests" / "observability"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Every series name the processes can export -> its label names."""
    c = ControllerMetrics()
    group_health.metrics_for(c.registry)
    out: dict[str, set[str]] = {}
    for registry in (WebhookMetrics().registry, c.registry):
        for collector in list(registry._collector_to_names):  # noqa: SLF001 (label names)
            labels = set(getattr(collector, "_labelnames", ()))
            for family in collector.describe():
                for suffix in SUFFIXES.get(family.type, ("",)):
                    extra = {"le"} if suffix == "_bucket" else set()
                    out[family.name + suffix] = labels | extra
    return out


def dashboard() -> dict:
    return json.loads((OBS / "kvmesh-dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    rule = yaml.safe_load((OBS / "prometheusrule.yaml").read_text())
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def used(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, labels the expression names for it) for each kvmesh metric in `expr`."""
    labels = set()
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in clause.split(",") if x.strip()}
    out = []
    for name, matchers in re.findall(r"\b(kvmesh_[a-z0-9_]+)(\{[^}]*\})?", expr):
        mine = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
        out.append((name, mine | labels))
    return out


@pytest.mark.parametrize("expr", dashboard_exprs() + rule_exprs())
def test_every_queried_metric_and_label_is_exported(expr):
    names = exported()
    found = used(expr)
    assert found, f"no kvmesh metric in {expr!r}"
    for name, labels in found:
        assert name in names, f"{name} (in {expr!r}) is exported by neither process"
        assert labels <= names[name], \
            f"{expr!r} groups {name} by {sorted(labels - names[name])}, not among its labels"


def test_the_check_itself_catches_a_wrong_name_and_label():
    names = exported()
    [(n, _)] = used("rate(kvmesh_webhook_injection_total[5m])")
    assert n not in names
    [(n, labels)] = used("sum by (pod) (kvmesh_group_sharing)")
    assert not labels <= names[n]


def test_dashboard_is_well_formed():
    d = dashboard()
    assert {"schemaVersion", "templating", "annotations", "panels", "uid", "title"} <= set(d)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    taken: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 < g["w"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells
        for t in p.get("targets", []):
            assert t["refId"] and t["datasource"]["uid"] == "${datasource}"
            assert set(re.findall(r"\$(\w+)", t["expr"])) <= variables, t["expr"]


def test_alert_rules_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make system-packages)")
    rule = yaml.safe_load((OBS / "prometheusrule.yaml").read_text())
    f = tmp_path / "rules.yaml"
    f.write_text(yaml.safe_dump(rule["spec"]))
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in r.stdout


def test_kustomize_build_ships_the_dashboard():
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("kubectl (with kustomize) not built: cluster/build.sh")
    out = subprocess.run([str(bin_dir / "kubectl"), "kustomize", str(OBS)], capture_output=True,
                         text=True, check=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out)}
    cm = docs["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kvmesh-dashboard.json"]) == dashboard()
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
