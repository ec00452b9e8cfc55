"""`kvmesh` console script: inject, explain, certs (offline), webhook, controller, check, demo.

Only argument handling lives here: the processes are assembled in kvmesh.webhook.main and
kvmesh.controller.main, the demo in kvmesh.local.demo, the decisions in kvmesh.core.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import yaml
from pydantic import ValidationError

from kvmesh import __version__

from kvmesh.core import names, workloads
from kvmesh.core import inject
from kvmesh.core.policy import PolicyDefaults, describe, load_defaults

EXIT_DENIED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


def _policy(args: argparse.Namespace) -> PolicyDefaults:
    data: dict = {}
    if getattr(args, "policy", None):
        try:
            with open(args.policy) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise UsageError(f"cannot read policy file {args.policy}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise UsageError(f"policy file {args.policy} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"policy file {args.policy} must hold a mapping")
        data = loaded
    try:
        policy = load_defaults(data)
        if getattr(args, "mode", None):
            policy = policy.model_copy(update={"mode": args.mode})
        return policy
    except ValidationError as e:
        raise UsageError(f"invalid policy defaults: {describe(e)}") from None


def _read_docs(path: str) -> list:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    try:
        return [d for d in yaml.safe_load_all(text)]
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {e}") from None


def _namespace(docs: list, given: Optional[str]) -> str:
    """The namespace for documents that name none. Like kubectl, refuse a document whose own
    namespace differs from an explicit -n (kubectl: "the namespace from the provided object
    ... does not match the namespace ...")."""
    if given is None:
        return "default"
    for d in docs:
        meta = d.get("metadata") if isinstance(d, dict) else None
        own = meta.get("namespace") if isinstance(meta, dict) else None
        if own and own != given:
            kind = d.get("kind", "document")
            raise UsageError(f"{kind} {meta.get('name', '')!s} names namespace {own!r}, which "
                             f"does not match -n {given!r}; remove one of them")
    return given


def _label(r: workloads.DocResult) -> str:
    return f"{r.kind}/{r.namespace}/{r.name}" if r.name else f"{r.kind} in {r.namespace}"


def cmd_inject(args: argparse.Namespace) -> int:
    policy = _policy(args)
    docs = _read_docs(args.file)
    ns = _namespace(docs, args.namespace)
    results = [workloads.process(d, policy, ns, args.selected) for d in docs]
    denied = [r for r in results if r.result and r.result.action == inject.DENY]
    for r in results:
        if r.result:
            for w in r.result.warnings:
                print(f"kvmesh: warning: {_label(r)}: {w}", file=sys.stderr)
    if denied:
        for r in denied:
            print(f"kvmesh: denied: {_label(r)}: {r.result.message}", file=sys.stderr)
        return EXIT_DENIED  # write nothing: a partial render would be applied by mistake
    out = [r.doc for r in results if r.doc is not None]
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    policy = _policy(args)
    denied = False
    docs = _read_docs(args.file)
    ns = _namespace(docs, args.namespace)
    for r in (workloads.process(d, policy, ns, args.selected) for d in docs):
        if r.result is None:
            if r.kind:
                print(f"{r.kind}: passed through (not a workload kvmesh injects)")
            continue
        res = r.result
        denied |= res.action == inject.DENY
        head = {inject.INJECT: "inject", inject.SKIP: f"skip ({res.reason})",
                inject.DENY: f"deny ({res.reason})"}[res.action]
        print(f"{_label(r)}: {head}")
        if res.mode:
            print(f"  mode: {res.mode} ({res.mode_reason})")
        if res.container:
            print(f"  container: {res.container}")
        print(f"  why: {res.message}")
        for w in res.warnings:
            print(f"  warning: {w}")
    return EXIT_DENIED if denied else 0


def cmd_webhook(args: argparse.Namespace) -> int:
    from kvmesh.webhook import main as webhook
    if args.cert_source == "files" and not (args.cert and args.key):
        raise UsageError("--cert-source files needs --cert and --key")
    if args.cert_source == "self" and not (args.cert_dir and args.san):
        raise UsageError("--cert-source self needs --cert-dir and at least one --san")
    if args.max_connections < 1 or args.header_timeout_seconds <= 0 or \
            args.idle_timeout_seconds <= 0:
        raise UsageError("--max-connections must be at least 1 and the timeouts above 0")
    self_signed = args.cert_source == "self"
    from kvmesh.webhook.server import Limits
    limits = Limits(max_connections=args.max_connections,
                    header_timeout=args.header_timeout_seconds,
                    body_timeout=args.header_timeout_seconds,
                    idle_timeout=args.idle_timeout_seconds)
    asyncio.run(webhook.run(args.host, args.port, _policy(args), cert=args.cert, key=args.key,
                            cert_dir=args.cert_dir if self_signed else None, sans=args.san,
                            kubeconfig=args.kubeconfig,
                            cert_check_seconds=args.cert_check_seconds,
                            leaf_validity=dt.timedelta(seconds=args.leaf_validity_seconds),
                            metrics_host=args.metrics_host or args.host,
                            metrics_port=args.metrics_port,
                            limits=limits))
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    from kvmesh.controller import main as controller
    from kvmesh.kube import leader
    try:
        leader.check_timing(args.leader_lease_seconds or leader.LEASE_SECONDS,
                            args.leader_renew_deadline_seconds or leader.RENEW_DEADLINE_SECONDS,
                            args.leader_retry_seconds or leader.RETRY_SECONDS)
    except ValueError as e:
        print(f"kvmesh controller: {e}", file=sys.stderr)
        return 2
    asyncio.run(controller.run(args.kubeconfig, args.metrics_port,
                               cert_interval=args.cert_check_seconds,
                               manage_certs=args.cert_source == "self",
                               ca_validity=dt.timedelta(seconds=args.ca_validity_seconds),
                               policy=_policy(args), grace_seconds=args.group_grace_seconds,
                               resync_seconds=args.resync_seconds,
                               webhook_url=args.webhook_url,
                               peer_network_policy=args.peer_network_policy == "on",
                               **{k: v for k, v in (
                                   ("lease_seconds", args.leader_lease_seconds),
                                   ("renew_deadline", args.leader_renew_deadline_seconds),
                                   ("retry_seconds", args.leader_retry_seconds))
                                  if v is not None}))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from kvmesh.certs import authority
    now = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ca = authority.new_ca(now)
    leaf = authority.issue_leaf(ca, args.host, now, dt.timedelta(days=args.days))
    (out / "ca.crt").write_bytes(ca.cert_pem)
    (out / "tls.crt").write_bytes(leaf.cert_pem)
    key = out / "tls.key"
    key.write_bytes(leaf.key_pem)
    os.chmod(key, 0o600)
    print(f"wrote {out}/ca.crt, {out}/tls.crt, {out}/tls.key for {', '.join(args.host)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from kvmesh import check
    return asyncio.run(check.main(args.kubeconfig, args.output, args.probe_namespace,
                                  args.namespace, probe=args.probe))


def cmd_demo(args: argparse.Namespace) -> int:
    from kvmesh.local import demo
    return demo.run(args.sample, exit_after_showing=args.exit)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", metavar="FILE",
                   help="policy defaults (YAML: bare defaults or a KVMeshPolicy)")
    p.add_argument("--mode", choices=names.MODES,
                   help="force a mode (overrides the policy file)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvmesh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=f"kvmesh {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (("inject", cmd_inject, "write manifests with LMCache P2P injected"),
                            ("explain", cmd_explain, "say per workload what kvmesh would do")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("-f", "--file", required=True, help="YAML file, or - for stdin")
        p.add_argument("-n", "--namespace", default=None,
                       help="namespace of documents that name none (default: default); a "
                            "document naming another one is refused, as kubectl does")
        p.add_argument("--selected", action="store_true",
                       help="treat workloads as selected by their namespace or a policy "
                            "(inject without the kvmesh.dev/inject label)")
        _common(p)
        p.set_defaults(fn=fn)
    p = sub.add_parser("webhook", help="run the admission webhook (HTTPS)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8443, help="admission port (HTTPS, /mutate)")
    p.add_argument("--metrics-host", help="address of the ops port (default: --host)")
    p.add_argument("--metrics-port", type=int, default=9090,
                   help="ops port (HTTP): /healthz, /readyz, /metrics")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections on the admission port (kept below the open-file "
                        "limit); more are refused")
    p.add_argument("--header-timeout-seconds", type=float, default=10.0,
                   help="time for a request head, and again for its body")
    p.add_argument("--idle-timeout-seconds", type=float, default=120.0,
                   help="close keep-alive connections idle this long (keep it above the API "
                        "server's 90 s)")
    p.add_argument("--cert-source", choices=("files", "self"), default="files",
                   help="files: --cert/--key managed outside (cert-manager); self: sign a leaf "
                        "from the kvmesh CA Secret into --cert-dir")
    p.add_argument("--cert", help="serving certificate file (--cert-source files)")
    p.add_argument("--key", help="serving key file (--cert-source files)")
    p.add_argument("--cert-dir", help="where to write the self-signed leaf")
    p.add_argument("--san", action="append", default=[],
                   help="DNS name or IP for the leaf (repeatable)")
    p.add_argument("--kubeconfig", help="kubeconfig (default: in-cluster, else ~/.kube/config)")
    p.add_argument("--leaf-validity-seconds", type=int, default=7 * 86400,
                   help="lifetime of the self-signed serving leaf (renewed at 2/3)")
    p.add_argument("--cert-check-seconds", type=float, default=5.0)
    _common(p)
    p.set_defaults(fn=cmd_webhook)
    p = sub.add_parser("controller", help="run the controller (leader-elected)")
    p.add_argument("--kubeconfig", help="kubeconfig (default: in-cluster, else ~/.kube/config)")
    p.add_argument("--metrics-port", type=int, default=9090)
    p.add_argument("--cert-source", choices=("files", "self"), default="self",
                   help="self: manage the webhook CA and caBundle; files: cert-manager does")
    p.add_argument("--ca-validity-seconds", type=int, default=365 * 86400,
                   help="lifetime of the webhook CA (rotated at 2/3, with overlap)")
    p.add_argument("--cert-check-seconds", type=float, default=5.0)
    p.add_argument("--group-grace-seconds", type=float, default=300.0,
                   help="keep an empty peer group's lookup service this long")
    p.add_argument("--resync-seconds", type=float, default=15.0,
                   help="period of the full pass over peer groups (purge retries, status)")
    p.add_argument("--webhook-url", help="base URL of the webhook for policy entries (local "
                   "clusters without Service routing); default: the kvmesh-webhook Service")
    p.add_argument("--peer-network-policy", choices=("on", "off"), default="on",
                   help="on: a NetworkPolicy fences each group's P2P ports to its pods (needs "
                        "a network plugin with endPort support); off: none, and kvmesh "
                        "deletes the ones it made")
    # Defaults (30 s / 20 s / 2 s) in kvmesh.kube.leader.
    p.add_argument("--leader-lease-seconds", type=int,
                   help="a standby takes the Lease when it was not renewed for this long")
    p.add_argument("--leader-renew-deadline-seconds", type=float,
                   help="the leader retries a failed renewal until this long after the last "
                        "success, then steps down (must be below the lease duration)")
    p.add_argument("--leader-retry-seconds", type=float,
                   help="renewal period of the leader, campaign period of a standby")
    _common(p)
    p.set_defaults(fn=cmd_controller)
    p = sub.add_parser("certs", help="write a CA and a serving certificate")
    p.add_argument("--out", required=True, help="directory for ca.crt, tls.crt, tls.key")
    p.add_argument("--host", action="append", required=True,
                   help="DNS name or IP the certificate is for (repeatable)")
    p.add_argument("--days", type=int, default=7)
    p.set_defaults(fn=cmd_certs)
    p = sub.add_parser("check", help="check every precondition of sharing on a cluster "
                       "(exit 1 when a check fails)")
    p.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG, else ~/.kube/config)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.add_argument("-n", "--namespace", help="check the peer groups of this namespace only "
                   "(default: all namespaces)")
    p.add_argument("--probe-namespace", help="namespace of the dry-run probe pod (nothing is "
                   "stored; default: --namespace, else default)")
    p.add_argument("--probe", action="store_true", help="also ask each group's lookup tier, "
                   "read-only, which ready peers have chunks another peer's lookup would find "
                   "(controller mode; needs pods/proxy)")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("demo", help="kvmesh on a local control plane with a sample vLLM "
                                    "Deployment")
    p.add_argument("--sample", default=None, help="Deployment to create (default: "
                   "manifests/samples/vllm-deployment.yaml)")
    p.add_argument("--exit", action="store_true", help="stop after showing the pods")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=os.environ.get("KVMESH_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"kvmesh: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
