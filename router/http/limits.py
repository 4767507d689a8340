"""Request limits of the HTTP front (`RouterConfig.limits`): the body's size and nesting, checked on the raw
bytes before anything parses them (a body past the size limit is not even read to its end), and the counts and
sizes inside a parsed request. Each refusal names its limit."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from k2serve.config import RequestLimits
from k2serve.router import request_checks
from k2serve.router.http.errors import APIError, error_body

# Structure outside strings: a string (escapes included) is one match, so brackets inside one never count.
_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]', re.DOTALL)
OFFLOAD_BYTES = 64 << 10


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays/objects in a JSON text (malformed text: whatever it nests)."""
    depth = deepest = 0
    for m in _STRUCTURE.finditer(body):
        c = m.group()[0]
        if c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


class BodyLimits:
    """ASGI middleware: 413 for a body over `max_body_bytes` (by Content-Length, or counted while it streams in),
    400 for one nested deeper than `max_json_depth`; the app gets the body only when it is within both."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        cap = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            await _refuse(send, 413, f"request body of {int(declared)} bytes exceeds the limit of {cap} bytes "
                          "(router.limits.max_body_bytes)", "max_body_bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                await _refuse(send, 413, f"request body exceeds the limit of {cap} bytes "
                              "(router.limits.max_body_bytes)", "max_body_bytes")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # A big body's scan on a worker thread: its Python loop yields the GIL, so streams go on meanwhile.
        depth = json_depth(body) if size <= OFFLOAD_BYTES else await asyncio.to_thread(json_depth, body)
        if depth > self.limits.max_json_depth:
            await _refuse(send, 400, f"request body nests {depth} levels deep; the limit is "
                          f"{self.limits.max_json_depth} (router.limits.max_json_depth)", "max_json_depth")
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    payload = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def check_request(limits: RequestLimits, *, stop: list[str], messages: list[dict[str, Any]] | None = None,
                  tools: list[dict[str, Any]] | None = None, prompt: Any = None) -> None:
    """400 naming the limit for a parsed request past one (router/request_checks.py)."""
    try:
        request_checks.check_request(limits, stop=stop, messages=messages, tools=tools, prompt=prompt)
    except request_checks.LimitExceeded as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None
