"""Token ids on disk and the append rule both backends enforce.

Ids are packed little-endian uint32 (K2's vocabulary is 163,840 ids): 4 bytes a token in SQLite blobs and in
Redis strings, where APPEND keeps a turn's generation contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TOKEN_BYTES = 4
_MAX_ID = 2**32 - 1


def check_tokens(tokens: Sequence[int], what: str) -> list[int]:
    out = [int(t) for t in tokens]
    bad = [t for t in out if not 0 <= t <= _MAX_ID]
    if bad:
        raise ValueError(f"{what}: token ids must be in [0, 2**32), got {bad[:5]}")
    return out


def pack(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<u4").tobytes()


def unpack(blob: bytes | None) -> list[int]:
    if not blob:
        return []
    return np.frombuffer(blob, dtype="<u4").tolist()
