"""The chain store interface. Backends: `SqliteChainStore` (the default; one file, e.g. on a PVC) and
`RedisChainStore` (several router replicas). `open_store` picks one from the serving config.

Every write is idempotent, so a caller (or the Redis client after a reconnect) may retry it blindly:
- `append_tokens` is idempotent by position: tokens overlapping what is stored must equal it and add nothing;
  a gap or a mismatch raises. This is what guarantees no token is duplicated or skipped after a resume.
- `create_chain` of an existing id, `finish_turn` with the same outcome, `record_tool_calls` of calls already
  recorded (same id, turn, name, arguments) and `record_tool_result` with the same result are no-ops.
- `begin_turn` is idempotent per call (a retried call returns the turn it created).
Turns of one chain are sequential: `begin_turn` refuses while the latest turn is still running.
Calls block; async callers run them on `io_threads` threads of their own.
"""

from __future__ import annotations

import abc
import contextlib
import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from k2serve.config import ChainStoreConfig
from k2serve.router.chains.models import TERMINAL, Chain, ChainSummary, ToolCall, TurnStatus
from k2serve.router.chains.tokens import check_tokens


class ChainStoreError(Exception):
    """Base of every error the chain store raises on purpose."""


class ChainStoreUnavailable(ChainStoreError):
    """The backend stayed unreachable for longer than the retry timeout."""


