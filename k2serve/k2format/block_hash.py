"""The token-block hash: a full block of tokens is named by the chained hash of every token up to and including
it. Workers key their prefix caches and KV handles by it and the router keys its prefix-affinity LRU by it, so it
must agree across processes, machines and restarts."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# Parent of a sequence's first block: fixed, so hashes agree across processes and restarts.
ROOT_HASH = b"k2serve-kv-root"


def hash_block_tokens(parent_hash: bytes, tokens: Sequence[int]) -> bytes:
    """Stable (process- and machine-independent) chained hash of one full block given its parent's hash."""
    h = hashlib.blake2b(parent_hash, digest_size=16)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def block_hashes(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of the full blocks of `tokens`: the prefix-cache keys at this block size."""
    out: list[bytes] = []
    parent = ROOT_HASH
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, tokens[start:start + block_size])
        out.append(parent)
    return out
