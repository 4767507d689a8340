"""Chain-store test helpers: a request and sampling document as the router stores them, and a fresh turn."""

from __future__ import annotations

from k2serve.router.chains import ChainStore

REQUEST = {"model": "tiny-k2", "max_tokens": 64, "tools": [{"type": "function", "function": {"name": "search"}}]}
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "seed": 1234}


def new_turn(store: ChainStore, prompt: list[int] | None = None) -> tuple[str, int]:
    chain = store.create_chain()
    return chain, store.begin_turn(chain, REQUEST, SAMPLING, prompt or [1, 2, 3])
