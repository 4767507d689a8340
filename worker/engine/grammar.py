"""Grammar compilation for constrained decoding, with xgrammar: the vocabulary as xgrammar sees it, and compiled
grammars cached per schema and built on a background thread, so a step never waits for a compile.

K2's special tokens (`</think>`, the tool-call section markers) are not text: they enter xgrammar's vocabulary
as empty strings, which xgrammar never allows inside a grammar. The per-sequence `Guide` places them between the
text segments that xgrammar constrains (the answer's JSON, a call's id, a call's arguments).
"""

from __future__ import annotations

import concurrent.futures
import json
from dataclasses import dataclass
from pathlib import Path

import xgrammar as xgr

from k2serve.sampling_params import Constraint
from k2serve.k2format.tokenizer import K2Tokenizer


@dataclass(frozen=True)
class GrammarVocab:
    """The token strings xgrammar matches against, and the special tokens the guide places itself."""

    encoded: list[bytes]  # [V] each token's bytes; b"" for special tokens
    eos_ids: tuple[int, ...]
    think_end: int  # </think>
    section_begin: int  # <|tool_calls_section_begin|>
    section_end: int  # <|tool_calls_section_end|>
    call_begin: int  # <|tool_call_begin|>
    argument_begin: int  # <|tool_call_argument_begin|>
    call_end: int  # <|tool_call_end|>

    @classmethod
    def from_tokenizer(cls, tok: K2Tokenizer, vocab_size: int) -> GrammarVocab:
        """`vocab_size`: the model's (its logits' width), at least the tokenizer's."""
        if vocab_size < tok.vocab_size:
            raise ValueError(f"model vocab {vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
        encoded = [b"" if i in tok.special_ids else tok.encoding.decode_single_token_bytes(i)
                   for i in range(tok.vocab_size)] + [b""] * (vocab_size - tok.vocab_size)
        return cls(encoded, tuple(tok.eos_ids), tok.token_id("</think>"), tok.token_id("<|tool_calls_section_begin|>"),
                   tok.token_id("<|tool_calls_section_end|>"), tok.token_id("<|tool_call_begin|>"),
                   tok.token_id("<|tool_call_argument_begin|>"), tok.token_id("<|tool_call_end|>"))

    @classmethod
    def from_model_dir(cls, model_dir: Path | str, vocab_size: int) -> GrammarVocab:
        return cls.from_tokenizer(K2Tokenizer.from_dir(model_dir), vocab_size)

    @property
    def size(self) -> int:
        return len(self.encoded)


@dataclass(frozen=True)
class ConstraintGrammars:
    """A constraint's compiled grammars: the answer's JSON, or each tool's call id and arguments."""

    answer: xgr.CompiledGrammar | None
    call_ids: tuple[xgr.CompiledGrammar, ...]  # [i]: the id of the i-th call of the turn (K2: functions.NAME:i)
    arguments: dict[str, xgr.CompiledGrammar]  # by tool name


def call_id_prefix(name: str) -> str:
    """K2's call ids are `functions.{name}:{index}`."""
    return f"functions.{name}:"


class Grammars:
    """Compiles constraints into xgrammar grammars; a compiled schema is kept (xgrammar's compiler caches by
    grammar) so every request with the same schema reuses it."""

    MAX_PARALLEL_CALLS = 8  # call ids a turn may use when parallel calls are allowed

    def __init__(self, vocab: GrammarVocab, *, threads: int = 1) -> None:
        self.vocab = vocab
        info = xgr.TokenizerInfo(vocab.encoded, xgr.VocabType.RAW, vocab_size=vocab.size,
                                 stop_token_ids=list(vocab.eos_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2serve-grammar")

    @staticmethod
    def check(constraint: Constraint) -> None:
        """Raises ValueError for a schema xgrammar cannot turn into a grammar. Cheap (no token masks are built),
        so a request is refused before it is queued."""
        try:
            for schema in _schemas(constraint):
                xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
        except Exception as e:  # xgrammar raises RuntimeError / InvalidJSONError for bad schemas
            raise ValueError(f"constraint: unusable JSON schema: {e}") from None

    def submit(self, constraint: Constraint) -> concurrent.futures.Future[ConstraintGrammars]:
        """Compiles on the grammar thread; the engine admits the request once the future is done."""
        return self._pool.submit(self.compile, constraint)

    def compile(self, constraint: Constraint) -> ConstraintGrammars:
        if constraint.kind == "json":
            assert constraint.json_schema is not None  # the Constraint validator guarantees it
            return ConstraintGrammars(self._json(constraint.json_schema), (), {})
        names = [t.name for t in constraint.tools]
        calls = self.MAX_PARALLEL_CALLS if constraint.parallel else 1
        alternatives = " | ".join(json.dumps(n) for n in names)
        ids = tuple(self._compiler.compile_grammar(
            f'root ::= "functions." ({alternatives}) ":{i}"') for i in range(calls))
        return ConstraintGrammars(None, ids, {t.name: self._json(t.parameters) for t in constraint.tools})

    def _json(self, schema: str) -> xgr.CompiledGrammar:
        # Compact JSON: no free whitespace, so a sequence cannot pad its answer with blanks until max_tokens.
        grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
        # xgrammar 0.2.9's string characters admit UTF-16 surrogates (their bytes are not UTF-8) and, in a
        # length-bounded string, raw control characters (JSON forbids them): strict parsers reject such answers.
        text = str(grammar)
        for loose, strict in _STRING_CHARS:
            text = text.replace(loose, strict)
        return self._compiler.compile_grammar(text)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_STRING_CHARS = ((r'[^\0-\x1f\"\\\r\n]', r'[^\0-\x1f\"\\\r\n\ud800-\udfff]'),
                 (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\ud800-\udfff]'))


def _schemas(constraint: Constraint) -> list[str]:
    if constraint.json_schema is not None:
        return [constraint.json_schema]
    return [t.parameters for t in constraint.tools]
