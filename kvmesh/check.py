"""`kvmesh check`: every precondition of sharing, against a live cluster, one line each.

What is checked (in this order, each with a fix hint when it fails):

    crds              both CRDs established, v1alpha1 served
    webhook-config    the MutatingWebhookConfiguration and its entries
    webhook-pods      the webhook Deployment has ready replicas (entries that use the Service);
                      entries that use `url:` (a webhook outside the cluster, as in the local
                      stack) are checked by connecting to the URL instead
    webhook-trust     every entry carries one caBundle; it holds the CA kvmesh signs with (CA
                      Secret); the certificate the webhook serves chains to it and names the host
    webhook-injects   a server-side dry-run create of a labelled probe pod comes back injected:
                      the API server reached and trusted the webhook (nothing is stored)
    controller-leader the leader Lease is held and renewed within its duration
    peer-groups       every KVMeshPeerGroup's Sharing/Degraded conditions
    probe (--probe)   read-only, per group: how many ready peers have chunks in the lookup
                      tier that another peer's lookup resolves (status.peersWithChunks, which
                      the controller reads from the lmcache_controller's worker listing or its
                      own Redis address index); nothing is written anywhere. Why there is no
                      store-on-A, hit-on-B probe and why redis and mp groups are not probed:
                      NOT_PROBED and the README.

The pure verdicts (`*_result`) take API objects as dicts; `run` does the I/O.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import os
import ssl
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Optional

from cryptography import x509

from kvmesh.certs import authority
from kvmesh.core import health, names
from kvmesh.kube import connect
from kvmesh.kube.api import ADMISSION_API, CRD_API, ApiError, Kube

OK, FAIL, WARN, SKIP = "ok", "fail", "warn", "skip"
CRDS = ("kvmeshpolicies.kvmesh.dev", "kvmeshpeergroups.kvmesh.dev")
CRD_KIND = ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
LEASE_API = "coordination.k8s.io/v1"
WEBHOOK_DEPLOYMENT = names.WEBHOOK_SERVICE
# The probe pod: what the webhook injects (a vLLM command, an LMCache image, the opt-in label).
PROBE_LABEL = names.PREFIX + "check-probe"
# How late a lease renewal may be before the leader counts as gone (clock skew, a slow
# renewal): on top of leaseDurationSeconds.
LEASE_SLACK_SECONDS = 5


@dataclass
class Result:
    name: str
    status: str  # ok | fail | warn | skip
    message: str
    fix: str = ""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _time(value: Optional[str]) -> Optional[dt.datetime]:
    if not value:
        return None
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


# --- pure verdicts ---------------------------------------------------------------------------

def crds_result(crds: dict[str, Optional[dict]]) -> Result:
    bad = []
    for name, crd in crds.items():
        if crd is None:
            bad.append(f"{name} missing")
            continue
        conds = {c.get("type"): c.get("status") for c in (crd.get("status") or {})
                 .get("conditions") or []}
        served = [v["name"] for v in crd["spec"].get("versions") or [] if v.get("served")]
        if conds.get("Established") != "True":
            bad.append(f"{name} not established")
        if names.API_VERSION not in served:
            bad.append(f"{name} serves {served or 'no version'}, not {names.API_VERSION}")
    if bad:
        return Result("crds", FAIL, "; ".join(bad),
                      "kubectl apply -k manifests/ (the CRDs are 10-crd-*.yaml and 11-crd-*.yaml)")
    return Result("crds", OK, f"{', '.join(crds)} established, {names.API_VERSION} served")


def config_result(mwc: Optional[dict]) -> Result:
    if mwc is None:
        return Result("webhook-config", FAIL,
                      f"MutatingWebhookConfiguration {names.WEBHOOK_CONFIGURATION} not found",
                      "kubectl apply -k manifests/ (50-mutatingwebhook.yaml)")
    entries = [w["name"] for w in mwc.get("webhooks") or []]
    missing = {names.WEBHOOK_POD_ENTRY, names.WEBHOOK_NAMESPACE_ENTRY} - set(entries)
    if missing:
        return Result("webhook-config", FAIL, f"entries missing: {', '.join(sorted(missing))}",
                      "kubectl apply -k manifests/ restores them")
    targets = sorted({_target(w) for w in mwc["webhooks"]})
    return Result("webhook-config", OK, f"{len(entries)} entries -> {', '.join(targets)}")


def _target(entry: dict) -> str:
    cc = entry.get("clientConfig") or {}
    if cc.get("url"):
        return cc["url"].split("/", 3)[2] if "://" in cc["url"] else cc["url"]
    s = cc.get("service") or {}
    return f"service {s.get('namespace')}/{s.get('name')}:{s.get('port', 443)}"


def deployment_result(dep: Optional[dict]) -> Result:
    where = f"Deployment {names.SYSTEM_NAMESPACE}/{WEBHOOK_DEPLOYMENT}"
    if dep is None:
        return Result("webhook-pods", FAIL, f"{where} not found",
                      "kubectl apply -k manifests/ (30-webhook.yaml)")
    want = (dep.get("spec") or {}).get("replicas", 1)
    ready = (dep.get("status") or {}).get("readyReplicas") or 0
    if ready == 0:
        return Result("webhook-pods", FAIL, f"{where}: 0 of {want} replicas ready",
                      f"kubectl -n {names.SYSTEM_NAMESPACE} scale deployment {WEBHOOK_DEPLOYMENT}"
                      f" --replicas=2; if they run but are not ready, their certificate is not "
                      f"trusted yet (kubectl -n {names.SYSTEM_NAMESPACE} logs "
                      f"deploy/{WEBHOOK_DEPLOYMENT})")
    status = OK if ready >= want else WARN
    return Result("webhook-pods", status, f"{where}: {ready} of {want} replicas ready",
                  "" if status == OK else "a replica is not ready: kubectl -n "
                  f"{names.SYSTEM_NAMESPACE} describe deployment {WEBHOOK_DEPLOYMENT}")


def bundle_result(mwc: dict, ca_secret: Optional[dict], served: dict[str, object],
                  now: dt.datetime) -> Result:
    """caBundle agreement, the CA Secret's CA in it, and each served leaf (PEM bytes, or the
    reason it could not be fetched) chaining to it and naming its host."""
    fix_bundle = ("the controller repairs the caBundle within seconds while it leads (see "
                  "controller-leader); with cert-manager, check its cainjector")
    bundles = {base64.b64decode((w.get("clientConfig") or {}).get("caBundle") or "")
               for w in mwc.get("webhooks") or []}
    if len(bundles) != 1 or b"" in bundles:
        return Result("webhook-trust", FAIL, "the entries do not all carry one caBundle",
                      fix_bundle)
    bundle = bundles.pop()
    if not authority.split_pem(bundle):
        return Result("webhook-trust", FAIL, "the caBundle holds no certificate", fix_bundle)
    notes = []
    if ca_secret is not None:
        ca = base64.b64decode((ca_secret.get("data") or {}).get("ca.crt") or "")
        if not ca or not authority.bundle_contains(bundle, ca):
            return Result("webhook-trust", FAIL,
                          f"the caBundle does not hold the CA in Secret {names.SYSTEM_NAMESPACE}/"
                          f"{names.CA_SECRET}: the API server cannot trust the webhook's leaf",
                          fix_bundle)
        notes.append("caBundle holds the kvmesh CA")
    for host, leaf in served.items():
        if not isinstance(leaf, bytes):
            notes.append(f"served chain at {host} not checked ({leaf})")
            continue
        if not authority.leaf_trusted(leaf, bundle, now):
            return Result("webhook-trust", FAIL,
                          f"the certificate served at {host} does not chain to the caBundle "
                          "(or has expired)", fix_bundle + "; the webhook re-signs its leaf "
                          "from the CA Secret every few seconds")
        if not leaf_names(leaf, host.rsplit(":", 1)[0]):
            return Result("webhook-trust", FAIL,
                          f"the certificate served at {host} does not name {host}",
                          "start the webhook with --san for that host")
        notes.append(f"leaf served at {host} chains to it")
    return Result("webhook-trust", OK, "; ".join(notes) or "one caBundle on every entry")


def leaf_names(leaf_pem: bytes, host: str) -> bool:
    cert = x509.load_pem_x509_certificate(leaf_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host in san.get_values_for_type(x509.DNSName)


def probe_result(answer: Optional[dict], error: Optional[str]) -> Result:
    if answer is None:
        return Result("webhook-injects", FAIL, f"the dry-run probe pod was refused: {error}",
                      "a Fail failurePolicy with the webhook unreachable refuses opted-in pods;"
                      " see webhook-pods and webhook-trust")
    raw = ((answer.get("metadata") or {}).get("annotations") or {}).get(names.ANN_STATUS)
    if raw is None:
        return Result("webhook-injects", FAIL,
                      "the dry-run probe pod came back without kvmesh.dev/status: the API server"
                      " did not get an answer from the webhook (failurePolicy Ignore admitted it"
                      " un-injected)",
                      "see webhook-pods and webhook-trust above; the API server's log names the "
                      "call's error (failed calling webhook \"pods.kvmesh.dev\")")
    st = json.loads(raw)
    if st.get("injected"):
        return Result("webhook-injects", OK, f"dry-run probe pod injected (mode {st.get('mode')},"
                      f" group {st.get('group', names.DEFAULT_GROUP)})")
    return Result("webhook-injects", WARN, f"the webhook answered but skipped the probe pod "
                  f"({st.get('reason')})", "a KVMeshPolicy may disable this namespace")


def lease_result(lease: Optional[dict], now: dt.datetime) -> Result:
    fix = (f"kubectl -n {names.SYSTEM_NAMESPACE} get pods -l "
           "app.kubernetes.io/name=kvmesh-controller; its logs say why it does not lead")
    where = f"Lease {names.SYSTEM_NAMESPACE}/{names.LEADER_LEASE}"
    if lease is None:
        return Result("controller-leader", FAIL, f"{where} not found: no controller ever led",
                      fix)
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    renewed = _time(spec.get("renewTime") or spec.get("acquireTime"))
    if not holder or renewed is None:
        return Result("controller-leader", FAIL, f"{where} is free: no controller leads", fix)
    age = (now - renewed).total_seconds()
    limit = (spec.get("leaseDurationSeconds") or 15) + LEASE_SLACK_SECONDS
    if age > limit:
        return Result("controller-leader", FAIL,
                      f"leader {holder} last renewed {age:.0f} s ago (lease "
                      f"{spec.get('leaseDurationSeconds') or 15} s): it is gone or hung, and no "
                      "other replica took over", fix)
    return Result("controller-leader", OK, f"{holder} leads (renewed {max(age, 0):.0f} s ago)")


def groups_result(groups: list[dict]) -> list[Result]:
    if not groups:
        return [Result("peer-groups", OK, "no KVMeshPeerGroup yet (no injected pod)")]
    out = []
    for g in sorted(groups, key=lambda g: (g["metadata"]["namespace"], g["metadata"]["name"])):
        where = f"{g['metadata']['namespace']}/{g['metadata']['name']}"
        st = g.get("status") or {}
        conds = {c.get("type"): c for c in st.get("conditions") or []}
        degraded, sharing = conds.get(health.DEGRADED), conds.get(health.SHARING)
        counts = f"{st.get('readyPeers', 0)}/{st.get('members', 0)} ready"
        if degraded and degraded.get("status") == "True":
            out.append(Result(f"group {where}", FAIL,
                              f"Degraded ({degraded.get('reason')}): {degraded.get('message')}",
                              health.fix_for(degraded.get("reason"))))
        elif sharing and sharing.get("status") != "True":
            status = WARN if sharing.get("reason") in health.BENIGN else FAIL
            out.append(Result(f"group {where}", status,
                              f"not sharing ({sharing.get('reason')}): {sharing.get('message')}",
                              health.fix_for(sharing.get("reason"))))
        elif sharing is None:
            out.append(Result(f"group {where}", WARN, f"{counts}; no Sharing condition yet",
                              "the controller writes it within one resync (15 s)"))
        else:
            out.append(Result(f"group {where}", OK, f"sharing, {counts}"))
    return out


NOT_PROBED = {
    names.MODE_MP: "mp mode is not probed: peers look chunks up in each other's lmcache "
                   "server directly, and the coordinator's key directory is fed only when the "
                   "servers run with --coordinator-event-reporting (off by default; it also "
                   "drives L2 quota eviction), which kvmesh does not turn on",
}
TIER = {names.MODE_CONTROLLER: "lmcache_controller", names.MODE_REDIS: "lookup Redis"}
PROBE_FIX = ("send one request to a replica and run again; still none after a minute: read "
             "that pod's log for LMCache errors (its stores do not reach the lookup tier)")


def keys_result(where: str, mode: str, ready: int, with_chunks: Optional[int]) -> Result:
    """`--probe`'s verdict for one group, from `status.peersWithChunks`: the ready peers the
    lookup tier holds chunks for, which any other peer's lookup resolves (controller mode:
    the lmcache_controller's registry, whose batched_p2p_lookup excludes only the asker,
    lmcache 0.5.6 kv_controller.py; redis mode: keys naming the peer's address). Read-only:
    nothing is stored anywhere."""
    name = f"probe {where}"
    if mode in NOT_PROBED:
        return Result(name, SKIP, NOT_PROBED[mode])
    tier = TIER.get(mode, "lookup tier")
    if with_chunks is None:
        return Result(name, SKIP, f"no key counts from the group's {tier} yet (not answering, "
                                  "index catching up, or an lmcache_controller older than "
                                  "LMCache 0.4): not probed")
    if with_chunks and ready >= 2:
        return Result(name, OK, f"the {tier} holds chunks of {with_chunks} of {ready} ready "
                                "peers; another peer's lookup resolves them")
    if with_chunks:
        return Result(name, WARN, f"{with_chunks} peer(s) with chunks, {ready} ready: no "
                                  "peer to share them with",
                      health.fix_for(health.NO_PEERS))
    return Result(name, WARN, f"none of {ready} ready peers has a chunk in the {tier} yet",
                  PROBE_FIX)


# --- I/O ---------------------------------------------------------------------------------------

async def served_leaf(host: str, port: int, timeout: float = 3.0) -> object:
    """The leaf certificate (PEM) the endpoint serves, or why it could not be read."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # read it, judge it ourselves
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=None if _is_ip(host) else host), timeout)
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
        return f"cannot connect: {e or type(e).__name__}"
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return ssl.DER_cert_to_PEM_cert(der).encode()
    finally:
        writer.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def probe_pod(namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "kvmesh-check-probe-", "namespace": namespace,
                         "labels": {names.LABEL_INJECT: names.INJECT_ENABLED,
                                    PROBE_LABEL: "true"}},
            "spec": {"containers": [{"name": "vllm", "image": names.LMCACHE_CONTROLLER_IMAGE,
                                     "command": ["vllm", "serve", "kvmesh-check/probe"]}]}}


