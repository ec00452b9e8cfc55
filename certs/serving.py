"""A webhook replica's own serving certificate, signed by the CA in the Secret.

Every replica signs its own leaf (no leader needed for serving, as in cert-manager's
DynamicAuthority), writes it to its cert directory for the server's reloader, re-issues it
before expiry or when the CA is promoted, and is ready only while the live webhook
configuration trusts it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from kvmesh.certs import authority, store
from kvmesh.core import names
from kvmesh.kube.api import Kube

log = logging.getLogger("kvmesh.certs")


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)  # atomic: the reloader never reads half a file


class SelfSigned:
    def __init__(self, kube: Kube, cert_dir: Path, hosts: list[str],
                 on_change: Callable[[], object], interval: float = 5.0,
                 validity: dt.timedelta = authority.LEAF_VALIDITY):
        self.kube = kube
        self.cert_dir, self.hosts, self.on_change = cert_dir, hosts, on_change
        self.interval, self.validity = interval, validity
        self.trusted = False
        cert_dir.mkdir(parents=True, exist_ok=True)

    @property
    def cert_file(self) -> Path:
        return self.cert_dir / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.cert_dir / "tls.key"

    def ready(self) -> bool:
        return self.trusted

    async def step(self, now: Optional[dt.datetime] = None) -> None:
        now = now or dt.datetime.now(dt.timezone.utc)
        state, _ = await store.read_ca(self.kube)
        if state is None:
            log.warning("CA Secret %s not found yet; waiting for the kvmesh controller to "
                        "create it (is the controller running?)", names.CA_SECRET)
            self.trusted = False
            return
        leaf_pem = self.cert_file.read_bytes() if self.cert_file.exists() else None
        if authority.leaf_needs_reissue(leaf_pem, state.current, self.hosts, now):
            leaf = authority.issue_leaf(state.current, self.hosts, now, self.validity)
            _write(self.key_file, leaf.key_pem, 0o600)
            _write(self.cert_file, leaf.cert_pem)
            leaf_pem = leaf.cert_pem
            log.info("issued serving certificate for %s (expires %s)", ", ".join(self.hosts),
                     leaf.cert.not_valid_after_utc.isoformat())
            self.on_change()
        bundle, consistent = await store.live_bundle(self.kube)
        trusted = consistent and authority.leaf_trusted(leaf_pem, bundle, now)
        if trusted != self.trusted:
            log.info("serving certificate %s by the live webhook configuration",
                     "trusted" if trusted else "NOT trusted (not ready)")
        self.trusted = trusted

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception as e:  # API unreachable: keep serving the last good pair
                log.error("certificate check failed: %s; retrying in %.0fs", e, self.interval)
            await asyncio.sleep(self.interval)
