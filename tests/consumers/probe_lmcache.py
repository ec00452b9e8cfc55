#!/usr/bin/env python3
"""Feed env dicts to the REAL LMCache config loader and report what it parsed.

Runs inside a cached venv holding one lmcache version (see setup_envs.sh);
driven by tests/consumers/consumers.py.  Protocol:

  stdin:  {"cases": [{"env": {"LMCACHE_...": "..."}}, ...]}
  stdout: {"lmcache_version": "...", "loader": "...", "import_warnings": [...],
           "results": [{"ok": true, "config": {...}, "warnings": [...]}
                       | {"ok": false, "stage": "load"|"validate"|"adapter",
                          "error": "Type: message", "warnings": [...]}, ...]}

Each case runs with os.environ holding exactly the case's env (nothing from the
probe's own environment leaks in: no LMCACHE_*, no PYTHONHASHSEED).

How the config is loaded, per generation (mirrors vLLM's LMCacheConnectorV1 path):
- lmcache <= 0.3.6 ("redis" generation): the real
  lmcache.integration.vllm.utils.lmcache_get_config() (LMCACHE_USE_EXPERIMENTAL
  check, from_env() or from_file()+update_config_from_env()), then the
  vllm_v1_adapter's `isinstance(config, v1 LMCacheEngineConfig)` assert.  That
  loader never calls validate() (0.3.6 only validates defaults in __post_init__;
  a missing LOOKUP_URL asserts later, in RedisLookupServer.__init__), so the
  probe calls config.validate() itself: stage "validate".
- lmcache >= 0.3.7 ("controller" generation): the env-only branch of
  lmcache.integration.vllm.utils.lmcache_get_or_create_config(), i.e.
  LMCacheEngineConfig.from_env() then validate() (from_file() +
  update_config_from_env() when LMCACHE_CONFIG_FILE is set).  That module
  itself needs real torch, so its few lines are replicated here.
  remote_config_url fetching is not performed.
"""

from __future__ import annotations

import dataclasses
import json
import linecache
import logging
import os
import sys
import traceback

# LMCache may report usage over the network; keep this process quiet.  Set
# before importing lmcache; per-case envs replace os.environ afterwards.
os.environ["LMCACHE_TRACK_USAGE"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.pop("LMCACHE_CONFIG_FILE", None)

# Anything lmcache prints goes to stderr; the JSON answer owns the real stdout.
_OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)


class _Collector:
    """Records WARNING+ log records of every `lmcache*` logger.

    lmcache loggers set propagate=False and carry their own handlers, and some
    are created during import, so hook Logger.handle itself (before importing
    lmcache) rather than attaching a handler to each logger afterwards."""

    def __init__(self) -> None:
        self.records: list[str] = []

    def install(self) -> None:
        orig = logging.Logger.handle
        collector = self

        def handle(logger: logging.Logger, record: logging.LogRecord) -> None:
            if record.name.startswith("lmcache") and record.levelno >= logging.WARNING:
                try:
                    msg = record.getMessage()
                except Exception:  # malformed log call
                    msg = str(record.msg)
                collector.records.append(f"{record.levelname} {record.name}: {msg}")
            orig(logger, record)

        logging.Logger.handle = handle  # type: ignore[method-assign]


_COLLECTOR = _Collector()
_COLLECTOR.install()


def _lmcache_version() -> str:
    from importlib.metadata import version

    return version("lmcache")


def _is_legacy(ver: str) -> bool:
    parts = []
    for p in ver.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) < (0, 3, 7)


VERSION = _lmcache_version()
LEGACY = _is_legacy(VERSION)

if LEGACY:
    from lmcache.integration.vllm.utils import lmcache_get_config as _get_config_036
    from lmcache.v1.config import LMCacheEngineConfig as _V1Config

    LOADER = "lmcache.integration.vllm.utils.lmcache_get_config + validate()"
else:
    from lmcache.v1.config import LMCacheEngineConfig as _V1Config

    LOADER = "LMCacheEngineConfig.from_env + validate() (= lmcache_get_or_create_config)"

IMPORT_WARNINGS = list(_COLLECTOR.records)


class _Stage(Exception):
    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(stage)
        self.stage = stage
        self.exc = exc


def _load():
    if LEGACY:
        try:
            cfg = _get_config_036()
            # vllm_v1_adapter.LMCacheConnectorV1Impl.__init__ in 0.3.6:
            assert isinstance(cfg, _V1Config), (
                "LMCache v1 configuration is should be passed for vLLM v1."
            )
        except BaseException as e:  # noqa: BLE001
            raise _Stage("load", e) from e
        try:
            cfg.validate()
        except BaseException as e:  # noqa: BLE001
            raise _Stage("validate", e) from e
        return cfg
    try:
        if "LMCACHE_CONFIG_FILE" in os.environ:
            cfg = _V1Config.from_file(os.environ["LMCACHE_CONFIG_FILE"])
            cfg.update_config_from_env()  # validates in 0.5.6
            return cfg
        cfg = _V1Config.from_env()
    except BaseException as e:  # noqa: BLE001
        raise _Stage("load", e) from e
    try:
        cfg.validate()
    except BaseException as e:  # noqa: BLE001
        raise _Stage("validate", e) from e
    return cfg


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted((_jsonable(x) for x in v), key=repr)
    if hasattr(v, "value") and type(v).__module__ != "builtins":  # enums
        return _jsonable(v.value)
    return repr(v)


def _config_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    return {k: _jsonable(v) for k, v in vars(cfg).items() if not k.startswith("_")}


def _describe(exc: BaseException) -> tuple[str, str | None]:
    tb = traceback.extract_tb(exc.__traceback__)
    where = None
    src = None
    if tb:
        fr = tb[-1]
        fn = fr.filename
        i = fn.rfind("site-packages/")
        short = fn[i + len("site-packages/") :] if i >= 0 else os.path.basename(fn)
        where = f"{short}:{fr.lineno}"
        src = (fr.line or linecache.getline(fr.filename, fr.lineno)).strip()
    msg = str(exc)
    if isinstance(exc, AssertionError) and not msg and src:
        msg = f"{src} ({where})"
    return f"{type(exc).__name__}: {msg}", where


def run_case(env: dict) -> dict:
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    _COLLECTOR.records = []
    try:
        cfg = _load()
        res = {"ok": True, "config": _config_dict(cfg)}
    except _Stage as s:
        err, where = _describe(s.exc)
        res = {"ok": False, "stage": s.stage, "error": err, "where": where}
    res["warnings"] = list(_COLLECTOR.records)
    return res


def main() -> int:
    req = json.load(sys.stdin)
    saved = dict(os.environ)
    results = []
    try:
        for case in req.get("cases", []):
            results.append(run_case(case.get("env", {})))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    json.dump(
        {
            "lmcache_version": VERSION,
            "loader": LOADER,
            "import_warnings": IMPORT_WARNINGS,
            "results": results,
        },
        _OUT,
    )
    _OUT.write("\n")
    _OUT.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
