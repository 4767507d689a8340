"""The official `openai` client (and plain httpx for SSE details) against a real uvicorn server on loopback,
over a real router core on the tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from k2serve.config import ChainStoreConfig, RouterConfig, ServingConfig
from k2serve.router.chains import ToolCall
from k2serve.router.chains.sqlite_store import SqliteChainStore
from k2serve.router.http.uvicorn_runner import BackgroundServer
from k2serve.stack.inproc import local_app

MODEL = "tiny-k2"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _config(tmp: Path, **router: Any) -> ServingConfig:
    # Aggregated: one in-process group, no Ray; P/D dispatch is the core's concern (tests/router/test_pd.py).
    return ServingConfig(chain_store=ChainStoreConfig(sqlite_path=str(tmp / "chains.sqlite3")),
                         router=RouterConfig(aggregated=True, **router))


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("http")


@pytest.fixture(scope="module")
def url(stack_dir: Path) -> Iterator[str]:
    with BackgroundServer(lambda: local_app(_config(stack_dir))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _sse(response: httpx.Response) -> list[tuple[str | None, Any]]:
    """(event id, parsed data) per SSE event; `[DONE]` stays a string."""
    events: list[tuple[str | None, Any]] = []
    event_id: str | None = None
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
            events.append((event_id, data if data == "[DONE]" else json.loads(data)))
            event_id = None
    return events


def _assemble(chunks: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"content": "", "reasoning": "", "calls": {}, "finish": None, "usage": None}
    for c in chunks:
        if c.usage is not None:
            out["usage"] = c.usage.model_dump()
        for choice in c.choices:
            out["content"] += choice.delta.content or ""
            out["reasoning"] += getattr(choice.delta, "reasoning_content", None) or ""
            for call in choice.delta.tool_calls or []:
                slot = out["calls"].setdefault(call.index, ["", "", ""])
                slot[0] += call.id or ""
                slot[1] += (call.function.name or "") if call.function else ""
                slot[2] += (call.function.arguments or "") if call.function else ""
            out["finish"] = choice.finish_reason or out["finish"]
    return out


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["plain", "tools"])
def test_stream_concatenates_to_non_stream(client: openai.OpenAI, tools: list[dict[str, Any]] | None) -> None:
    """Same seed, same tokens: the second call's prompt is in the prefix cache, so it prefills a different
    split of rows, and only deterministic (batch-invariant) decoding promises the same bits then — as in
    vLLM's and SGLang's batch-invariant modes; the default mode's bf16 experts can move a sampled token."""
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "seed": 1234,
                              "temperature": 1.0, "extra_body": {"deterministic": True}}
    if tools:
        kwargs |= {"tools": tools, "tool_choice": "auto"}
    raw = client.chat.completions.with_raw_response.create(**kwargs)
    whole = raw.parse()
    assert raw.headers["x-k2-chain-id"]
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    got = _assemble(chunks)
    message = whole.choices[0].message
    assert got["content"] == (message.content or "")
    assert got["reasoning"] == (getattr(message, "reasoning_content", None) or "")
    assert got["reasoning"] + got["content"]  # the tiny model does say something
    assert [tuple(v) for _, v in sorted(got["calls"].items())] == [
        (c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
    assert got["finish"] == whole.choices[0].finish_reason
    assert got["usage"] == whole.usage.model_dump() and whole.usage.completion_tokens <= 24
    assert whole.usage.prompt_tokens > 10


def test_completions_token_prompt_with_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=[72, 105, 33, 32], max_tokens=8, temperature=0, logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == len(lp.tokens) <= 8
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy: the chosen token is the top one
    again = client.completions.create(model=MODEL, prompt="Hi! ", max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text  # "Hi! " is the same 4 byte tokens on the tiny model


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
               and bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content)


def test_client_errors(client: openai.OpenAI, url: str) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert nf.value.code == "model_not_found"
    # the name the stack was started with is the same model as the listed one
    started_as = client.chat.completions.create(model="builtin:tiny-k2", messages=MESSAGES, max_tokens=2)
    assert started_as.model == MODEL
    cases: list[tuple[dict[str, Any], str]] = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4, "n": 9}, "the limit is 8 (router.limits.max_n)"),
        ({"max_tokens": 10**6}, "maximum context length"),
        ({"max_tokens": 4, "temperature": -1}, "temperature"),
        ({"max_tokens": 4, "tools": [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]},
         "tools"),
        ({"max_tokens": 4, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "tools"),
        ({"max_tokens": 4, "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ]
    for extra, needle in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, **extra})
        assert needle in bad.value.message and bad.value.body["type"] == "invalid_request_error", (extra, bad.value)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model=MODEL, prompt=[1, 10**6], max_tokens=2)
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/chains/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "chain_not_found"


def test_chain_header_round_trip_and_delete(client: openai.OpenAI, url: str) -> None:
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4, seed=1)
    chain_id = first.headers["x-k2-chain-id"]
    reply = first.parse().choices[0].message
    follow = MESSAGES + [{"role": "assistant", "content": reply.content or "",
                          "reasoning_content": getattr(reply, "reasoning_content", None) or ""},
                         {"role": "user", "content": "And 3+3?"}]
    second = client.chat.completions.with_raw_response.create(model=MODEL, messages=follow, max_tokens=4, seed=2,
                                                              extra_headers={"X-K2-Chain-Id": chain_id})
    assert second.headers["x-k2-chain-id"] == chain_id
    third = client.chat.completions.with_raw_response.create(model=MODEL, messages=follow, max_tokens=4,
                                                             extra_body={"chain_id": chain_id})
    assert third.headers["x-k2-chain-id"] == chain_id
    chain = httpx.get(f"{url}/v1/chains/{chain_id}").json()
    assert chain["chain_id"] == chain_id and len(chain["turns"]) == 3
    assert httpx.delete(f"{url}/v1/chains/{chain_id}").status_code == 200
    assert httpx.get(f"{url}/v1/chains/{chain_id}").status_code == 404
    assert httpx.delete(f"{url}/v1/chains/{chain_id}").status_code == 404


