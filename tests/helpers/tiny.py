"""The built-in tiny K2 model, loaded once per test process."""

from __future__ import annotations

from functools import lru_cache

from k2serve.worker.engine.engine import Engine
from k2serve.worker.engine.settings import EngineConfig
from k2serve.k2format.source import resolve_model
from k2serve.worker.engine.grammar import GrammarVocab
from k2serve.worker.loader import ModelWeights, load_weights, resolve_checkpoint
from k2serve.worker.model.k2 import K2Model
from k2serve.k2format.tokenizer import K2Tokenizer


@lru_cache(maxsize=2)
def tiny_weights(device: str = "cpu") -> ModelWeights:
    return load_weights(resolve_checkpoint("builtin:tiny-k2"), device=device)


@lru_cache(maxsize=1)
def tiny_tokenizer() -> K2Tokenizer:
    return K2Tokenizer.from_dir(resolve_model("builtin:tiny-k2"))


def tiny_engine(deterministic: bool = False, *, guided: bool = False, device: str = "cpu", **cfg: object) -> Engine:
    """`guided`: with the tokenizer's stop tokens and vocabulary (constraints, reasoning budgets); else no stop
    token and no steering. `device`: where the weights, the KV cache and the forward live (float32 everywhere)."""
    w = tiny_weights(device)
    model = K2Model(w.config, w.dense, w.experts, deterministic=deterministic)
    config = EngineConfig(**{"num_blocks": 1024, "block_size": 16, "deterministic": deterministic, **cfg})  # type: ignore[arg-type]
    if not guided:
        return Engine(model, config, eos_token_ids=[])
    tok = tiny_tokenizer()
    return Engine(model, config, eos_token_ids=tok.eos_ids,
                  grammar_vocab=GrammarVocab.from_tokenizer(tok, w.config.vocab_size))


def run_all(engine: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token)
    return out
