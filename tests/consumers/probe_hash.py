"""Chunk keys as LMCache computes them in a vLLM pod (run in the vLLM + LMCache env).

The process environment is the injected container's env (PYTHONHASHSEED above all: it must be
set when the interpreter starts, so it cannot come through stdin). stdin: {"tokens": [...]};
stdout: {"hashes": [...], "none_hash": ..., "algorithm": ...}, the prefix hash of every chunk
from LMCache's own ChunkedTokenDatabase with its config read from that env, which also runs
vLLM's init_none_hash (the root of the chain, derived from PYTHONHASHSEED).
"""

import json
import sys


def main() -> None:
    tokens = json.load(sys.stdin)["tokens"]
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1 import token_database
    config = LMCacheEngineConfig.from_env()
    db = token_database.ChunkedTokenDatabase(config, None)
    hashes = [h for _, _, h in db.process_tokens(tokens=tokens, make_key=False)]
    json.dump({"hashes": [str(h) for h in hashes], "none_hash": str(token_database.NONE_HASH),
               "algorithm": config.pre_caching_hash_algorithm}, sys.stdout)


if __name__ == "__main__":
    main()
