"""How much work one pod may cost kvmesh (pure, no I/O).

Anyone who may create a pod in an opted-in namespace chooses its size, and the webhook decides
on the API server's clock (timeoutSeconds: 3) for every pod of the cluster. So what grows with
the pod is capped here, far above real workloads, and a pod over a cap is admitted without
injection (reason `limit-exceeded` or `script-not-editable`, naming the cap) rather than
costing seconds. Ports are picked in time linear in the pod (PortSet), and parse caches are
bounded in bytes (ByteLRU), not entries.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

# Ranks (tensor-parallel x pipeline-parallel) kvmesh configures in one pod: three ports each.
# One pod holds at most 8-16 GPUs; 64 leaves room for multi-node heads.
MAX_RANKS = 64
# env entries of the vLLM container (real ones have tens).
MAX_ENV_ENTRIES = 1000
# A `sh -c` script kvmesh parses to find vLLM (real launch scripts are a few KiB; the parser
# costs ~1.5 us per byte), per script and for all scripts of one pod together.
MAX_SCRIPT_BYTES = 64 * 1024
MAX_SCRIPT_BYTES_PER_POD = 128 * 1024
# Parsed scripts remembered across admissions (every replica carries the same script).
SCRIPT_CACHE_BYTES = 8 * 1024 * 1024
MAX_PORT = 65535


def kib(n: int) -> str:
    return f"{n // 1024} KiB"


class NoFreePort(ValueError):
    pass


class PortSet:
    """Ports taken in a pod; `pick(start)` takes the first free one at or above `start`.

    Skip pointers with path compression: a run of taken ports is crossed once, not on every
    pick, so picking 3 x ranks ports over a crowded range is linear, not quadratic."""

    def __init__(self, taken: set[int]):
        self._taken = taken
        self._skip: dict[int, int] = {}

    def __contains__(self, port: int) -> bool:
        return port in self._taken

    def pick(self, start: int) -> int:
        path = []
        p = start
        while p in self._taken:
            path.append(p)
            p = self._skip.get(p, p + 1)
        if p > MAX_PORT:
            raise NoFreePort(f"no free port between {start} and {MAX_PORT}")
        for q in path:
            self._skip[q] = p
        self._taken.add(p)
        return p


class ByteLRU:
    """Least-recently-used cache bounded by the summed `cost` of its entries (bytes), so
    a few huge keys cannot hold what many small ones would. Thread-safe (the webhook decides
    large pods on a worker thread)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return default
            self._data.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: Any, cost: int) -> None:
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._data[key] = (value, cost)
            self.bytes += cost
            while self.bytes > self.max_bytes:
                _, (_, c) = self._data.popitem(last=False)
                self.bytes -= c
