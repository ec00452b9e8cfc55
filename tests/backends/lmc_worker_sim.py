"""TEST CODE ONLY: a simulated LMCache 0.5.6 worker (``LMCacheWorker``'s controller protocol).

Two halves in one file:

* ``WorkerSim`` (stdlib only, imported by the tests in kvmesh's venv) spawns this file with the
  vllm-0.33.0 consumer venv's python and drives it with JSON lines on stdin/stdout.
* ``_serve()`` (runs in that venv) imports lmcache's real message classes and speaks the protocol
  the way ``lmcache/v1/cache_controller/worker.py`` does:
  - register: DEALER → controller ROUTER "reply" port, frames ``[b"", msgpack(RegisterMsg)]``,
    answer ``RegisterRetMsg{extra_config:{heartbeat_url}}`` (``LMCacheWorker.register``);
  - KV admits: PUSH → controller PULL port, one multipart of ``msgpack(BatchedKVOperationMsg)``
    (``LMCacheWorker.push``), location ``"LocalCPUBackend"`` as LocalCPUBackend reports it;
  - P2P lookup: ``BatchedP2PLookupMsg`` over the worker's DEALER → ``BatchedP2PLookupRetMsg``;
  - heartbeat: DEALER → the ``heartbeat_url`` handed out at registration, ``HeartbeatMsg``;
  - kill: drop the worker's sockets without deregistering (a pod that died).
  It does not bind the worker's REP socket (the controller only connects a REQ to ip:port for
  control operations, which these tests never issue), so the ip may be any loopback address.

``decode`` runs exactly the controller's JSON path on bytes (``msgspec.convert(json.loads(part),
type=Msg)``, ``controller_manager.py`` L347–351) and returns the decoded message.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

READY = "ready"


class SimError(RuntimeError):
    pass


class WorkerSim:
    """Client for one simulator subprocess (many simulated workers)."""

    def __init__(self, python: Path, pull_url: str, reply_url: str, env: dict[str, str],
                 stderr_path: Path):
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--serve", pull_url, reply_url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
            text=True, bufsize=1)

    def wait_ready(self, timeout: float = 120.0) -> None:
        res = self._read(timeout)
        if res != READY:
            raise SimError(f"simulator did not start: {res!r}; stderr: {self.stderr_tail()}")

    def stderr_tail(self, n: int = 3000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _read(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimError(f"simulator: no answer within {timeout}s; stderr: {self.stderr_tail()}")
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if not r:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise SimError(f"simulator exited (rc={self.proc.poll()}); stderr: {self.stderr_tail()}")
            msg = json.loads(line)
            if not msg.get("ok"):
                raise SimError(f"simulator error: {msg.get('error')}")
            return msg.get("result")

    def call(self, cmd: str, timeout: float = 15.0, **kw: Any) -> Any:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    # convenience wrappers --------------------------------------------------------------
    def register(self, instance_id: str, worker_id: int, ip: str, port: int,
                 peer_init_url: Optional[str]) -> dict:
        return self.call("register", instance_id=instance_id, worker_id=worker_id, ip=ip,
                         port=port, peer_init_url=peer_init_url)

    def admit(self, instance_id: str, worker_id: int, keys: list[int],
              location: str = "LocalCPUBackend") -> None:
        self.call("admit", instance_id=instance_id, worker_id=worker_id, keys=keys,
                  location=location)

    def lookup(self, instance_id: str, worker_id: int, hashes: list[int]) -> list[list]:
        return self.call("lookup", instance_id=instance_id, worker_id=worker_id, hashes=hashes)

    def heartbeat(self, instance_id: str, worker_id: int) -> dict:
        return self.call("heartbeat", instance_id=instance_id, worker_id=worker_id)

    def kill(self, instance_id: str, worker_id: int) -> None:
        self.call("kill", instance_id=instance_id, worker_id=worker_id)

    def decode(self, parts: list[bytes]) -> list[dict]:
        return self.call("decode", parts=[p.decode() for p in parts])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._stderr.close()


# ------------------------------------------------------------------------------------------
# Server side: runs in the vllm-0.33.0 venv (lmcache 0.5.6)
# ------------------------------------------------------------------------------------------

def _serve(pull_url: str, reply_url: str) -> None:  # pragma: no cover - runs in the other venv
    # Keep the protocol channel clean: anything else written to fd 1 goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def answer(ok: bool, result: Any = None, error: str = "") -> None:
        out.write(json.dumps({"ok": ok, "result": result, "error": error}) + "\n")
        out.flush()

    import msgspec
    import zmq

    from lmcache.v1.cache_controller.message import (
        BatchedKVOperationMsg, BatchedP2PLookupMsg, HeartbeatMsg, KVOpEvent, Msg, OpType,
        RegisterMsg, RegisterRetMsg)

    RECV_MS, SEND_MS = 5000, 5000  # LMCache defaults are 30000/10000 (rpc_utils)
    ctx = zmq.Context()
    workers: dict[tuple[str, int], dict] = {}

    def dealer(url: str):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.RCVTIMEO, RECV_MS)
        s.setsockopt(zmq.SNDTIMEO, SEND_MS)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://{url}")
        return s

    def request(sock, msg) -> Any:
        sock.send_multipart([b"", msgspec.msgpack.encode(msg)])
        frames = sock.recv_multipart()
        return msgspec.msgpack.decode(frames[-1], type=Msg)

    def drop(key) -> None:
        w = workers.pop(key, None)
        if w:
            for name in ("req", "push", "hb"):
                if w.get(name) is not None:
                    w[name].close(linger=0)

    answer(True, READY)
    for line in sys.stdin:
        try:
            c = json.loads(line)
            cmd = c.pop("cmd")
            if cmd == "quit":
                answer(True, "bye")
                break
            key = (c.get("instance_id"), c.get("worker_id"))
            if cmd == "register":
                drop(key)  # a new process incarnation: fresh sockets
                w = {"info": dict(ip=c["ip"], port=c["port"], peer_init_url=c["peer_init_url"]),
                     "req": dealer(reply_url), "push": ctx.socket(zmq.PUSH), "hb": None, "seq": {}}
                w["push"].setsockopt(zmq.LINGER, 2000)
                w["push"].connect(f"tcp://{pull_url}")
                workers[key] = w
                ret = request(w["req"], RegisterMsg(instance_id=key[0], worker_id=key[1],
                                                    **w["info"]))
                if not isinstance(ret, RegisterRetMsg):
                    raise RuntimeError(f"unexpected register answer {ret!r}")
                hb_url = ret.extra_config.get("heartbeat_url")
                if hb_url:
                    w["hb"] = dealer(hb_url)
                answer(True, {"type": type(ret).__name__, "extra_config": ret.extra_config})
            elif cmd == "admit":
                w = workers[key]
                loc = c["location"]
                ops = []
                for k in c["keys"]:
                    seq = w["seq"].get(loc, -1) + 1
                    w["seq"][loc] = seq
                    ops.append(KVOpEvent(op_type=OpType.ADMIT, key=k, seq_num=seq))
                msg = BatchedKVOperationMsg(instance_id=key[0], worker_id=key[1], location=loc,
                                            operations=ops)
                w["push"].send_multipart([msgspec.msgpack.encode(msg)])
                answer(True, len(ops))
            elif cmd == "lookup":
                w = workers.get(key)
                sock = w["req"] if w else dealer(reply_url)
                try:
                    ret = request(sock, BatchedP2PLookupMsg(hashes=c["hashes"],
                                                            instance_id=key[0], worker_id=key[1]))
                finally:
                    if not w:
                        sock.close(linger=0)
                answer(True, [list(t) for t in ret.layout_info])
            elif cmd == "heartbeat":
                w = workers[key]
                if w["hb"] is None:
                    raise RuntimeError("no heartbeat_url was handed out at registration")
                ret = request(w["hb"], HeartbeatMsg(instance_id=key[0], worker_id=key[1],
                                                    **w["info"]))
                answer(True, {"type": type(ret).__name__,
                              "commands": [{"type": type(x).__name__, **msgspec.to_builtins(x)}
                                           for x in getattr(ret, "commands", [])]})
            elif cmd == "kill":
                drop(key)
                answer(True, None)
            elif cmd == "decode":
                # exactly the controller's JSON branch (controller_manager.py L347-351)
                res = []
                for part in c["parts"]:
                    b = part.encode()
                    assert b.startswith(b"{")
                    m = msgspec.convert(json.loads(b), type=Msg)
                    res.append({"type": type(m).__name__, **msgspec.to_builtins(m)})
                answer(True, res)
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as e:  # report, keep serving
            answer(False, error=f"{type(e).__name__}: {e}")
    for key in list(workers):
        drop(key)
    ctx.term()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        _serve(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: lmc_worker_sim.py --serve <pull host:port> <reply host:port>")
