"""The real public manifests (tests/golden/real/cases) through the real `kvmesh inject`, and
what their consumers would be given: the pod the kubelet would start, the environment it would
expand, the argv a real shell would hand to vLLM.

Used by test_real_cases.py. Nothing here knows what kvmesh *should* decide for a case: it only
reconstructs what a decision means for the programs that read it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import yaml

import consumers
from injected import POD_IP, POD_NAME, POD_UID
from kvmesh import cli as kvmesh_cli
from kvmesh.core import names, workloads

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "tests" / "golden" / "real" / "cases"
SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh"}
SHELL_TIMEOUT_S = 30


def _require_flag() -> bool:
    return os.environ.get("KVMESH_REQUIRE_CLUSTER") == "1" or \
        os.environ.get("KVMESH_REQUIRE_CONSUMERS") == "1"


def consumer(call, *args):
    """Run a consumers.* call; a genuinely missing cached env skips with the setup command,
    unless KVMESH_REQUIRE_CLUSTER=1 (make test) or KVMESH_REQUIRE_CONSUMERS=1 make it fail."""
    try:
        return call(*args)
    except consumers.ConsumerEnvMissing as e:
        if _require_flag():
            pytest.fail(str(e))
        pytest.skip(f"{e} (set KVMESH_REQUIRE_CONSUMERS=1 to make this a failure)")


# --- the CLI's decisions -------------------------------------------------------------------

@dataclass
class Workload:
    """One workload document of a case: what went in, what `kvmesh inject` wrote."""

    case: str
    doc_in: dict
    doc_out: dict

    @property
    def kind(self) -> str:
        return self.doc_in["kind"]

    @property
    def label(self) -> str:
        return f"{self.case}/{self.kind}/{self.doc_in['metadata'].get('name')}"

    def template(self, doc: dict) -> dict:
        path = workloads.TEMPLATE_PATHS[self.kind]
        return workloads._get(doc, path) if path else doc

    @property
    def status(self) -> Optional[dict]:
        raw = ((self.template(self.doc_out).get("metadata") or {}).get("annotations") or {}) \
            .get(names.ANN_STATUS)
        return None if raw is None else json.loads(raw)

    @property
    def injected(self) -> bool:
        return bool((self.status or {}).get("injected"))


@dataclass
class Outcome:
    case: str
    rc: int
    stdout: str
    stderr: str
    inputs: list
    outputs: list = field(default_factory=list)
    again: Optional[str] = None  # stdout of `kvmesh inject` on this case's own output

    @property
    def workloads(self) -> list[Workload]:
        return [Workload(self.case, i, o) for i, o in zip(self.inputs, self.outputs)
                if isinstance(i, dict) and i.get("kind") in workloads.TEMPLATE_PATHS]


def case_files() -> list[Path]:
    return sorted(REAL.glob("*.yaml"))


def cli(args: list[str]) -> tuple[int, str, str]:
    """`kvmesh inject ...` through the CLI's own entry point, in this process (the golden tier
    runs it as a process; 60-odd process starts would cost minutes on a busy machine)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = kvmesh_cli.main(args)
    return rc, out.getvalue(), err.getvalue()


def _run_case(path: Path, tmp: Path) -> Outcome:
    code, stdout, stderr = cli(["inject", "-f", str(path)])
    inputs = list(yaml.safe_load_all(path.read_text()))
    out = Outcome(path.stem, code, stdout, stderr, inputs)
    if code == 0:
        out.outputs = list(yaml.safe_load_all(stdout))
        again = tmp / f"{path.stem}.injected.yaml"
        again.write_text(stdout)
        code2, stdout2, stderr2 = cli(["inject", "-f", str(again)])
        out.again = stdout2 if code2 == 0 else f"exit {code2}: {stderr2}"
    return out


