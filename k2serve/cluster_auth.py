"""Authentication of internal gRPC (router → worker groups, and any other call inside the deployment): a shared
cluster token, `ServingConfig.cluster_token_file`, sent as `authorization: Bearer <token>` metadata; a server given
the token refuses (UNAUTHENTICATED) every call without it, before reading the request. Tokens are compared as
sha256 digests with `hmac.compare_digest` (constant time, equal lengths)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from k2serve import grpc_tls
from k2serve.config import TLSConfig
from k2serve.watched_file import WatchedFile

AUTH_HEADER = "authorization"


def _parse_token(text: str) -> bytes:
    token = text.strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError("a cluster token file must hold one token (no whitespace inside)")
    return token.encode()


def digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The `Bearer` credential in gRPC metadata, or None."""
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            scheme, _, given = str(value).partition(" ")
            return given.strip() if scheme.lower() == "bearer" else None
    return None


class ClusterToken:
    """The cluster token, re-read when its file changes (rotation without restart: both sides re-read it)."""

    def __init__(self, path: str) -> None:
        self._file = WatchedFile(path, _parse_token)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTH_HEADER, f"Bearer {self._file.value().decode()}"),)

    def accepts(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(digest(given), digest(self._file.value()))


def cluster_token(path: str | None) -> ClusterToken | None:
    return ClusterToken(path) if path is not None else None


def refusing_handler(handler: grpc.RpcMethodHandler, detail: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers UNAUTHENTICATED without deserializing the request."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

    raw: dict[str, Any] = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **raw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **raw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **raw)
    return grpc.unary_unary_rpc_method_handler(refuse, **raw)


class BearerInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only when `accepts(bearer credential)`; others get UNAUTHENTICATED."""

    def __init__(self, accepts: Callable[[str | None], bool], detail: str) -> None:
        self._accepts = accepts
        self._detail = detail

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self._accepts(bearer(details.invocation_metadata)):
            return handler
        return refusing_handler(handler, self._detail)


def server_interceptors(token: ClusterToken | None) -> list[grpc.aio.ServerInterceptor]:
    if token is None:
        return []
    return [BearerInterceptor(token.accepts, "this service needs the cluster token "
                              "(`authorization: Bearer <token>`, ServingConfig.cluster_token_file)")]


class _SendsToken:
    """Adds the token (read at each call, so a rotated one is used at once) to a call's metadata."""

    def __init__(self, token: ClusterToken) -> None:
        self._token = token

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), *self._token.metadata())
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


# A channel files each interceptor under the first call kind it implements: one class per kind.
class _UnaryUnary(_SendsToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_SendsToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_SendsToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_SendsToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def internal_channel(address: str, token: ClusterToken | None, options: Sequence[tuple[str, Any]] = (),
                     tls: TLSConfig | None = None) -> grpc.aio.Channel:
    """A channel to an internal service that sends the cluster token on every call (when there is one), over TLS
    when `tls` is set (k2serve/grpc_tls.py)."""
    interceptors = ([kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
                    if token is not None else None)
    return grpc_tls.channel(address, tls, options, interceptors)
