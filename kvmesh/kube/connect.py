"""Kubernetes client construction for the kvmesh processes (the only place that loads it)."""

from __future__ import annotations

import os
import urllib.request
from typing import Optional
from urllib.parse import urlsplit

from kubernetes_asyncio import client, config

from kvmesh.kube.api import Kube


def _without_netrc(api: client.ApiClient) -> client.ApiClient:
    """kubernetes-asyncio opens its aiohttp session with trust_env=True (for the proxy
    variables); aiohttp then also looks ~/.netrc up, in a worker thread, before every request
    that carries no aiohttp credentials, which is every kvmesh request (bearer token or client
    certificate): a thread hop per API call, ~10 % of the controller's CPU samples at 5,000
    pods. Keep what the environment's proxy settings would give this API server, drop the
    lookups."""
    cfg = api.configuration
    host = urlsplit(cfg.host).hostname or ""
    if not cfg.proxy and host and not urllib.request.proxy_bypass(host):
        proxy = urllib.request.getproxies().get(urlsplit(cfg.host).scheme)
        if proxy:
            cfg.proxy = api.rest_client.proxy = proxy
    session = api.rest_client.pool_manager
    if hasattr(session, "_trust_env"):  # aiohttp's ClientSession; its .trust_env is read-only
        session._trust_env = False
    return api


async def api_client(kubeconfig: Optional[str] = None) -> Kube:
    """In-cluster config when running in a pod, else the given (or default) kubeconfig."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return Kube(_without_netrc(client.ApiClient()))
    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return Kube(_without_netrc(client.ApiClient(configuration=cfg)))
