"""TEST CODE: the JSON-lines control protocol shared by both engine processes
(engine_node.py for LMCache 0.3.6, engine_node_ctrl.py for 0.5.6).

Stdlib only (psutil is imported lazily; both engine venvs have it), so either engine venv can
import it: the scripts' own directory is first on sys.path.

Start-up: one {"event": "ready", ...} line (built by each engine) or {"event": "fatal", ...}
(start_or_exit). Then one request per stdin line: {"id", "cmd", "timeout"?, ...args} -> one
reply line on the protocol stream (a dup of the original stdout, so library output cannot
corrupt it).
`node.cmd_<cmd>(**args)` answers; with a timeout the call runs in a thread, and a call that
is still blocked marks the node wedged (a hung LMCache call never returns) so later
data-path calls fail fast instead of queueing behind it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Callable, TypeVar

T = TypeVar("T")


def protocol_reply() -> Callable[[dict], None]:
    """Call before importing LMCache: keep the real stdout for replies only. Returns the
    function that writes one reply line to it."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)

    def reply(obj: dict) -> None:
        stream.write(json.dumps(obj) + "\n")
        stream.flush()
    return reply


def start_or_exit(reply: Callable[[dict], None], start: Callable[[], T]) -> T:
    """The engine's start-up; if it raises, reply {"event": "fatal", ...} and exit 3."""
    try:
        return start()
    except Exception as e:
        reply({"event": "fatal", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()})
        os._exit(3)


def listen_addrs() -> list[str]:
    import psutil
    return sorted(f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN)


def run_call(node, fn: Callable, args: dict, timeout) -> dict:
    if timeout is None:
        return fn(**args)
    box: dict = {}

    def target():
        try:
            box["result"] = fn(**args)
        except BaseException as e:  # reported to the caller like a direct call would be
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(timeout)
    if t.is_alive():
        import faulthandler
        print(f"=== {fn.__name__} blocked for {timeout}s; thread stacks:", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        node.wedged = f"{fn.__name__} blocked for more than {timeout}s"
        return {"ok": False, "timeout": True, "elapsed_s": time.perf_counter() - t0}
    if "error" in box:
        raise box["error"]
    return box["result"]


def serve(node, reply: Callable[[dict], None], data_path: set[str]) -> None:
    """Answer requests until "exit" or EOF, then leave without joining LMCache's non-daemon
    threads."""
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        rid, cmd = req.pop("id", None), req.pop("cmd", "")
        timeout = req.pop("timeout", None)
        if cmd == "exit":
            reply({"id": rid, "ok": True})
            break
        fn = getattr(node, f"cmd_{cmd}", None)
        if fn is None:
            reply({"id": rid, "ok": False, "error": f"unknown command {cmd!r}"})
            continue
        if cmd in data_path and node.wedged:
            reply({"id": rid, "ok": False, "error": f"wedged: {node.wedged}"})
            continue
        try:
            out = run_call(node, fn, req, timeout)
            # run_call's own {"ok": False, "timeout": True} passes through as is
            reply({"id": rid, "ok": True, **out} if "timeout" not in out else {"id": rid, **out})
        except Exception as e:
            reply({"id": rid, "ok": False, "exception": type(e).__name__, "error": str(e)[:500],
                   "traceback": traceback.format_exc()[-3000:]})
    os._exit(0)
