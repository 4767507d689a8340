"""Per-request sampling settings: the one schema the HTTP front, the router, the wire and the engine share."""

from __future__ import annotations

import secrets
from collections.abc import Collection

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOP_LOGPROBS = 20


class SamplingParams(BaseModel):
    """Per-request sampling settings (cross the router → worker boundary)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=1.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 means off")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    max_tokens: int = Field(default=16, ge=1)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs > 0 requires logprobs=True")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def resolve_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, or a fresh one the caller must record to replay the request."""
    return params.seed if params.seed is not None else secrets.randbits(63)


def finish_reason(params: SamplingParams, token: int, generated: int, total: int, max_len: int,
                  eos_ids: Collection[int]) -> str | None:
    """Why a sequence ends at `token`, its `generated`-th generated token (`total` tokens with the prompt), or None
    when it goes on. The engine asks after every token it samples; a router asks of a turn's last durable token
    when it takes over a turn a dead router left running (that router may have died after making the last token
    durable but before ending the turn)."""
    if (token in eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
        return "stop"
    if generated >= params.max_tokens or total >= max_len:
        return "length"
    return None
