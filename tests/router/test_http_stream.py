"""Pure parts of the HTTP front: token → OpenAI assembly, stop strings, event ids, request → sampling."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from helpers.tiny import tiny_tokenizer
from pydantic import ValidationError

from k2serve.router.http.errors import APIError
from k2serve.router.http.k2_parse import parse_k2_output
from k2serve.router.http.openai_models import ChatCompletionRequest, CompletionRequest
from k2serve.router.http.prompts import check_model, completion_prompt, sampling_params
from k2serve.router.http.stream import (ChunkWriter, StopStrings, TurnAssembler, chat_logprobs, chat_message,
                                        completion_logprobs, parse_event_id)

K2_OUTPUT = ("<think>Let me check é the weather.</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>"
             "functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|>"
             "<|tool_call_begin|>functions.lookup:1<|tool_call_argument_begin|>{\"q\": 1}<|tool_call_end|>"
             "<|tool_calls_section_end|>")


@dataclass
class Tok:
    chain_id: str
    turn: int
    index: int
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None
    prompt_tokens: int = 3


def _tokens(ids: list[int], finish: str = "stop") -> list[Tok]:
    return [Tok("c1", 0, i, t, -0.5 - i, [(t, -0.5 - i), (65, -3.0)], finish if i == len(ids) - 1 else None)
            for i, t in enumerate(ids)]


def _assembler(chat: bool = True, stops: list[str] | None = None, top: int | None = None) -> TurnAssembler:
    tok = tiny_tokenizer()
    return TurnAssembler(tok, stop_token_ids=set(tok.eos_ids), stop_strings=stops or [], chat=chat, top_logprobs=top)


def _accumulate(chunks: list[dict]) -> dict:
    """What an OpenAI client assembles from chat.completion.chunk deltas."""
    out: dict = {"content": "", "reasoning_content": "", "tool_calls": {}}
    for c in chunks:
        delta = c["choices"][0]["delta"]
        out["content"] += delta.get("content") or ""
        out["reasoning_content"] += delta.get("reasoning_content") or ""
        for call in delta.get("tool_calls", []):
            slot = out["tool_calls"].setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
            slot["id"] = call.get("id") or slot["id"]
            slot["name"] += call["function"].get("name") or ""
            slot["arguments"] += call["function"]["arguments"]
    return out


def test_chat_steps_match_whole_parse_and_strip_eos() -> None:
    tok = tiny_tokenizer()
    ids = tok.encode(K2_OUTPUT) + [tok.token_id("[EOS]")]
    asm = _assembler()
    steps = [asm.push(t) for t in _tokens(ids)]
    message = chat_message(steps)
    whole = parse_k2_output(K2_OUTPUT)
    assert message["reasoning_content"] == whole.reasoning_content == "Let me check é the weather."
    assert message["content"] == whole.content == "Checking."
    assert message["tool_calls"] == [c.to_openai() for c in whole.tool_calls]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "lookup"]
    assert steps[-1].finish_reason == "tool_calls" and asm.done
    assert asm.generated == len(ids)  # the stop token is counted, not shown
    assert "[EOS]" not in "".join(s.text for s in steps)
    with pytest.raises(ValueError, match="after the turn ended"):
        asm.push(_tokens(ids)[0])


def test_streamed_chunks_concatenate_to_the_message() -> None:
    tok = tiny_tokenizer()
    ids = tok.encode(K2_OUTPUT) + [tok.token_id("<|im_end|>")]
    asm = _assembler()
    writer = ChunkWriter("chatcmpl-x", 1, "m", chat=True, logprobs=False)
    steps = [asm.push(t) for t in _tokens(ids)]
    chunks = [c for s in steps if (c := writer.step_chunk(s)) is not None]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("tool_calls") == 1
    got = _accumulate(chunks)
    message = chat_message(steps)
    assert got["content"] == message["content"] and got["reasoning_content"] == message["reasoning_content"]
    assert [(c["id"], c["name"], c["arguments"]) for c in got["tool_calls"].values()] == [
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    # A multi-byte character split over byte tokens comes out whole, once.
    assert sum(s.text.count("é") for s in steps) == 1


def test_stop_strings_cut_and_hold_back() -> None:
    stops = StopStrings(["STOP", "xyz"])
    assert stops.feed("hello ST", final=False) == ("hello ", False)  # "ST" could still become "STOP"
    assert stops.feed("ARS", final=False) == ("STAR", False)  # "S" could start "STOP" again
    assert stops.feed("T STOP tail", final=False) == ("ST ", True)
    assert StopStrings([]).feed("abc", final=False) == ("abc", False)
    assert StopStrings(["xy"]).feed("abx", final=True) == ("abx", False)

    tok = tiny_tokenizer()
    asm = _assembler(chat=False, stops=["STOP"])
    steps = []
    for t in _tokens(tok.encode("one two STOP three"), finish="length"):
        steps.append(asm.push(t))
        if asm.done:
            break
    assert "".join(s.text for s in steps) == "one two "
    assert steps[-1].finish_reason == "stop" and steps[-1].index == len(tok.encode("one two STOP")) - 1


def test_length_finish_flushes_held_text() -> None:
    tok = tiny_tokenizer()
    asm = _assembler(chat=False, stops=["STOP"])
    steps = [asm.push(t) for t in _tokens(tok.encode("abc ST"), finish="length")]
    assert "".join(s.text for s in steps) == "abc ST" and steps[-1].finish_reason == "length"


def test_logprob_shapes() -> None:
    tok = tiny_tokenizer()
    ids = tok.encode("hi") + [tok.token_id("[EOS]")]
    asm = _assembler(chat=True, top=1)
    steps = [asm.push(t) for t in _tokens(ids)]
    content = chat_logprobs(steps)["content"]
    assert [e["token"] for e in content] == ["h", "i"]  # the stop token has no entry
    assert content[0] == {"token": "h", "logprob": -0.5, "bytes": [104],
                          "top_logprobs": [{"token": "h", "logprob": -0.5, "bytes": [104]}]}
    legacy = completion_logprobs(steps)
    assert legacy == {"tokens": ["h", "i"], "token_logprobs": [-0.5, -1.5],
                      "top_logprobs": [{"h": -0.5}, {"i": -1.5}], "text_offset": [0, 1]}
    no_lp = _assembler(chat=True, top=None)
    assert all(no_lp.push(t).logprob is None for t in _tokens(ids))


def test_event_ids() -> None:
    assert parse_event_id("chain-a:b:12") == ("chain-a:b", 12)
    for bad in ("12", "abc:", ":3", "x:-1", "x:1.5"):
        with pytest.raises(ValueError, match="Last-Event-ID"):
            parse_event_id(bad)


def test_requests_to_sampling() -> None:
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_completion_tokens=5,
                                 max_tokens=9, seed=3, temperature=0.5, logprobs=True, top_logprobs=2)
    params = sampling_params(chat, prompt_len=10, max_context=100, top_logprobs=2, default_max_tokens=50)
    assert (params.max_tokens, params.seed, params.temperature, params.logprobs, params.top_logprobs) == \
        (5, 3, 0.5, True, 2)
    assert sampling_params(ChatCompletionRequest(messages=[{"role": "user"}]), 10, 100,
                           top_logprobs=None, default_max_tokens=1000).max_tokens == 90  # what fits
    assert sampling_params(ChatCompletionRequest(messages=[{"role": "user"}]), 10, 100,
                           top_logprobs=None, default_max_tokens=50).max_tokens == 50  # the default budget
    with pytest.raises(APIError) as err:
        sampling_params(chat, prompt_len=98, max_context=100, top_logprobs=None, default_max_tokens=50)
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    assert "98 in the prompt" in str(err.value)
    with pytest.raises(APIError, match="maximum context length is 100"):
        sampling_params(ChatCompletionRequest(messages=[{"role": "user"}]), 100, 100, top_logprobs=None,
                        default_max_tokens=50)
    with pytest.raises(APIError) as err:
        check_model("gpt-4", "tiny-k2")
    assert err.value.status == 404 and err.value.code == "model_not_found"
    check_model(None, "tiny-k2")
    for bad, field in [({"n": 129}, "n"), ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"top_logprobs": 2}, "top_logprobs"),
                       ({"tool_choice": "required"}, "tool_choice"), ({"stop": [""]}, "stop"),
                       ({"temperature": 3}, "temperature"), ({"messages": []}, "messages")]:
        with pytest.raises(ValidationError, match=field):
            ChatCompletionRequest.model_validate({"messages": [{"role": "user"}], **bad})


def test_completion_prompts() -> None:
    tok = tiny_tokenizer()
    assert completion_prompt(tok, CompletionRequest(prompt=[1, 2, 3])) == [1, 2, 3]
    assert completion_prompt(tok, CompletionRequest(prompt=[[4, 5]])) == [4, 5]
    assert completion_prompt(tok, CompletionRequest(prompt="ab")) == [97, 98]
    # Special-token text in a plain prompt is text, not a control token.
    assert completion_prompt(tok, CompletionRequest(prompt="<think>")) == list(b"<think>")
    with pytest.raises(APIError, match=r"outside the vocabulary \[0, 512\)"):
        completion_prompt(tok, CompletionRequest(prompt=[1, 100000]))
    for bad in ({"prompt": ["a", "b"]}, {"prompt": ""}, {"prompt": "a", "echo": True}, {"prompt": "a", "best_of": 2},
                {"prompt": "a", "logprobs": 6}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)
