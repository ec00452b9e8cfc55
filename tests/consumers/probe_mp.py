#!/usr/bin/env python3
"""Feed argv + env to the REAL `lmcache server` and `lmcache coordinator` commands (lmcache 0.5.6,
vllm-0.33.0 venv) and report the configs they build, without serving.

Protocol (driven through tests/consumers/consumers.py run_probe):

  stdin:  {"cases": [{"cmd": "server"|"coordinator", "argv": [...], "env": {...}}
                     | {"cmd": "connector", "extra": {...}, "parallel": [tp, pp]}, ...]}
  stdout: {"lmcache_version": "...", "results": [{"ok": true, "config": {...}}
                                                 | {"ok": false, "error": "..."}, ...]}

Each case runs the command's own `add_arguments` + `execute` (lmcache/cli/commands/server.py,
coordinator.py) with os.environ holding exactly the case's env; only the final serve call is
replaced by a recorder: `uvicorn.Server` for the server (`run_http_server` validates the P2P
settings, stores the five configs in `http_server._configs`, then builds `uvicorn.Server(...)`
and runs it: multiprocess/http_server.py:216-260) and `uvicorn.run` for the coordinator
(cli/commands/coordinator.py:328 passes it the app built from MPCoordinatorConfig). Everything
before that -- argparse, env fallbacks, validation, create_app -- is LMCache's code as shipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import traceback

os.environ["LMCACHE_TRACK_USAGE"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["LMCACHE_DISABLE_BANNER"] = "1"

_OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

import lmcache  # noqa: E402
import uvicorn  # noqa: E402
from lmcache.cli.commands.coordinator import CoordinatorCommand  # noqa: E402
from lmcache.cli.commands.server import ServerCommand  # noqa: E402
import lmcache.v1.multiprocess.http_server as http_server  # noqa: E402


def plain(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def connector_case(case: dict) -> dict:
    """What LMCache's own MP connector (lmcache.integration.vllm.lmcache_mp_connector) makes of
    a kv_connector_extra_config: the server URL it connects to (single-server form), the
    extra config as its adapters resolve it, and the transfer mode create_transfer_context
    would use; plus the ParallelStrategy it builds for each rank of case["parallel"]
    (tp, pp), through its own build_parallel_strategy_from_vllm_config."""
    from types import SimpleNamespace

    from lmcache.integration.vllm import lmcache_mp_connector as conn
    from lmcache.integration.vllm import vllm_multi_process_adapter as ad
    from lmcache.v1.multiprocess.transfer_context import worker_transfer

    extra = case["extra"]
    resolved = ad._resolve_extra_config(extra)
    out = {"resolved": resolved,
           "server_url": conn._ensure_transport_scheme(
               f"{extra.get('lmcache.mp.host', 'tcp://localhost')}:"
               f"{extra.get('lmcache.mp.port', 5555)}"),
           "uses_server_urls": bool(extra.get("lmcache.mp.server_urls")),
           "autostart": conn.is_mp_server_autostart_enabled(extra),
           "transfer_mode": worker_transfer._resolve_mode(resolved["mp_transfer_mode"]).value}
    tp, pp = case.get("parallel", (1, 1))
    ranks = []
    for rank in range(tp * pp):
        pc = SimpleNamespace(world_size=tp * pp, rank=rank, tensor_parallel_size=tp,
                             pipeline_parallel_size=pp, decode_context_parallel_size=1)
        vc = SimpleNamespace(parallel_config=pc, model_config=SimpleNamespace(
            use_mla=False, is_deepseek_mla=False))
        ps = conn.build_parallel_strategy_from_vllm_config(vc, 1)
        ranks.append({"kv_world_size": ps.kv_world_size, "kv_worker_id": ps.kv_worker_id,
                      "is_kv_writer": ps.is_kv_writer, "mla_only": ps.mla_only})
    out["ranks"] = ranks
    return {"ok": True, "config": plain(out)}


def run_case(case: dict) -> dict:
    if case["cmd"] == "connector":
        try:
            return connector_case(case)
        except BaseException as e:  # noqa: BLE001 - report, never crash the batch
            return {"ok": False, "error": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc()[-1500:]}
    cmd = {"server": ServerCommand, "coordinator": CoordinatorCommand}[case["cmd"]]()
    parser = argparse.ArgumentParser(prog=f"lmcache {case['cmd']}", exit_on_error=False)
    cmd.add_arguments(parser)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1"})
    os.environ.update(case.get("env", {}))
    got: dict = {}
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            try:
                args = parser.parse_args(case["argv"])
            except SystemExit as e:  # argparse errors exit(2) even with exit_on_error=False
                return {"ok": False, "error": f"argparse exit {e.code}: {err.getvalue().strip()}"}
        if case["cmd"] == "server":
            class Recorder:
                def __init__(self, config):
                    got["serve"] = {"host": config.host, "port": config.port}

                def run(self):
                    got.update(http_server._configs)
            uvicorn.Server = Recorder
        else:
            uvicorn.run = lambda app, **kw: got.update(config=app.state.config, serve=kw)
        cmd.execute(args)
        return {"ok": True, "config": plain(got)}
    except BaseException as e:  # noqa: BLE001 - report, never crash the batch
        return {"ok": False, "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc()[-1500:]}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    payload = json.load(sys.stdin)
    results = [run_case(c) for c in payload["cases"]]
    _OUT.write(json.dumps({"lmcache_version": getattr(lmcache, "__version__", "?"),
                           "results": results}))
    _OUT.flush()


if __name__ == "__main__":
    main()
