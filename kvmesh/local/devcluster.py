"""A throw-away local Kubernetes control plane for tests and demos.

Runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK
(fake nodes whose pods become Running with an IP) as child processes on
127.0.0.1, from binaries built by ``cluster/build.sh``. No Docker, no kubelet.

    with DevCluster() as c:                  # bin dir from $KVMESH_K8S_BIN or build.sh
        c.kubectl("get", "nodes")
        c.api("GET", "/api/v1/namespaces/default")

Certificates come from kvmesh.certs.authority; everything else is the standard library.
"""

from __future__ import annotations

import atexit
import base64
import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from kvmesh.local.children import die_with_parent
from kvmesh.certs import authority
from kvmesh.local.net import free_ports

__all__ = ["DevCluster", "DevClusterError", "find_bin_dir", "build_binaries"]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "cluster" / "build.sh"
BIN_ENV = "KVMESH_K8S_BIN"
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl")
SERVICE_CIDR = "10.96.0.0/16"  # API data only; nothing routes to it


class DevClusterError(RuntimeError):
    pass


# --------------------------------------------------------------------------- binaries


def _valid_bin_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_BINARIES) and (path / "kwok-stages.yaml").is_file()


def find_bin_dir() -> Path | None:
    """The bin dir from $KVMESH_K8S_BIN, else from ``build.sh --check``; None if not built."""
    env = os.environ.get(BIN_ENV)
    if env:
        path = Path(env)
        if not _valid_bin_dir(path):
            raise DevClusterError(f"${BIN_ENV}={env} does not hold {', '.join(REQUIRED_BINARIES)} and kwok-stages.yaml")
        return path
    if not BUILD_SCRIPT.is_file():
        return None
    res = subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    path = Path(res.stdout.strip().splitlines()[-1])
    return path if _valid_bin_dir(path) else None


