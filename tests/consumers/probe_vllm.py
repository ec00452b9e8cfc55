#!/usr/bin/env python3
"""Feed `vllm serve` command lines to vLLM's REAL argument parser.

Runs inside the cached vllm venv (see setup_envs.sh); driven by consumers.py.

  stdin:  {"cases": [{"argv": ["vllm", "serve", "MODEL", ...]}
                     | {"argv": ["python3", "-m", "vllm.entrypoints.openai.api_server", ...]}
                     | {"shell": "<script given to sh -c>"},
                     ...  optional per case: "load_connector": true]}
  stdout: {"vllm_version": "...", "results": [
             {"ok": true, "form": "serve"|"api_server", "argv": [...],
              "model": ..., "tensor_parallel_size": ..., "pipeline_parallel_size": ...,
              "kv_transfer_config": {...} | null, "connector_registered": bool | null,
              ["connector_import": "ok" | "<error>"]}
           | {"ok": false, "stage": "locate"|"parse"|"validate"|"kv_transfer_config",
              "error": "...", ["argv": [...]]}, ...]}

How a command line is parsed (mirrors vLLM 0.33.0):
- `vllm serve ...`: vllm.entrypoints.cli.main.main() builds a top-level
  FlexibleArgumentParser, adds the `serve` sub-parser via
  ServeSubcommand().subparser_init() (= make_arg_parser), parses, then calls
  ServeSubcommand.validate (= validate_parsed_serve_args).  We do the same with
  only the `serve` sub-command registered, on argv[1:] ("serve", ...).
  model = the positional model_tag if given (as ServeSubcommand.cmd does).
- `python -m vllm.entrypoints.openai.api_server ...`: the parser of
  vllm.entrypoints.launchers.api_server.entry.main(): FlexibleArgumentParser +
  make_arg_parser + validate_parsed_serve_args.
- `--kv-transfer-config` JSON is turned into a KVTransferConfig by the argparse
  type (pydantic TypeAdapter) while parsing, so a rejected config is a parse
  error (SystemExit 2); EngineArgs passes that object on unchanged.  (If a
  vLLM version leaves a dict/str there, the probe constructs KVTransferConfig
  from it: stage "kv_transfer_config".)
- Runs with VLLM_TARGET_DEVICE=cpu (no GPU here; see below).
- connector_registered: kv_connector is a key of KVConnectorFactory._registry
  (vllm/distributed/kv_transfer/kv_connector/factory.py); null when
  kv_connector_module_path names an external module instead.
- Shell scripts: split with shlex (POSIX rules), cut into simple commands at
  `&&`, `||`, `;`, `|`, `&` and newlines, and take the first command that runs
  `vllm serve` or `python -m vllm.entrypoints.openai.api_server` (after
  optional `exec`/`env`/VAR=value prefixes).  No $VAR expansion is done.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import sys
import traceback

# No GPU here: without this, vLLM's platform is "unspecified" and building the
# serve parser fails in DeviceConfig ("Failed to infer device type").  The CPU
# platform only changes device-dependent defaults, not what the parser accepts.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Anything vLLM prints goes to stderr; the JSON answer owns the real stdout.
_OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

import vllm  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.entrypoints.cli.serve import ServeSubcommand  # noqa: E402
from vllm.entrypoints.common.cli_args import (  # noqa: E402
    make_arg_parser,
    validate_parsed_serve_args,
)
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

try:
    from vllm.config import KVTransferConfig  # noqa: E402
except ImportError:  # pragma: no cover - older layouts
    from vllm.config.kv_transfer import KVTransferConfig  # noqa: E402

API_SERVER_MODULES = {"vllm.entrypoints.openai.api_server"}
CLI_MODULES = {"vllm.entrypoints.cli.main"}
SEPARATORS = {"&&", "||", ";", "|", "&", "\n", ";;", "|&"}
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PYTHON = re.compile(r"^(.*/)?python[0-9.]*$")


def _serve_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    return parser


def _api_server_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(
        prog="api_server.py", description="vLLM OpenAI-Compatible RESTful API server."
    )
    return make_arg_parser(parser)


def classify(argv: list[str]) -> tuple[str, list[str]] | None:
    """Return (form, args-for-the-parser) for a vLLM server invocation, else None."""
    i = 0
    # wrappers: exec, env [-i] [VAR=val...], VAR=val prefixes
    while i < len(argv):
        tok = argv[i]
        if tok in ("exec", "env", "-i", "--") or _ASSIGN.match(tok):
            i += 1
            continue
        break
    argv = argv[i:]
    if not argv:
        return None
    prog = os.path.basename(argv[0])
    if prog == "vllm":
        if len(argv) >= 2 and argv[1] == "serve":
            return "serve", argv[1:]
        return None
    if _PYTHON.match(argv[0]):
        j = 1
        while j < len(argv) and argv[j].startswith("-") and argv[j] != "-m":
            j += 1  # interpreter flags such as -u, -O
        if j + 1 < len(argv) and argv[j] == "-m":
            mod = argv[j + 1]
            rest = argv[j + 2 :]
            if mod in API_SERVER_MODULES:
                return "api_server", rest
            if mod in CLI_MODULES and rest[:1] == ["serve"]:
                return "serve", rest
    return None


def split_shell(script: str) -> list[list[str]]:
    """Split an sh -c script into simple commands (POSIX quoting rules)."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=";&|<>()\n")
    lex.whitespace = " \t\r"
    lex.whitespace_split = True
    cmds: list[list[str]] = [[]]
    for tok in lex:
        if tok in SEPARATORS or set(tok) <= set(";&|\n"):
            cmds.append([])
        else:
            cmds[-1].append(tok)
    return [c for c in cmds if c]


