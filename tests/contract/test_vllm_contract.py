"""The mutated command lines parse with vLLM's own `vllm serve` / api_server argument parser
(vLLM 0.33.0), and the injected --kv-transfer-config is accepted by vLLM's KVTransferConfig
with a connector vLLM has registered. Shell-script launches are parsed the same way."""

from __future__ import annotations

import json

import pytest

import consumers
from injected import injected_goldens
from kvmesh.webhook import contract, launch

CASES = [c for c in injected_goldens() if "v0-connector" not in c.case]


def _probe_case(c) -> dict:
    command, args = c.container.get("command") or [], c.container.get("args") or []
    argv = command + args
    if launch.server_start(argv) is not None:
        return {"argv": argv}
    if command and launch._base(command[0]) in launch.SHELLS:
        return {"shell": argv[-1]}
    # args-only: the vLLM image's entrypoint is `vllm serve`
    return {"argv": ["vllm", "serve", *args]}


@pytest.fixture(scope="module")
def results():
    return dict(zip((c.case for c in CASES), consumers.vllm_parse([_probe_case(c) for c in CASES])))


@pytest.mark.parametrize("case", CASES, ids=[c.case for c in CASES])
def test_vllm_parses_mutated_command_line(case, results):
    r = results[case.case]
    assert r["ok"], r
    kv = r["kv_transfer_config"]
    assert kv["kv_connector"] == contract.CONNECTOR_V1
    assert kv["kv_role"] == "kv_both"
    assert r["connector_registered"] is True


def test_shell_form_is_covered(results):
    assert any("shell-script" in c.case for c in CASES)


def test_parser_really_rejects_broken_configs():
    bad = consumers.vllm_parse([
        {"argv": ["vllm", "serve", "m", "--kv-transfer-config",
                  json.dumps({"kv_connector": contract.CONNECTOR_V1, "kv_role": "both"})]},
        {"argv": ["vllm", "serve", "m", "--kv-transfer-config",
                  json.dumps({"kv_connector": contract.CONNECTOR_V1, "kv_role": "kv_both",
                              "no_such_key": 1})]},
    ])
    assert [r["ok"] for r in bad] == [False, False]


def test_v0_connector_is_not_registered_in_current_vllm():
    """kvmesh injects the V0 connector only for pre-0.3.0 LMCache images (vLLM 0.8-0.10)."""
    [r] = consumers.vllm_parse([{"argv": ["vllm", "serve", "m", "--kv-transfer-config",
                                          contract.kv_transfer_json(contract.CONNECTOR_V0)]}])
    assert r["ok"] and r["connector_registered"] is False