class NotFoundError(ChainStoreError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ChainNotFound(NotFoundError):
    pass


class TurnNotFound(NotFoundError):
    pass


class ToolCallNotFound(NotFoundError):
    pass


class ConflictError(ChainStoreError, ValueError):
    """A write disagrees with what is stored."""


class TurnClosed(ConflictError):
    pass


class TokenGap(ConflictError):
    def __init__(self, chain_id: str, turn: int, stored: int, start: int) -> None:
        self.stored, self.start = stored, start
        super().__init__(
            f"chain {chain_id} turn {turn}: append at position {start} would leave a gap "
            f"(only {stored} tokens stored)"
        )


class TokenMismatch(ConflictError):
    def __init__(self, chain_id: str, turn: int, position: int, stored: int, given: int) -> None:
        self.position, self.stored_token, self.given_token = position, stored, given
        super().__init__(
            f"chain {chain_id} turn {turn}: token at position {position} is stored as {stored}, "
            f"the append gives {given}"
        )


def json_text(value: Mapping[str, Any], what: str) -> str:
    """Canonical JSON (sorted keys) so a retried write compares equal to the stored one."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable: {e}") from e


def first_mismatch(stored: Sequence[int], start: int, tokens: Sequence[int]) -> tuple[int, int, int] | None:
    """(position, stored, given) of the first disagreement between `tokens` placed at `start` and the stored
    tokens `stored[start:]`, or None."""
    for i, (a, b) in enumerate(zip(stored[start:], tokens)):
        if a != b:
            return start + i, a, b
    return None


class ChainStore(abc.ABC):
    """Public methods validate their arguments, then call the backend's `_method`."""

    io_threads = 1  # threads a caller should give its calls: as many as the backend serves at once

    def create_chain(self, chain_id: str | None = None, tenant: str = "") -> str:
        """A new chain owned by `tenant` (see ChainSummary.tenant)."""
        chain_id = chain_id or uuid.uuid4().hex
        if not isinstance(chain_id, str) or len(chain_id) > 200 or not chain_id.isprintable():
            raise ValueError(f"chain_id must be a printable string of at most 200 characters, got {chain_id!r}")
        if len(tenant) > 200 or not tenant.isprintable():
            raise ValueError(f"tenant must be a printable string of at most 200 characters, got {tenant!r}")
        self._create_chain(chain_id, tenant, time.time())
        return chain_id

    def begin_turn(
        self,
        chain_id: str,
        request: Mapping[str, Any],
        sampling: Mapping[str, Any],
        prompt_tokens: Sequence[int],
    ) -> int:
        """Starts the next turn (status running) and returns its index."""
        return self._begin_turn(
            chain_id,
            json_text(request, "request"),
            json_text(sampling, "sampling"),
            check_tokens(prompt_tokens, "prompt_tokens"),
            time.time(),
        )

    def append_tokens(self, chain_id: str, turn: int, start: int, tokens: Sequence[int]) -> int:
        """Stores `tokens` as generated positions start.. of the turn; returns how many tokens are stored."""
        if start < 0:
            raise ValueError(f"append_tokens: start must be >= 0, got {start}")
        return self._append_tokens(chain_id, turn, start, check_tokens(tokens, "append_tokens"), time.time())

    def record_tool_calls(self, chain_id: str, turn: int, calls: Sequence[ToolCall | Mapping[str, Any]]) -> None:
        """Appends the turn's tool calls to the chain's transcript, in order."""
        parsed = [c if isinstance(c, ToolCall) else ToolCall.model_validate(c) for c in calls]
        ids = [c.id for c in parsed]
        if len(set(ids)) != len(ids):
            raise ValueError(f"record_tool_calls: duplicate tool call ids in one batch: {ids}")
        self._record_tool_calls(chain_id, turn, parsed, time.time())

    def record_tool_result(self, chain_id: str, tool_call_id: str, result: str) -> None:
        if not isinstance(result, str):
            raise ValueError(f"record_tool_result: result must be a string, got {type(result).__name__}")
        self._record_tool_result(chain_id, tool_call_id, result, time.time())

    def finish_turn(self, chain_id: str, turn: int, status: TurnStatus, finish_reason: str | None) -> None:
        if status not in TERMINAL:
            raise ValueError(f"finish_turn: status must be one of {TERMINAL}, got {status!r}")
        self._finish_turn(chain_id, turn, status, finish_reason, time.time())

    def claim(self, chain_id: str, owner: str, ttl_s: float) -> bool:
        """Takes or renews the chain's lease for `owner`; False while another owner's lease is unexpired."""
        if ttl_s <= 0 or not owner:
            raise ValueError(f"claim: need a non-empty owner and ttl_s > 0, got {owner!r}, {ttl_s}")
        return self._claim(chain_id, owner, ttl_s)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Groups the writes made inside (by this thread) into one durable commit where the backend can: SQLite
        makes them one transaction (one fsync instead of one per write; all or none). Elsewhere (Redis) each
        write commits on its own, as outside a batch. Either way they are durable when the block exits."""
        yield

    @abc.abstractmethod
    def release(self, chain_id: str, owner: str) -> None:
        """Drops the lease if `owner` holds it (else nothing)."""

    @abc.abstractmethod
    def get_chain(self, chain_id: str) -> Chain: ...

    @abc.abstractmethod
    def generated(self, chain_id: str, turn: int) -> list[int]:
        """The turn's durable generated tokens (the fast path of a resume)."""

    @abc.abstractmethod
    def delete_chain(self, chain_id: str) -> bool:
        """True if the chain existed."""

    def list_chains(self, limit: int = 100) -> list[ChainSummary]:
        """Most recently updated first."""
        if limit < 1:
            raise ValueError(f"list_chains: limit must be >= 1, got {limit}")
        return self._list_chains(limit)

    def purge_expired(self, ttl_seconds: float, now: float | None = None) -> int:
        """Deletes the chains untouched for `ttl_seconds` that no unexpired lease holds; returns how many.
        A running chain that old with no lease is abandoned (its router died and nobody resumed it)."""
        if ttl_seconds < 0:
            raise ValueError(f"purge_expired: ttl_seconds must be >= 0, got {ttl_seconds}")
        return self._purge_expired((time.time() if now is None else now) - ttl_seconds)

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "ChainStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def _create_chain(self, chain_id: str, tenant: str, now: float) -> None: ...

    @abc.abstractmethod
    def _begin_turn(
        self, chain_id: str, request: str, sampling: str, prompt: list[int], now: float
    ) -> int: ...

    @abc.abstractmethod
    def _append_tokens(self, chain_id: str, turn: int, start: int, tokens: list[int], now: float) -> int: ...

    @abc.abstractmethod
    def _record_tool_calls(self, chain_id: str, turn: int, calls: list[ToolCall], now: float) -> None: ...

    @abc.abstractmethod
    def _record_tool_result(self, chain_id: str, tool_call_id: str, result: str, now: float) -> None: ...

    @abc.abstractmethod
    def _finish_turn(
        self, chain_id: str, turn: int, status: TurnStatus, finish_reason: str | None, now: float
    ) -> None: ...

    @abc.abstractmethod
    def _claim(self, chain_id: str, owner: str, ttl_s: float) -> bool: ...

    @abc.abstractmethod
    def _purge_expired(self, cutoff: float) -> int: ...

    @abc.abstractmethod
    def _list_chains(self, limit: int) -> list[ChainSummary]: ...


def open_store(cfg: ChainStoreConfig, *, create: bool = True) -> ChainStore:
    """The configured store; `create=False` (readers such as `k2serve chains`) refuses to make a new one."""
    if cfg.backend == "redis":
        from k2serve.router.chains.redis_store import RedisChainStore

        assert cfg.redis_url is not None  # the config validator requires it
        return RedisChainStore(cfg.redis_url)
    from k2serve.router.chains.sqlite_store import SqliteChainStore

    return SqliteChainStore(cfg.sqlite_file(), create=create)
