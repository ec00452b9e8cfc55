"""Kubernetes client construction for the kvmesh processes (the only place that loads it)."""

from __future__ import annotations

import os
from typing import Optional

from kubernetes_asyncio import client, config

from kvmesh.kube.api import Kube


async def api_client(kubeconfig: Optional[str] = None) -> Kube:
    """In-cluster config when running in a pod, else the given (or default) kubeconfig."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return Kube(client.ApiClient())
    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return Kube(client.ApiClient(configuration=cfg))
