"""kvmesh.kube.api.Kube: the URLs, query parameters and content types it sends, and how it
reads answers, over a recorded stand-in for the ApiClient's transport."""

import json

import pytest

from kvmesh.core import names
from kvmesh.kube import api as K
from kvmesh.kube.api import ApiError, Kube


class Resp:
    def __init__(self, status=200, body=None):
        self.status, self._body, self.reason, self.released = status, body, "", False

    async def read(self):
        return b"" if self._body is None else json.dumps(self._body).encode()

    def release(self):
        self.released = True


class Transport:
    """Records every call_api request; answers from a queue (default: 200 {})."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    async def call_api(self, url, method, query_params=None, body=None, header_params=None,
                       **kw):
        self.calls.append({"url": url, "method": method, "query": dict(query_params or []),
                           "body": body, "content_type": header_params["Content-Type"], **kw})
        return self.answers.pop(0) if self.answers else Resp(200, {})


def peer_group(**status):
    obj = {"apiVersion": f"{names.API_GROUP}/{names.API_VERSION}",
           "kind": names.PEER_GROUP_KIND, "metadata": {"name": "redis-default",
                                                       "namespace": "team-a"}}
    return {**obj, "status": status} if status else obj


@pytest.mark.parametrize("args,want", [
    (("v1", "Pod"), "/api/v1/pods"),
    (("v1", "Pod", "ns"), "/api/v1/namespaces/ns/pods"),
    (("v1", "Namespace", "ignored", "n"), "/api/v1/namespaces/n"),
    (("apps/v1", "ReplicaSet", "ns", "rs"), "/apis/apps/v1/namespaces/ns/replicasets/rs"),
    ((K.ADMISSION_API, "MutatingWebhookConfiguration", None, "w"),
     "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/w"),
    ((K.CRD_API, "KVMeshPolicy", None, "p", "status"),
     "/apis/kvmesh.dev/v1alpha1/kvmeshpolicies/p/status"),
])
def test_paths_for_namespaced_cluster_scoped_and_subresources(args, want):
    assert K.path(*args) == want


async def test_apply_is_a_server_side_apply_patch_of_the_object_or_its_status():
    t = Transport()
    kube = Kube(t)
    await kube.apply(peer_group())
    await kube.apply(peer_group(members=1), subresource="status", manager="m", force=False)
    first, second = t.calls
    assert first["method"] == second["method"] == "PATCH"
    assert first["content_type"] == second["content_type"] == K.APPLY_PATCH
    assert first["url"] == \
        "/apis/kvmesh.dev/v1alpha1/namespaces/team-a/kvmeshpeergroups/redis-default"
    assert first["query"] == {"fieldManager": names.FIELD_MANAGER, "force": "true"}
    assert second["url"] == first["url"] + "/status" and second["query"] == {"fieldManager": "m"}
    assert second["body"]["status"] == {"members": 1}


async def test_errors_raise_except_absence_on_get_and_delete():
    kube = Kube(Transport(Resp(404, {"kind": "Status", "reason": "NotFound"}),
                          Resp(404), Resp(409, {"kind": "Status", "reason": "Conflict"})))
    assert await kube.get("v1", "Secret", "s", "ns") is None
    assert await kube.delete("v1", "Service", "s", "ns") is False
    with pytest.raises(ApiError) as e:
        await kube.apply(peer_group())
    assert e.value.status == 409


async def test_list_follows_continue_tokens():
    t = Transport(Resp(200, {"items": [{"a": 1}], "metadata": {"continue": "tok"}}),
                  Resp(200, {"items": [{"a": 2}], "metadata": {}}))
    items = await Kube(t).list("v1", "Pod", "ns", label_selector="x=y")
    assert items == [{"a": 1}, {"a": 2}]
    assert t.calls[1]["query"] == {"limit": "500", "labelSelector": "x=y", "continue": "tok"}


async def test_the_informer_request_maps_list_method_arguments_to_query_parameters():
    t = Transport()
    fn = Kube(t).lister("v1", "Pod")
    await fn(namespace="ns", label_selector="a", watch=True, resource_version="7",
             allow_watch_bookmarks=True, timeout_seconds=30, _preload_content=False,
             _request_timeout=5)
    await fn(limit=2, _continue="c")
    watch, page = t.calls
    assert watch["url"] == "/api/v1/namespaces/ns/pods" and watch["_request_timeout"] == 5
    assert watch["query"] == {"labelSelector": "a", "watch": "true", "resourceVersion": "7",
                              "allowWatchBookmarks": "true", "timeoutSeconds": "30"}
    assert page["url"] == "/api/v1/pods" and page["query"] == {"limit": "2", "continue": "c"}
    assert watch["_preload_content"] is False


async def test_the_client_skips_netrc_lookups_but_keeps_the_environment_proxy(tmp_path,
                                                                            monkeypatch):
    """aiohttp with trust_env reads ~/.netrc in a thread before every request; kvmesh's client
    does not, and still goes through HTTPS_PROXY unless NO_PROXY names the API server."""
    from kvmesh.kube import connect
    kc = tmp_path / "kubeconfig"
    kc.write_text("apiVersion: v1\nkind: Config\ncurrent-context: c\n"
                  "clusters: [{name: k, cluster: {server: 'https://api.example:6443'}}]\n"
                  "users: [{name: u, user: {token: t}}]\n"
                  "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    kube = await connect.api_client(str(kc))
    try:
        assert not kube.api.rest_client.pool_manager.trust_env
        assert kube.api.rest_client.proxy == "http://proxy.example:3128"
    finally:
        await kube.close()
    monkeypatch.setenv("NO_PROXY", "api.example")
    kube = await connect.api_client(str(kc))
    try:
        assert not kube.api.rest_client.pool_manager.trust_env
        assert not kube.api.rest_client.proxy
    finally:
        await kube.close()


async def test_server_version_reads_the_version_endpoint():
    t = Transport(Resp(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}))
    v = await Kube(t).server_version()
    assert (t.calls[0]["url"], t.calls[0]["method"]) == ("/version", "GET")
    assert (v["major"], v["minor"]) == ("1", "31")
