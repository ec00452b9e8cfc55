"""The webhook process, assembled: serving certificate, policy source, HTTPS server.

The serving certificate is either a cert/key pair kept current outside kvmesh (cert-manager,
`kvmesh certs`) or a leaf each replica signs from the kvmesh CA Secret into `cert_dir`. Each
pod's policy comes from the KVMeshPolicies the webhook watches; only with outside-managed
files and no API to reach (no kubeconfig, not in a cluster) do the `policy` defaults apply to
every pod.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Optional, Sequence

from kvmesh.certs import authority
from kvmesh.certs.serving import SelfSigned
from kvmesh.core.policy import PolicyDefaults
from kvmesh.kube import connect
from kvmesh.webhook import server
from kvmesh.webhook.policy_cache import PolicyCache


async def run(host: str, port: int, policy: PolicyDefaults, *,
              cert: Optional[str] = None, key: Optional[str] = None,
              cert_dir: Optional[str] = None, sans: Sequence[str] = (),
              kubeconfig: Optional[str] = None, cert_check_seconds: float = 5.0,
              leaf_validity: dt.timedelta = authority.LEAF_VALIDITY) -> None:
    """Serve until SIGTERM/SIGINT: from cert/key files, or (cert_dir set) a self-signed leaf
    for `sans`."""
    if cert_dir is None and not (kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST")):
        await server.serve(host, port, cert, key, policy)
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
                           policy_cache=cache)
    finally:
        await api.close()
