"""Every request limit (`router.limits`) at the limit and one past it, over a real uvicorn server: past it a
4xx that names the limit, before any turn starts (the chain store gains no chain). Plus inputs that once gave
500s — deep nesting, lone surrogates, invalid UTF-8, huge numbers — now 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from k2serve.config import ChainStoreConfig, RequestLimits, RouterConfig, ServingConfig
from k2serve.router.chains.sqlite_store import SqliteChainStore
from k2serve.router.http.limits import json_depth
from k2serve.router.http.uvicorn_runner import BackgroundServer
from k2serve.stack.inproc import local_app

LIMITS = RequestLimits(max_body_bytes=64 << 10, max_json_depth=12, max_messages=6, max_tools=3,
                       max_tool_schema_bytes=512, max_stop_strings=2, max_stop_chars=8, default_max_tokens=5,
                       max_turns_per_chain=2)
USER = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("limits")
    config = ServingConfig(chain_store=ChainStoreConfig(sqlite_path=str(tmp / "chains.sqlite3")),
                           router=RouterConfig(aggregated=True, limits=LIMITS))
    with BackgroundServer(lambda: local_app(config)) as base:
        yield base, tmp / "chains.sqlite3"


def chains(db: Path) -> int:
    with SqliteChainStore(str(db)) as store:
        return len(store.list_chains(limit=10_000))


def chat(url: str, **body: Any) -> httpx.Response:
    doc = json.dumps({"messages": [USER], "max_tokens": 2, **body}).encode()  # sent as measured
    return httpx.post(f"{url}/v1/chat/completions", content=doc, headers={"content-type": "application/json"},
                      timeout=60)


def tool(name: str, pad: int = 0) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": "x" * pad,
                                             "parameters": {"type": "object", "properties": {}}}}


def tool_bytes(t: dict[str, Any]) -> int:
    # What the router measures: the tool as the model sees it (pydantic dump, no nulls).
    return len(json.dumps(t, ensure_ascii=False).encode())


def nested(depth: int) -> dict[str, Any]:
    """A chat body nesting `depth` levels (its outer object and messages list count as 2)."""
    inner: Any = "x"
    for _ in range(depth - 3):
        inner = [inner]
    return {"messages": [{"role": "user", "content": "hi", "extra": inner}], "max_tokens": 2}


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth(b'{"a": "[[[{{{", "b": [1, {"c": "\\"]]"}]}') == 3
    assert json_depth(b"[]") == 1 and json_depth(b'"x"') == 0


@pytest.mark.parametrize("case", ["messages", "tools", "tool_schema", "stop_count", "stop_chars", "depth", "body"])
def test_each_limit_at_and_past_it(served: tuple[str, Path], case: str) -> None:
    url, db = served
    small = tool("t")
    big = tool("t", LIMITS.max_tool_schema_bytes - tool_bytes(small))
    assert tool_bytes(big) == LIMITS.max_tool_schema_bytes
    over = tool("t", LIMITS.max_tool_schema_bytes - tool_bytes(small) + 1)
    # Padding in a field the API ignores (`user`), so the body's size is all that matters.
    at_body: dict[str, Any] = {"messages": [USER], "max_tokens": 2, "user": ""}
    at_body["user"] = "x" * (LIMITS.max_body_bytes - len(json.dumps(at_body).encode()))
    past_body = {**at_body, "user": at_body["user"] + "x"}
    bodies: dict[str, tuple[dict[str, Any], dict[str, Any], int, str]] = {
        "messages": ({"messages": [USER] * LIMITS.max_messages}, {"messages": [USER] * (LIMITS.max_messages + 1)},
                     400, "max_messages"),
        "tools": ({"tools": [small] * LIMITS.max_tools}, {"tools": [small] * (LIMITS.max_tools + 1)}, 400,
                  "max_tools"),
        "tool_schema": ({"tools": [big]}, {"tools": [over]}, 400, "max_tool_schema_bytes"),
        "stop_count": ({"stop": ["a"] * LIMITS.max_stop_strings}, {"stop": ["a"] * (LIMITS.max_stop_strings + 1)},
                       400, "max_stop_strings"),
        "stop_chars": ({"stop": "s" * LIMITS.max_stop_chars}, {"stop": "s" * (LIMITS.max_stop_chars + 1)}, 400,
                       "max_stop_chars"),
        "depth": (nested(LIMITS.max_json_depth), nested(LIMITS.max_json_depth + 1), 400, "max_json_depth"),
        "body": (at_body, past_body, 413, "max_body_bytes"),
    }
    at, past, status, code = bodies[case]
    if case == "body":
        assert len(json.dumps({"messages": [USER], "max_tokens": 2, **at}).encode()) == LIMITS.max_body_bytes
    ok = chat(url, **at)
    assert ok.status_code == 200, ok.text
    before = chains(db)
    refused = chat(url, **past)
    assert refused.status_code == status, refused.text
    assert refused.json()["error"]["code"] == code or code in refused.text
    assert chains(db) == before  # refused before any turn started


def test_a_20_mb_body_is_refused_unread_and_unstored(served: tuple[str, Path]) -> None:
    url, db = served
    before = chains(db)
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (20 << 20)}]}).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        for i in range(0, len(body), 1 << 20):
            yield body[i:i + (1 << 20)]

    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413
    assert chains(db) == before


def test_default_max_tokens_and_turns_per_chain(served: tuple[str, Path]) -> None:
    url, _ = served
    first = httpx.post(f"{url}/v1/chat/completions", json={"messages": [USER], "ignore_eos": True}, timeout=60)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == LIMITS.default_max_tokens
    chain = first.headers["X-K2-Chain-Id"]
    assert chat(url, chain_id=chain).status_code == 200  # turn 2 of 2
    third = chat(url, chain_id=chain)
    assert third.status_code == 400 and "max_turns_per_chain" in third.text


@pytest.mark.parametrize("raw", [
    b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8
    b'{"messages": [{"role": "user", "content": "hi"}], "tools": ' + b"[" * 900 + b"]" * 900 + b"}",
    json.dumps({"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": \"\\ud800\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}).replace("\\\\ud800", "\\ud800").encode(),
    b'{"messages": [{"role": "user", "content": "\\udc00"}]}',  # a lone surrogate in content
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 400 + b"}",
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": -' + b"9" * 40 + b"}",
], ids=["invalid_utf8", "nested_900", "surrogate_in_tool_args", "surrogate_in_content", "huge_int",
        "inf_float", "huge_seed"])
def test_inputs_that_gave_500_give_4xx_before_a_turn(served: tuple[str, Path], raw: bytes) -> None:
    url, db = served
    before = chains(db)
    r = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert chains(db) == before


def test_templating_and_tokenizing_run_off_the_event_loop(served: tuple[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A big conversation's template and tokenizer run on a worker thread, not the loop every stream shares: the
    thread that runs them is one of asyncio's worker threads, not the server's loop thread (`k2serve-http`)."""
    import threading

    from k2serve.k2format.tokenizer import K2Tokenizer

    url, _ = served
    threads: dict[str, str] = {}
    encode = K2Tokenizer.encode_chat

    def spy(self: K2Tokenizer, *args: Any, **kwargs: Any) -> list[int]:
        threads["encode_chat"] = threading.current_thread().name
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(K2Tokenizer, "encode_chat", spy)
    assert chat(url).status_code == 200
    assert threads["encode_chat"].startswith("asyncio_"), threads
