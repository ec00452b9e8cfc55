"""The PYTHONHASHSEED of a peer group (pure: the key is passed in).

Why a seed at all: LMCache's chunk keys start their prefix-hash chain at vLLM's NONE_HASH,
which vLLM derives from PYTHONHASHSEED (`init_none_hash` in vllm/v1/core/kv_cache_utils.py;
LMCache's TokenDatabase calls it, 0.3.x and 0.5.x alike), and with LMCache's default
`pre_caching_hash_algorithm: builtin` the root itself is Python's str hash, keyed by the same
variable. Every sharing pod must therefore carry one value (LMCache#1799), and whoever knows
it can compute the key of any guessed prompt prefix offline. A single cluster-wide `0` lets
anyone confirm a prefix cached in another tenant's group; a seed per group does not.

The seed is HMAC-SHA256(key, "hash-seed\\0<namespace>/<peer group>") cut to 32 bits, with
the key from Secret names.HASH_SEED_SECRET in kvmesh-system: equal for every member (the
webhook and the controller derive it alike, without storing one per group), different for
every group, and not computable without the key. The domain prefix keeps it apart from
anything else derived from a key. Its value is visible in the pods' spec: a namespace is one
tenant (README "Trust boundary").

LMCache's MP mode hashes with blake3 by default, which ignores the seed; it is still set there
so a user's `builtin` choice stays consistent within the group.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional

SEED_BITS = 32  # PYTHONHASHSEED accepts 0..4294967295
KEY_FIELD = "seed-key"  # the Secret's data key
KEY_BYTES = 32


def derive(key: bytes, namespace: str, peer_group: str) -> int:
    """The seed of peer group `peer_group` (its label, `<mode>-<group>`) in `namespace`."""
    if len(key) < 16:
        raise ValueError("the hash-seed key must hold at least 16 bytes")
    msg = b"hash-seed\0" + f"{namespace}/{peer_group}".encode()
    digest = hmac.new(key, msg, hashlib.sha256).digest()
    return int.from_bytes(digest[:SEED_BITS // 8], "big")


def for_group(explicit: Optional[int], key: Optional[bytes], namespace: str,
              peer_group: str) -> Optional[int]:
    """A policy's explicit hashSeed wins (the admin chose to share it); else the group's own
    seed when the key is known; else None: nobody here can know the group's seed."""
    if explicit is not None:
        return explicit
    if key is None:
        return None
    return derive(key, namespace, peer_group)
