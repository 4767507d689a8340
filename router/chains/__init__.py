"""Durable reasoning chains: a token-level record of every chain (request, sampling, prompt, generated tokens,
tool-call transcript) behind one `ChainStore` interface, with SQLite and Redis backends."""

from k2serve.router.chains.checkpoint import ChainCheckpointer
from k2serve.router.chains.models import Chain, ChainSummary, ToolCall, ToolCallRecord, Turn
from k2serve.router.chains.store import (
    ChainNotFound,
    ChainStore,
    ChainStoreError,
    ChainStoreUnavailable,
    ConflictError,
    NotFoundError,
    TokenGap,
    TokenMismatch,
    ToolCallNotFound,
    TurnClosed,
    TurnNotFound,
    open_store,
)

__all__ = [
    "Chain",
    "ChainCheckpointer",
    "ChainNotFound",
    "ChainStore",
    "ChainStoreError",
    "ChainStoreUnavailable",
    "ChainSummary",
    "ConflictError",
    "NotFoundError",
    "TokenGap",
    "TokenMismatch",
    "ToolCall",
    "ToolCallNotFound",
    "ToolCallRecord",
    "Turn",
    "TurnClosed",
    "TurnNotFound",
    "open_store",
]