def build_binaries() -> Path:
    """Run cluster/build.sh (a no-op when already built; ~30 min cold on 2 cores)."""
    res = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise DevClusterError(f"{BUILD_SCRIPT} failed with exit code {res.returncode}")
    return Path(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- certificates


class _PKI:
    """The cluster's CA, its certificates and the service-account signing key, as PEM files
    (issued by kvmesh.certs.authority, the same code that signs the webhook's certificates)."""

    VALIDITY = datetime.timedelta(days=30)

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.now = datetime.datetime.now(datetime.timezone.utc)
        self.ca = authority.new_ca(self.now, "kvmesh-devcluster-ca", self.VALIDITY)
        self.ca_cert = self._write("ca.crt", self.ca.cert_pem)

    def _write(self, name: str, data: bytes, mode: int = 0o644) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(mode)
        return path

    def _pair(self, name: str, pair: authority.KeyPair) -> tuple[Path, Path]:
        return self._write(f"{name}.crt", pair.cert_pem), self._write(f"{name}.key", pair.key_pem, 0o600)

    def serving(self, name: str, hosts: list[str]) -> tuple[Path, Path]:
        return self._pair(name, authority.issue_leaf(self.ca, hosts, self.now, self.VALIDITY))

    def client(self, name: str, user: str, groups: tuple[str, ...] = ()) -> tuple[Path, Path]:
        return self._pair(name, authority.issue_client(self.ca, user, groups, self.now, self.VALIDITY))

    def sa_keypair(self) -> tuple[Path, Path]:
        private, public = authority.signing_key()
        return self._write("sa.pub", public), self._write("sa.key", private, 0o600)


# --------------------------------------------------------------------------- cluster


class DevCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + KWOK on 127.0.0.1.

    Attributes after ``start()``: ``server`` (https URL), ``kubeconfig`` (path of
    an admin kubeconfig, user in ``system:masters``), ``ca_file`` (cluster CA
    PEM, also trusted for client certs), ``workdir`` (logs under ``logs/``),
    ``node_names``.
    """

    def __init__(
        self,
        bin_dir: str | os.PathLike | None = None,
        *,
        nodes: int = 3,
        pod_cidr: str = "127.64.0.0/16",
        node_ip: str = "127.0.0.1",
        workdir: str | os.PathLike | None = None,
        keep_workdir: bool = False,
        start_timeout: float = 90.0,
        use_service_account_credentials: bool = True,
        verbose: bool = False,
    ):
        if bin_dir is None:
            found = find_bin_dir()
            if found is None:
                raise DevClusterError(f"control-plane binaries not built: run {BUILD_SCRIPT} (or set ${BIN_ENV})")
            bin_dir = found
        self.bin_dir = Path(bin_dir)
        if not _valid_bin_dir(self.bin_dir):
            raise DevClusterError(f"{self.bin_dir} lacks some of {REQUIRED_BINARIES} / kwok-stages.yaml")
        net = ipaddress.ip_network(pod_cidr)
        self.pod_cidr = str(net)
        self.node_count = nodes
        self.node_ip = node_ip
        self.start_timeout = start_timeout
        self.use_sa_credentials = use_service_account_credentials
        self.verbose = verbose
        self._own_workdir = workdir is None
        self._keep = keep_workdir
        self._workdir_arg = workdir
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._failed = False
        self._stopped = True
        self.workdir: Path | None = None
        self.server = ""
        self.kubeconfig = ""
        self.ca_file = ""
        self.node_names: list[str] = []
        self.startup_seconds: float | None = None
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle

    def __enter__(self) -> "DevCluster":
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._failed = True
        self.stop()
        return False

    def start(self) -> "DevCluster":
        if not self._stopped:
            raise DevClusterError("already started")
        t0 = time.monotonic()
        self._stopped = False
        if self._workdir_arg is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="kvmesh-devcluster-"))
        else:
            self.workdir = Path(self._workdir_arg)
            self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self._failed = True
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        self._log(f"cluster ready in {self.startup_seconds:.1f}s at {self.server} (workdir {self.workdir})")
        return self

    def stop(self) -> None:
        """Stop only the processes this object started (each in its own process group)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        # Reverse start order, one at a time: kube-apiserver still needs etcd to
        # clean up its lease while shutting down.
        for name, proc in reversed(self._procs):
            self._terminate(proc, timeout=10 if name == "kube-apiserver" else 5)
        self._procs.clear()
        if self.workdir is None:
            return
        if self._failed or self._keep or not self._own_workdir:
            print(f"kvmesh devcluster: logs kept in {self.workdir / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _terminate(proc: subprocess.Popen, timeout: float) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # pgid == pid: start_new_session=True
            proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    def mark_failed(self) -> None:
        """Keep the work dir (and logs) at stop()."""
        self._failed = True

    # -- startup

    def _start(self) -> None:
        w = self.workdir
        p_etcd, p_peer, p_api, p_kcm, p_sched = free_ports(5)
        self.server = f"https://127.0.0.1:{p_api}"

        pki = _PKI(w / "pki")
        self.ca_file = str(pki.ca_cert)
        svc_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
        api_crt, api_key = pki.serving("apiserver", [
            "kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local", "localhost", "127.0.0.1", svc_ip])
        sa_pub, sa_key = pki.sa_keypair()
        admin = pki.client("admin", "kvmesh-admin", ("system:masters",))
        kcm = pki.client("kube-controller-manager", "system:kube-controller-manager")
        sched = pki.client("kube-scheduler", "system:kube-scheduler")
        kwok = pki.client("kwok", "kwok-controller", ("system:masters",))
        proxy_crt, proxy_key = pki.client("front-proxy-client", "front-proxy-client")

        self.kubeconfig = str(self._write_kubeconfig(w / "admin.kubeconfig", *admin))
        kcm_kc = self._write_kubeconfig(w / "kube-controller-manager.kubeconfig", *kcm)
        sched_kc = self._write_kubeconfig(w / "kube-scheduler.kubeconfig", *sched)
        kwok_kc = self._write_kubeconfig(w / "kwok.kubeconfig", *kwok)
        self._ssl = ssl.create_default_context(cafile=self.ca_file)
        self._ssl.load_cert_chain(str(admin[0]), str(admin[1]))

        b = self.bin_dir
        etcd_url = f"http://127.0.0.1:{p_etcd}"
        peer_url = f"http://127.0.0.1:{p_peer}"
        self._spawn("etcd", [
            b / "etcd", "--name=default", f"--data-dir={w / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--initial-cluster-state=new",
            "--unsafe-no-fsync=true", "--log-level=warn",
        ])
        self._wait("etcd", lambda: json.loads(self._http_get(f"{etcd_url}/health")).get("health") == "true")

        self._spawn("kube-apiserver", [
            b / "kube-apiserver",
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={p_api}",
            f"--tls-cert-file={api_crt}", f"--tls-private-key-file={api_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--cert-dir={w / 'apiserver-certs'}",
            # Aggregation-layer settings; without them every component logs
            # "missing content for CA bundle ... requestheader-client-ca-file".
            f"--requestheader-client-ca-file={pki.ca_cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={proxy_crt}", f"--proxy-client-key-file={proxy_key}",
        ])
        self._wait("kube-apiserver /readyz", lambda: self._api_ok("/readyz"))

        common = ["--leader-elect=false", "--bind-address=127.0.0.1", "--profiling=false"]
        self._spawn("kube-controller-manager", [
            b / "kube-controller-manager", f"--kubeconfig={kcm_kc}",
            f"--authentication-kubeconfig={kcm_kc}", f"--authorization-kubeconfig={kcm_kc}",
            f"--secure-port={p_kcm}", f"--cert-dir={w / 'kcm-certs'}", *common,
            f"--root-ca-file={pki.ca_cert}", f"--service-account-private-key-file={sa_key}",
            f"--use-service-account-credentials={'true' if self.use_sa_credentials else 'false'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--kube-api-qps=100", "--kube-api-burst=200",
            "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10",
        ])
        self._spawn("kube-scheduler", [
            b / "kube-scheduler", f"--kubeconfig={sched_kc}",
            f"--authentication-kubeconfig={sched_kc}", f"--authorization-kubeconfig={sched_kc}",
            f"--secure-port={p_sched}", f"--cert-dir={w / 'scheduler-certs'}", *common,
        ])
        key, value = KWOK_NODE_ANNOTATION
        self._spawn("kwok", [
            b / "kwok", f"--kubeconfig={kwok_kc}",
            "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={key}={value}",
            f"--config={b / 'kwok-stages.yaml'}",
            f"--cidr={self.pod_cidr}", f"--node-ip={self.node_ip}",
            "--node-lease-duration-seconds=40",
        ], env={"HOME": str(w)})  # kwok also reads ~/.kwok/kwok.yaml

        self.node_names = [f"kwok-node-{i}" for i in range(self.node_count)]
        for name in self.node_names:
            self.api("POST", "/api/v1/nodes", self._node_manifest(name))
        self._wait("nodes Ready", self._nodes_ready)
        self._wait("kube-scheduler /readyz", lambda: self._local_https_ok(p_sched, "/readyz"))
        self._wait("kube-controller-manager /healthz", lambda: self._local_https_ok(p_kcm, "/healthz"))
        # The serviceaccount controller runs: pods can be created in new namespaces.
        self._wait("default ServiceAccount", lambda: self._exists("/api/v1/namespaces/default/serviceaccounts/default"))

    def _node_manifest(self, name: str) -> dict:
        key, value = KWOK_NODE_ANNOTATION
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {key: value},
                "labels": {
                    "type": "kwok",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node-role.kubernetes.io/agent": "",
                },
            },
            "spec": {},
        }

    def _nodes_ready(self) -> bool:
        items = self.api("GET", "/api/v1/nodes?labelSelector=type%3Dkwok").get("items", [])
        ready = {
            n["metadata"]["name"]
            for n in items
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in n.get("status", {}).get("conditions", []))
            and not any(t.get("key") == "node.kubernetes.io/not-ready" for t in n.get("spec", {}).get("taints", []) or [])
        }
        return set(self.node_names) <= ready

    def _write_kubeconfig(self, path: Path, crt: Path, key: Path) -> Path:
        def b64(p) -> str:
            return base64.b64encode(Path(p).read_bytes()).decode()

        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kvmesh-dev", "cluster": {"server": self.server, "certificate-authority-data": b64(self.ca_file)}}],
            "users": [{"name": "kvmesh-dev", "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
            "contexts": [{"name": "kvmesh-dev", "context": {"cluster": "kvmesh-dev", "user": "kvmesh-dev", "namespace": "default"}}],
            "current-context": "kvmesh-dev",
        }
        path.write_text(json.dumps(cfg, indent=2))  # JSON is valid kubeconfig YAML
        path.chmod(0o600)
        return path

    def _spawn(self, name: str, argv: list, env: dict | None = None) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "wb")
        full_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        full_env.update(env or {})
        self._log(f"starting {name}")
        try:
            proc = subprocess.Popen(
                [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=full_env, cwd=self.workdir,
                preexec_fn=die_with_parent,  # no orphans if whoever started us is SIGKILLed
            )
        finally:
            log.close()
        self._procs.append((name, proc))

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise DevClusterError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")

    def _wait(self, what: str, probe, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        t0 = time.monotonic()
        last: Exception | None = None
        while True:
            self._check_alive()
            try:
                if probe():
                    self._log(f"{what}: ok after {time.monotonic() - t0:.1f}s")
                    return
            except (OSError, ValueError, urllib.error.URLError, DevClusterError) as e:
                last = e
            if time.monotonic() > deadline:
                raise DevClusterError(f"timed out waiting for {what} (last error: {last!r}); logs in {self.workdir / 'logs'}")
            time.sleep(0.1)

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"kvmesh devcluster: {msg}", file=sys.stderr, flush=True)

    # -- HTTP

    @staticmethod
    def _http_get(url: str) -> str:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()

    def _local_https_ok(self, port: int, path: str) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert of our own child process on loopback
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=2) as r:
            return r.status == 200

    def _api_ok(self, path: str) -> bool:
        req = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=5) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False

    def _exists(self, path: str) -> bool:
        try:
            self.api("GET", path)
            return True
        except DevClusterError as e:
            if "HTTP 404" in str(e):
                return False
            raise

    def api(self, method: str, path: str, body: dict | None = None, content_type: str = "application/json",
            timeout: float = 30) -> dict:
        """One request to the apiserver as the admin user; returns the decoded JSON body."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise DevClusterError(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None
        return json.loads(raw) if raw else {}

    # -- kubectl

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the built kubectl against this cluster; text output. Raises DevClusterError if check and rc != 0."""
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        env["KUBECACHEDIR"] = str(self.workdir / "kube-cache")
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *map(str, args)]
        res = subprocess.run(argv, input=input, capture_output=True, text=True, env=env, timeout=timeout)
        if check and res.returncode != 0:
            raise DevClusterError(f"kubectl {' '.join(map(str, args))} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def kubectl_json(self, *args: str, **kw) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json", **kw).stdout)

    # -- conveniences

    def create_namespace(self, name: str, labels: dict | None = None, wait_service_account: bool = True) -> None:
        self.api("POST", "/api/v1/namespaces",
                 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})
        if wait_service_account:  # the ServiceAccount admission plugin rejects pods until it exists
            self._wait(f"ServiceAccount {name}/default",
                       lambda: self._exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"), timeout=30)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def main(argv: list[str] | None = None) -> int:
    """python -m kvmesh.local.devcluster [NODES]: start a cluster, print its kubeconfig path, run until Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    nodes = int(argv[0]) if argv else 3
    with DevCluster(nodes=nodes, verbose=True, keep_workdir=True) as c:
        print(f"export KUBECONFIG={c.kubeconfig}   # server {c.server}, ready in {c.startup_seconds:.1f}s", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT may start ignored (`cmd &`)
            signal.signal(sig, signal.default_int_handler)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
