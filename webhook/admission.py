"""AdmissionReview (admission.k8s.io/v1) in, AdmissionReview response out (pure, no I/O).

The patch is computed by diffing the pod before and after `inject.decide`, so the webhook can
never send a patch that disagrees with what the offline CLI writes.

`Memo` remembers answers: a ReplicaSet's pods reach admission as identical objects (the name
is generated after admission, the uid too), so scaling a Deployment to N replicas is one
decision and N-1 lookups. The answer is a function of the object, its namespace, how it was
selected and the governing defaults, which is exactly the key.
"""

from __future__ import annotations

import binascii
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Union

import orjson

from kvmesh.core import inject
from kvmesh.core.policy import PolicyDefaults

API_VERSION = "admission.k8s.io/v1"
MAX_WARNINGS = 20  # the API server truncates long warning lists; keep the important first
MAX_WARNING_LEN = 480


class BadReview(ValueError):
    """The body is not an AdmissionReview request kvmesh can answer (HTTP 400)."""


@dataclass
class Outcome:
    """What happened, for metrics and logs."""

    action: str  # inject | skip | deny | ignore (not a pod CREATE)
    reason: str
    mode: Optional[str] = None
    dry_run: bool = False
    uid: str = ""
    namespace: str = ""
    name: str = ""
    patch_ops: int = 0
    message: str = ""
    warnings: list[str] = field(default_factory=list)


# (namespace, pod labels) -> (the defaults governing the pod, the KVMeshPolicy name or None)
Resolver = Callable[[str, dict], tuple[PolicyDefaults, Optional[str]]]
# (the key of the per-group hash seeds or None, True while a webhook still waits for it)
SeedState = tuple[Optional[bytes], bool]


@dataclass
class _Answer:
    defaults: PolicyDefaults  # held so its id() in the key cannot be reused while cached
    response: dict  # the AdmissionReview "response" without its uid
    outcome: Outcome


class Memo:
    """Bounded LRU of answers, keyed by the pod object's serialized bytes, namespace,
    selection, policy name and the identity of the defaults object (a changed policy is a new
    object, hence a miss). Objects larger than max_key_bytes are not remembered, and the
    entries together hold at most max_bytes (key and patch bytes, plus a fixed overhead)."""

    OVERHEAD = 2048  # the rest of an entry: tuple, outcome, response dict, warnings

    def __init__(self, max_entries: int = 256, max_key_bytes: int = 64 * 1024,
                 max_bytes: int = 16 * 1024 * 1024):
        self.max_entries, self.max_key_bytes, self.max_bytes = \
            max_entries, max_key_bytes, max_bytes
        self._data: OrderedDict[tuple, _Answer] = OrderedDict()
        self._cost: dict[tuple, int] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def key(self, pod: Any, namespace: str, selected: bool, defaults: PolicyDefaults,
            policy_name: Optional[str], seeds: SeedState = (None, False)) -> Optional[tuple]:
        try:
            raw = orjson.dumps(pod)
        except TypeError:  # not JSON-shaped (never the case for a parsed request body)
            return None
        if len(raw) > self.max_key_bytes:
            return None
        return raw, namespace, selected, policy_name, id(defaults), seeds

    def get(self, key: tuple, defaults: PolicyDefaults) -> Optional[_Answer]:
        a = self._data.get(key)
        if a is None or a.defaults is not defaults:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return a

    def put(self, key: tuple, answer: _Answer) -> None:
        cost = len(key[0]) + len(answer.response.get("patch", "")) + self.OVERHEAD + \
            sum(len(w) for w in answer.response.get("warnings", ()))
        if key in self._data:
            self.bytes -= self._cost.pop(key)
        self._data[key] = answer
        self._data.move_to_end(key)
        self._cost[key] = cost
        self.bytes += cost
        while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
            old, _ = self._data.popitem(last=False)
            self.bytes -= self._cost.pop(old)


def review(body: Any, policy: Union[PolicyDefaults, Resolver], selected: bool = True,
           memo: Optional[Memo] = None, seeds: SeedState = (None, False),
           native_sidecars: Optional[bool] = None) -> tuple[dict, Outcome]:
    """Answer one AdmissionReview. Raises BadReview when there is no request to answer.
    `seeds`: (the per-group hash-seed key or None, whether it is still to come);
    `native_sidecars`: whether the cluster runs them (mp mode needs them; None: unknown)."""
    if not isinstance(body, dict):
        raise BadReview("body must be a JSON object (an AdmissionReview)")
    if body.get("kind") != "AdmissionReview" or body.get("apiVersion") != API_VERSION:
        raise BadReview(f"expected kind AdmissionReview, apiVersion {API_VERSION}; got kind "
                        f"{body.get('kind')!r}, apiVersion {body.get('apiVersion')!r}")
    req = body.get("request")
    if not isinstance(req, dict):
        raise BadReview("AdmissionReview has no request object")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid must be a non-empty string")

    out = Outcome("ignore", "not-a-pod-create", uid=uid, dry_run=req.get("dryRun") is True)
    kind = req.get("kind") if isinstance(req.get("kind"), dict) else {}
    op = req.get("operation")
    if (kind.get("group", "") != "" or kind.get("kind") != "Pod" or op != "CREATE"
            or req.get("subResource")):
        # Misrouted by the webhook configuration: let it through untouched, and say so.
        out.message = (f"kvmesh only mutates Pod CREATE; got {kind.get('kind')!r} {op!r}"
                       f"{' subresource ' + str(req['subResource']) if req.get('subResource') else ''}")
        return _response(uid, True, warnings=[out.message]), out

    pod = req.get("object")
    namespace = req.get("namespace") if isinstance(req.get("namespace"), str) else ""
    out.namespace = namespace
    if isinstance(pod, dict) and isinstance(pod.get("metadata"), dict):
        meta = pod["metadata"]
        out.name = str(meta.get("name") or meta.get("generateName") or "")
        namespace = namespace or str(meta.get("namespace") or "")
    if isinstance(policy, PolicyDefaults):
        defaults, policy_name = policy, None
    else:
        labels = pod.get("metadata", {}).get("labels") if isinstance(pod, dict) and \
            isinstance(pod.get("metadata"), dict) else None
        defaults, policy_name = policy(namespace, labels if isinstance(labels, dict) else {})
    key = None if memo is None else memo.key(pod, namespace, selected, defaults, policy_name,
                                             seeds)
    if key is not None:
        hit = memo.get(key, defaults)
        if hit is not None:
            return ({"apiVersion": API_VERSION, "kind": "AdmissionReview",
                     "response": {**hit.response, "uid": uid}},
                    replace(hit.outcome, uid=uid, dry_run=out.dry_run, namespace=out.namespace,
                            name=out.name))
    resp, out = _decide(pod, namespace, defaults, policy_name, selected, out, seeds,
                        native_sidecars)
    if key is not None:
        memo.put(key, _Answer(defaults, {k: v for k, v in resp["response"].items()
                                         if k != "uid"}, out))
    return resp, out