def test_tool_results_go_into_the_transcript(url: str, stack_dir: Path) -> None:
    first = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "tools": TOOLS})
    chain_id = first.headers["x-k2-chain-id"]
    call = ToolCall(id="functions.get_weather:0", name="get_weather", arguments='{"city": "Paris"}')
    # The tiny model emits no real calls: record one as if turn 0 had, through a second handle on the store.
    with SqliteChainStore(stack_dir / "chains.sqlite3") as store:
        store.record_tool_calls(chain_id, 0, [call])
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": [{"type": "text", "text": "sunny, 21 C"}]},
        {"role": "tool", "tool_call_id": "functions.unknown:9", "content": "not ours"}]
    second = httpx.post(f"{url}/v1/chat/completions", headers={"X-K2-Chain-Id": chain_id},
                        json={"messages": history, "max_tokens": 3, "tools": TOOLS})
    assert second.status_code == 200, second.text
    chain = httpx.get(f"{url}/v1/chains/{chain_id}").json()
    assert [(c["id"], c["turn"], c["result"]) for c in chain["tool_calls"]] == [(call.id, 0, "sunny, 21 C")]


def test_resume_by_last_event_id_and_from(url: str) -> None:
    # No logprobs: the store keeps token ids only, so replayed tokens carry none.
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "seed": 99, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chain_id = r.headers["x-k2-chain-id"]
        events = _sse(r)
    assert events[-1] == (None, "[DONE]")
    ids = [int(e[0].rsplit(":", 1)[1]) for e in events[:-1]]
    assert ids == sorted(ids) and all(e[0].startswith(f"{chain_id}:") for e in events[:-1])
    cut = len(events) // 2
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Last-Event-ID": events[cut - 1][0]}) as r:
        rest = _sse(r)
    assert rest == events[cut:]  # the same chunks, byte for byte as JSON, from the next token on

    generated = httpx.get(f"{url}/v1/chains/{chain_id}").json()["turns"][-1]["generated"]
    assert len(generated) == 20
    n = 7
    with httpx.stream("GET", f"{url}/v1/chains/{chain_id}/stream", params={"from": n}, timeout=60) as r:
        raw = _sse(r)
    assert [d["token"] for _, d in raw[:-1]] == generated[n:]
    assert [i for i, _ in raw[:-1]] == [f"{chain_id}:{k}" for k in range(n, 20)]
    with httpx.stream("GET", f"{url}/v1/chains/{chain_id}/stream", timeout=60,
                      headers={"Last-Event-ID": f"{chain_id}:{n}"}) as r:
        assert [d["token"] for _, d in _sse(r)[:-1]] == generated[n + 1:]
    bad = httpx.get(f"{url}/v1/chains/{chain_id}/stream", headers={"Last-Event-ID": "other:3"})
    assert bad.status_code == 400


def test_disconnect_leaves_the_turn_generating_until_cancelled(url: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        chain_id = r.headers["x-k2-chain-id"]
        next(r.iter_lines())
    # The chain is durable: the closed connection does not stop it, and a second reader follows it live.
    with httpx.stream("GET", f"{url}/v1/chains/{chain_id}/stream", params={"from": 0}, timeout=60) as r:
        got: list[int] = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:])["index"])
                if len(got) == 40:
                    break
    assert got == list(range(40))
    assert httpx.get(f"{url}/v1/chains/{chain_id}").json()["turns"][-1]["status"] == "running"
    cancel = httpx.post(f"{url}/v1/chains/{chain_id}/cancel")
    assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
    turn = httpx.get(f"{url}/v1/chains/{chain_id}").json()["turns"][-1]
    assert turn["status"] == "cancelled" and 40 <= len(turn["generated"]) < 2000
    assert httpx.post(f"{url}/v1/chains/{chain_id}/cancel").json()["cancelled"] is False
    assert httpx.post(f"{url}/v1/chains/no-such-chain/cancel").status_code == 404


def test_probes_and_metrics(client: openai.OpenAI, url: str) -> None:
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    text = httpx.get(f"{url}/metrics").text
    assert 'k2serve_requests_total{endpoint="/v1/chat/completions",outcome="ok"}' in text
    assert 'k2serve_requests_total{endpoint="/v1/models",outcome="ok"}' in text
    assert "k2serve_time_to_first_token_seconds_count" in text and "k2serve_router_inflight_requests 0.0" in text


def test_api_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-alpha\n\nsk-beta\n")
    config = _config(tmp_path, api_keys_file=str(keys))
    with BackgroundServer(lambda: local_app(config)) as base:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        bad = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sk-gamma"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        for key in ("sk-alpha", "sk-beta"):
            ok = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            assert ok.models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="sk-alph", max_retries=0).chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=2)
        assert all(httpx.get(f"{base}{p}").status_code == 200 for p in ("/healthz", "/readyz", "/metrics"))
