"""Per-request sampling settings: the one schema the HTTP front, the router, the wire and the engine share."""

from __future__ import annotations

import secrets
from collections.abc import Collection
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries; OpenAI documents no cap, vLLM none either: ours bounds a request's work
MAX_SCHEMA_CHARS = 65_536  # one JSON schema (response_format or a tool's parameters), as JSON text
MAX_TOOLS = 128


class ToolSchema(BaseModel):
    """A function the model may call under a tool-call constraint, with its parameters' JSON schema as text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    parameters: str = Field(default='{"type": "object"}', max_length=MAX_SCHEMA_CHARS)


class Constraint(BaseModel):
    """What the answer must be. `json`: one JSON value valid against `json_schema`. `tool_calls`: K2's tool-call
    section with one call (several when `parallel`) of one of `tools`, arguments valid against its parameters;
    unless `required`, the answer may also be free text, and only a tool-call section it starts is constrained.
    `after_think`: K2 Thinking's reasoning stays free; the constraint starts after `</think>` (or, for tool
    calls, at the tool-call section, where K2's reasoning also ends)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["json", "tool_calls"]
    json_schema: str | None = Field(default=None, max_length=MAX_SCHEMA_CHARS)
    tools: list[ToolSchema] = Field(default_factory=list, max_length=MAX_TOOLS)
    parallel: bool = True
    required: bool = True
    after_think: bool = True

    @model_validator(mode="after")
    def _check(self) -> Constraint:
        if self.kind == "json" and (self.json_schema is None or self.tools):
            raise ValueError("a json constraint needs json_schema and no tools")
        if self.kind == "tool_calls" and (not self.tools or self.json_schema is not None):
            raise ValueError("a tool_calls constraint needs tools and no json_schema")
        return self


class SamplingParams(BaseModel):
    """Per-request sampling settings (cross the router → worker boundary)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=1.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 means off")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="0 means off")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    max_tokens: int = Field(default=16, ge=1)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10.0, description="1 means off")
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    constraint: Constraint | None = None
    max_reasoning_tokens: int | None = Field(default=None, ge=0,
                                             description="past it the engine closes the thinking section")

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs > 0 requires logprobs=True")
        if any(t < 0 for t in self.logit_bias) or any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError("logit_bias maps token ids >= 0 to biases in [-100, 100]")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the sampler must look at the sequence's earlier tokens."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def guided(self) -> bool:
        """Whether the engine steers this sequence token by token (a constraint or a reasoning budget)."""
        return self.constraint is not None or self.max_reasoning_tokens is not None


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
