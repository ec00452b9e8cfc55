"""`kvmesh inject/explain -n`: like kubectl, an explicit -n that a document's own namespace
contradicts is refused (issue 9 class 9: the document's namespace used to win silently)."""

from pathlib import Path

from support import run_cli

CASE = Path(__file__).parent / "real" / "cases" / "04-pstack-minimal.yaml"  # namespace: default


def test_explicit_namespace_contradicting_the_document_is_refused():
    for cmd in ("inject", "explain"):
        r = run_cli(cmd, "-n", "team-b", "-f", str(CASE))
        assert r.returncode == 2 and r.stdout == ""
        assert "names namespace 'default', which does not match -n 'team-b'" in r.stderr


def test_matching_or_absent_namespace_is_accepted():
    assert run_cli("inject", "-n", "default", "-f", str(CASE)).returncode == 0
    doc = CASE.read_text().replace("  namespace: default\n", "", 1)
    r = run_cli("explain", "-n", "team-b", "-f", "-", stdin=doc)
    assert r.returncode == 0 and "/team-b/" in r.stdout