async def _webhook_pods(kube: Kube, mwc: dict) -> tuple[Result, dict[str, object]]:
    """The webhook-pods verdict and, per endpoint reachable from here, its served leaf."""
    urls = sorted({(w.get("clientConfig") or {}).get("url") for w in mwc["webhooks"]} - {None})
    served: dict[str, object] = {}
    for url in urls:
        u = urllib.parse.urlsplit(url)
        served[f"{u.hostname}:{u.port or 443}"] = await served_leaf(u.hostname, u.port or 443)
    results = []
    if urls:
        down = {h: v for h, v in served.items() if not isinstance(v, bytes)}
        results.append(Result("webhook-pods", FAIL, "; ".join(
            f"webhook at {h}: {v}" for h, v in down.items()),
            "the entries point at a webhook outside the cluster (url:): start it there, or "
            "restore the Service entries (kubectl apply -k manifests/)") if down else Result(
            "webhook-pods", OK, f"webhook answering TLS at {', '.join(served)} (url: entries)"))
    if any("service" in (w.get("clientConfig") or {}) for w in mwc["webhooks"]):
        results.append(deployment_result(await kube.get(
            "apps/v1", "Deployment", WEBHOOK_DEPLOYMENT, names.SYSTEM_NAMESPACE)))
    worst = next((r for r in results if r.status == FAIL), None) or \
        next((r for r in results if r.status == WARN), None) or results[0]
    if len(results) > 1:
        worst = Result(worst.name, worst.status, "; ".join(r.message for r in results),
                       worst.fix)
    return worst, served


