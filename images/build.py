#!/usr/bin/env python3
"""Build kvmesh's container images here, without a registry or a container daemon.

    python3 images/build.py kvmesh            # the product image (same content as ./Containerfile)
    python3 images/build.py redis             # the redis-mode lookup service, Debian's redis-server
    python3 images/build.py pause --binary P  # a pod sandbox image around a static pause binary
    python3 images/build.py NAME --check      # print the tarball if built, else exit 1 (never builds)

Each image is a Debian bookworm root file system made by `mmdebstrap` (`--variant=essential`,
docs and locales left out), plus for `kvmesh` a venv at /opt/kvmesh holding the project's wheel
and its dependencies as binary wheels (no compiler in the image, no pip either: pip runs from its
own wheel during the build). The result is ONE tarball that is both an OCI image layout
(`index.json`, `blobs/sha256/...`; `ctr images import`, `podman load`, `skopeo copy oci-archive:`)
and a docker archive (`manifest.json`; `docker load`), one gzip layer.

Tarballs are cached under $KVMESH_CACHE/images (default ~/.cache/kvmesh/images) as
`<name>-<version>-<hash>.tar`; the hash covers every input that shapes the image (this script,
the project's sources and pyproject for `kvmesh`, the pause binary), so a changed input is a new
build and an unchanged one is never rebuilt. The image reference inside is
`kvmesh.local/<name>:<version>-<hash>`. The LAST stdout line is the tarball path; the line before
it is the reference. Progress goes to stderr. Needs root (mmdebstrap's root mode, run inside a
private mount namespace so nothing it mounts outlives it), `mmdebstrap`
(`apt-get install mmdebstrap`), Debian's archive and PyPI.

Dependencies are resolved by pip at build time within pyproject's ranges (not locked), so two
builds of the same key months apart can differ in dependency versions; the key names the
project's inputs, not the resolver's answer. The image records `pip freeze` in
/opt/kvmesh/requirements.lock.txt.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
MIRRORS = [
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
]
# What the installed project is made of (pyproject's package-dir mapping).
PROJECT_INPUTS = ["pyproject.toml", "README.md", "kvmesh", "webhook", "controller", "certs"]
NONROOT = 65532
REGISTRY = "kvmesh.local"
# bookworm's python3 is 3.11.2; redis-py needs async-timeout below 3.11.3, which a resolver
# running on a newer host 3.11 would leave out of the wheelhouse.
EXTRA_WHEELS = ["async-timeout>=4.0.3"]
KVMESH_ENV = [
    "PATH=/opt/kvmesh/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONUNBUFFERED=1",
    "PYTHONDONTWRITEBYTECODE=1",
]
DPKG_EXCLUDES = [
    "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/lintian/*",
]


def log(msg: str) -> None:
    print(f"[images/build.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("KVMESH_CACHE") or Path.home() / ".cache" / "kvmesh") / "images"


def project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if p.is_dir():
            out += [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                    and not f.name.endswith((".pyc", ".pyo"))]
        elif p.is_file():
            out.append(p)
    return sorted(out)


def input_hash(name: str, extra: list[Path] = ()) -> str:
    h = hashlib.sha256()
    h.update(f"{name}\n{SUITE}\n{MIRRORS}\n{DPKG_EXCLUDES}\n{EXTRA_WHEELS}\n".encode())
    files = [Path(__file__).resolve()]
    if name == "kvmesh":
        files += _files([REPO / p for p in PROJECT_INPUTS])
    files += list(extra)
    for f in files:
        rel = str(f.relative_to(REPO)) if f.is_relative_to(REPO) else f.name
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- OCI packing


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pack(layer_tar: Path, out: Path, ref: str, config: dict, history: str) -> dict:
    """Write `out` as an OCI layout + docker archive with one gzip layer made of `layer_tar`."""
    log(f"packing {ref}")
    diff = hashlib.sha256()
    gz_path = out.with_suffix(".layer.gz")
    with open(layer_tar, "rb") as src, open(gz_path, "wb") as raw:
        # mtime=0: the same layer gives the same compressed digest.
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                diff.update(chunk)
                gz.write(chunk)
    layer_digest = "sha256:" + _file_sha(gz_path)
    layer_size = gz_path.stat().st_size
    cfg = {
        "architecture": "amd64", "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff.hexdigest()]},
        "history": [{"created_by": history}],
    }
    cfg_bytes = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _sha(cfg_bytes), "size": len(cfg_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer_size}],
    }
    man_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    tag = ref.rsplit(":", 1)[1]
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": manifest["mediaType"], "digest": _sha(man_bytes),
                       "size": len(man_bytes),
                       "annotations": {"io.containerd.image.name": ref,
                                       "org.opencontainers.image.ref.name": tag}}],
    }
    blob = lambda d: "blobs/sha256/" + d.split(":", 1)[1]  # noqa: E731
    docker = [{"Config": blob(_sha(cfg_bytes)), "RepoTags": [ref], "Layers": [blob(layer_digest)]}]
    tmp = out.with_suffix(".tar.part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            t.addfile(info, io.BytesIO(data))

        add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(blob(_sha(cfg_bytes)), cfg_bytes)
        add_bytes(blob(_sha(man_bytes)), man_bytes)
        info = t.gettarinfo(str(gz_path), arcname=blob(layer_digest))
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        with open(gz_path, "rb") as f:
            t.addfile(info, f)
        add_bytes("index.json", json.dumps(index, indent=1).encode())
        add_bytes("manifest.json", json.dumps(docker, indent=1).encode())
    gz_path.unlink()
    tmp.rename(out)
    return {"ref": ref, "tarball": str(out), "layer_bytes": layer_size,
            "uncompressed_bytes": layer_tar.stat().st_size, "manifest_digest": _sha(man_bytes)}


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- rootfs


def mmdebstrap(out_tar: Path, include: list[str], hooks: list[str]) -> None:
    if not shutil.which("mmdebstrap"):
        raise SystemExit("images/build.py: mmdebstrap not found (apt-get install mmdebstrap)")
    if os.geteuid() != 0:
        raise SystemExit("images/build.py: needs root (mmdebstrap --mode=root)")
    argv = ["unshare", "--mount", "--propagation", "private", "--",
            "mmdebstrap", "--mode=root", "--variant=essential", "--format=tar", "--quiet",
            f"--include={','.join(include)}"]
    argv += [f"--dpkgopt={o}" for o in DPKG_EXCLUDES]
    argv += [f"--customize-hook={h}" for h in hooks]
    # Nothing that only the build needs: no apt lists or caches (apt is not even in the
    # image: --variant=essential), no logs.
    argv += ["--customize-hook=rm -rf \"$1\"/var/log/* \"$1\"/var/cache/debconf/*-old "
             "\"$1\"/var/lib/dpkg/*-old \"$1\"/tmp/* \"$1\"/root/.cache "
             "\"$1\"/var/cache/apt/* \"$1\"/var/lib/apt/lists/*"]
    argv += [SUITE, str(out_tar), *MIRRORS]
    # The hooks' pip must see only the wheelhouse: no host pip settings (find-links, indexes).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["SOURCE_DATE_EPOCH"] = os.environ.get("SOURCE_DATE_EPOCH", "1700000000")
    log(f"mmdebstrap {SUITE} + {', '.join(include)}")
    subprocess.run(argv, check=True, env=env, stdout=sys.stderr)


def _nonroot_hook() -> str:
    return (f"echo 'nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/usr/sbin/nologin' >> \"$1/etc/passwd\" && "
            f"echo 'nonroot:x:{NONROOT}:' >> \"$1/etc/group\" && "
            f"install -d -o {NONROOT} -g {NONROOT} -m 0750 \"$1/home/nonroot\"")


def wheelhouse(dest: Path) -> None:
    """The project's wheel (built from a copy of exactly the hashed inputs) and binary wheels
    of all its dependencies, for CPython 3.11 on x86_64 glibc."""
    src = dest.parent / "src"
    for p in PROJECT_INPUTS:
        s = REPO / p
        if s.is_dir():
            shutil.copytree(s, src / p, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, src / p)
    log("pip wheel: the project and its dependencies (binary only)")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(src)],
                   check=True, stdout=sys.stderr)
    wheel = next(dest.glob("kvmesh-*.whl"))
    subprocess.run([*pip, "download", "--quiet", "--only-binary=:all:", "--dest", str(dest),
                    "--python-version", "3.11", "--platform", "manylinux_2_36_x86_64",
                    "--platform", "manylinux2014_x86_64", "--implementation", "cp",
                    str(wheel), *EXTRA_WHEELS, "pip"],
                   check=True, stdout=sys.stderr)


def build_kvmesh(out: Path, ref: str, work: Path) -> dict:
    wh = work / "wheels"
    wh.mkdir()
    wheelhouse(wh)
    pip_whl = next(wh.glob("pip-*.whl")).name
    hooks = [
        f"mkdir -p \"$1/tmp/wh\" && cp {wh}/*.whl \"$1/tmp/wh/\"",
        "chroot \"$1\" /usr/bin/python3 -m venv --without-pip /opt/kvmesh",
        # pip runs from its own wheel: it is not installed into the image.
        f"chroot \"$1\" /opt/kvmesh/bin/python3 /tmp/wh/{pip_whl}/pip install --quiet --no-index "
        f"--no-cache-dir --disable-pip-version-check --find-links /tmp/wh kvmesh",
        f"chroot \"$1\" /opt/kvmesh/bin/python3 /tmp/wh/{pip_whl}/pip freeze --disable-pip-version-check "
        f"--all --exclude pip > \"$1/opt/kvmesh/requirements.lock.txt\"",
        "chroot \"$1\" /opt/kvmesh/bin/kvmesh --help > /dev/null",
        _nonroot_hook(),
    ]
    layer = work / "rootfs.tar"
    # libstdc++6: manylinux wheels may link it as a system library (pyzmq does); Debian's
    # python3 does not pull it in, python:3.11-slim has it.
    mmdebstrap(layer, ["python3", "libstdc++6"], hooks)
    config = {"User": f"{NONROOT}:{NONROOT}", "Env": KVMESH_ENV, "Entrypoint": ["kvmesh"],
              "WorkingDir": "/home/nonroot",
              "Labels": {"org.opencontainers.image.title": "kvmesh",
                         "org.opencontainers.image.version": project_version(),
                         "org.opencontainers.image.base.name": f"debian:{SUITE} (mmdebstrap essential + python3)"}}
    return pack(layer, out, ref, config, "images/build.py kvmesh: mmdebstrap essential + python3 + /opt/kvmesh venv")


def build_redis(out: Path, ref: str, work: Path) -> dict:
    layer = work / "rootfs.tar"
    # redis-server pulls redis-tools (redis-cli, used by the lookup Deployment's liveness probe).
    mmdebstrap(layer, ["redis-server"], [_nonroot_hook()])
    # Plain redis-server, like the official image: the controller's arguments turn protected
    # mode off (kvmesh/core/lookup.py REDIS_PROTECTED_MODE_OFF), for this image or any other.
    config = {"User": f"{NONROOT}:{NONROOT}", "Entrypoint": ["redis-server"],
              "WorkingDir": "/tmp",
              "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
              "ExposedPorts": {"6379/tcp": {}},
              "Labels": {"org.opencontainers.image.title": "redis (Debian redis-server)"}}
    return pack(layer, out, ref, config, "images/build.py redis: mmdebstrap essential + redis-server")


def build_pause(out: Path, ref: str, work: Path, binary: Path) -> dict:
    layer = work / "rootfs.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
        info = t.gettarinfo(str(binary), arcname="pause")
        info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime = 0o755, 0, 0, "", "", 0
        with open(binary, "rb") as f:
            t.addfile(info, f)
    config = {"User": f"{NONROOT}:{NONROOT}", "Entrypoint": ["/pause"], "WorkingDir": "/"}
    return pack(layer, out, ref, config, "images/build.py pause")


def prune(cache: Path, prefix: str, keep: int) -> None:
    """Each source change is a new key: keep the newest `keep` tarballs of one name and
    version (other checkouts sharing the cache may use them), delete older ones."""
    tars = sorted(cache.glob(prefix + "*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in tars[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
        (cache / f".{old.stem}.lock").unlink(missing_ok=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=["kvmesh", "redis", "pause"])
    ap.add_argument("--check", action="store_true", help="print the tarball if built, else exit 1")
    ap.add_argument("--binary", type=Path, help="pause: the static pause binary")
    ap.add_argument("--json", action="store_true", help="print one JSON line about the image instead")
    args = ap.parse_args(argv)

    extra: list[Path] = []
    version = {"kvmesh": project_version, "redis": lambda: SUITE, "pause": lambda: "3.10"}[args.name]()
    if args.name == "pause":
        if not args.binary or not args.binary.is_file():
            ap.error("pause needs --binary PATH (cluster/node-build.sh builds one)")
        extra = [args.binary.resolve()]
    digest = input_hash(args.name, extra)
    key = f"{args.name}-{version}-{digest}"
    ref = f"{REGISTRY}/{args.name}:{version}-{digest}"
    cache = cache_dir()
    out = cache / f"{key}.tar"
    meta_path = cache / f"{key}.json"

    def done() -> int:
        meta = json.loads(meta_path.read_text())
        if args.json:
            print(json.dumps(meta))
        else:
            print(meta["ref"])
            print(out)
        return 0

    if out.is_file() and meta_path.is_file():
        return done()
    if args.check:
        print(f"images/build.py: not built: {out}", file=sys.stderr)
        return 1
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per key; the others wait and reuse
        if out.is_file() and meta_path.is_file():
            return done()
        for stale in cache.glob(f".build-{key}-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".build-{key}-", dir=cache) as tmp:
            work = Path(tmp)
            if args.name == "kvmesh":
                meta = build_kvmesh(out, ref, work)
            elif args.name == "redis":
                meta = build_redis(out, ref, work)
            else:
                meta = build_pause(out, ref, work, args.binary)
        meta["seconds"] = round(time.monotonic() - t0, 1)
        meta["tarball_bytes"] = out.stat().st_size
        meta_path.write_text(json.dumps(meta, indent=1))
        prune(cache, f"{args.name}-{version}-", keep=3)
        log(f"{ref}: {meta['tarball_bytes'] / 1e6:.0f} MB tarball, {meta['uncompressed_bytes'] / 1e6:.0f} MB "
            f"unpacked, in {meta['seconds']} s -> {out}")
    return done()


if __name__ == "__main__":
    raise SystemExit(main())
