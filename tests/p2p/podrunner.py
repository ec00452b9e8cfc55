"""TEST CODE: run a pod of the control plane as a real LMCache 0.3.6 engine process.

KWOK only fakes pods; this module is the "kubelet + container runtime" for the LMCache part of
a vLLM pod. Given the pod as stored in the API server (after real admission), it starts
tests/p2p/engine_node.py in the `lmcache-0.3.6-engine` venv with exactly the environment the
kubelet would give the pod's vLLM container: the container's `env` list expanded by
`kubelet_expand` against the pod's own metadata and status (so `$(KVMESH_POD_IP)` becomes the
pod IP KWOK assigned, a loopback address in 127.64.0.0/16 that the engine really binds), plus
the few variables an image/runtime provides (PATH, HOME, HOSTNAME). Nothing is added for
LMCache: if kvmesh's injection is wrong, the engine is wrong.

The engine is launched under `setarch -R` (ASLR off): on a PIE Python 3.11, `hash(None)` (part
of LMCache 0.3.6's chunk keys when vLLM is absent) differs per process otherwise, and peers
never hit. `EngineProcess.ready["hash_none"]` lets tests assert the keys agree.

Stdlib only (runs in the main test venv); the process group of every engine is killed on
close().
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "consumers"))
import consumers  # noqa: E402  (tests/consumers/consumers.py: env paths, kubelet_expand)

ENGINE_ENV = "lmcache-0.3.6-engine"
NODE_SCRIPT = HERE / "engine_node.py"
READY_TIMEOUT_S = float(os.environ.get("KVMESH_ENGINE_READY_TIMEOUT", "90"))


class EngineError(RuntimeError):
    """The engine process died, printed garbage or did not answer in time."""


def engine_python() -> Path:
    """The engine venv's python; ConsumerEnvMissing (with the setup command) if absent."""
    return consumers.env_python(ENGINE_ENV)


def no_aslr_prefix() -> list[str]:
    """`setarch -R` (util-linux): ASLR off for the engine, so hash(None) is the same in every
    engine process (see the module docstring)."""
    exe = shutil.which("setarch")
    if exe is None:
        raise EngineError("setarch (util-linux) is needed to run LMCache 0.3.6 engines with "
                          "matching chunk keys on a PIE Python 3.11: apt-get install util-linux")
    return [exe, os.uname().machine, "-R"]


def container_of(pod: dict, name: str = "vllm") -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def pod_environment(pod: dict, container: str = "vllm") -> dict[str, str]:
    """The process environment the kubelet gives `container` of `pod` (env list only: kvmesh
    injects no envFrom), plus what the image/runtime provides."""
    env = consumers.kubelet_expand(container_of(pod, container).get("env") or [], pod)
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
            "HOSTNAME": pod["metadata"]["name"], "LANG": "C.UTF-8"}
    return {**base, **env}


class EngineProcess:
    """One engine for one pod. `call(cmd, timeout=..., **args)` -> reply dict."""

    def __init__(self, pod: dict, log_dir: Path):
        self.pod_name = pod["metadata"]["name"]
        self.pod_ip = pod["status"]["podIP"]
        self.env = pod_environment(pod)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"engine-{self.pod_name}-{int(time.time() * 1000)}.log"
        self._log = open(self.log_path, "wb")
        argv = [*no_aslr_prefix(), str(engine_python()), "-s", str(NODE_SCRIPT)]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=self.env, cwd=str(HERE),
                                     start_new_session=True)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._ids = itertools.count(1)
        self.ready: dict = {}
        self.frozen = False

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line.decode(errors="replace"))
        self._lines.put(None)

    def _read(self, deadline: float) -> dict:
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                raise TimeoutError("no answer in time") from None
            if line is None:
                raise EngineError(f"engine {self.pod_name} exited "
                                  f"(rc={self.proc.poll()}):\n{self.tail()}")
            try:
                return json.loads(line)
            except ValueError:
                raise EngineError(f"engine {self.pod_name} printed {line!r}") from None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict:
        try:
            msg = self._read(time.monotonic() + timeout)
        except TimeoutError:
            self.close()
            raise EngineError(f"engine {self.pod_name} not ready after {timeout}s:\n"
                              f"{self.tail()}") from None
        if msg.get("event") != "ready":
            self.close()
            raise EngineError(f"engine {self.pod_name} failed to start: "
                              f"{msg.get('error')}\n{msg.get('traceback', '')}\n{self.tail()}")
        msg["start_s"] = time.monotonic() - self.t0
        self.ready = msg
        return msg

    def call(self, cmd: str, timeout: Optional[float] = None, **args: Any) -> dict:
        """Send one command. `timeout` bounds the LMCache call inside the engine (a blocked call
        answers {"ok": False, "timeout": True}); the reply itself is awaited `timeout + 30` s
        (or 120 s) before the engine is declared hung."""
        rid = next(self._ids)
        req = {"id": rid, "cmd": cmd, **args}
        if timeout is not None:
            req["timeout"] = timeout
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            raise EngineError(f"engine {self.pod_name} is gone:\n{self.tail()}") from None
        try:
            msg = self._read(time.monotonic() + (timeout + 30 if timeout else 120))
        except TimeoutError:
            raise EngineError(f"engine {self.pod_name} did not answer {cmd}:\n"
                              f"{self.tail()}") from None
        if msg.get("id") != rid:
            raise EngineError(f"engine {self.pod_name}: reply {msg} to request {rid}")
        return msg

    # -- what happens to a container

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def freeze(self) -> None:
        """SIGSTOP: the process stays, its kernel sockets still accept connections."""
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL (a crash / OOM kill / container runtime stopping it): no clean shutdown,
        LMCache's keys stay in Redis."""
        self._signal(signal.SIGKILL)
        self.thaw()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            self.kill()
        for f in (self.proc.stdin, self._log):
            try:
                f.close()  # type: ignore[union-attr]
            except (OSError, AttributeError):
                pass

    def tail(self, n: int = 40) -> str:
        try:
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (OSError, ValueError):
            return ""


class PodRunner:
    """Starts and tracks engines for pods; close() kills every one it started."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.engines: list[EngineProcess] = []

    def start(self, pod: dict) -> EngineProcess:
        e = EngineProcess(pod, self.log_dir)
        self.engines.append(e)
        e.wait_ready()
        return e

    def close(self) -> None:
        for e in self.engines:
            e.close()
        self.engines.clear()