def probe_groups(groups: list[dict]) -> list[Result]:
    """`--probe`: one line per group from what the controller read (it reaches the lookup
    tier inside the cluster; the API server's pod proxy carries no Redis protocol)."""
    out = []
    for g in sorted(groups, key=lambda g: (g["metadata"]["namespace"], g["metadata"]["name"])):
        st = g.get("status") or {}
        n = st.get("peersWithChunks")
        out.append(keys_result(f"{g['metadata']['namespace']}/{g['metadata']['name']}",
                               (g.get("spec") or {}).get("mode", ""),
                               st.get("readyPeers", 0), n if isinstance(n, int) else None))
    return out


async def run(kube: Kube, probe_namespace: str = "default",
              now: Optional[dt.datetime] = None,
              namespace: Optional[str] = None, probe: bool = False) -> list[Result]:
    """Every check; peer groups of `namespace` only when given (else all namespaces)."""
    now = now or _now()
    out = [crds_result({n: await kube.get(*CRD_KIND, n) for n in CRDS})]
    mwc = await kube.get(ADMISSION_API, "MutatingWebhookConfiguration",
                         names.WEBHOOK_CONFIGURATION)
    out.append(config_result(mwc))
    if out[-1].status == OK:
        pods, served = await _webhook_pods(kube, mwc)
        out.append(pods)
        secret = await _optional(kube.get("v1", "Secret", names.CA_SECRET,
                                          names.SYSTEM_NAMESPACE))
        out.append(bundle_result(mwc, secret, served, now))
        try:
            answer, error = await kube.create(probe_pod(probe_namespace), dry_run=True), None
        except ApiError as e:
            answer, error = None, f"{e.status} {_reason(e)}"
        out.append(probe_result(answer, error))
    out.append(lease_result(await kube.get(LEASE_API, "Lease", names.LEADER_LEASE,
                                           names.SYSTEM_NAMESPACE), now))
    groups = await kube.list(CRD_API, names.PEER_GROUP_KIND, namespace)
    out += groups_result(groups)
    if probe:
        out += probe_groups(groups)
    return out


