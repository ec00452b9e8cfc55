"""`kvmesh.dev/*` labels and annotations -> typed overrides (pure, no I/O).

Every key under kvmesh.dev/ is validated: an unknown key or a bad value is an error naming the
key, the value and what is accepted, because a typo silently ignored is a pod silently not
sharing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from kvmesh.core import groups, names
from kvmesh.core import contract


class InvalidOverride(ValueError):
    """A kvmesh.dev/* label or annotation has a value kvmesh does not accept."""


@dataclass(frozen=True)
class Overrides:
    mode: Optional[str] = None
    container: Optional[str] = None
    allow_parallel: bool = False
    group: Optional[str] = None
    cpu_cache_gb: Optional[float] = None
    mp_gpu_visibility: Optional[str] = None


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_GROUP = groups.GROUP_NAME


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if v not in allowed:
            raise ValueError(" or ".join(f'"{a}"' for a in allowed))
        return v
    return parse


def _bool(v: str) -> bool:
    if v not in ("true", "false"):
        raise ValueError('"true" or "false"')
    return v == "true"


def _container(v: str) -> str:
    if not _DNS_LABEL.match(v):
        raise ValueError("a container name (DNS label)")
    return v


def _group(v: str) -> str:
    if not _GROUP.match(v):
        raise ValueError("1-32 lowercase letters, digits or '-', starting and ending with a "
                         "letter or digit")
    return v


def _gb(v: str) -> float:
    if contract.check_gb(v) is not None:
        raise ValueError('a finite number of GB greater than 0, e.g. "20" (not "20Gi")')
    return float(v)


# annotation -> (Overrides field, parser). The parser raises ValueError("<what is accepted>").
ANNOTATIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    names.ANN_MODE: ("mode", _choice(*names.MODES)),
    names.ANN_CONTAINER: ("container", _container),
    names.ANN_ALLOW_PARALLEL: ("allow_parallel", _bool),
    names.ANN_GROUP: ("group", _group),
    names.ANN_CPU_CACHE_GB: ("cpu_cache_gb", _gb),
    names.ANN_MP_GPU_VISIBILITY: ("mp_gpu_visibility", _choice("none", "all")),
}
# Keys kvmesh writes or that belong to the opt-in flow; accepted without parsing here.
_PASSIVE = {names.ANN_STATUS, names.ANN_INJECT}
_INJECT_VALUES = (names.INJECT_ENABLED, names.INJECT_DISABLED)


_NONE = Overrides()


def parse(annotations: dict, labels: dict) -> Overrides:
    """Validate every kvmesh.dev/* annotation and the opt-in label; raise InvalidOverride."""
    values: dict[str, object] = {}
    # Sorted, so that of several bad keys the same one is always reported.
    for key in sorted([k for k in annotations or () if k.startswith(names.PREFIX)]):
        raw = annotations[key]
        if key in _PASSIVE:
            if key == names.ANN_INJECT:
                _check_inject(key, raw, "annotation")
            continue
        if key not in ANNOTATIONS:
            known = ", ".join(sorted(list(ANNOTATIONS) + [names.ANN_INJECT]))
            raise InvalidOverride(
                f"unknown annotation {key}={raw!r}: kvmesh accepts only {known}")
        attr, parser = ANNOTATIONS[key]
        try:
            values[attr] = parser(str(raw))
        except ValueError as e:
            raise InvalidOverride(
                f"annotation {key} has value {raw!r}; accepted: {e}") from None
    if names.LABEL_INJECT in (labels or {}):
        _check_inject(names.LABEL_INJECT, labels[names.LABEL_INJECT], "label")
    return Overrides(**values) if values else _NONE


def _check_inject(key: str, raw: object, what: str) -> None:
    if raw not in _INJECT_VALUES:
        raise InvalidOverride(
            f"{what} {key} has value {raw!r}; accepted: "
            + " or ".join(f'"{v}"' for v in _INJECT_VALUES))
