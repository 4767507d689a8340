"""What a chain is, as it crosses processes (router replicas, the CLI): pydantic models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TurnStatus = Literal["running", "finished", "failed", "cancelled"]
# `idle`: created, no turn yet; otherwise the status of the latest turn.
ChainStatus = Literal["idle", "running", "finished", "failed", "cancelled"]
TERMINAL: tuple[str, ...] = ("finished", "failed", "cancelled")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCall(_Model):
    """One tool call as the model emitted it (OpenAI shape, flattened)."""

    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments exactly as generated (a JSON string, not re-serialized).")


class ToolCallRecord(ToolCall):
    turn: int = Field(ge=0)
    index: int = Field(ge=0, description="Position among this turn's tool calls.")
    result: str | None = None
    result_at: float | None = None


class Turn(_Model):
    index: int = Field(ge=0)
    request: dict[str, Any] = Field(description="The request body minus messages (tools, max_tokens, ...).")
    sampling: dict[str, Any] = Field(description="Sampling parameters, seed included: what resumption replays.")
    prompt_tokens: list[int]
    generated: list[int]
    status: TurnStatus
    finish_reason: str | None = None
    created_at: float
    updated_at: float


class ChainSummary(_Model):
    chain_id: str
    created_at: float
    updated_at: float
    status: ChainStatus
    n_turns: int = Field(ge=0)
    n_tool_calls: int = Field(ge=0)
    owner: str | None = Field(None, description="The router replica holding the chain's lease, if unexpired.")
    tenant: str = Field("", description="Who created the chain (an API key's identity, never the key): only "
                        "they may read, continue, cancel or delete it. Empty: created with the API open.")


class Chain(ChainSummary):
    turns: list[Turn]
    tool_calls: list[ToolCallRecord] = Field(description="The transcript, in the order the calls were generated.")
