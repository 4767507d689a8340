"""Request metrics and the lifetime of one generation as the HTTP layer consumes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from k2serve.metrics import Metrics
from k2serve.router.http.errors import APIError
from k2serve.router.http.stream import TokenLike
from k2serve.router.quotas import RateLimited

OUTCOME_KEY = "k2serve_outcome"  # in the request's ASGI state: a generation's own verdict on how it ended


class Canceller(Protocol):
    async def cancel(self, chain_id: str) -> bool: ...


class RequestMetrics:
    """ASGI middleware: `k2serve_requests_total{endpoint, outcome}`.

    The endpoint label is the matched route's path template (bounded); unmatched paths count as `other`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        state: dict[str, Any] = scope.setdefault("state", {})
        outcome = "server_error"
        try:
            await self.app(scope, receive, send_status)
            code = status[0] if status else 500
            outcome = state.get(OUTCOME_KEY) or ("ok" if code < 400 else "client_error" if code < 500
                                                 else "server_error")
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "other")
            self.metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()


class Generation:
    """One turn's token stream as a response consumes it. The first token is pulled at `start`, so bad input
    is a 4xx before any response is sent and the chain id is known for the response header. Token timings and
    counts are the core's to record (it sees every token, whichever front asked)."""

    def __init__(self, tokens: AsyncIterator[Any], first: TokenLike, *, core: Canceller,
                 state: dict[str, Any]) -> None:
        self.chain_id = first.chain_id
        self.turn = first.turn
        self.prompt_tokens: int = first.prompt_tokens
        self._first: TokenLike | None = first
        self._tokens = tokens
        self._core = core
        self._state = state
        self._finished = False
        self._closed = False

    @classmethod
    async def start(cls, tokens: AsyncIterator[Any], *, core: Canceller, state: dict[str, Any]) -> Generation:
        try:
            first = await anext(tokens)
        except StopAsyncIteration:
            raise APIError(409, "the chain has no tokens to stream from there", param="from") from None
        except ValueError as e:
            raise APIError(400, str(e)) from e
        except RateLimited as e:
            raise APIError(429, str(e), code=e.limit, headers={"Retry-After": str(e.retry_after_s)}) from e
        except KeyError as e:
            raise APIError(404, f"no such chain: {e.args[0] if e.args else e}", code="chain_not_found") from e
        return cls(tokens, first, core=core, state=state)

    async def __aiter__(self) -> AsyncIterator[TokenLike]:
        if self._first is not None:
            first, self._first = self._first, None
            self._finished = first.finish_reason is not None
            yield first
        async for tok in self._tokens:
            self._finished = tok.finish_reason is not None
            yield tok

    async def close(self, outcome: str, *, stop: bool = False) -> None:
        """`outcome` (ok, cancelled, server_error) labels the request. `stop`: the reader ended the turn on
        purpose (a stop string hit) — an unfinished turn is cancelled in the core; otherwise (client gone,
        an error here) the turn generates on, durable, for a later reader. Idempotent; safe in a `finally`
        of a cancelled task (the core's cancel runs shielded)."""
        if self._closed:
            return
        self._closed = True
        self._state[OUTCOME_KEY] = outcome
        with anyio.CancelScope(shield=True):
            if stop and not self._finished:
                await self._core.cancel(self.chain_id)
            await self._tokens.aclose()  # type: ignore[attr-defined]