async def _optional(coro):
    """None when this identity may not read it (a user without Secret access still gets the
    other checks)."""
    try:
        return await coro
    except ApiError as e:
        if e.status == 403:
            return None
        raise


def _reason(e: ApiError) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


# --- output ------------------------------------------------------------------------------------

def render_text(results: list[Result], server: str) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"kvmesh check against {server}"]
    for r in results:
        lines.append(f"[{r.status.upper():4}] {r.name:<{width}}  {r.message}")
        if r.fix and r.status != OK:
            lines.append(f"       {'':<{width}}  fix: {r.fix}")
    failed = sum(r.status == FAIL for r in results)
    lines.append(f"{failed} check(s) failed" if failed else "all checks passed")
    return "\n".join(lines)


def render_json(results: list[Result], server: str) -> str:
    return json.dumps({"server": server, "ok": not any(r.status == FAIL for r in results),
                       "checks": [asdict(r) for r in results]}, indent=2)


async def main(kubeconfig: Optional[str], output: str, probe_namespace: Optional[str],
               namespace: Optional[str] = None, probe: bool = False) -> int:
    """Prints the report; exit status 1 when any check failed, 2 when the API is unreachable."""
    if kubeconfig and not os.path.isfile(kubeconfig):
        print(f"kvmesh check: kubeconfig {kubeconfig} does not exist")
        return 2
    try:
        kube = await connect.api_client(kubeconfig)
    except Exception as e:  # no kubeconfig, bad file: say so, do not trace
        print(f"kvmesh check: cannot load the kubeconfig: {e}")
        return 2
    server = kube.api.configuration.host
    try:
        results = await run(kube, probe_namespace or namespace or "default",
                            namespace=namespace, probe=probe)
    except ApiError as e:
        if e.status in (401, 403):
            print(f"kvmesh check: the API server at {server} refused this identity "
                  f"({e.status}: {_reason(e)}); it needs to read CRDs, the "
                  "MutatingWebhookConfiguration, Deployments, the leader Lease and "
                  "KVMeshPeerGroups, and to create pods (dry run) in --probe-namespace")
        else:
            print(f"kvmesh check: the API server at {server} answered {e.status}: {_reason(e)}")
        return 2
    except (OSError, asyncio.TimeoutError) as e:
        print(f"kvmesh check: the API server at {server} did not answer: {e or type(e).__name__}")
        return 2
    finally:
        await kube.close()
    print(render_json(results, server) if output == "json" else render_text(results, server))
    return 1 if any(r.status == FAIL for r in results) else 0
