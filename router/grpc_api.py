"""The router's gRPC service (`k2serve.v1.Router`): a thin adapter from protos to `RouterCore`. Clients
authenticate as over HTTP (router/api_keys.py): with keys set, a call without a valid `authorization: Bearer <key>`
is refused UNAUTHENTICATED before its request is read, and a chain of another key's tenant is NOT_FOUND. The same
request limits hold as over HTTP (`router.limits`, router/request_checks.py): a message over `max_body_bytes` is
RESOURCE_EXHAUSTED unread, a request past another limit INVALID_ARGUMENT naming it, a key past its quota
RESOURCE_EXHAUSTED with `retry-after` (seconds) in the trailing metadata."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc

from k2serve import grpc_tls
from k2serve.cluster_auth import BearerInterceptor, bearer
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.router.api_keys import APIKeys
from k2serve.router.chains import NotFoundError
from k2serve.router.core import RouterCore
from k2serve.router.live import ChainToken
from k2serve.router.quotas import KeyLimits, RateLimited
from k2serve.router.request_checks import check_chain_id, check_request
from k2serve.proto.convert import sampling_from_proto
from k2serve.sampling_params import SamplingParams

RETRY_AFTER_KEY = "retry-after"


class RouterService(pb_grpc.RouterServicer):
    def __init__(self, core: RouterCore, keys: APIKeys) -> None:
        self.core = core
        self.keys = keys

    async def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant (the interceptor already refused calls without a valid key)."""
        tenant = self.keys.tenant(bearer(context.invocation_metadata()))
        if tenant is None:  # the key file rotated between the interceptor and here
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the API key is no longer valid")
            raise AssertionError("abort raises")
        return tenant

    async def _chain_id(self, chain_id: str, context: grpc.aio.ServicerContext) -> str:
        try:
            check_chain_id(self.core.config.router.limits, chain_id)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return chain_id

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateChunk]:
        if request.model and request.model not in self.core.model_aliases:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}; this router serves "
                                f"{self.core.model_name!r}")
        chain_id = await self._chain_id(request.chain_id, context)
        try:
            prompt = await asyncio.to_thread(self._prompt, request)  # templating + tokenizing: off the event loop
            params = self._sampling(request.sampling, len(prompt))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        limits: KeyLimits | None = self.keys.limits(bearer(context.invocation_metadata()),
                                                    self.core.config.router.limits)
        stream = self.core.generate(prompt, params, chain_id=chain_id or None,
                                    deterministic=request.deterministic, request_meta={"api": "grpc"},
                                    tenant=await self._tenant(context), limits=limits)
        async for chunk in self._answer(stream, context):
            yield chunk

    def _sampling(self, wire: pb.SamplingParams, prompt_len: int) -> SamplingParams:
        """The request's sampling; an unset max_tokens (0) is `router.limits.default_max_tokens`, at most what fits
        in the context (as over HTTP)."""
        if wire.max_tokens:
            return sampling_from_proto(wire)
        filled = pb.SamplingParams()
        filled.CopyFrom(wire)
        room = self.core.max_context - prompt_len
        filled.max_tokens = max(1, min(room, self.core.config.router.limits.default_max_tokens))
        return sampling_from_proto(filled)

    async def ResumeChain(self, request: pb.ResumeChainRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.GenerateChunk]:
        chain_id = await self._chain_id(request.chain_id, context)
        stream = self.core.resume(chain_id, request.from_index, await self._tenant(context))
        async for chunk in self._answer(stream, context):
            yield chunk

    async def _answer(self, stream: AsyncIterator[ChainToken], context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[pb.GenerateChunk]:
        """The turn's chunks; the core's refusals (raised before its first token) as gRPC status codes."""
        try:
            async for chunk in self._chunks(stream):
                yield chunk
        except NotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RateLimited as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e),
                                trailing_metadata=((RETRY_AFTER_KEY, str(e.retry_after_s)),))

    async def Cancel(self, request: pb.CancelChainRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        try:
            await self.core.get_chain(await self._chain_id(request.chain_id, context), await self._tenant(context))
        except NotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return pb.CancelResponse(cancelled=await self.core.cancel(request.chain_id))

    async def GetChain(self, request: pb.GetChainRequest, context: grpc.aio.ServicerContext) -> pb.ChainDocument:
        try:
            chain = await self.core.get_chain(await self._chain_id(request.chain_id, context),
                                              await self._tenant(context))
        except NotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return pb.ChainDocument(chain_id=chain.chain_id, json=chain.model_dump_json())

    def _prompt(self, request: pb.GenerateRequest) -> list[int]:
        if request.prompt_token_ids and request.chat_json:
            raise ValueError("give either prompt_token_ids or chat_json, not both")
        if request.prompt_token_ids:
            return list(request.prompt_token_ids)
        try:
            doc = json.loads(request.chat_json or "null")
        except json.JSONDecodeError as e:
            raise ValueError(f"chat_json is not valid JSON: {e}") from e
        if (not isinstance(doc, dict) or not isinstance(doc.get("messages"), list)
                or not isinstance(doc.get("tools") or [], list)):
            raise ValueError('chat_json must be an object with a "messages" list (and optionally a "tools" list)')
        check_request(self.core.config.router.limits, stop=[], messages=doc["messages"], tools=doc.get("tools"))
        return self.core.tokenizer.encode_chat(doc["messages"], tools=doc.get("tools"))

    async def _chunks(self, stream: AsyncIterator[ChainToken]) -> AsyncIterator[pb.GenerateChunk]:
        decoder = self.core.tokenizer.incremental_decoder()
        async for tok in stream:
            text = decoder.push([tok.token]) + (decoder.flush() if tok.finish_reason else "")
            yield pb.GenerateChunk(chain_id=tok.chain_id, turn=tok.turn, index=tok.index, token=tok.token, text=text,
                                   logprob=tok.logprob or 0.0, finish_reason=tok.finish_reason or "",
                                   prompt_tokens=tok.prompt_tokens)


async def start_router_server(core: RouterCore, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Serves the Router service; returns the started server and its bound port. ValueError if
    `router.api_keys_file` is set but unreadable or empty."""
    keys = APIKeys(core.config.router.api_keys_file)
    interceptors = [] if keys.open else [BearerInterceptor(
        lambda given: keys.tenant(given) is not None,
        "incorrect or missing API key: send metadata `authorization: Bearer <key>`")]
    # A message past the body limit is refused (RESOURCE_EXHAUSTED) before it is parsed.
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", core.config.router.limits.max_body_bytes)])
    pb_grpc.add_RouterServicer_to_server(RouterService(core, keys), server)
    bound = grpc_tls.bind(server, f"{host}:{port}", core.config.tls)
    if bound == 0:
        raise RuntimeError(f"router: cannot bind gRPC on {host}:{port}")
    await server.start()
    return server, bound
