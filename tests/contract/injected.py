"""The injected pods of the golden outputs, with the identity the kubelet would give them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvmesh.core import inject, names, workloads

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "expected"
POD_IP = "10.244.1.17"
POD_NAME = "qwen-5f7d9c8b6d-x2x9q"
POD_UID = "6f1d2c3b-aaaa-4bbb-8ccc-123456789abc"
SEED_KEY = b"contract-test-hash-seed-key....."


@dataclass
class Injected:
    case: str
    mode: str
    pod: dict  # with metadata name/uid and status podIP, as the kubelet sees it
    container: dict

    @property
    def ports(self) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in self.container.get("ports", [])
                if p.get("name", "").startswith(names.PORT_NAME_PREFIX)}


def injected_goldens() -> list[Injected]:
    out = []
    for f in sorted(GOLDEN.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") not in workloads.TEMPLATE_PATHS:
                continue
            pod = workloads.pod_for(doc)
            status = json.loads((pod["metadata"].get("annotations") or {})
                                .get(names.ANN_STATUS, "{}"))
            if not status.get("injected"):
                continue
            # The CLI leaves PYTHONHASHSEED to the webhook (each group has its own): admit the
            # output as the webhook would, which adds only that.
            ns = pod["metadata"].get("namespace") or "default"
            pod = inject.decide(pod, inject.Context(ns, selected=True,
                                                    hash_seed_key=SEED_KEY)).pod
            pod["metadata"].setdefault("name", POD_NAME)
            pod["metadata"]["uid"] = POD_UID
            pod["status"] = {"podIP": POD_IP, "hostIP": "192.168.0.10"}
            c = next(c for c in pod["spec"]["containers"] if c["name"] == status["container"])
            out.append(Injected(f"{f.stem}/{doc['metadata']['name']}", status["mode"], pod, c))
    return out
