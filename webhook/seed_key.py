"""The key of the per-group PYTHONHASHSEEDs (kvmesh.core.hashseed), as the webhook holds it.

Read from Secret kvmesh-system/kvmesh-hash-seed (names.HASH_SEED_SECRET), which the
controller creates; the webhook may only get that one Secret. Admission never waits on the
API: it reads `key`. Until the key is loaded the webhook is not ready, and a pod that reaches
it anyway is admitted without injection with reason `hash-seed-unavailable`, never with a
seed its peers might not share.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Optional

from kvmesh.core import hashseed, names
from kvmesh.kube.api import Kube

log = logging.getLogger("kvmesh.webhook")


class SeedKey:
    def __init__(self, kube: Kube, retry: float = 2.0, refresh: float = 60.0):
        self.kube, self.retry, self.refresh = kube, retry, refresh
        self.key: Optional[bytes] = None
        self._said: Optional[str] = None  # the last problem logged (each once, not per poll)

    @property
    def pending(self) -> bool:
        return self.key is None

    def ready(self) -> bool:
        return self.key is not None

    async def step(self) -> None:
        where = f"Secret {names.SYSTEM_NAMESPACE}/{names.HASH_SEED_SECRET}"
        s = await self.kube.get("v1", "Secret", names.HASH_SEED_SECRET, names.SYSTEM_NAMESPACE)
        if s is None:
            self._say(logging.WARNING, f"{where} not found yet; the kvmesh controller creates "
                      "it (is it running?). Not ready until then: pods that arrive meanwhile "
                      "are admitted without injection (hash-seed-unavailable)")
            return
        try:
            key = base64.b64decode((s.get("data") or {})[hashseed.KEY_FIELD], validate=True)
            if len(key) < 16:
                raise ValueError(f"{len(key)} bytes")
        except (KeyError, ValueError, binascii.Error) as e:
            self._say(logging.ERROR, f"{where} has no usable '{hashseed.KEY_FIELD}' "
                      f"({type(e).__name__}: {e}); delete it and the controller recreates it "
                      "(every group's seed then changes: roll the injected workloads)")
            return
        if self.key is not None and key != self.key:
            log.warning("%s changed: pods admitted from now on get new per-group seeds and do "
                        "not share cache with older members until their workloads roll", where)
        elif self.key is None:
            log.info("loaded the per-group hash-seed key from %s", where)
        self.key, self._said = key, None

    def _say(self, level: int, msg: str) -> None:
        if msg != self._said:
            log.log(level, msg)
            self._said = msg

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception as e:  # API unreachable: keep the key already loaded
                self._say(logging.ERROR, f"cannot read the hash-seed key: "
                          f"{type(e).__name__}: {e}; retrying")
            await asyncio.sleep(self.refresh if self.key is not None else self.retry)
