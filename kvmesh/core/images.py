"""What an image reference and a container's resources say about the vLLM it runs (pure).

One place for the image facts kvmesh decides by: which images' entrypoint is the vLLM server,
which platform a container is built for, which vLLM and LMCache an image tag implies, and
whether such an image can run LMCache's V1 connector at all. Sources (tests/golden/real/
ANALYSIS.md, "Evidence answers"): vLLM's release pipeline and Dockerfiles, LMCache's publish
workflows, PyPI upload dates.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass
from typing import Optional

from kvmesh.core import names

CUDA, ROCM, HPU, NEURON, TPU, CPU, XPU, ASCEND = (
    "cuda", "rocm", "hpu", "neuron", "tpu", "cpu", "xpu", "ascend")

# Images whose entrypoint is the vLLM OpenAI server (`vllm serve` or the api_server module),
# so a container with `args` and no `command` runs the server; with the platform they are
# built for. Any other image, whatever its name, needs a command kvmesh can read.
_ECR = "public.ecr.aws/q9t5s3a7/"
SERVER_IMAGES = {
    "vllm/vllm-openai": CUDA, "vllm/vllm-openai-cpu": CPU, "vllm/vllm-openai-rocm": ROCM,
    "vllm/vllm-tpu": TPU, _ECR + "vllm-release-repo": CUDA, _ECR + "vllm-cpu-release-repo": CPU,
    _ECR + "vllm-arm64-cpu-release-repo": CPU, _ECR + "vllm-neuron-release-repo": NEURON,
    names.LMCACHE_IMAGE_REPO: CUDA, "opea/vllm-gaudi": HPU, "opea/vllm": CPU,
}
SERVER_ENTRYPOINT = ("vllm", "serve")
# vLLM's own CUDA release images (the retagged release-repo build).
_VLLM_RELEASE = ("vllm/vllm-openai", _ECR + "vllm-release-repo")

# Device-plugin resources: they decide where the pod is scheduled, the strongest evidence.
_RESOURCE_PLATFORMS = (("amd.com/gpu", ROCM), ("habana.ai/", HPU), ("aws.amazon.com/neuron", NEURON),
                       ("google.com/tpu", TPU), ("gpu.intel.com/", XPU), ("huawei.com/ascend", ASCEND),
                       ("nvidia.com/gpu", CUDA))
# Words in an image's repository or tag that name a platform build.
_B = r"(^|[/_.:-])"  # a word boundary inside an image reference
_NAME_PLATFORMS = tuple((re.compile(_B + word), plat) for word, plat in (
    ("rocm", ROCM), ("tpu", TPU), ("neuron", NEURON), ("gaudi", HPU), ("habana", HPU),
    ("hpu", HPU), ("xpu", XPU), ("ascend", ASCEND), (r"cpu([/_.:-]|$)", CPU)))

V1_API_VLLM = (0, 8, 5)  # KVConnectorBase_V1 and LMCacheConnectorV1 first ship in vLLM 0.8.5
V1_API_DATE = dt.date(2025, 4, 28)  # vLLM 0.8.5 on PyPI
BUNDLES_LMCACHE_VLLM = (0, 9, 2)  # release images built with INSTALL_KV_CONNECTORS=true
CONTROLLER_GEN_VLLM = (0, 11, 0)  # first vLLM release after LMCache 0.3.7 (2025-10-04)
# LMCache's first PyPI uploads around the cut between the generations.
LMCACHE_0_3_0 = dt.date(2025, 5, 28)
LMCACHE_0_3_6 = dt.date(2025, 9, 15)  # the last redis-generation release
LMCACHE_0_3_7 = dt.date(2025, 9, 29)  # the first controller-generation release


@dataclass(frozen=True)
class Ref:
    repo: str  # lowercased, without docker.io/ and library/
    tag: str


def parse_ref(image: str) -> Ref:
    ref = image.split("@", 1)[0].strip().lower()
    repo, tag = ref, ""
    if ":" in ref.rsplit("/", 1)[-1]:
        repo, tag = ref.rsplit(":", 1)
    for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
        if repo.startswith(prefix):
            repo = repo[len(prefix):]
    if repo.startswith("library/"):
        repo = repo[len("library/"):]
    return Ref(repo, tag)


def is_server_image(image: str) -> bool:
    return parse_ref(image).repo in SERVER_IMAGES


def platform(image: str, resources: dict, env_names: frozenset) -> tuple[str, str]:
    """(platform, evidence): what the container is built for, and from what."""
    keys = set()
    for part in ("limits", "requests"):
        got = resources.get(part) if isinstance(resources, dict) else None
        if isinstance(got, dict):
            keys.update(str(k).lower() for k in got)
    for prefix, plat in _RESOURCE_PLATFORMS:
        hit = sorted(k for k in keys if k.startswith(prefix))
        if hit:
            return plat, f"resource {hit[0]}"
    ref = parse_ref(image)
    if ref.repo in SERVER_IMAGES and SERVER_IMAGES[ref.repo] != CUDA:
        return SERVER_IMAGES[ref.repo], f"image {ref.repo}"
    for rx, plat in _NAME_PLATFORMS:
        if rx.search(ref.repo) or rx.search(ref.tag):
            return plat, f"image {image}"
    if "VLLM_CPU_KVCACHE_SPACE" in env_names:
        return CPU, "env VLLM_CPU_KVCACHE_SPACE without an accelerator resource"
    return CUDA, "no other platform named by resources, image or env"


_SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")
_VLLM_IN_TAG = re.compile(r"vllm[_-]?v?(\d+)\.(\d+)\.(\d+)")
_DATE = re.compile(r"(?<!\d)(20\d\d)-?(\d\d)-?(\d\d)(?!\d)")


def vllm_version(image: str) -> Optional[tuple[int, int, int]]:
    """The vLLM version a tag names: vLLM's own images (`v0.10.1`), or `…vllm_0.6.4…`."""
    ref = parse_ref(image)
    if ref.repo in _VLLM_RELEASE or (ref.repo in SERVER_IMAGES and "lmcache" not in ref.repo):
        m = _SEMVER.match(ref.tag)
        if m:
            return int(m.group(1)), int(m.group(2)), int(m.group(3))
    m = _VLLM_IN_TAG.search(ref.tag)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def tag_date(tag: str) -> Optional[dt.date]:
    m = _DATE.search(tag)
    if not m:
        return None
    try:
        return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def _v(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


def unsupported(image: str, plat: str, plat_evidence: str) -> Optional[str]:
    """Why this image cannot run LMCache's V1 connector, with the evidence; None if it may.
    Cached (a cluster runs few images), unless the reference is very long."""
    if len(image) > 512:
        return _unsupported.__wrapped__(image, plat, plat_evidence)
    return _unsupported(image, plat, plat_evidence)


@functools.lru_cache(maxsize=256)
def _unsupported(image: str, plat: str, plat_evidence: str) -> Optional[str]:
    if plat != CUDA:
        return (f"platform {plat} ({plat_evidence}): no {plat} vLLM image is known to bundle "
                "LMCache, and LMCache's NIXL transfer channel is unverified there")
    ref = parse_ref(image)
    v = vllm_version(image)
    if v is not None and v < V1_API_VLLM:
        return (f"image {image} runs vLLM {_v(v)}, older than {_v(V1_API_VLLM)}, the first "
                "vLLM with the V1 KV-connector API (LMCacheConnectorV1)")
    if v is not None and ref.repo in _VLLM_RELEASE and v < BUNDLES_LMCACHE_VLLM:
        return (f"image {image}: vLLM's release images bundle LMCache only from "
                f"v{_v(BUNDLES_LMCACHE_VLLM)} (INSTALL_KV_CONNECTORS); vLLM {_v(v)} would fail "
                "to import lmcache at engine start")
    d = tag_date(ref.tag)
    if v is None and d is not None and d < V1_API_DATE and "lmcache" not in ref.repo:
        return (f"image {image}: its tag dates it {d.isoformat()}, before vLLM "
                f"{_v(V1_API_VLLM)} ({V1_API_DATE.isoformat()}), the first vLLM with the V1 "
                "KV-connector API")
    return None


def lmcache_generation(image: str) -> tuple[Optional[str], str, Optional[tuple[int, int, int]]]:
    """(mode, evidence, LMCache version) from the image tag; mode None when the tag says
    nothing, "" when it dates the image inside the window between the generations."""
    ref = parse_ref(image)
    if "lmcache" in ref.repo:
        m = _SEMVER.match(ref.tag)
        if m:
            ver = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
            gen = names.MODE_REDIS if ver <= (0, 3, 6) else names.MODE_CONTROLLER
            return gen, f"image tag: LMCache {_v(ver)}", ver
    if ref.repo == names.LMCACHE_IMAGE_REPO:
        return _lmcache_by_date(ref.tag)
    v = vllm_version(image)
    if ref.repo in _VLLM_RELEASE and ref.tag in ("latest", ""):
        return (names.MODE_CONTROLLER, "image tag: vllm/vllm-openai:latest bundles LMCache "
                ">= 0.3.11", None)
    if ref.repo in _VLLM_RELEASE and v is not None and v >= BUNDLES_LMCACHE_VLLM:
        if v < CONTROLLER_GEN_VLLM:
            return (names.MODE_REDIS, f"image tag: vLLM {_v(v)} was released before LMCache "
                    "0.3.7, so it bundles LMCache <= 0.3.6", None)
        return (names.MODE_CONTROLLER, f"image tag: vLLM {_v(v)} was released after LMCache "
                "0.3.7", None)
    return None, "", None


def _lmcache_by_date(tag: str) -> tuple[Optional[str], str, Optional[tuple[int, int, int]]]:
    if tag in ("", "latest", "latest-nightly", "nightly"):
        return (names.MODE_CONTROLLER, f"image tag: lmcache/vllm-openai:{tag or 'latest'} is "
                "the newest build, controller generation since LMCache 0.3.7 (2025-09-29)", None)
    d = tag_date(tag)
    if d is None:
        return None, "", None
    where = f"image tag: lmcache/vllm-openai:{tag} dates LMCache {d.isoformat()}"
    if d <= LMCACHE_0_3_6:
        return names.MODE_REDIS, f"{where}, at or before 0.3.6 ({LMCACHE_0_3_6})", None
    if d >= LMCACHE_0_3_7:
        return names.MODE_CONTROLLER, f"{where}, at or after 0.3.7 ({LMCACHE_0_3_7})", None
    return "", f"{where}, between 0.3.6 and 0.3.7 when the redis generation was removed", None
