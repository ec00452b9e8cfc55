"""The webhook process, assembled: serving certificate, policy source, HTTPS server.

The serving certificate is either a cert/key pair kept current outside kvmesh (cert-manager,
`kvmesh certs`) or a leaf each replica signs from the kvmesh CA Secret into `cert_dir`. Each
pod's policy comes from the KVMeshPolicies the webhook watches; only with outside-managed
files and no API to reach (no kubeconfig, not in a cluster) do the `policy` defaults apply to
every pod.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from kvmesh.certs import authority
from kvmesh.certs.serving import SelfSigned
from kvmesh.core import mp
from kvmesh.core.policy import PolicyDefaults
from kvmesh.kube import connect
from kvmesh.kube.api import Kube
from kvmesh.webhook import server
from kvmesh.webhook.policy_cache import PolicyCache
from kvmesh.webhook.seed_key import SeedKey

log = logging.getLogger("kvmesh.webhook")


async def native_sidecars(api: Kube) -> Optional[bool]:
    """Whether the cluster runs native sidecars (mp mode's server is one), from the API
    server's version; None (mp assumed possible) when it cannot be read."""
    try:
        v = await api.server_version()
        found = mp.kube_has_native_sidecars(str(v.get("major", "")), str(v.get("minor", "")))
    except Exception as e:  # noqa: BLE001 - a start-up hint, never a reason not to serve
        log.warning("cannot read the API server's version (%s); assuming native sidecars "
                    "for mp mode", e)
        return None
    if found is False:
        log.warning("Kubernetes %s.%s has no native sidecars: mp-mode pods are admitted "
                    "without injection (reason native-sidecars-unsupported)",
                    v.get("major"), v.get("minor"))
    return found


async def run(host: str, port: int, policy: PolicyDefaults, *,
              cert: Optional[str] = None, key: Optional[str] = None,
              cert_dir: Optional[str] = None, sans: Sequence[str] = (),
              kubeconfig: Optional[str] = None, cert_check_seconds: float = 5.0,
              leaf_validity: dt.timedelta = authority.LEAF_VALIDITY,
              metrics_host: str = "0.0.0.0", metrics_port: int = 9090,
              limits: server.Limits = server.Limits()) -> None:
    """Serve until SIGTERM/SIGINT: from cert/key files, or (cert_dir set) a self-signed leaf
    for `sans`. Exits within limits.shutdown_timeout of the signal whatever the API server
    does (an unreachable or hung API server included)."""
    stopping = server.install_stop_signals(limits.shutdown_timeout)
    opts = dict(metrics_host=metrics_host, metrics_port=metrics_port, limits=limits,
                stopping=stopping)
    if cert_dir is None and not (kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST")):
        await server.serve(host, port, cert, key, policy, **opts)
        return
    api = await connect.api_client(kubeconfig)
    try:
        source = None
        if cert_dir is not None:
            source = SelfSigned(api, Path(cert_dir), list(sans), on_change=lambda: None,
                                interval=cert_check_seconds, validity=leaf_validity)
            cert, key = str(source.cert_file), str(source.key_file)
        cache = PolicyCache(api, policy)
        await server.serve(host, port, cert, key, cache.resolve, cert_source=source,
                           policy_cache=cache, seed_key=SeedKey(api),
                           native_sidecars=await native_sidecars(api), **opts)
    finally:
        try:  # closing the client must not hold the exit when the API server is gone
            await asyncio.wait_for(api.close(), 2.0)
        except (asyncio.TimeoutError, Exception):
            pass
