"""`k2serve chat "…"`: one streamed chat request to a running stack (`make up` or `k2serve up`); prints the
thinking, the tool calls and the answer as they arrive.

Model text is printed with control characters escaped (k2serve.terminal), so whatever a model emits cannot drive
the terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import httpx

from k2serve.errors import UserError
from k2serve.helptext import summary
from k2serve.terminal import printable


def stream_chat(client: httpx.Client, body: dict[str, Any], out: TextIO) -> dict[str, Any]:
    """Streams one chat completion to `out`; returns {"reasoning", "content", "tool_calls", "finish_reason"}."""
    result: dict[str, Any] = {"reasoning": "", "content": "", "tool_calls": {}, "finish_reason": None}
    section = ""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data: "):]).get("choices", []):
                delta = choice.get("delta", {})
                for key, title in (("reasoning_content", "thinking"), ("content", "answer")):
                    if delta.get(key):
                        if section != title:
                            out.write(f"\n[{title}]\n")
                            section = title
                        out.write(printable(delta[key]))
                        result["reasoning" if key == "reasoning_content" else "content"] += delta[key]
                for call in delta.get("tool_calls") or []:
                    slot = result["tool_calls"].setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                    fn = call.get("function", {})
                    slot["id"] = call.get("id") or slot["id"]
                    slot["name"] = fn.get("name") or slot["name"]
                    slot["arguments"] += fn.get("arguments") or ""
                result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
                out.flush()
    for i, call in sorted(result["tool_calls"].items()):
        out.write(printable(f"\n[tool call {i}] {call['name']}({call['arguments']}) id={call['id']}"))
    out.write(f"\n[finish: {result['finish_reason']}]\n")
    result["tool_calls"] = [c for _, c in sorted(result["tool_calls"].items())]
    return result


def add_client_args(ap: argparse.ArgumentParser) -> None:
    """The options every client command shares: where the stack is, which model, which key."""
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the router's HTTP address (http://127.0.0.1:8000)")
    ap.add_argument("--model", help="model name (default: the first in /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("K2SERVE_API_KEY"), help="bearer key ($K2SERVE_API_KEY)")


@contextmanager
def connected(args: argparse.Namespace) -> Iterator[tuple[httpx.Client, str]]:
    """A client of the stack at --url and the model to ask; any failure is one UserError naming the URL."""
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(600, connect=5)) as client:
            yield client, args.model or client.get("/v1/models").raise_for_status().json()["data"][0]["id"]
    except (httpx.HTTPError, RuntimeError, OSError, ValueError) as e:
        raise request_failed(args.url, e) from e


def request_failed(url: str, e: Exception) -> UserError:
    """The one-line error for a request to a stack that failed; for no stack at all, how to start one."""
    if isinstance(e, httpx.ConnectError):
        return UserError(f"no k2serve stack answers at {url} ({e}); start one with `make up` or `k2serve up` in "
                         "another terminal, or pass --url")
    return UserError(f"request to {url} failed: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve chat", description=summary(__doc__))
    ap.add_argument("message", help="the user message")
    add_client_args(ap)
    ap.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate, thinking included (256)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0, as K2 Thinking "
                    "recommends; 0 is greedy)")
    ap.add_argument("--seed", type=int, help="sampling seed, for a reproducible answer")
    ap.add_argument("--tools", type=Path, help="JSON file with an OpenAI `tools` list (the demo's: "
                    "k2serve/demo_tools.json)")
    args = ap.parse_args(argv)
    with connected(args) as (client, model):
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": args.message}],
                                "max_tokens": args.max_tokens, "temperature": args.temperature}
        if args.seed is not None:
            body["seed"] = args.seed
        if args.tools:
            body["tools"] = json.loads(args.tools.read_text())
        stream_chat(client, body, sys.stdout)
    return 0
