"""What the engine holds per request and what it reports: the request itself, its sampled-token events, a
prompt's KV on its way between engines, and the engine's cumulative counters."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field, fields

import torch

from k2serve.worker.engine.grammar import ConstraintGrammars
from k2serve.worker.engine.guide import Guide
from k2serve.worker.engine.sampling import SamplingParams


@dataclass
class KVHandoff:
    """A prompt's computed latent KV, moved from a prefill engine to a decode engine."""

    tokens: list[int]  # the tokens whose KV `data` holds
    block_size: int
    data: torch.Tensor  # [layers, blocks, block_size, kv_dim]


class KVHandoffLost(RuntimeError):
    """A handed-off KV could not be read where it was to be imported (its object is gone or its owner died)."""


@dataclass
class TokenEvent:
    request_id: str
    index: int  # position among the generated tokens (output_prefix included)
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # "stop" | "length" | None while running


@dataclass(eq=False)  # identity: the scheduler's `in` / `remove` on lists must not compare token lists
class Request:
    """A request in the engine: waiting, running, or finished and holding its KV for export."""

    request_id: str
    prompt: list[int]
    output: list[int]
    params: SamplingParams
    seed: int
    deterministic: bool
    hold_kv: bool
    kv: KVHandoff | None = None
    num_computed: int = 0
    admitted: int = -1
    finish_reason: str | None = None
    guide: Guide | None = None  # constrained decoding / reasoning budget: set once its grammars are compiled
    compiling: concurrent.futures.Future[ConstraintGrammars] | None = None
    forks: list[Request] = field(default_factory=list)  # its other choices, until its first sample (engine/forks.py)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        """len(tokens), without building the list (a step asks for every running sequence)."""
        return len(self.prompt) + len(self.output)

    def token_at(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]


@dataclass
class EngineStats:
    """The engine's counters (cumulative): the one snapshot that reaches /metrics. A field added here is exported
    once `Metrics.engine_counters` names its counter (tests/worker/test_engine_stats.py checks both agree)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    steps: int = 0
    preemptions: int = 0

    def __add__(self, other: EngineStats) -> EngineStats:
        return EngineStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})
