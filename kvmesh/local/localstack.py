"""kvmesh on the local control plane: manifests applied with the built kubectl, and the
webhook and controller running as local processes (the same code the images run).

There is no Service routing to local processes, so the webhook configuration's entries are
pointed at https://127.0.0.1:<port>/... by `url:`; everything else (the CA Secret, the
caBundle written by the controller, leader election, the real admission chain) is as in a
real cluster. The in-cluster Deployments are scaled to zero: KWOK would only fake them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from kvmesh.local.children import die_with_parent
from kvmesh.core import names
from kvmesh.local.devcluster import DevCluster
from kvmesh.local.net import free_port

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
# Which path each webhook entry calls (the namespace entry tells the webhook the API server
# selected the pod by namespace, not by label).
ENTRY_PATHS = {names.WEBHOOK_POD_ENTRY: "/mutate", names.WEBHOOK_NAMESPACE_ENTRY: "/mutate/namespace"}


class Process:
    """A kvmesh process of the local stack (its own session, output to a log file)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Optional[dict] = None):
        self.name, self.log_path = name, log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True,
                                     preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class LocalStack:
    def __init__(self, cluster: DevCluster, workdir: Path):
        self.cluster, self.workdir = cluster, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.webhook_port = free_port()
        self.webhook_metrics_port = free_port()  # the webhook's ops port: probes, /metrics
        self.webhook: Optional[Process] = None
        self.controller: Optional[Process] = None
        self.controller_metrics_port = free_port()

    # -- install

    def apply_manifests(self) -> str:
        """Server-side dry run first (nothing is written if anything is invalid), then apply.

        A dry run cannot place objects in a namespace that does not exist yet, so the
        namespace file goes first."""
        self.cluster.kubectl("apply", "-f", str(MANIFESTS / "00-namespace.yaml"))
        self.cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", str(MANIFESTS))
        out = self.cluster.kubectl("apply", "-f", str(MANIFESTS)).stdout
        self.cluster.kubectl("-n", names.SYSTEM_NAMESPACE, "scale", "deployment", "--all",
                             "--replicas=0")
        self.point_webhook_at_local(self.webhook_port)
        return out

    def point_webhook_at_local(self, port: int, failure_policy: str = "Ignore") -> None:
        mwc = self.cluster.kubectl_json("get", "mutatingwebhookconfiguration",
                                        names.WEBHOOK_CONFIGURATION)
        ops = []
        for i, w in enumerate(mwc["webhooks"]):
            if "service" in w["clientConfig"]:
                ops.append({"op": "remove", "path": f"/webhooks/{i}/clientConfig/service"})
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/url",
                        "value": f"https://127.0.0.1:{port}{ENTRY_PATHS[w['name']]}"})
            ops.append({"op": "replace", "path": f"/webhooks/{i}/failurePolicy",
                        "value": failure_policy})
        self.cluster.kubectl("patch", "mutatingwebhookconfiguration",
                             names.WEBHOOK_CONFIGURATION, "--type=json", "-p", json.dumps(ops))

    # -- processes

    def _kvmesh(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kvmesh.cli", *args]

    def controller_process(self, identity: str, metrics_port: int, *extra: str) -> Process:
        """A controller replica (several may run: one leads, the others stand by)."""
        return Process(identity, self._kvmesh(
            "controller", "--kubeconfig", self.cluster.kubeconfig,
            "--metrics-port", str(metrics_port),
            "--webhook-url", f"https://127.0.0.1:{self.webhook_port}", *extra),
            self.workdir / f"{identity}.log", env={"POD_NAMESPACE": names.SYSTEM_NAMESPACE,
                                                  "POD_NAME": identity})

    def start_controller(self, *extra: str) -> Process:
        self.controller = self.controller_process("kvmesh-controller-local",
                                                  self.controller_metrics_port, *extra)
        self.controller.name = "controller"
        return self.controller

    def start_webhook(self, *extra: str) -> Process:
        self.webhook = Process("webhook", self._kvmesh(
            "webhook", "--host", "127.0.0.1", "--port", str(self.webhook_port),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(self.webhook_metrics_port),
            "--cert-source", "self", "--cert-dir", str(self.workdir / "certs"),
            "--san", "127.0.0.1", "--kubeconfig", self.cluster.kubeconfig, *extra),
            self.workdir / "webhook.log")
        return self.webhook

    def restart(self, controller_args: tuple = (), webhook_args: tuple = ()) -> None:
        """Restart both processes with extra flags (tests that change timing or policy)."""
        self.down()
        self.start_controller(*controller_args)
        self.start_webhook(*webhook_args)
        self.wait("the webhook to be ready (its certificate trusted by the API server)",
                  self.webhook_ready, timeout=90)

    def webhook_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.webhook_metrics_port}/readyz",
                                        timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait(self, what: str, probe, timeout: float = 60, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            got = probe()
            if got:
                return got
            for p in (self.webhook, self.controller):
                if p is not None and not p.alive():
                    raise RuntimeError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in (self.webhook,
                                                                       self.controller) if p)
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{logs}")
            time.sleep(interval)

    def up(self) -> "LocalStack":
        self.apply_manifests()
        self.restart()
        return self

    def down(self) -> None:
        for p in (self.webhook, self.controller):
            if p is not None:
                p.stop()