def _decide(pod: Any, namespace: str, defaults: PolicyDefaults, policy_name: Optional[str],
            selected: bool, out: Outcome, seeds: SeedState,
            native_sidecars: Optional[bool] = None) -> tuple[dict, Outcome]:
    uid = out.uid
    result = inject.decide(pod, inject.Context(namespace=namespace, policy=defaults,
                                               selected=selected, policy_name=policy_name,
                                               hash_seed_key=seeds[0],
                                               hash_seed_pending=seeds[1],
                                               native_sidecars=native_sidecars))
    out.action, out.reason, out.mode = result.action, result.reason, result.mode
    out.message, out.warnings = result.message, result.warnings
    if result.action == inject.DENY:
        return _response(uid, False, message=f"kvmesh: {result.message}", code=403,
                         reason=result.reason, warnings=result.warnings), out
    ops = diff(pod, result.pod)
    out.patch_ops = len(ops)
    return _response(uid, True, patch=ops, warnings=result.warnings), out


def _response(uid: str, allowed: bool, patch: Optional[list] = None, message: str = "",
              code: int = 0, reason: str = "", warnings: Optional[list[str]] = None) -> dict:
    resp: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        resp["patchType"] = "JSONPatch"
        resp["patch"] = binascii.b2a_base64(orjson.dumps(patch), newline=False).decode()
    if not allowed:
        resp["status"] = {"code": code, "message": message, "reason": reason}
    if warnings:
        resp["warnings"] = [("kvmesh: " + w)[:MAX_WARNING_LEN] for w in warnings[:MAX_WARNINGS]]
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": resp}


# --- JSON patch by diff -----------------------------------------------------------------------

def _ptr(token: Any) -> str:
    t = str(token)
    return t.replace("~", "~0").replace("/", "~1") if "~" in t or "/" in t else t


_ABSENT = object()


def diff(before: Any, after: Any, path: str = "") -> list[dict]:
    """RFC 6902 operations turning `before` into `after`: objects recursed, lists matched by
    common prefix/suffix, so an insertion is one `add` and a changed element is recursed; a
    list whose middle changed shape is one `replace` (one op for a rewritten env list instead
    of one per entry). The core shares every unchanged subtree with its input, so identity
    ends most comparisons before any walk."""
    if before is after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        ops: list[dict] = []
        if not before.keys() <= after.keys():
            for k in before:
                if k not in after:
                    ops.append({"op": "remove", "path": f"{path}/{_ptr(k)}"})
        for k, v in after.items():
            b = before.get(k, _ABSENT)
            if b is _ABSENT:
                ops.append({"op": "add", "path": f"{path}/{_ptr(k)}", "value": v})
            elif b is not v:
                ops += diff(b, v, f"{path}/{_ptr(k)}")
        return ops
    if isinstance(before, list) and isinstance(after, list):
        return _diff_lists(before, after, path)
    if before == after and type(before) is type(after):
        return []
    return [{"op": "replace", "path": path, "value": after}]


def _diff_lists(before: list, after: list, path: str) -> list[dict]:
    nb, na = len(before), len(after)
    pre = 0
    # `is` first: == on two distinct but equal containers would walk them.
    while pre < nb and pre < na and (before[pre] is after[pre] or before[pre] == after[pre]):
        pre += 1
    suf = 0
    while suf < nb - pre and suf < na - pre and (before[-1 - suf] is after[-1 - suf]
                                                 or before[-1 - suf] == after[-1 - suf]):
        suf += 1
    old_n, new_n = nb - pre - suf, na - pre - suf
    if old_n == 0:
        return [{"op": "add", "path": f"{path}/{pre + i}", "value": after[pre + i]}
                for i in range(new_n)]
    if new_n == 0:  # from the back so earlier indexes stay valid
        return [{"op": "remove", "path": f"{path}/{pre + i}"} for i in range(old_n - 1, -1, -1)]
    if old_n == new_n:
        ops: list[dict] = []
        for i in range(pre, pre + old_n):
            ops += diff(before[i], after[i], f"{path}/{i}")
        return ops
    return [{"op": "replace", "path": path, "value": after}]
