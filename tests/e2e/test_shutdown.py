"""The controller exits within its bound after SIGTERM whatever the API server's state: with it
up (and then the Lease is given up), and with it gone silent (connections accepted, nothing
answered: the worst case, since nothing fails fast). The controller under test leads a Lease
of its own (POD_NAMESPACE = the test's namespace), reached through a proxy the test can freeze."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import pytest

from kvmesh.core import names
from kvmesh.local.net import free_port
from helpers import wait_for

BOUND = 10.0  # seconds from SIGTERM to exit (the controller's own hard stop is 9 s)


class FreezableProxy:
    """127.0.0.1:port -> target, byte for byte, one thread per direction. freeze(): bytes are
    read and dropped both ways and new connections are accepted and never answered, as from an
    API server that hangs (no RST, no FIN)."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.frozen = target, False
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            try:
                up = socket.create_connection(self.target, timeout=5)
                up.settimeout(None)
            except OSError:
                c.close()
                continue
            self.conns.append(up)
            for a, b in ((c, up), (up, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.frozen:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if not self.frozen:
                for s in (src, dst):
                    try:
                        s.close()
                    except OSError:
                        pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


@pytest.fixture
def proxied_controller(stack, devcluster, namespace, tmp_path):
    u = urlparse(devcluster.server)
    proxy = FreezableProxy((u.hostname, u.port))
    cfg = json.loads(open(devcluster.kubeconfig).read())
    for c in cfg["clusters"]:
        c["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    kc = tmp_path / "proxied.kubeconfig"
    kc.write_text(json.dumps(cfg))
    log = open(tmp_path / "controller.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.cli", "controller", "--kubeconfig", str(kc),
         "--metrics-port", str(free_port()), "--cert-source", "files"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "POD_NAMESPACE": namespace, "POD_NAME": "shutdown-test"})
    try:
        wait_for("the test controller leads its own lease", lambda: (
            devcluster.kubectl_json("get", "lease", "-n", namespace, names.LEADER_LEASE,
                                    check=False)["spec"].get("holderIdentity")
            == "shutdown-test") if devcluster.kubectl(
                "get", "lease", "-n", namespace, names.LEADER_LEASE, check=False
            ).returncode == 0 else False, 60, 0.3)
        yield proc, proxy, tmp_path / "controller.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        proxy.close()


def _sigterm_and_time(proc) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(BOUND + 20)
    except subprocess.TimeoutExpired:
        pass
    return time.monotonic() - t0


def test_sigterm_with_api_server_up_releases_lease(proxied_controller, devcluster, namespace):
    proc, _, log = proxied_controller
    took = _sigterm_and_time(proc)
    assert proc.poll() is not None and took < BOUND, (took, log.read_text()[-2000:])
    lease = devcluster.kubectl_json("get", "lease", "-n", namespace, names.LEADER_LEASE)
    assert not lease["spec"].get("holderIdentity"), lease["spec"]  # a standby may take it now
    print(f"\nSIGTERM -> exit with the API server up: {took:.2f}s, lease released")


def test_sigterm_with_api_server_gone_silent(proxied_controller):
    proc, proxy, log = proxied_controller
    proxy.frozen = True  # every request from now on hangs
    time.sleep(1)
    took = _sigterm_and_time(proc)
    assert proc.poll() is not None and took < BOUND, (took, log.read_text()[-2000:])
    print(f"\nSIGTERM -> exit with the API server silent: {took:.2f}s (exit {proc.returncode})")


def test_sigterm_with_api_server_stopped(proxied_controller):
    proc, proxy, log = proxied_controller
    proxy.close()  # connections cut and refused from now on, as from a stopped API server
    time.sleep(1)
    took = _sigterm_and_time(proc)
    assert proc.poll() is not None and took < BOUND, (took, log.read_text()[-2000:])
    print(f"\nSIGTERM -> exit with the API server stopped: {took:.2f}s (exit {proc.returncode})")
