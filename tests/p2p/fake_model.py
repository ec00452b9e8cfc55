"""TEST CODE: the tiny fake model both engine processes serve (LMCache 0.3.6 and 0.5.6), and
its deterministic prompts and KV: the same seed gives the same tokens and KV in every
process, so a peer's fetch can be checked byte for byte. Needs torch (both engine venvs)."""

from __future__ import annotations

import hashlib

import torch

NUM_LAYERS, KV_HEADS, HEAD_DIM = 2, 8, 128
HIDDEN = KV_HEADS * HEAD_DIM
VOCAB = 32000


def sequence(seed: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same tokens and KV in every process for a seed (the 'prompt' and its 'prefill')."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n_tokens,), generator=g, dtype=torch.long)
    kv = torch.randn((2, NUM_LAYERS, n_tokens, HIDDEN), generator=g).to(torch.float16)
    return tokens, kv


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
