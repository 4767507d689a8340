"""`k2serve agent`'s loop over the OpenAI streaming API: scripted SSE replies, the demo tools run locally."""

from __future__ import annotations

import io
import json

import httpx

from k2serve.agent_loop import run_agent
from k2serve.agent_tools import DEMO_TOOLS, DemoTools
from k2serve.router.agent import http_completer


def _sse(*deltas: dict, finish: str) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def test_agent_executes_the_streamed_call_and_prints_everything() -> None:
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if len(bodies) == 1:
            stream = _sse({"reasoning_content": "Use the calculator."},
                          {"tool_calls": [{"index": 0, "id": "functions.calculator:0", "type": "function",
                                           "function": {"name": "calculator", "arguments": ""}}]},
                          {"tool_calls": [{"index": 0, "function": {"arguments": '{"expression":"17 * 23"}'}}]},
                          finish="tool_calls")
        else:
            stream = _sse({"reasoning_content": "Done."}, {"content": "17 * 23 = 391."}, finish="stop")
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    out = io.StringIO()
    with httpx.Client(base_url="http://k2", transport=httpx.MockTransport(handler)) as client:
        run = run_agent("What is 17 * 23?", http_completer(client, "m", 64, out), DemoTools())
    assert run.answer == "17 * 23 = 391." and [c.result for c in run.calls] == ["391"]
    assert bodies[0]["tools"] == DEMO_TOOLS and bodies[0]["temperature"] == 0 and bodies[0]["stream"]
    second = bodies[1]["messages"]
    assert second[1]["tool_calls"][0]["function"]["arguments"] == '{"expression":"17 * 23"}'
    assert second[2] == {"role": "tool", "tool_call_id": "functions.calculator:0", "content": "391"}
    printed = out.getvalue()
    assert "Use the calculator." in printed and "calculator(" in printed and "17 * 23 = 391." in printed
