"""The router's gRPC service (`k2serve.v1.Router`): a thin adapter from protos to `RouterCore`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc

from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.router.chains import NotFoundError
from k2serve.router.core import ChainToken, RouterCore
from k2serve.proto.convert import sampling_from_proto


class RouterService(pb_grpc.RouterServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateChunk]:
        if request.model and request.model not in self.core.model_aliases:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}; this router serves "
                                f"{self.core.model_name!r}")
        try:
            prompt = self._prompt(request)
            params = sampling_from_proto(request.sampling)
            stream = self.core.generate(prompt, params, chain_id=request.chain_id or None,
                                        deterministic=request.deterministic, request_meta={"api": "grpc"})
            async for chunk in self._chunks(stream):
                yield chunk
        except NotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def ResumeChain(self, request: pb.ResumeChainRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.GenerateChunk]:
        try:
            async for chunk in self._chunks(self.core.resume(request.chain_id, request.from_index)):
                yield chunk
        except NotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def Cancel(self, request: pb.CancelChainRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        return pb.CancelResponse(cancelled=await self.core.cancel(request.chain_id))

    async def GetChain(self, request: pb.GetChainRequest, context: grpc.aio.ServicerContext) -> pb.ChainDocument:
        try:
            chain = await self.core.get_chain(request.chain_id)
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
        if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
            raise ValueError('chat_json must be an object with a "messages" list (and optionally "tools")')
        return self.core.tokenizer.encode_chat(doc["messages"], tools=doc.get("tools"))

    async def _chunks(self, stream: AsyncIterator[ChainToken]) -> AsyncIterator[pb.GenerateChunk]:
        decoder = self.core.tokenizer.incremental_decoder()
        async for tok in stream:
            text = decoder.push([tok.token]) + (decoder.flush() if tok.finish_reason else "")
            yield pb.GenerateChunk(chain_id=tok.chain_id, turn=tok.turn, index=tok.index, token=tok.token, text=text,
                                   logprob=tok.logprob or 0.0, finish_reason=tok.finish_reason or "",
                                   prompt_tokens=tok.prompt_tokens)


async def start_router_server(core: RouterCore, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Serves the Router service; returns the started server and its bound port."""
    server = grpc.aio.server()
    pb_grpc.add_RouterServicer_to_server(RouterService(core), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"router: cannot bind gRPC on {host}:{port}")
    await server.start()
    return server, bound