def _err(exc: BaseException) -> str:
    msg = str(exc)
    if isinstance(exc, AssertionError) and not msg:
        tb = traceback.extract_tb(exc.__traceback__)
        if tb:
            msg = (tb[-1].line or "").strip()
    return f"{type(exc).__name__}: {msg}"


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    return repr(v)


def _kv_dict(cfg) -> dict:
    try:
        from pydantic import TypeAdapter

        d = TypeAdapter(type(cfg)).dump_python(cfg, mode="json")
    except Exception:  # noqa: BLE001
        import dataclasses

        d = dataclasses.asdict(cfg)
    return _jsonable(d)


def parse_one(argv: list[str], load_connector: bool = False) -> dict:
    found = classify(argv)
    if found is None:
        return {"ok": False, "stage": "locate", "error": f"not a vllm server command: {argv!r}"}
    form, args_list = found
    parser = _serve_parser() if form == "serve" else _api_server_parser()
    res: dict = {"form": form, "argv": argv}
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(args_list)
    except SystemExit as e:
        text = stderr.getvalue()
        i = text.find(" error: ")
        msg = text[i + len(" error: ") :].strip() if i >= 0 else (text.strip() or f"exit {e.code}")
        return {**res, "ok": False, "stage": "parse", "error": f"SystemExit({e.code}): {msg}",
                "stderr": stderr.getvalue()[-3000:]}
    except Exception as e:  # noqa: BLE001
        return {**res, "ok": False, "stage": "parse", "error": _err(e)}
    try:
        if form == "serve":
            ServeSubcommand().validate(args)
        else:
            validate_parsed_serve_args(args)
    except Exception as e:  # noqa: BLE001
        return {**res, "ok": False, "stage": "validate", "error": _err(e)}
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag
    res.update(
        model=getattr(args, "model", None),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", None),
        pipeline_parallel_size=getattr(args, "pipeline_parallel_size", None),
        kv_transfer_config=None,
        connector_registered=None,
    )
    # The argparse type of --kv-transfer-config already built a KVTransferConfig
    # (pydantic TypeAdapter); EngineArgs keeps it as-is and hands it to
    # VllmConfig.  (EngineArgs.from_cli_args itself is not used: its
    # __post_init__ resolves the model on the HF hub.)
    try:
        kv = getattr(args, "kv_transfer_config", None)
        if kv is not None and not isinstance(kv, KVTransferConfig):
            kv = KVTransferConfig(**(json.loads(kv) if isinstance(kv, str) else dict(kv)))
    except Exception as e:  # noqa: BLE001
        return {**res, "ok": False, "stage": "kv_transfer_config", "error": _err(e)}
    if kv is not None:
        res["kv_transfer_config"] = _kv_dict(kv)
        if kv.kv_connector is not None and not getattr(kv, "kv_connector_module_path", None):
            res["connector_registered"] = kv.kv_connector in KVConnectorFactory._registry
        if load_connector and kv.kv_connector is not None:
            try:
                KVConnectorFactory.get_connector_class(kv)
                res["connector_import"] = "ok"
            except BaseException as e:  # noqa: BLE001
                res["connector_import"] = _err(e)
    res["ok"] = True
    return res


def run_case(case: dict) -> dict:
    load = bool(case.get("load_connector"))
    if "argv" in case:
        return parse_one([str(a) for a in case["argv"]], load)
    if "shell" in case:
        try:
            cmds = split_shell(case["shell"])
        except ValueError as e:  # unbalanced quotes
            return {"ok": False, "stage": "locate", "error": f"shell split: {e}"}
        for cmd in cmds:
            if classify(cmd) is not None:
                return parse_one(cmd, load)
        return {"ok": False, "stage": "locate",
                "error": f"no vllm server invocation in shell script; commands: {cmds!r}"}
    return {"ok": False, "stage": "locate", "error": "case needs 'argv' or 'shell'"}


def main() -> int:
    req = json.load(sys.stdin)
    results = []
    for case in req.get("cases", []):
        try:
            results.append(run_case(case))
        except Exception as e:  # noqa: BLE001 - a probe bug must not lose the batch
            results.append({"ok": False, "stage": "probe", "error": _err(e),
                            "traceback": traceback.format_exc()[-3000:]})
    json.dump({"vllm_version": vllm.__version__, "results": results}, _OUT)
    _OUT.write("\n")
    _OUT.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
