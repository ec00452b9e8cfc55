import pytest

from kvmesh.core import names
from kvmesh.core import contract


@pytest.mark.parametrize("image,version", [
    ("lmcache/vllm-openai:v0.3.6", (0, 3, 6)),
    ("lmcache/vllm-openai:0.3.7", (0, 3, 7)),
    ("docker.io/lmcache/vllm-openai:v0.5.6-nightly@sha256:ab", (0, 5, 6)),
    ("registry:5000/ml/lmcache-vllm:0.3.10", (0, 3, 10)),
    ("vllm/vllm-openai:v0.10.0", None),  # a vLLM version, not an LMCache one
    ("lmcache/vllm-openai:latest", None),
    ("lmcache/vllm-openai", None),
    ("registry:5000/lmcache/vllm-openai", None),
])
def test_lmcache_version_only_from_lmcache_images(image, version):
    assert contract.lmcache_version_from_image(image) == version


def test_mode_boundary_is_0_3_7():
    assert contract.mode_for_version((0, 3, 6)) == names.MODE_REDIS
    assert contract.mode_for_version((0, 3, 7)) == names.MODE_CONTROLLER
    assert contract.mode_for_version((0, 2, 9)) == names.MODE_REDIS
    assert contract.mode_for_version((1, 0, 0)) == names.MODE_CONTROLLER


@pytest.mark.parametrize("value,ok", [("20", True), ("0.5", True), ("0", False), ("-1", False),
                                      ("20Gi", False), ("", False)])
def test_gb_check(value, ok):
    assert (contract.check_gb(value) is None) is ok


@pytest.mark.parametrize("value,gb", [("20Gi", 21.475), ("512Mi", 0.537), ("20G", 20.0),
                                      ("4", 4.0), ("lots", None), ("0Gi", None)])
def test_quantity_conversion(value, gb):
    assert contract.quantity_to_gb(value) == gb


def test_bool_reading_matches_lmcache_semantics():
    assert not contract.is_true("yes") and contract.is_true(" TRUE ")


def test_kv_transfer_json_is_compact_and_stable():
    assert contract.kv_transfer_json("LMCacheConnectorV1") == \
        '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'


def test_generations_never_share_injected_variables():
    assert not set(contract.GENERATION_VARS["redis"]) & set(contract.GENERATION_VARS["controller"])
