"""The sampling surface agent frameworks drive through the official `openai` client, streaming and not, on the
random tiny-k2 (only the grammar can make its answers valid): response_format, tool_choice required / named,
parallel_tool_calls, penalties, min_p, logit_bias, stop_token_ids, the reasoning budget, and 400s for
generation-changing fields the server does not support."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from k2serve.config import ChainStoreConfig, RouterConfig, ServingConfig
from k2serve.router.http.uvicorn_runner import BackgroundServer
from k2serve.stack.inproc import local_app

MESSAGES = [{"role": "user", "content": "Answer in JSON."}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "tag", "n"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
             "additionalProperties": False}}}]
SCHEMAS = {"get_weather": CITY, "get_time": TOOLS[1]["function"]["parameters"]}
BUDGET = {"max_reasoning_tokens": 4}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    tmp: Path = tmp_path_factory.mktemp("sampling")
    config = ServingConfig(chain_store=ChainStoreConfig(sqlite_path=str(tmp / "chains.sqlite3")),
                           router=RouterConfig(aggregated=True))
    with BackgroundServer(lambda: local_app(config)) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)


def _complete(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, list[dict[str, Any]], str]:
    """(content, tool calls as {id, name, arguments}, finish_reason), streamed or not."""
    kwargs = {"model": "tiny-k2", "messages": MESSAGES, "temperature": 1.0, "max_tokens": 200, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in choice.message.tool_calls or ()]
        return choice.message.content or "", calls, choice.finish_reason
    content, calls, finish = "", {}, ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for c in ch.delta.tool_calls or ():
                call = calls.setdefault(c.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += c.id or ""
                call["name"] += (c.function.name or "") if c.function else ""
                call["arguments"] += (c.function.arguments or "") if c.function else ""
            finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_answers_validate(client: openai.OpenAI, stream: bool, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    content, calls, finish = _complete(client, stream, seed=seed, response_format=fmt, extra_body=BUDGET)
    assert finish == "stop" and not calls
    jsonschema.validate(json.loads(content), SCHEMA)


def test_json_object(client: openai.OpenAI) -> None:
    content, _, finish = _complete(client, False, seed=3, response_format={"type": "json_object"},
                                   extra_body={"max_reasoning_tokens": 0}, max_tokens=400)
    assert finish == "stop" and isinstance(json.loads(content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_calls(client: openai.OpenAI, stream: bool) -> None:
    for seed, choice, parallel in [(1, "required", None), (2, "required", False),
                                   (3, {"type": "function", "function": {"name": "get_time"}}, None)]:
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        _, calls, finish = _complete(client, stream, seed=seed, tools=TOOLS, tool_choice=choice, extra_body=BUDGET,
                                     max_tokens=800, **extra)
        assert finish == "tool_calls" and calls
        if parallel is False:
            assert len(calls) == 1
        for call in calls:
            if isinstance(choice, dict):
                assert call["name"] == "get_time"
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_penalties_bias_and_stop_tokens(client: openai.OpenAI) -> None:
    base = {"messages": MESSAGES, "model": "tiny-k2", "max_tokens": 6, "temperature": 0.0}
    forced = client.completions.create(model="tiny-k2", prompt="abc", max_tokens=5, temperature=0.0,
                                       logit_bias={"120": 100})
    assert forced.choices[0].text == "xxxxx"  # token 120 is the byte 'x' in the tiny vocabulary
    stopped = client.completions.create(model="tiny-k2", prompt="abc", max_tokens=5, temperature=0.0,
                                        logit_bias={"120": 100}, extra_body={"stop_token_ids": [120]})
    assert stopped.choices[0].finish_reason == "stop" and len(stopped.choices[0].text) <= 1
    plain = client.chat.completions.create(**base, seed=5)
    penalized = client.chat.completions.create(**base, seed=5, presence_penalty=2.0, frequency_penalty=2.0,
                                               extra_body={"repetition_penalty": 3.0, "min_p": 0.5})
    assert plain.choices[0].finish_reason and penalized.choices[0].finish_reason
    again = client.chat.completions.create(**base, seed=5, presence_penalty=2.0, frequency_penalty=2.0,
                                           extra_body={"repetition_penalty": 3.0, "min_p": 0.5})
    assert again.choices[0].message == penalized.choices[0].message


@pytest.mark.parametrize(("extra", "named"), [
    ({"guided_regex": "a+"}, "guided_regex"), ({"functions": [{"name": "f"}]}, "functions"),
    ({"n": 9}, "max_n"), ({"logit_bias": {"x": 1}}, "logit_bias"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"), ({"logit_bias": {"99999": 1}}, "logit_bias"),  # dividing by it would overflow the logits
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format"),
])
def test_unsupported_or_bad_fields_are_400(client: openai.OpenAI, extra: dict[str, Any], named: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-k2", messages=MESSAGES, max_tokens=4, extra_body=extra)
    assert named in str(e.value)


def test_server_reasoning_budget_is_the_chat_default() -> None:
    from k2serve.router.http.openai_models import ChatCompletionRequest, CompletionRequest
    from k2serve.router.http.prompts import sampling_params

    chat = ChatCompletionRequest(messages=MESSAGES)
    assert sampling_params(chat, 5, 100, top_logprobs=None, default_max_tokens=50, reasoning_budget=7).max_reasoning_tokens == 7
    own = ChatCompletionRequest(messages=MESSAGES, max_reasoning_tokens=0)
    assert sampling_params(own, 5, 100, top_logprobs=None, default_max_tokens=50, reasoning_budget=7).max_reasoning_tokens == 0
    raw = CompletionRequest(prompt="abc")  # a raw prompt has no thinking section of the server's making
    assert sampling_params(raw, 5, 100, top_logprobs=None, default_max_tokens=50, reasoning_budget=7).max_reasoning_tokens is None
