"""The router's side of durability: buffer a turn's generated tokens and make them durable in batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2serve.router.chains.models import ToolCall, TurnStatus
from k2serve.router.chains.store import ChainStore


@dataclass
class ChainCheckpointer:
    """Flushes every `every` tokens, and always before a tool-call record and at the end of the turn, so the
    store never holds a tool call whose preceding tokens it lacks. Tokens past `durable` are lost with the
    router; a resume regenerates them from position `durable` on."""

    store: ChainStore
    chain_id: str
    turn: int
    every: int = 16
    durable: int = 0
    pending: list[int] = field(default_factory=list)
    inflight: int = 0  # tokens a group write (`BatchedCommit`) took and has not confirmed yet
    on_settled: Callable[[int], None] | None = None  # told the durable count when a group write settles

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"ChainCheckpointer.every must be >= 1, got {self.every}")

    @classmethod
    def resume(cls, store: ChainStore, chain_id: str, turn: int, every: int = 16) -> "ChainCheckpointer":
        """Continues a turn from what the store holds (after a router restart)."""
        return cls(store, chain_id, turn, every, durable=len(store.generated(chain_id, turn)))

    @property
    def position(self) -> int:
        """Tokens generated so far (durable + buffered): the index of the next token."""
        return self.durable + self.inflight + len(self.pending)

    def take(self) -> tuple[int, list[int]]:
        """The buffered tokens, for a write made elsewhere (a batched commit): (their start, them)."""
        start, tokens = self.durable + self.inflight, self.pending
        self.pending = []
        self.inflight += len(tokens)
        return start, tokens

    def settle(self, durable: int) -> None:
        """The write of what `take` gave out is durable: the store holds `durable` tokens of the turn."""
        self.durable, self.inflight = durable, 0
        if self.on_settled is not None:
            self.on_settled(durable)

    def restore(self, tokens: list[int]) -> None:
        """The write of `tokens` (from `take`) failed: they are buffered again, ahead of any buffered since."""
        self.pending = tokens + self.pending
        self.inflight = 0

    def add(self, tokens: Sequence[int]) -> None:
        self.pending.extend(tokens)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> int:
        """Makes every buffered token durable; returns the durable count."""
        if self.inflight:
            raise RuntimeError(f"chain {self.chain_id!r}: a group write of turn {self.turn} is still in flight")
        if self.pending:
            self.durable = self.store.append_tokens(self.chain_id, self.turn, self.durable, self.pending)
            self.pending = []
        return self.durable

    def tool_calls(self, calls: Sequence[ToolCall | Mapping[str, Any]]) -> None:
        self.flush()
        self.store.record_tool_calls(self.chain_id, self.turn, calls)

    def finish(self, status: TurnStatus, finish_reason: str | None) -> None:
        self.flush()
        self.store.finish_turn(self.chain_id, self.turn, status, finish_reason)
