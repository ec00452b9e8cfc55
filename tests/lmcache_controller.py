"""TEST CODE: the real `lmcache_controller` (LMCache 0.5.6, from the vllm-0.33.0 consumer venv)
as a process, for tests/backends/test_lmcache_controller.py, tests/e2e/test_mesh.py and
tests/p2p/ctrlrunner.py.

Start it bound to a host with given ports (default: the ports kvmesh's lookup StatefulSet
declares), reaper off (workers must not vanish behind the tests' back), logging into a
directory; `wait_up()` until its HTTP API answers; `stop()` its process group. A failed
`wait_up()` stops the process before raising, so a caller never leaks it.

Stdlib only at import time (kvmesh's own client is imported by `workers()` only).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "consumers"))
import consumers  # noqa: E402  (tests/consumers/consumers.py: consumer venv paths)

ENV = "vllm-0.33.0"


class ControllerNotUp(RuntimeError):
    """lmcache_controller exited or did not answer in time (its log tail attached)."""


def child_env() -> dict[str, str]:
    """A clean environment for lmcache_controller and the worker simulator: nothing of the
    test process leaks in; no telemetry, no hub access."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


class LMCacheController:
    """One `lmcache_controller` process on `ip`. Raises consumers.ConsumerEnvMissing (with the
    setup command) if the venv is absent."""

    def __init__(self, ip: str, log_dir: Path, port: int = 9000, pull: int = 8300,
                 reply: int = 8400, heartbeat: int = 8500, extra_args: tuple[str, ...] = ()):
        self.python = consumers.env_python(ENV)  # the venv, checked as a whole
        exe = consumers.env_dir(ENV) / "bin" / "lmcache_controller"
        if not exe.exists():
            raise consumers.ConsumerEnvMissing(
                f"{exe} missing: recreate the env with bash {consumers.SETUP_SCRIPT} {ENV}")
        self.ip, self.port = ip, port
        self.http_url = f"http://{ip}:{port}"
        self.pull_url = f"{ip}:{pull}"      # the form LMCACHE_CONTROLLER_PULL_URL uses
        self.reply_url = f"{ip}:{reply}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"lmcache_controller-{ip}-{port}.log"
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [str(exe), "--host", ip, "--port", str(port), "--monitor-ports",
                 json.dumps({"pull": pull, "reply": reply, "heartbeat": heartbeat}),
                 "--health-check-interval", "-1", *extra_args],
                stdout=self._log, stderr=subprocess.STDOUT, env=child_env(), cwd=log_dir,
                start_new_session=True)
        except BaseException:
            self._log.close()
            raise

    def answers(self) -> bool:
        """Whether the HTTP API answers (404 for the unknown probe instance is an answer)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.http_url}/controller/workers?instance_id=__probe__",
                             timeout=1):
                return True
        except urllib.error.HTTPError as e:
            return e.code == 404
        except OSError:
            return False

    def wait_up(self, timeout: float = 90) -> None:
        """Until the HTTP API answers; on failure the process is stopped, then ControllerNotUp."""
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited rc={self.proc.returncode}" if self.proc.poll() is not None
                       else f"not answering after {timeout:.0f} s")
                self.stop()
                raise ControllerNotUp(f"lmcache_controller on {self.http_url} {why}:\n"
                                      f"{self.tail()}")
            time.sleep(0.1)

    def workers(self, instance: str, timeout: float = 2.0):
        """Fresh per-instance listing through kvmesh's client ([] = not registered), None if
        the controller is down."""
        import asyncio
        from kvmesh.backends import lmcache_controller as lmcache_ctrl
        try:
            return asyncio.run(lmcache_ctrl.workers(self.http_url, instance, timeout=timeout))
        except Exception:
            return None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 10 s. Idempotent."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
