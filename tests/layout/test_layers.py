"""The layers, checked over the import graph (every import statement, including the ones
inside functions), so the architecture holds by test instead of by memory.

    kvmesh.core       pure: contract, policy, overrides, launch, inject, workloads, groups, lookup
    kvmesh.runtime    OS-level helpers both processes share (the exit watchdog) -> nothing
    kvmesh.kube       the only importer of kubernetes_asyncio            -> core
    kvmesh.backends   lookup-tier clients (Redis index, LMCache controller) -> core
    kvmesh.certs      CA and serving certificates                        -> core, kube
    kvmesh.webhook    the admission process                               -> core, kube, certs
    kvmesh.controller the controller process                              -> core, kube, backends, certs
    kvmesh.local      dev cluster, local stack, demo (runs the processes as subprocesses)
                                                                          -> core, certs
    kvmesh.check      `kvmesh check`: preconditions against a live cluster -> core, kube, certs
    kvmesh.cli        argument parsing only                               -> anything
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Package folder -> import name (pyproject.toml's package-dir).
ROOTS = {"kvmesh": "kvmesh", "webhook": "kvmesh.webhook", "controller": "kvmesh.controller",
         "certs": "kvmesh.certs"}

LAYERS = ("kvmesh.core", "kvmesh.runtime", "kvmesh.kube", "kvmesh.backends", "kvmesh.certs",
          "kvmesh.webhook", "kvmesh.controller", "kvmesh.local", "kvmesh.check")
MAY_IMPORT = {
    "kvmesh.core": set(),
    "kvmesh.runtime": set(),
    "kvmesh.kube": {"kvmesh.core"},
    "kvmesh.backends": {"kvmesh.core"},
    "kvmesh.certs": {"kvmesh.core", "kvmesh.kube"},
    "kvmesh.webhook": {"kvmesh.core", "kvmesh.runtime", "kvmesh.kube", "kvmesh.certs"},
    "kvmesh.controller": {"kvmesh.core", "kvmesh.runtime", "kvmesh.kube", "kvmesh.backends",
                          "kvmesh.certs"},
    "kvmesh.local": {"kvmesh.core", "kvmesh.certs"},
    "kvmesh.check": {"kvmesh.core", "kvmesh.kube", "kvmesh.certs"},
}
# Third-party packages that mean I/O; the core may import none of them.
IO_PACKAGES = ("kubernetes_asyncio", "aiohttp", "redis", "zmq", "socket", "subprocess",
               "urllib", "http", "ssl", "asyncio", "prometheus_client")


def modules() -> dict[str, Path]:
    out = {}
    for folder, name in ROOTS.items():
        for f in sorted((REPO / folder).rglob("*.py")):
            rel = f.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = f
    return out


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import; `from a import b` yields a.b when a.b is a
    module of ours, else a."""
    ours = modules()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if sub in ours else node.module))
    return found


def layer_of(module: str) -> str | None:
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def violations() -> list[str]:
    out = []
    for mod, path in modules().items():
        mine = layer_of(mod)
        where = path.relative_to(REPO)
        for line, imp in imports(path):
            top = imp.split(".")[0]
            if top == "kubernetes_asyncio" and mine != "kvmesh.kube":
                out.append(f"{where}:{line}: {mod} imports {imp}: only kvmesh.kube may")
            if mine == "kvmesh.core" and top in IO_PACKAGES:
                out.append(f"{where}:{line}: the pure core ({mod}) imports {imp}")
            if top != "kvmesh" or imp == "kvmesh" or mine is None:
                continue  # kvmesh itself holds only the version; cli may import anything
            theirs = layer_of(imp)
            if theirs is not None and theirs != mine and theirs not in MAY_IMPORT[mine]:
                out.append(f"{where}:{line}: {mod} ({mine}) imports {imp} ({theirs}); "
                           f"{mine} may import " + (", ".join(sorted(MAY_IMPORT[mine])) or "no other layer"))
    return out


def test_every_module_is_in_a_layer():
    stray = [m for m in modules() if layer_of(m) is None and m not in ("kvmesh", "kvmesh.cli")]
    assert not stray, f"modules outside every layer (add them to one): {stray}"


def test_imports_point_down_the_layers():
    bad = violations()
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer,forbidden", [("kvmesh.core", "kvmesh.kube.apply"),
                                             ("kvmesh.webhook", "kvmesh.controller.mesh"),
                                             ("kvmesh.controller", "kvmesh.webhook.server")])
def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch, layer, forbidden):
    """The check itself can fail: a module that imports across a layer is reported."""
    folder = {"kvmesh.core": ("kvmesh", "core"), "kvmesh.webhook": ("webhook",),
              "kvmesh.controller": ("controller",)}[layer]
    for name in ROOTS:
        (tmp_path / name).mkdir()
    target = tmp_path.joinpath(*folder)
    target.mkdir(parents=True, exist_ok=True)
    (target / "bad.py").write_text(f"def f():\n    import {forbidden}\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert any(f"imports {forbidden}" in v for v in violations())
