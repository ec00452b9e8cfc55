"""The mutated command lines parse with vLLM's own `vllm serve` / api_server argument parser
(vLLM 0.33.0), and the injected --kv-transfer-config is accepted by vLLM's KVTransferConfig
with a connector vLLM has registered. Shell-script launches are parsed the same way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import consumers
from injected import injected_goldens
from kvmesh.core import contract, launch

# mp mode's command lines: tests/contract/test_mp_inject.py (another connector, a sidecar).
CASES = [c for c in injected_goldens() if "v0-connector" not in c.case and c.mode != "mp"]


STUB = """#!{python}
import json, os, sys
with open(os.environ["KVMESH_ARGV_OUT"], "w") as f:
    json.dump([os.path.basename(sys.argv[0])] + sys.argv[1:], f)
"""


def run_script_with_real_shell(argv: list[str], env: dict, tmp) -> list[str]:
    """Run the container's `sh -c` command with the real shell, `vllm`/`python*` replaced by
    a stub that records its argv: quoting, line continuations, redirections and $VAR
    expansion are then exactly what the shell does, not what kvmesh's parser believes."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("vllm", "python", "python3"):
        stub = bindir / name
        stub.write_text(STUB.format(python=sys.executable))
        stub.chmod(0o755)
    (bindir / "tee").write_text("#!/bin/sh\nexec cat\n")  # no writes outside tmp
    (bindir / "tee").chmod(0o755)
    out = tmp / "argv.json"
    subprocess.run(argv, env={**env, "PATH": f"{bindir}:/usr/bin:/bin",
                              "KVMESH_ARGV_OUT": str(out)},
                   check=True, timeout=20, capture_output=True)
    return json.loads(out.read_text())


def _probe_case(c, tmp) -> dict:
    command, args = c.container.get("command") or [], c.container.get("args") or []
    argv = command + args
    if launch.server_start(argv) is not None:
        return {"argv": argv}
    if command and launch._base(command[0]) in launch.SHELLS:
        env = consumers.kubelet_expand(c.container.get("env") or [], c.pod)
        return {"argv": run_script_with_real_shell(argv, env, tmp)}
    # args-only: the vLLM image's entrypoint is `vllm serve`
    return {"argv": ["vllm", "serve", *args]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shell")
    return dict(zip((c.case for c in CASES),
                    consumers.vllm_parse([_probe_case(c, tmp) for c in CASES])))


@pytest.mark.parametrize("case", CASES, ids=[c.case for c in CASES])
def test_vllm_parses_mutated_command_line(case, results):
    r = results[case.case]
    assert r["ok"], r
    kv = r["kv_transfer_config"]
    assert kv["kv_connector"] == contract.CONNECTOR_V1
    assert kv["kv_role"] == "kv_both"
    assert r["connector_registered"] is True


def test_shell_form_is_covered(results):
    shell = [c.case for c in CASES if "shell-script" in c.case]
    assert shell
    for case in shell:  # the real shell expanded $MODEL and kept every flag
        assert results[case]["argv"][:4] == ["vllm", "serve", "/models/model", "--port"]


def test_parser_rejects_broken_configs_and_v0_connector_is_not_registered():
    """The parser really rejects broken configs (a bad kv_role at parse time, an unknown key);
    the V0 connector parses but is not registered in current vLLM: kvmesh injects it only for
    pre-0.3.0 LMCache images (vLLM 0.8-0.10). One vLLM process for the three."""
    bad_role, unknown_key, v0 = consumers.vllm_parse([
        {"argv": ["vllm", "serve", "m", "--kv-transfer-config",
                  json.dumps({"kv_connector": contract.CONNECTOR_V1, "kv_role": "both"})]},
        {"argv": ["vllm", "serve", "m", "--kv-transfer-config",
                  json.dumps({"kv_connector": contract.CONNECTOR_V1, "kv_role": "kv_both",
                              "no_such_key": 1})]},
        {"argv": ["vllm", "serve", "m", "--kv-transfer-config",
                  contract.kv_transfer_json(contract.CONNECTOR_V0)]},
    ])
    assert not bad_role["ok"] and bad_role["stage"] == "parse", bad_role
    assert "kv_role" in bad_role["error"], bad_role
    assert not unknown_key["ok"], unknown_key
    assert v0["ok"] and v0["connector_registered"] is False, v0
