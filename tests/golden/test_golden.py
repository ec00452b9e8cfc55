"""Golden cases: every input manifest goes through BOTH the offline CLI (a real `kvmesh
inject` process) and the HTTPS webhook (a real `kvmesh webhook` process); they must agree,
match the reviewed expected output, and not change when injected again.

Two sets: cases/ (synthetic, one behaviour each) and real/cases/ (public manifests of other
projects, each with its source in a header; real/ANALYSIS.md says what each one shows). Each
set's expected outputs sit in its own expected/ folder.

Regenerate the expected files after a deliberate change with KVMESH_UPDATE_GOLDEN=1, then
review the diff like code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kvmesh.core import names, workloads
from support import apply_response, run_cli

HERE = Path(__file__).parent
CASES = sorted((HERE / "cases").glob("*.yaml")) + sorted((HERE / "real" / "cases").glob("*.yaml"))
UPDATE = os.environ.get("KVMESH_UPDATE_GOLDEN") == "1"


def _expected(case: Path, suffix: str) -> Path:
    return case.parent.parent / "expected" / (case.stem + suffix)


def _check(path: Path, actual: str) -> None:
    if UPDATE:
        path.write_text(actual)
    assert path.exists(), f"missing golden {path}; run with KVMESH_UPDATE_GOLDEN=1 and review"
    assert actual == path.read_text(), f"{path.name} differs from the reviewed golden"


def _id(case: Path) -> str:
    return ("real-" if case.parent.parent.name == "real" else "") + case.stem


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_golden_cli_webhook_agree(case: Path, webhook) -> None:
    cli = run_cli("inject", "-f", str(case))
    denied = _expected(case, ".denied.txt")
    if cli.returncode == 1 or (denied.exists() and not UPDATE):
        assert cli.returncode == 1, cli.stderr
        assert cli.stdout == ""
        lines = [ln for ln in cli.stderr.splitlines() if ln.startswith("kvmesh: denied:")]
        _check(denied, "\n".join(lines) + "\n")
    else:
        assert cli.returncode == 0, cli.stderr
        _check(_expected(case, ".yaml"), cli.stdout)
        # Idempotent offline: injecting the output again changes nothing.
        again = run_cli("inject", "-f", "-", stdin=cli.stdout)
        assert again.returncode == 0, again.stderr
        assert again.stdout == cli.stdout

    inputs = list(yaml.safe_load_all(case.read_text()))
    outputs = list(yaml.safe_load_all(cli.stdout)) if cli.returncode == 0 else [None] * len(inputs)
    assert len(outputs) == len(inputs)
    for doc, out in zip(inputs, outputs):
        if doc.get("kind") not in workloads.TEMPLATE_PATHS:
            assert out == doc  # other kinds pass through untouched
            continue
        pod = workloads.pod_for(doc)
        resp = webhook.review(pod)
        decision = workloads.process(doc, _policy()).result
        if decision.action == "deny":
            assert resp["allowed"] is False
            assert resp["status"]["message"] == "kvmesh: " + decision.message
            assert f": {decision.message}" in cli.stderr
            continue
        assert resp["allowed"] is True
        injected = apply_response(pod, resp)
        tmpl = out if out["kind"] == "Pod" else workloads._get(out, workloads.TEMPLATE_PATHS[out["kind"]])
        assert injected["spec"] == tmpl["spec"], "webhook and CLI disagree on the pod spec"
        for part in ("labels", "annotations"):
            assert (injected["metadata"].get(part) or {}) == (tmpl["metadata"].get(part) or {})
        # Idempotent online (reinvocationPolicy: IfNeeded): a second review patches nothing.
        second = webhook.review(injected)
        assert second["allowed"] is True and "patch" not in second
        if decision.action == "inject":
            assert names.ANN_STATUS in injected["metadata"]["annotations"]


def _policy():
    from kvmesh.core.policy import PolicyDefaults
    return PolicyDefaults()