def run_all(files: list[Path], tmp: Path) -> dict[str, Outcome]:
    """One `kvmesh inject` per case (a denial in one must not hide the others), and one on
    its output."""
    return {o.case: o for o in (_run_case(f, tmp) for f in files)}


# --- the pod as the kubelet would start it ---------------------------------------------------

def running_pod(w: Workload) -> dict:
    """The injected pod with the identity the API server and the kubelet give it."""
    pod = workloads.pod_for(w.doc_out)
    pod["metadata"].setdefault("name", POD_NAME)
    pod["metadata"]["uid"] = POD_UID
    pod["status"] = {"podIP": POD_IP, "hostIP": "192.168.0.10"}
    return pod


def all_containers(pod: dict) -> list[dict]:
    spec = pod.get("spec") or {}
    return list(spec.get("containers") or []) + list(spec.get("initContainers") or [])


def container(pod: dict, name: str) -> dict:
    return next(c for c in all_containers(pod) if c["name"] == name)


def kvmesh_ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports") or []
            if p.get("name", "").startswith(names.PORT_NAME_PREFIX)}


def expand_words(words: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet expands $(VAR) in command and args from the container's env."""
    return [consumers._expand(w, env.get) for w in words]


# --- the argv vLLM receives ------------------------------------------------------------------

RECORDER = """#!{python}
import json, os, sys
with open(os.environ["KVMESH_ARGV_OUT"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""
RECORDED = ("vllm", "python", "python3") + tuple(f"python3.{n}" for n in range(8, 15))


def _no_network() -> list[str]:
    """Run the manifest's script in a fresh network namespace (no route anywhere) when this
    process may create one; the script runs a recorder instead of vLLM either way."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


def is_server(argv: list[str]) -> bool:
    prog = os.path.basename(argv[0]) if argv else ""
    if prog == "vllm":
        return argv[1:2] == ["serve"]
    if prog.startswith("python") and "-m" in argv:
        rest = argv[argv.index("-m") + 1:]
        return rest[:1] == ["vllm.entrypoints.openai.api_server"] or \
            rest[:2] == ["vllm.entrypoints.cli.main", "serve"]
    return False


def through_real_shell(argv: list[str], env: dict[str, str], tmp: Path) -> list[list[str]]:
    """Run the container's own `sh -c`/`bash -c` command line, with its container args as the
    shell's positional parameters exactly as the kubelet passes them, under the real shell;
    `vllm` and `python*` are recorders on PATH. Returns every recorded invocation: quoting,
    "$@"/$*, ${VAR} expansion and control flow are what the shell does, not what kvmesh's
    script parser believes."""
    bindir = tmp / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name in RECORDED:
        stub = bindir / name
        stub.write_text(RECORDER.format(python=sys.executable))
        stub.chmod(0o755)
    out = tmp / "argv.jsonl"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        _no_network() + argv, cwd=tmp, capture_output=True, text=True, timeout=SHELL_TIMEOUT_S,
        env={**env, "PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp),
             "KVMESH_ARGV_OUT": str(out)})
    calls = [json.loads(ln) for ln in out.read_text().splitlines()] if out.exists() else []
    if not any(is_server(c) for c in calls):
        raise AssertionError(
            f"the real shell never started a vLLM server (exit {proc.returncode}); recorded "
            f"{calls!r}; stderr: {proc.stderr[-1500:]}")
    return calls


def vllm_argv(c: dict, env: dict[str, str], tmp: Path) -> tuple[str, list[str]]:
    """(how it was found, the argv of the vLLM server process) for container `c`."""
    command = expand_words(list(c.get("command") or []), env)
    args = expand_words(list(c.get("args") or []), env)
    argv = command + args
    if command and os.path.basename(command[0]) in SHELLS:
        calls = through_real_shell(argv, env, tmp)
        return "shell", next(x for x in calls if is_server(x))
    if command:
        return "exec", argv
    # args-only: the vLLM images' entrypoint is the server (`vllm serve`)
    return "args-only", ["vllm", "serve", *args]
