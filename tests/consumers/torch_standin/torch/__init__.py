# TEST STAND-IN, not PyTorch.  Put on PYTHONPATH only by consumers.py when running
# probe_lmcache.py against lmcache 0.3.6: its config chain (lmcache/config.py,
# lmcache/integration/vllm/utils.py) imports torch only to evaluate annotations
# (`kv_dtype: torch.dtype`, `token_ids: torch.Tensor`).  Nothing here is called.
class dtype: ...  # noqa: E701
class Tensor: ...  # noqa: E701
