"""A dev cluster with ONE REAL NODE: kubelet + containerd + runc + CNI bridge + kube-proxy + CoreDNS.

Everything runs inside a network namespace this module creates (``kvmesh-node-<id>``) with no
route out of it, and inside a private mount namespace, so that no rule, route, link, mount or
packet of the run touches the machine's own namespaces (the safety rules of
``docs/research/real-node.md``): the control plane (etcd, kube-apiserver, controller-manager,
scheduler), containerd and its shims, the kubelet, kube-proxy (its iptables rules live only in
that namespace) and CoreDNS. The test process reaches the API server through a loopback port
forwarder whose far end is opened inside the namespace; the kubeconfig's
``https://127.0.0.1:<port>`` is valid on both sides.

    with RealNodeCluster(images=["kvmesh"]) as c:
        c.kubectl("apply", "-f", "manifests/")      # pods really run, Services have endpoints
        c.image_refs["kvmesh"]                      # kvmesh.local/kvmesh:0.1.0-<hash>

Network inside the namespace: bridge ``cni0`` 10.244.0.1/24 (the node's IP; the kubelet and
CoreDNS listen there), pods in 10.244.0.0/24, Services in 10.96.0.0/16 (routed to ``cni0`` so
kube-proxy's DNAT applies to the node's own connections too), no default route.

What the kubelet changes outside those namespaces, and how it is undone at ``stop()`` (also
after a failure; a crashed run is cleaned up by the next ``start()`` from its record under
``/run/kvmesh-node/``):
- global sysctls (``vm.overcommit_memory``, ``vm.panic_on_oom``, ``kernel.panic``,
  ``kernel.panic_on_oops``, ``kernel.keys.root_max*``): saved before, restored after;
- cgroups: all under ``cgroupRoot: /kvmesh-node-<id>`` in every hierarchy, removed after;
- processes: all in the namespaces; stopped by PID, then anything left in the mount namespace.

Needs root, ``cluster/build.sh`` (control plane), ``cluster/node-build.sh`` (kubelet,
kube-proxy, CoreDNS, pause) and its Debian packages (``node-build.sh --packages``), and
``images/build.py`` for the images. KWOK stays available (``kwok_nodes``) for scale; its nodes
are tainted ``kvmesh.dev/fake-node:NoSchedule`` here so real workloads land on the real node.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvmesh.local.devcluster import SERVICE_CIDR, DevCluster, DevClusterError, _PKI, _valid_bin_dir
from kvmesh.local.net import free_ports

__all__ = ["RealNodeCluster", "node_bin_dir", "kube_router_bin", "network_policy_missing", "platform_unsupported",
           "prerequisites", "GLOBAL_SYSCTLS", "cleanup_stale"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTROL_PLANE_BUILD = REPO_ROOT / "cluster" / "build.sh"
NODE_BUILD = REPO_ROOT / "cluster" / "node-build.sh"
KUBE_ROUTER_BUILD = REPO_ROOT / "cluster" / "kube-router-build.sh"
IMAGE_BUILD = REPO_ROOT / "images" / "build.py"
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns", "pause")
DEB_TOOLS = {"containerd": "/usr/bin/containerd", "ctr": "/usr/bin/ctr", "runc": "/usr/sbin/runc",
             "containerd-shim-runc-v2": "/usr/bin/containerd-shim-runc-v2",
             "CNI bridge": "/usr/lib/cni/bridge", "CNI host-local": "/usr/lib/cni/host-local",
             "CNI portmap": "/usr/lib/cni/portmap", "CNI loopback": "/usr/lib/cni/loopback",
             "iptables": "/usr/sbin/iptables", "conntrack": "/usr/sbin/conntrack",
             "nsenter": "/usr/bin/nsenter", "unshare": "/usr/bin/unshare", "ip": "/usr/sbin/ip"}
# Not per network namespace: the kubelet sets these (setupKernelTunables) on the whole machine.
GLOBAL_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                  "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
                  "net/netfilter/nf_conntrack_max")
NODE_IP = "10.244.0.1"
POD_CIDR = "10.244.0.0/24"
CLUSTER_DNS_DOMAIN = "cluster.local"
RECORDS = Path("/run/kvmesh-node")
# Paths containerd, CNI and the kubelet hard-code; each gets a private tmpfs in the node's
# mount namespace, so the machine's copies are never written.
MOUNTPOINTS = ("/run/netns", "/run/containerd", "/var/lib/cni", "/var/log/containers")
FAKE_NODE_TAINT = {"key": "kvmesh.dev/fake-node", "value": "true", "effect": "NoSchedule"}
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def control_plane_bin_dir() -> Path | None:
    """$KVMESH_K8S_BIN, else cluster/build.sh's bin dir if built, else None (never builds)."""
    env = os.environ.get("KVMESH_K8S_BIN")
    if env:
        return Path(env) if _valid_bin_dir(Path(env)) else None
    res = subprocess.run(["bash", str(CONTROL_PLANE_BUILD), "--check"], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    path = Path(res.stdout.strip().splitlines()[-1])
    return path if _valid_bin_dir(path) else None


def kube_router_bin() -> Path | None:
    """cluster/kube-router-build.sh's kube-router if built, else None (never builds)."""
    res = subprocess.run(["bash", str(KUBE_ROUTER_BUILD), "--check"], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    path = Path(res.stdout.strip().splitlines()[-1]) / "kube-router"
    return path if path.is_file() else None


def network_policy_missing() -> list[str]:
    """What a node with NetworkPolicy enforcement needs beyond prerequisites()."""
    missing = [] if kube_router_bin() else [f"kube-router ({KUBE_ROUTER_BUILD.name})"]
    return missing + ([] if shutil.which("ipset") else ["ipset (Debian package ipset)"])


def node_bin_dir() -> Path | None:
    """cluster/node-build.sh's bin dir if built, else None (never builds)."""
    res = subprocess.run(["bash", str(NODE_BUILD), "--check"], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    path = Path(res.stdout.strip().splitlines()[-1])
    return path if all((path / b).is_file() for b in NODE_BINARIES) else None


def image_tarball(name: str, *extra: str) -> tuple[str, Path] | None:
    """(reference, tarball) of a built image, or None (never builds)."""
    res = subprocess.run([sys.executable, str(IMAGE_BUILD), name, "--check", *extra],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return None
    ref, path = res.stdout.strip().splitlines()[-2:]
    return ref, Path(path)


def platform_unsupported() -> str | None:
    """Why this machine cannot run a real node at all (not something a build would fix), or
    None: it needs root, and unshare(1) must be able to create network and mount namespaces
    (a container without CAP_SYS_ADMIN, or a kernel without them, cannot)."""
    if os.geteuid() != 0:
        return "needs root (the node creates network and mount namespaces, cgroups and mounts)"
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare(1) not found (util-linux)"
    try:
        res = subprocess.run([unshare, "--net", "--mount", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare --net --mount true` did not run: {e}"
    if res.returncode != 0:
        return f"this machine does not allow new network/mount namespaces (`unshare --net --mount true`: {res.stderr.strip()})"
    return None


def prerequisites(images: tuple[str, ...] = ()) -> list[str]:
    """What is missing for a real node (empty when it can start). Never builds anything."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if control_plane_bin_dir() is None:
        missing.append("control plane (cluster/build.sh)")
    nb = node_bin_dir()
    if nb is None:
        missing.append("node binaries (cluster/node-build.sh)")
    missing += [f"{what} ({path}; cluster/node-build.sh --packages)" for what, path in DEB_TOOLS.items()
                if not os.path.exists(path)]
    if nb is not None and image_tarball("pause", "--binary", str(nb / "pause")) is None:
        missing.append("pause image (images/build.py pause --binary .../pause)")
    missing += [f"{i} image (images/build.py {i})" for i in images if image_tarball(i) is None]
    return missing


# --------------------------------------------------------------------------- namespaces


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({path}): {os.strerror(e)}")
    finally:
        os.close(fd)


class _Forwarder:
    """127.0.0.1:<port> on the machine's loopback -> 127.0.0.1:<port> inside the namespace.

    Each accepted connection gets a thread that first enters the network namespace (setns
    changes only the calling thread), connects there and copies bytes both ways."""

    def __init__(self, netns_path: str, port: int):
        self.netns_path, self.port = netns_path, port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"netns-fwd-{port}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        try:
            _setns(self.netns_path)
            far = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            conn.close()
            return
        far.settimeout(None)
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ, far)
        sel.register(far, selectors.EVENT_READ, conn)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=1):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            sel.close()
            conn.close()
            far.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _read_sysctls() -> dict[str, str]:
    out = {}
    for key in GLOBAL_SYSCTLS:
        try:
            out[key] = Path("/proc/sys", key).read_text().strip()
        except OSError:
            pass
    return out


def _write_sysctls(values: dict[str, str]) -> list[str]:
    errors = []
    for key, value in values.items():
        p = Path("/proc/sys", key)
        try:
            if p.read_text().strip() != value:
                p.write_text(value + "\n")
        except OSError as e:
            errors.append(f"{key}: {e}")
    return errors


def _cgroup_mounts() -> list[Path]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] in ("cgroup", "cgroup2"):
            out.append(Path(fields[4]))
    return out


def _remove_cgroup_tree(root: Path) -> list[str]:
    """rmdir every directory under root, deepest first; cgroupfs refuses if a process is left."""
    left = []
    if not root.is_dir():
        return left
    for d in [Path(d) for d, _, _ in os.walk(root, topdown=False)]:  # deepest first, root last
        for attempt in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == 49:
                    left.append(f"{d}: {e}")
                    break
                time.sleep(0.1)
    return left


def _processes_in_mntns(ns_inode: int) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.stat(p / "ns" / "mnt").st_ino == ns_inode:
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): with the PID, names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def _machine_lock():
    """One run at a time changes the machine-wide state below (records, baseline)."""
    RECORDS.mkdir(parents=True, exist_ok=True)
    with open(RECORDS / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _records() -> list[tuple[Path, dict]]:
    out = []
    for rec in sorted(RECORDS.glob("kvmesh-node-*.json")):
        try:
            out.append((rec, json.loads(rec.read_text())))
        except (OSError, ValueError):
            continue
    return out


def _alive(data: dict) -> bool:
    owner = data.get("owner_pid")
    return bool(owner) and _start_time(owner) == data.get("owner_start")


def _kill_cgroup_procs(root: Path) -> None:
    """SIGKILL every process in a cgroup tree of ours (containers outlive a killed shim)."""
    if not root.is_dir():
        return
    for d, _, _ in os.walk(root):  # os.walk skips directories that vanish meanwhile
        try:
            pids = Path(d, "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def _processes_in_netns(ns_inode: int) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.stat(p / "ns" / "net").st_ino == ns_inode:
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def _kill_until_gone(list_pids, cgroup_root: str, tries: int = 20) -> list[int]:
    """SIGKILL what ``list_pids()`` finds (never ourselves) and everything in our cgroup root,
    until nothing is left or ``tries`` rounds (0.25 s apart) pass; returns what is left."""
    pids: list[int] = []
    for _ in range(tries):
        for mount in _cgroup_mounts():
            _kill_cgroup_procs(mount / cgroup_root.lstrip("/"))
        pids = [p for p in list_pids() if p != os.getpid()]
        if not pids:
            return []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.25)
    return pids


def _clean_run(data: dict) -> list[str]:
    """Remove what one (dead) run left: its processes (by its network namespace, which the
    /run/netns bind mount keeps alive, so the inode is still its own), its containers and
    cgroups (by its cgroup root) and the namespace itself."""
    problems = []
    ns_file = Path("/run/netns") / data["netns"]
    pids = _kill_until_gone(
        lambda: _processes_in_netns(os.stat(ns_file).st_ino) if ns_file.exists() else [],
        data["cgroup_root"])
    if pids:
        problems.append(f"processes left in {data['netns']}: {pids}")
    for mount in _cgroup_mounts():
        problems += _remove_cgroup_tree(mount / data["cgroup_root"].lstrip("/"))
    if ns_file.exists():
        res = subprocess.run(["ip", "netns", "del", data["netns"]], capture_output=True, text=True)
        if res.returncode != 0:
            problems.append(f"ip netns del {data['netns']}: {res.stderr.strip()}")
    return problems


def _release_machine(leaving: Path | None = None) -> list[str]:
    """With no other run left: restore the sysctls saved by the first run and remove the
    empty mount-point directories it created. Call under _machine_lock."""
    baseline = RECORDS / "baseline.json"
    if any(_alive(d) for r, d in _records() if r != leaving) or not baseline.exists():
        return []
    data = json.loads(baseline.read_text())
    problems = _write_sysctls(data["sysctls"])
    changed = {k: v for k, v in _read_sysctls().items() if data["sysctls"].get(k) != v}
    if changed:
        problems.append(f"sysctls not restored: {changed}")
    for d in reversed(data.get("created_dirs", [])):
        try:
            os.rmdir(d)
        except OSError:
            pass
    if not problems:
        baseline.unlink()
    return problems


def _claim_machine() -> None:
    """Before a run changes anything: the first of possibly concurrent runs saves the
    machine-wide sysctls and creates the mount points the node's private mounts need; the
    last one to leave restores and removes them (_release_machine). Call under _machine_lock."""
    baseline = RECORDS / "baseline.json"
    if baseline.exists():
        return
    created = []
    for d in MOUNTPOINTS:
        path = Path(d)
        missing = []
        while not path.exists():
            missing.append(str(path))
            path = path.parent
        for m in reversed(missing):
            os.mkdir(m)
            created.append(m)
    baseline.write_text(json.dumps({"sysctls": _read_sysctls(), "created_dirs": created}))


def cleanup_stale() -> list[str]:
    """Undo what crashed runs left (those whose owner process is gone), then release the
    machine's baseline if no run is left. Returns what was done."""
    done = []
    if not RECORDS.is_dir():
        return done
    with _machine_lock():
        for rec, data in _records():
            if _alive(data):
                continue
            problems = _clean_run(data)
            rec.unlink(missing_ok=True)
            done.append(f"cleaned up {data['netns']} (owner {data.get('owner_pid')} gone)"
                        + (f": {problems}" if problems else ""))
        done += _release_machine()
    return done


# --------------------------------------------------------------------------- the cluster


class RealNodeCluster(DevCluster):
    """DevCluster whose control plane and one real node run in namespaces of their own.

    Attributes after ``start()`` beyond DevCluster's: ``netns`` (name), ``node_name``,
    ``image_refs`` (image name -> reference imported into containerd), ``timings``."""

    def __init__(self, bin_dir=None, *, images: tuple[str, ...] | list[str] = ("kvmesh",),
                 kwok_nodes: int = 0, node_name: str = "kvmesh-node-0", workdir=None,
                 keep_workdir: bool = False, start_timeout: float = 120.0, verbose: bool = False,
                 network_policy: bool = False):
        if bin_dir is None:
            bin_dir = control_plane_bin_dir()
            if bin_dir is None:
                raise DevClusterError(f"control-plane binaries not built: run {CONTROL_PLANE_BUILD}")
        super().__init__(bin_dir, nodes=kwok_nodes, pod_cidr="127.64.0.0/16", node_ip="127.0.0.1",
                         workdir=workdir, keep_workdir=keep_workdir, start_timeout=start_timeout,
                         verbose=verbose)
        nb = node_bin_dir()
        if nb is None:
            raise DevClusterError(f"node binaries not built: run {NODE_BUILD}")
        self.node_bin = nb
        self.images = tuple(images)
        self.node_name = node_name
        self.network_policy = network_policy
        self.id = secrets.token_hex(4)
        self.netns = f"kvmesh-node-{self.id}"
        self.cgroup_root = f"/kvmesh-node-{self.id}"
        self.image_refs: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._holder: subprocess.Popen | None = None
        self._mntns: int | None = None
        self._forwarders: list[_Forwarder] = []
        self._record: Path | None = None
        self._netns_created = False
        self._node_procs: list[tuple[str, subprocess.Popen]] = []

    # -- namespaces

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    def _ns_prefix(self) -> list[str]:
        assert self._holder is not None
        pid = self._holder.pid
        return ["nsenter", f"--net=/proc/{pid}/ns/net", f"--mount=/proc/{pid}/ns/mnt", f"--wd={self.workdir}", "--"]

    def ns_run(self, *argv, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a command inside the node's network and mount namespaces."""
        res = subprocess.run([*self._ns_prefix(), *map(str, argv)], capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise DevClusterError(f"{' '.join(map(str, argv))}: rc {res.returncode}: {res.stderr.strip()[-2000:]}")
        return res

    def _spawn(self, name: str, argv: list, env: dict | None = None) -> None:
        super()._spawn(name, [*self._ns_prefix(), *argv], env)

    def _setup_namespaces(self) -> None:
        with _machine_lock():
            _claim_machine()
            self._write_record()  # before anything exists: a crash from here on is cleaned up
        ip = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True, text=True)  # noqa: E731
        ip("netns", "add", self.netns)
        self._netns_created = True
        # The holder: a process in the new network namespace and a new mount namespace whose
        # mounts never propagate back. Private tmpfs over the paths containerd and CNI hard-code
        # (/run/netns for pod namespaces, /run/containerd for shim sockets, /var/lib/cni for
        # results) keeps another containerd on this machine and ours apart.
        script = "set -e; " + "".join(f"mount -t tmpfs -o mode=0755 kvmesh-node {d}; " for d in MOUNTPOINTS) \
            + "echo ready; exec sleep infinity"
        self._holder = subprocess.Popen(
            ["nsenter", f"--net={self.netns_path}", "--", "unshare", "--mount", "--propagation", "slave",
             "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        line = self._holder.stdout.readline().strip()
        if line != b"ready":
            raise DevClusterError(f"namespace holder failed: {self._holder.stderr.read().decode()[-2000:]}")
        self._mntns = os.stat(f"/proc/{self._holder.pid}/ns/mnt").st_ino
        if self._mntns == os.stat("/proc/self/ns/mnt").st_ino:
            raise DevClusterError("holder did not get its own mount namespace")
        with _machine_lock():
            self._write_record()
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "cni0", "type", "bridge"],
                    ["ip", "addr", "add", f"{NODE_IP}/24", "dev", "cni0"],
                    ["ip", "link", "set", "cni0", "up"],
                    ["ip", "route", "add", SERVICE_CIDR, "dev", "cni0"]):
            self.ns_run(*cmd)
        routes = self.ns_run("ip", "route", "show").stdout
        if "default" in routes:
            raise DevClusterError(f"the node namespace must have no default route: {routes}")

    def _write_record(self) -> None:
        RECORDS.mkdir(parents=True, exist_ok=True)
        self._record = RECORDS / f"{self.netns}.json"
        me = os.getpid()
        self._record.write_text(json.dumps({
            "netns": self.netns, "cgroup_root": self.cgroup_root,
            "owner_pid": me, "owner_start": _start_time(me),
            "holder_pid": self._holder.pid if self._holder else None, "mntns": self._mntns,
            "workdir": str(self.workdir)}))

    # -- start

    def start(self) -> "RealNodeCluster":
        for line in cleanup_stale():
            self._log(line)
        return super().start()

    def _start(self) -> None:
        t0 = time.monotonic()
        self._setup_namespaces()
        self.timings["namespaces"] = time.monotonic() - t0
        self._start_control_plane()
        self.timings["control_plane"] = time.monotonic() - t0
        self._start_node()
        self.timings["node_ready"] = time.monotonic() - t0

    def _forward(self, port: int) -> None:
        self._forwarders.append(_Forwarder(self.netns_path, port))

    def _start_control_plane(self) -> None:
        from kvmesh.local import devcluster as dc

        w = self.workdir
        p_etcd, p_peer, p_api, p_kcm, p_sched = free_ports(5)  # free here, so free on both sides
        for p in (p_etcd, p_api, p_kcm, p_sched):
            self._forward(p)
        self.server = f"https://127.0.0.1:{p_api}"
        self.api_port = p_api
        pki = _PKI(w / "pki")
        self.pki = pki
        self.ca_file = str(pki.ca_cert)
        svc_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
        api_crt, api_key = pki.serving(
            "apiserver", ["127.0.0.1", svc_ip, NODE_IP, "localhost", "kubernetes", "kubernetes.default",
                          "kubernetes.default.svc", f"kubernetes.default.svc.{CLUSTER_DNS_DOMAIN}"])
        sa_pub, sa_key = pki.sa_keypair()
        admin = pki.client("admin", "kvmesh-admin", ("system:masters",))
        kcm = pki.client("kube-controller-manager", "system:kube-controller-manager")
        sched = pki.client("kube-scheduler", "system:kube-scheduler")
        kwok = pki.client("kwok", "kwok-controller", ("system:masters",))
        proxy_crt, proxy_key = pki.client("front-proxy-client", "front-proxy-client")
        kl_crt, kl_key = pki.client("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                   ("kubeadm:cluster-admins",))
        self.kubeconfig = str(self._write_kubeconfig(w / "admin.kubeconfig", *admin))
        kcm_kc = self._write_kubeconfig(w / "kube-controller-manager.kubeconfig", *kcm)
        sched_kc = self._write_kubeconfig(w / "kube-scheduler.kubeconfig", *sched)
        kwok_kc = self._write_kubeconfig(w / "kwok.kubeconfig", *kwok)
        import ssl

        self._ssl = ssl.create_default_context(cafile=self.ca_file)
        self._ssl.load_cert_chain(str(admin[0]), str(admin[1]))

        b = self.bin_dir
        etcd_url, peer_url = f"http://127.0.0.1:{p_etcd}", f"http://127.0.0.1:{p_peer}"
        self._spawn("etcd", [
            b / "etcd", "--name=default", f"--data-dir={w / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--initial-cluster-state=new",
            "--unsafe-no-fsync=true", "--log-level=warn"])
        self._wait("etcd", lambda: json.loads(self._http_get(f"{etcd_url}/health")).get("health") == "true")
        self._spawn("kube-apiserver", [
            b / "kube-apiserver", f"--etcd-servers={etcd_url}",
            # Inside the namespace only: loopback for the host side's forwarder, the bridge
            # address for pods (kubernetes Service -> 10.244.0.1, a legal endpoint).
            "--bind-address=0.0.0.0", f"--advertise-address={NODE_IP}", f"--secure-port={p_api}",
            f"--tls-cert-file={api_crt}", f"--tls-private-key-file={api_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            "--endpoint-reconciler-type=lease",
            # Webhook Services are dialled at their endpoints' IPs (pods on the bridge).
            "--enable-aggregator-routing=true",
            f"--kubelet-client-certificate={kl_crt}", f"--kubelet-client-key={kl_key}",
            # logs/exec/port-forward dial the kubelet: by its InternalIP (10.244.0.1), since the
            # node's name resolves nowhere in the namespace (the default order tries Hostname first).
            "--kubelet-preferred-address-types=InternalIP",
            "--profiling=false", f"--cert-dir={w / 'apiserver-certs'}",
            f"--requestheader-client-ca-file={pki.ca_cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={proxy_crt}", f"--proxy-client-key-file={proxy_key}"])
        self._wait("kube-apiserver /readyz", lambda: self._api_ok("/readyz"))
        # kubectl logs/exec/port-forward: the apiserver's kubelet client may use the node API.
        self.api("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "kvmesh-dev:apiserver-kubelet-client"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:kubelet-api-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": "kube-apiserver-kubelet-client"}]})
        common = ["--leader-elect=false", "--bind-address=127.0.0.1", "--profiling=false"]
        self._spawn("kube-controller-manager", [
            b / "kube-controller-manager", f"--kubeconfig={kcm_kc}",
            f"--authentication-kubeconfig={kcm_kc}", f"--authorization-kubeconfig={kcm_kc}",
            f"--secure-port={p_kcm}", f"--cert-dir={w / 'kcm-certs'}", *common,
            f"--root-ca-file={pki.ca_cert}", f"--service-account-private-key-file={sa_key}",
            "--use-service-account-credentials=true", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--kube-api-qps=100", "--kube-api-burst=200",
            "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10"])
        self._spawn("kube-scheduler", [
            b / "kube-scheduler", f"--kubeconfig={sched_kc}",
            f"--authentication-kubeconfig={sched_kc}", f"--authorization-kubeconfig={sched_kc}",
            f"--secure-port={p_sched}", f"--cert-dir={w / 'scheduler-certs'}", *common])
        if self.node_count:
            from kvmesh.local.devcluster import KWOK_NODE_ANNOTATION

            key, value = KWOK_NODE_ANNOTATION
            self._spawn("kwok", [
                b / "kwok", f"--kubeconfig={kwok_kc}", "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={key}={value}",
                f"--config={b / 'kwok-stages.yaml'}", f"--cidr={self.pod_cidr}",
                f"--node-ip={self.node_ip}", "--node-lease-duration-seconds=40"], env={"HOME": str(w)})
            self.node_names = [f"kwok-node-{i}" for i in range(self.node_count)]
            for name in self.node_names:
                node = self._node_manifest(name)
                node["spec"] = {"taints": [FAKE_NODE_TAINT]}
                self.api("POST", "/api/v1/nodes", node)
            self._wait("KWOK nodes Ready", self._nodes_ready)
        self._wait("kube-scheduler /readyz", lambda: self._local_https_ok(p_sched, "/readyz"))
        self._wait("kube-controller-manager /healthz", lambda: self._local_https_ok(p_kcm, "/healthz"))
        self._wait("default ServiceAccount", lambda: self._exists("/api/v1/namespaces/default/serviceaccounts/default"))

    # -- the node

    def _start_node(self) -> None:
        w, nb, pki = self.workdir, self.node_bin, self.pki
        state = w / "node"
        for d in ("run", "cni/net.d", "cni/ipam", "etc", "pod-logs", "kubelet", "kubelet-pki", "runc"):
            (state / d).mkdir(parents=True, exist_ok=True)
        sock = state / "run" / "containerd.sock"
        self.containerd_socket = str(sock)

        # Images first: the sandbox image's name goes into containerd's config.
        refs = {}
        for name in ("pause", *self.images):
            extra = ("--binary", str(nb / "pause")) if name == "pause" else ()
            found = image_tarball(name, *extra)
            if found is None:
                raise DevClusterError(f"image {name} not built: run images/build.py {name} {' '.join(extra)}")
            refs[name] = found
        self.image_refs = {n: r for n, (r, _) in refs.items()}

        (state / "containerd.toml").write_text(_CONTAINERD_TOML.format(
            state=state, sock=sock, pause=self.image_refs["pause"], runc_root=state / "runc"))
        (state / "cni" / "net.d" / "10-kvmesh-node.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "kvmesh-node",
            "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "dataDir": str(state / "cni" / "ipam"),
                                  "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}},
                        {"type": "portmap", "capabilities": {"portMappings": True}}]}, indent=1))
        t = time.monotonic()
        self._spawn_node("containerd", ["/usr/bin/containerd", f"--config={state / 'containerd.toml'}"])
        self._wait("containerd socket", lambda: self._ctr("version", check=False).returncode == 0, timeout=30)
        for name, (ref, tarball) in refs.items():
            ti = time.monotonic()
            self._ctr("images", "import", str(tarball), timeout=300)
            self.timings[f"import_{name}"] = time.monotonic() - ti
            if ref not in self._ctr("images", "ls", "-q").stdout.split():
                raise DevClusterError(f"ctr import of {tarball} did not create {ref}")
        self.timings["containerd_and_images"] = time.monotonic() - t

        # Credentials: the kubelet as system:node:<name>, kube-proxy as system:kube-proxy,
        # CoreDNS as a read-only user.
        node_kc = self._write_kubeconfig(w / "kubelet.kubeconfig", *pki.client(
            "kubelet-client", f"system:node:{self.node_name}", ("system:nodes",)))
        serve_crt, serve_key = pki.serving("kubelet-serving", [NODE_IP, "127.0.0.1", self.node_name])
        proxy_kc = self._write_kubeconfig(w / "kube-proxy.kubeconfig", *pki.client("kube-proxy", "system:kube-proxy"))
        dns_kc = self._write_kubeconfig(w / "coredns.kubeconfig", *pki.client("coredns", "kvmesh-dev:coredns"))
        self.api("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "kvmesh-dev:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "kvmesh-dev:coredns"}]})
        self.api("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "kvmesh-dev:coredns-extra"},
            "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
                      {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                       "verbs": ["list", "watch"]}]})
        self.api("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "kvmesh-dev:coredns-extra"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kvmesh-dev:coredns-extra"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "kvmesh-dev:coredns"}]})

        # cgroups: everything the kubelet creates goes under a root of this run's own.
        for mount in _cgroup_mounts():
            (mount / self.cgroup_root.lstrip("/")).mkdir(exist_ok=True)
        (state / "etc" / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
        (state / "kubelet.yaml").write_text(_KUBELET_YAML.format(
            sock=sock, ca=pki.ca_cert, state=state, node_ip=NODE_IP, cgroup_root=self.cgroup_root,
            crt=serve_crt, key=serve_key, domain=CLUSTER_DNS_DOMAIN))
        self._spawn_node("kubelet", [
            nb / "kubelet", f"--config={state / 'kubelet.yaml'}", f"--kubeconfig={node_kc}",
            f"--hostname-override={self.node_name}", f"--node-ip={NODE_IP}",
            f"--root-dir={state / 'kubelet'}", f"--cert-dir={state / 'kubelet-pki'}",
            "--node-labels=kvmesh.dev/real-node=true", "--v=1"])
        (state / "kube-proxy.yaml").write_text(_KUBE_PROXY_YAML.format(
            kubeconfig=proxy_kc, node=self.node_name, cidr=POD_CIDR))
        self._spawn_node("kube-proxy", [nb / "kube-proxy", f"--config={state / 'kube-proxy.yaml'}", "--v=1"])
        (state / "Corefile").write_text(_COREFILE.format(ip=NODE_IP, kubeconfig=dns_kc, domain=CLUSTER_DNS_DOMAIN))
        self._spawn_node("coredns", [nb / "coredns", "-conf", state / "Corefile"])
        t = time.monotonic()
        self._wait("real node Ready", self._real_node_ready)
        self.timings["kubelet_to_ready"] = time.monotonic() - t
        if self.network_policy:  # it reads its Node object once, at start
            self._start_kube_router()
        self._wait("kubernetes Service endpoints",
                   lambda: bool(self.api("GET", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
                                              "?labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes")["items"]))

    def _start_kube_router(self) -> None:
        """kube-router's network policy controller only (no routing, no proxy: kube-proxy and the
        bridge do those): iptables and ipsets in the node's namespace, gone with it."""
        binary = kube_router_bin()
        if binary is None or not shutil.which("ipset"):
            raise DevClusterError("NetworkPolicy enforcement needs " + "; ".join(network_policy_missing()))
        user = "kvmesh-dev:kube-router"
        kc = self._write_kubeconfig(self.workdir / "kube-router.kubeconfig",
                                    *self.pki.client("kube-router", user))
        read = ["get", "list", "watch"]
        self.api("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": user},
            "rules": [{"apiGroups": [""], "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
                       "verbs": read},
                      {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": read},
                      {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read}]})
        self.api("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": user},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
        self._spawn_node("kube-router", [
            binary, f"--kubeconfig={kc}", f"--hostname-override={self.node_name}",
            "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
            "--enable-ipv6=false", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--health-port=0", "--metrics-port=0", "--v=1"])
        self._wait("kube-router's policy chains", lambda: self.ns_run(
            "iptables", "-w", "-S", "KUBE-ROUTER-FORWARD", check=False).returncode == 0, timeout=60)

    def _spawn_node(self, name: str, argv: list) -> None:
        self._spawn(name, argv)
        self._node_procs.append(self._procs[-1])

    def _ctr(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        # ctr talks to containerd's socket, a plain file under the work dir: no namespace needed,
        # but the unpack (mounts) happens in containerd, which is inside.
        res = subprocess.run(["ctr", "--address", self.containerd_socket, "-n", "k8s.io", *args],
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise DevClusterError(f"ctr {' '.join(args)}: {res.stderr.strip()[-2000:]}")
        return res

    def _real_node_ready(self) -> bool:
        try:
            node = self.api("GET", f"/api/v1/nodes/{self.node_name}")
        except DevClusterError as e:
            if "HTTP 404" in str(e):
                return False
            raise
        return any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in node.get("status", {}).get("conditions", []))

    # -- teardown

    def stop(self) -> None:
        if self._stopped:
            return
        problems: list[str] = []
        t0 = time.monotonic()
        try:
            if self._holder is not None and self._node_procs:
                problems += self._drain_node()
        except Exception as e:  # noqa: BLE001 - teardown goes on whatever happens
            problems.append(f"drain: {e!r}")
        for name, proc in reversed(self._node_procs):
            self._terminate(proc, timeout=10)
        try:
            super().stop()  # the control plane, by the PIDs it recorded; the work dir
        finally:
            problems += self._teardown_namespaces()
            self.timings["teardown"] = time.monotonic() - t0
            if problems:
                print("kvmesh node teardown: " + "; ".join(problems), file=sys.stderr)
            self.teardown_problems = problems

    def _drain_node(self) -> list[str]:
        """Delete every pod while the kubelet runs, so that it stops containers and CNI DEL
        releases their addresses; wait (bounded) until containerd runs no container."""
        out = []
        for name, proc in self._procs:  # no controller may recreate what we delete
            if name == "kube-controller-manager":
                self._terminate(proc, timeout=5)
        self.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=0", "--force",
                     "--wait=false", check=False, timeout=60)
        # Done when no task runs and host-local IPAM holds no address (CNI DEL ran for every
        # sandbox); stopped containers may stay until the kubelet's GC, which is harmless.
        ipam = self.workdir / "node" / "cni" / "ipam" / "kvmesh-node"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tasks = self._ctr("tasks", "ls", "-q", check=False).stdout.split()
            leases = [p.name for p in ipam.glob("*") if p.name[0].isdigit()] if ipam.is_dir() else []
            if not tasks and not leases:
                return out
            time.sleep(0.3)
        out.append(f"after 60 s: tasks {tasks}, addresses {leases}")
        return out

    def _teardown_namespaces(self) -> list[str]:
        problems = []
        if self._mntns is not None:
            # Anything left in the mount namespace is ours (shims, the holder), and so is
            # anything in our cgroup root (containers a killed shim would leave running).
            mntns = self._mntns
            pids = _kill_until_gone(lambda: _processes_in_mntns(mntns), self.cgroup_root)
            if pids:
                problems.append(f"processes left in the node's mount namespace: {pids}")
        if self._holder is not None:
            try:
                self._holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                problems.append("namespace holder did not exit")
            self._holder = None
        for f in self._forwarders:
            f.close()
        self._forwarders.clear()
        if self._record is not None:
            with _machine_lock():
                problems += _clean_run({"netns": self.netns, "cgroup_root": self.cgroup_root})
                self._netns_created = False
                if not problems:
                    self._record.unlink(missing_ok=True)
                problems += _release_machine(leaving=self._record)
        return problems

    # -- conveniences

    def import_image(self, tarball: str | os.PathLike) -> None:
        self._ctr("images", "import", str(tarball), timeout=300)


_CONTAINERD_TOML = """\
# containerd 1.6 (Debian bookworm) for one real kubelet node; everything under the work dir.
version = 2
root = "{state}/containerd/root"
state = "{state}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{state}/containerd/opt"    # not /opt/containerd on the machine

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  disable_apparmor = true
  # No CAP_SYS_RESOURCE in this machine's bounding set: no negative oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{runc_root}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{state}/cni/net.d"
    max_conf_num = 1
"""

_KUBELET_YAML = """\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false                 # cgroup v1 (hybrid) hosts: 1.35+ refuses them by default
cgroupDriver: cgroupfs              # containerd 1.6 lacks the RuntimeConfig RPC
cgroupRoot: {cgroup_root}           # every cgroup of this run under one removable root
cgroupsPerQOS: true
containerRuntimeEndpoint: unix://{sock}
address: {node_ip}                  # :10250 on the node's bridge, inside the namespace
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: {crt}
tlsPrivateKeyFile: {key}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
clusterDomain: {domain}
clusterDNS: [{node_ip}]             # CoreDNS on the bridge address
resolvConf: {state}/etc/resolv.conf
podLogsDir: {state}/pod-logs
failSwapOn: false
maxPods: 40
serializeImagePulls: false
imageGCHighThresholdPercent: 100    # images are imported locally and cannot be pulled again
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "100Mi", nodefs.available: "2%", imagefs.available: "2%"}}
containerLogMaxSize: 10Mi
staticPodPath: ""
"""

_KUBE_PROXY_YAML = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {kubeconfig}}}
hostnameOverride: {node}
mode: iptables
clusterCIDR: {cidr}
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the machine-wide conntrack settings alone (nf_conntrack_max is global).
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
"""

_COREFILE = """\
# Cluster DNS for the real node: answers only the cluster domain (and reverse); no forwarding.
.:53 {{
    bind {ip}
    errors
    kubernetes {domain} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""


def main(argv: list[str] | None = None) -> int:
    """python -m kvmesh.local.node [IMAGE...]: start, print the kubeconfig, run until Ctrl-C or
    SIGTERM, then tear down. IMAGE: kvmesh (default), redis; `pause` alone: no other image."""
    argv = sys.argv[1:] if argv is None else argv

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both tear down (a shell's `cmd &` starts with SIGINT ignored).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    images = tuple(a for a in argv if a != "pause") if argv else ("kvmesh",)
    with RealNodeCluster(images=images, verbose=True, keep_workdir=True) as c:
        print(f"export KUBECONFIG={c.kubeconfig}   # node {c.node_name} in netns {c.netns}; "
              f"images {c.image_refs}; timings {json.dumps({k: round(v, 1) for k, v in c.timings.items()})}",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
