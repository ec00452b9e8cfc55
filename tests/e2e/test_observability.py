"""The dashboard's and alerts' queries in a real Prometheus (Debian's `prometheus`) scraping the
real webhook and controller of the local stack: every query parses and evaluates, and the
panels that must show something do (a leader, injections, the group's ready peers under the
group's own namespace label, which the scrape keeps with honor_labels as the PodMonitor does)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from kvmesh.core import names
from helpers import apply, running_pods, vllm_deployment, wait_for
from support import free_port

OBS = Path(__file__).resolve().parents[2] / "manifests" / "observability"


@pytest.fixture
def prometheus(stack, tmp_path):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (Debian package prometheus; make system-packages)")
    port = free_port()
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
           "scrape_configs": [{"job_name": "kvmesh", "honor_labels": True,
                               "static_configs": [{"targets": [
                                   f"127.0.0.1:{stack.webhook_metrics_port}",
                                   f"127.0.0.1:{stack.controller_metrics_port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("prometheus ready", lambda: _ok(f"{base}/-/ready"), 60)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # 400: the query does not parse
        raise AssertionError(f"{expr!r}: {e.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_every_query_runs_and_the_key_panels_show_data(prometheus, devcluster, namespace):
    apply(devcluster, vllm_deployment("watched", namespace, 2,
                                      {names.LABEL_INJECT: "enabled"}))
    running_pods(devcluster, namespace, "app=watched", 2)
    peers = wait_for("the group's ready peers scraped under its namespace", lambda: query(
        prometheus, f'kvmesh_group_ready_peers{{namespace="{namespace}"}}'), 60, 1)
    assert peers[0]["metric"]["group"] == "controller-default"
    assert float(wait_for("2 ready peers", lambda: [
        s for s in query(prometheus, f'kvmesh_group_ready_peers{{namespace="{namespace}"}}')
        if s["value"][1] == "2"], 60, 1)[0]["value"][1]) == 2
    # Instant queries wait too: a scrape that misses its 1 s timeout on a busy machine marks
    # that target's series stale until the next one succeeds (CI saw an empty result once).
    assert wait_for("one leader scraped", lambda: query(
        prometheus, "sum(kvmesh_controller_leader)"), 60, 1)[0]["value"][1] == "1"
    assert float(wait_for("the webhook's injections scraped", lambda: query(
        prometheus, "sum(kvmesh_webhook_injections_total)"), 60, 1)[0]["value"][1]) >= 2

    board = json.loads((OBS / "kvmesh-dashboard.json").read_text())
    exprs = [t["expr"].replace("$namespace", ".*") for p in board["panels"]
             for t in p.get("targets", [])]
    rules = yaml.safe_load((OBS / "prometheusrule.yaml").read_text())
    exprs += [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    for expr in exprs:
        query(prometheus, expr)  # parses and evaluates
    # The dashboard's group panels see this group.
    [row] = wait_for("the first group panel's row", lambda: query(
        prometheus, exprs[0].replace(".*", namespace)), 60, 1)
    assert row["value"][1] in ("0", "1")
