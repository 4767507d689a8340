"""The OpenAI-compatible HTTP front of the router: a thin FastAPI adapter over `RouterCore`.

Every generated turn belongs to a chain; its id goes out in the `X-K2-Chain-Id` header and comes back (header or
body `chain_id`) to continue the conversation on the same chain. Streamed events carry `id: <chain>:<index>`,
so a client that lost its connection re-sends the request with `Last-Event-ID` (or reads
`GET /v1/chains/{id}/stream?from=N`) and gets the rest of the turn from the core's durable record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from k2serve.config import ServingConfig
from k2serve.metrics import Metrics
from k2serve.router.chains import ToolCall
from k2serve.router.http import openai_models as om
from k2serve.router.api_keys import APIKeys
from k2serve.router.http.body import body_doc, documented_bodies, threaded_body
from k2serve.router.http.auth import bearer_guard, request_key_limits, request_tenant
from k2serve.router.http.errors import APIError, error_body, install_error_handlers
from k2serve.router.http.limits import BodyLimits, check_request
from k2serve.router.http.observe import Generation, RequestMetrics
from k2serve.router.http.prompts import chat_prompt, check_model, completion_prompt, sampling_params
from k2serve.sampling_params import SamplingParams
from k2serve.router.http.stream import (ChunkWriter, TokenStep, TurnAssembler, chat_logprobs, chat_message,
                                        completion_logprobs, event_id, merged, parse_event_id, sse_event, usage)

if TYPE_CHECKING:
    from k2serve.router.core import RouterCore

CHAIN_HEADER = "X-K2-Chain-Id"
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": om.ErrorResponse} for code in (400, 401, 404, 409, 429)
}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

ChainHeader = Annotated[str | None, Header(alias=CHAIN_HEADER, min_length=1, max_length=128,
                                          description="Continue this chain.")]
# Parsed off the event loop (router/http/body.py).
ChatBody = Annotated[om.ChatCompletionRequest, Depends(threaded_body(om.ChatCompletionRequest))]
CompletionBody = Annotated[om.CompletionRequest, Depends(threaded_body(om.CompletionRequest))]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", pattern=r"^.+:[0-9]+$",
                                           description="Resume a stream after this event: `<chain>:<index>`.")]


class _Api:
    def __init__(self, core: RouterCore, config: ServingConfig, metrics: Metrics) -> None:
        self.core = core
        self.config = config
        self.metrics = metrics
        self.started = int(time.time())

    # ---- generation endpoints

    async def chat(self, body: ChatBody, request: Request, chain: ChainHeader = None,
                   last_event_id: LastEventId = None) -> Response:
        check_model(body.model, self.core.model_name, self.core.model_aliases)
        top = (body.top_logprobs or 0) if body.logprobs else None
        if last_event_id is not None:
            return await self._replay(request, body, last_event_id, chat=True, top=top)
        # Off the event loop: templating and tokenizing a big conversation takes seconds of CPU, and every
        # stream this router serves would stall for as long.
        prompt = await asyncio.to_thread(self._chat_prompt, body)
        return await self._generate(request, body, prompt, chain, chat=True, top=top,
                                    history=body.template_messages())

    async def completions(self, body: CompletionBody, request: Request, chain: ChainHeader = None,
                          last_event_id: LastEventId = None) -> Response:
        check_model(body.model, self.core.model_name, self.core.model_aliases)
        top = body.logprobs
        if last_event_id is not None:
            return await self._replay(request, body, last_event_id, chat=False, top=top)
        prompt = await asyncio.to_thread(self._completion_prompt, body)
        return await self._generate(request, body, prompt, chain, chat=False, top=top)

    def _chat_prompt(self, body: om.ChatCompletionRequest) -> list[int]:
        check_request(self.config.router.limits, stop=body.stop_strings, messages=body.template_messages(),
                      tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None)
        return self._fitting(body, chat_prompt(self.core.tokenizer, body))

    def _completion_prompt(self, body: om.CompletionRequest) -> list[int]:
        check_request(self.config.router.limits, stop=body.stop_strings, prompt=body.prompt)
        return self._fitting(body, completion_prompt(self.core.tokenizer, body))

    def _fitting(self, body: om.SamplingRequest, prompt: list[int]) -> list[int]:
        """`prompt`, if the request fits the context; else its 400, raised on this worker thread with the ids
        freed here: freeing the millions of ids of a huge prompt takes the event loop ~0.1 s."""
        try:
            self._sampling(body, prompt, top=None)
        except APIError:
            prompt.clear()
            raise
        return prompt

    def _sampling(self, body: om.SamplingRequest, prompt: list[int], top: int | None) -> SamplingParams:
        return sampling_params(body, len(prompt), self.core.max_context, top_logprobs=top,
                               default_max_tokens=self.config.router.limits.default_max_tokens,
                               reasoning_budget=self.config.router.max_reasoning_tokens)

    async def _generate(self, request: Request, body: om.SamplingRequest, prompt: list[int], header_chain: str | None,
                        *, chat: bool, top: int | None, history: list[dict[str, Any]] | None = None) -> Response:
        if header_chain and body.chain_id and header_chain != body.chain_id:
            raise APIError(400, f"chain_id {body.chain_id!r} differs from header {CHAIN_HEADER} {header_chain!r}",
                           param="chain_id")
        chain_id = header_chain or body.chain_id
        cap = self.config.router.limits.max_n
        if body.n > cap:
            raise APIError(400, f"n={body.n}; the limit is {cap} (router.limits.max_n)", param="n", code="max_n")
        if body.n > 1 and chain_id:
            raise APIError(400, "n > 1 starts a new chain per choice; it cannot continue a chain", param="n")
        params = self._sampling(body, prompt, top)
        deterministic = self.config.deterministic if body.deterministic is None else body.deterministic
        meta = body.model_dump(mode="json", exclude={"messages"}, exclude_none=True)
        tenant = request_tenant(request)
        if body.n == 1:
            streams = [self.core.generate(prompt, params, chain_id=chain_id, deterministic=deterministic,
                                          request_meta=meta, tenant=tenant, limits=request_key_limits(request))]
        else:
            try:
                streams = await self.core.generate_choices(prompt, params, body.n, deterministic=deterministic,
                                                           request_meta=meta, tenant=tenant,
                                                           limits=request_key_limits(request))
            except ValueError as e:
                raise APIError(400, str(e)) from e
        gens = [await Generation.start(tokens, core=self.core, state=request.scope["state"]) for tokens in streams]
        for gen in gens if history else ():
            await self._record_transcript(gen, history or [], request)
        return await self._respond(request, body, gens, chat=chat, top=top, created=int(time.time()), resume_at=0)

    async def _replay(self, request: Request, body: om.SamplingRequest, last_event_id: str, *, chat: bool,
                      top: int | None) -> Response:
        """A reconnect: the same request re-sent with `Last-Event-ID`; the turn's events after that one."""
        try:
            chain_id, last = parse_event_id(last_event_id)
        except ValueError as e:
            raise APIError(400, str(e), param="Last-Event-ID") from e
        turn = await self._latest_turn(chain_id, request)
        gen = await self._resumed(request, chain_id)
        return await self._respond(request, body, [gen], chat=chat, top=top, created=int(turn.created_at),
                                   resume_at=last + 1)

    async def chain_stream(self, chain_id: str, request: Request,
                           start: Annotated[int, Query(alias="from", ge=0, description="First token index.")] = 0,
                           last_event_id: LastEventId = None) -> Response:
        """The latest turn's raw tokens from `from` on (or after `Last-Event-ID`), as SSE events."""
        if last_event_id is not None:
            try:
                event_chain, last = parse_event_id(last_event_id)
            except ValueError as e:
                raise APIError(400, str(e), param="Last-Event-ID") from e
            if event_chain != chain_id:
                raise APIError(400, f"Last-Event-ID names chain {event_chain!r}, the path {chain_id!r}",
                               param="Last-Event-ID")
            start = last + 1
        gen = await self._resumed(request, chain_id)
        asm = TurnAssembler(self.core.tokenizer, stop_token_ids=set(), stop_strings=[], chat=False, top_logprobs=0)

        async def events() -> AsyncIterator[bytes]:
            outcome = "cancelled"
            try:
                async for tok in gen:
                    step = asm.push(tok)
                    if tok.index >= start:
                        yield sse_event({"chain_id": tok.chain_id, "turn": tok.turn, "index": tok.index,
                                         "token": tok.token, "text": step.text, "logprob": tok.logprob,
                                         "finish_reason": tok.finish_reason}, event_id(tok.chain_id, tok.index))
                    if asm.done:
                        break
                outcome = "ok"
                yield sse_event("[DONE]")
            finally:
                await gen.close(outcome)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={CHAIN_HEADER: chain_id, **_SSE_HEADERS})

    async def _resumed(self, request: Request, chain_id: str) -> Generation:
        # From token 0: the detokenizer and parser state at any index is a function of the tokens before it.
        return await Generation.start(self.core.resume(chain_id, 0, request_tenant(request)), core=self.core,
                                      state=request.scope["state"])

    async def _latest_turn(self, chain_id: str, request: Request) -> Any:
        chain = await self._chain(chain_id, request)
        if not chain.turns:
            raise APIError(409, f"chain {chain_id!r} has no turn to stream", code="chain_idle")
        return chain.turns[-1]

    async def _respond(self, request: Request, body: om.SamplingRequest, gens: list[Generation], *, chat: bool,
                       top: int | None, created: int, resume_at: int) -> Response:
        """The response for a request's choices (`gens`, in choice order)."""
        tokenizer = self.core.tokenizer
        tools = body.template_tools() if isinstance(body, om.ChatCompletionRequest) else None
        asms = [TurnAssembler(tokenizer, stop_token_ids=set(tokenizer.eos_ids), stop_strings=body.stop_strings,
                              chat=chat, top_logprobs=top, tools=tools) for _ in gens]
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{gens[0].chain_id}-{gens[0].turn}"
        model = self.core.model_name
        headers = {CHAIN_HEADER: gens[0].chain_id}
        if body.stream:
            writers = [ChunkWriter(completion_id, created, model, chat=chat, logprobs=top is not None, index=i)
                       for i in range(len(gens))]
            events = self._sse(gens, asms, writers, resume_at=resume_at, include_usage=body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers | _SSE_HEADERS)
        collected = await self._collect(request, gens, asms)
        if collected is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        choices = []
        for i, (gen, steps) in enumerate(zip(gens, collected)):
            choice: dict[str, Any] = {"index": i, "finish_reason": steps[-1].finish_reason if steps else None}
            if chat:
                choice |= {"message": chat_message(steps),
                           "logprobs": chat_logprobs(steps) if top is not None else None}
            else:
                choice |= {"text": "".join(s.text for s in steps),
                           "logprobs": completion_logprobs(steps) if top is not None else None}
            if len(gens) > 1:
                choice["chain_id"] = gen.chain_id  # k2serve: each choice is its own chain
            choices.append(choice)
        return JSONResponse({"id": completion_id, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": model, "choices": choices,
                             "usage": usage(gens[0].prompt_tokens, sum(a.generated for a in asms))}, headers=headers)

    async def _sse(self, gens: list[Generation], asms: list[TurnAssembler], writers: list[ChunkWriter], *,
                   resume_at: int, include_usage: bool) -> AsyncIterator[bytes]:
        """The choices' events as they come (each event names its choice), then usage and [DONE]."""
        async for event in merged([self._choice_sse(*c, resume_at=resume_at) for c in zip(gens, asms, writers)]):
            yield event
        if include_usage:
            yield sse_event(writers[0].usage_chunk(gens[0].prompt_tokens, sum(a.generated for a in asms)))
        yield sse_event("[DONE]")

    async def _choice_sse(self, gen: Generation, asm: TurnAssembler, writer: ChunkWriter, *,
                          resume_at: int) -> AsyncIterator[bytes]:
        outcome = "cancelled"
        try:
            async for tok in gen:
                step = asm.push(tok)
                chunk = writer.step_chunk(step)  # also for skipped steps: the writer's state follows every token
                if chunk is not None and step.index >= resume_at:
                    yield sse_event(chunk, event_id(gen.chain_id, step.index))
                if asm.done:
                    break
            await self._record_tool_calls(gen, asm)
            outcome = "ok" if asm.done else "server_error"
        except Exception as e:  # the response has started: the error becomes an event, as vLLM sends it
            outcome = "server_error"
            yield sse_event(error_body(500, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            await gen.close(outcome, stop=asm.done)  # a stop string ends the turn; a gone client does not

    async def _collect(self, request: Request, gens: list[Generation],
                       asms: list[TurnAssembler]) -> list[list[TokenStep]] | None:
        """Every choice's whole turn, or None if the client disconnected first (the turns generate on: the client
        may read them later from their chains)."""

        async def collect(gen: Generation, asm: TurnAssembler) -> list[TokenStep]:
            steps: list[TokenStep] = []
            async for tok in gen:
                steps.append(asm.push(tok))
                if asm.done:
                    break
            await self._record_tool_calls(gen, asm)
            return steps

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(asyncio.gather(*(collect(g, a) for g, a in zip(gens, asms))))
        watch = asyncio.create_task(disconnected())
        outcome = "server_error"
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                outcome = "cancelled"
                return None
            collected = work.result()
            outcome = "ok" if all(a.done for a in asms) else "server_error"
            return collected
        finally:
            for task in (work, watch):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for gen, asm in zip(gens, asms):
                await gen.close(outcome, stop=asm.done)

    async def _record_tool_calls(self, gen: Generation, asm: TurnAssembler) -> None:
        """A finished turn's tool calls into the chain's transcript (idempotent, so replays may repeat it)."""
        calls = asm.tool_calls()
        if calls and asm.done:
            await self.core.record_tool_calls(gen.chain_id, gen.turn,
                                              [ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls])

    async def _record_transcript(self, gen: Generation, messages: list[dict[str, Any]], request: Request) -> None:
        """The conversation's tool calls into the chain's transcript, in conversation order: calls the client
        wrote itself (an agent replaying or scripting assistant turns) are recorded under the chain's previous
        turn, calls already recorded are skipped; then the tool results sent for calls that have none yet."""
        calls = [ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"].get("arguments") or "")
                 for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or ()]
        if calls:
            await self.core.record_tool_calls(gen.chain_id, max(gen.turn - 1, 0), calls)
        sent = {m["tool_call_id"]: m.get("content") for m in messages
                if m.get("role") == "tool" and isinstance(m.get("tool_call_id"), str)}
        if not sent:
            return
        chain = await self._chain(gen.chain_id, request)
        results = {c.id: _text(sent[c.id]) for c in chain.tool_calls if c.result is None and c.id in sent}
        if results:
            await self.core.record_tool_results(gen.chain_id, results)

    # ---- chains, models, probes

    async def _chain(self, chain_id: str, request: Request) -> Any:
        """The chain if the caller's tenant owns it; 404 as for a missing one otherwise."""
        try:
            return await self.core.get_chain(chain_id, request_tenant(request))
        except KeyError:
            raise APIError(404, f"no such chain: {chain_id!r}", param="chain_id", code="chain_not_found") from None

    async def get_chain(self, chain_id: str, request: Request) -> JSONResponse:
        return JSONResponse((await self._chain(chain_id, request)).model_dump(mode="json"))

    async def cancel_chain(self, chain_id: str, request: Request) -> JSONResponse:
        """Stops the chain's turn if this router generates it (a disconnect does not: chains are durable)."""
        await self._chain(chain_id, request)
        return JSONResponse({"id": chain_id, "object": "chain.cancel", "cancelled": await self.core.cancel(chain_id)})

    async def delete_chain(self, chain_id: str, request: Request) -> JSONResponse:
        if not await self.core.delete_chain(chain_id, request_tenant(request)):
            raise APIError(404, f"no such chain: {chain_id!r}", param="chain_id", code="chain_not_found")
        return JSONResponse({"id": chain_id, "object": "chain.deleted", "deleted": True})

    async def models(self) -> om.ModelList:
        return om.ModelList(data=[om.ModelCard(id=self.core.model_name, created=self.started,
                                               max_model_len=self.core.max_context)])

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        ready = self.core.ready()
        return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a content list."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def create_app(core: RouterCore, config: ServingConfig, metrics: Metrics) -> FastAPI:
    """The HTTP app; ValueError if `router.api_keys_file` is set but unreadable or empty."""
    keys = APIKeys(config.router.api_keys_file)
    api = _Api(core, config, metrics)
    app = FastAPI(title="k2serve", summary="OpenAI-compatible API of the k2serve router", version="1")
    install_error_handlers(app)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(BodyLimits, limits=config.router.limits)  # outermost: before anything reads the body

    app.add_api_route("/healthz", api.healthz, methods=["GET"], tags=["probes"])
    app.add_api_route("/readyz", api.readyz, methods=["GET"], tags=["probes"], responses={503: {}})
    app.add_api_route("/metrics", api.prometheus, methods=["GET"], tags=["probes"],
                      response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer_guard(keys, config.router.limits))], responses=_ERRORS)
    stream_doc = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}
    v1.add_api_route("/chat/completions", api.chat, methods=["POST"], response_model=om.ChatCompletion,
                     responses=stream_doc, openapi_extra=body_doc(om.ChatCompletionRequest))
    v1.add_api_route("/completions", api.completions, methods=["POST"], response_model=om.Completion,
                     responses=stream_doc, openapi_extra=body_doc(om.CompletionRequest))
    v1.add_api_route("/models", api.models, methods=["GET"], response_model=om.ModelList)
    v1.add_api_route("/chains/{chain_id}", api.get_chain, methods=["GET"])
    v1.add_api_route("/chains/{chain_id}", api.delete_chain, methods=["DELETE"])
    v1.add_api_route("/chains/{chain_id}/cancel", api.cancel_chain, methods=["POST"])
    v1.add_api_route("/chains/{chain_id}/stream", api.chain_stream, methods=["GET"],
                     response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    app.include_router(v1)
    documented_bodies(app, [om.ChatCompletionRequest, om.CompletionRequest])
    metrics.init_requests(sorted({getattr(route, "path", "other") for route in app.routes}))  # as RequestMetrics labels
    return app
