"""Generated tokens → OpenAI output, one token at a time, for streamed and whole responses alike.

`TurnAssembler` turns each token into a `TokenStep` (the text it releases, parsed into K2 deltas for chat,
and its logprobs); a whole response is the merge of every step, a stream sends one event per step. So the
streamed deltas add up to the non-streamed answer by construction, and replaying a turn's tokens gives the
same steps at the same indices, which is what lets a client resume at a token index (`Last-Event-ID`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from k2serve.router.http.k2_parse import K2StreamParser, ParsedToolCall, StreamDelta, _held_tail, merge_deltas
from k2serve.k2format.tokenizer import K2Tokenizer

T = TypeVar("T")


class TokenLike(Protocol):
    """What the core yields per generated token (`ChainToken`)."""

    chain_id: str
    turn: int
    index: int
    token: int
    logprob: float | None  # None for tokens replayed from the chain store
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None
    prompt_tokens: int


@dataclass(frozen=True)
class Logprob:
    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]]  # most likely first


@dataclass(frozen=True)
class TokenStep:
    index: int
    text: str  # text this token released (after stop strings), before K2 parsing
    deltas: list[StreamDelta]  # chat only: `text` parsed
    logprob: Logprob | None  # None for a stop token or when not asked
    finish_reason: str | None  # set on the last step


class StopStrings:
    """Cuts the text at the first stop string, holding back a tail that could still become one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = tuple(stops)
        self._buffer = ""

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        """(text now certain to be output, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._buffer += text
        hits = [pos for s in self._stops if (pos := self._buffer.find(s)) >= 0]
        if hits:
            out, self._buffer = self._buffer[:min(hits)], ""
            return out, True
        keep = 0 if final else _held_tail(self._buffer, self._stops)
        out = self._buffer[:len(self._buffer) - keep]
        self._buffer = self._buffer[len(out):]
        return out, False


class TurnAssembler:
    """Feeds one turn's tokens, in index order, through detokenizer → stop strings → (chat) K2 parser."""

    def __init__(self, tokenizer: K2Tokenizer, *, stop_token_ids: set[int], stop_strings: list[str],
                 chat: bool, top_logprobs: int | None, tools: list[dict[str, Any]] | None = None) -> None:
        self._tokenizer = tokenizer
        self._decoder = tokenizer.incremental_decoder(skip_special=False)  # K2 markers are special tokens
        self._stop_ids = stop_token_ids
        self._stops = StopStrings(stop_strings)
        # The request's tools name calls whose id lacks the function name (see k2_parse).
        self._parser = K2StreamParser(tools) if chat else None
        self._top_logprobs = top_logprobs  # None: no logprobs at all
        self._call_deltas: list[StreamDelta] = []
        self.generated = 0  # tokens consumed, stop tokens included (usage counts them, as vLLM does)
        self.done = False

    def push(self, tok: TokenLike) -> TokenStep:
        if self.done:
            raise ValueError(f"token {tok.index} after the turn ended")
        self.generated += 1
        is_stop_token = tok.finish_reason == "stop" and tok.token in self._stop_ids
        finish = tok.finish_reason
        text, hit = self._stops.feed("" if is_stop_token else self._decoder.push([tok.token]), final=False)
        if not hit and finish is not None:
            tail, hit = self._stops.feed(self._decoder.flush(), final=True)
            text += tail
        if hit:
            finish = "stop"
        deltas: list[StreamDelta] = []
        if self._parser is not None:
            deltas = self._parser.feed(text)
            if finish is not None:
                deltas += self._parser.finish()
            self._call_deltas += [d for d in deltas if d.tool_call is not None]
            if finish == "stop" and self._call_deltas:
                finish = "tool_calls"
        self.done = finish is not None
        logprob = None if is_stop_token or self._top_logprobs is None or tok.logprob is None else self._logprob(tok)
        return TokenStep(tok.index, text, deltas, logprob, finish)

    def tool_calls(self) -> list[ParsedToolCall]:
        """The calls parsed so far (chat)."""
        return merge_deltas(self._call_deltas).tool_calls

    def _logprob(self, tok: TokenLike) -> Logprob:
        assert tok.logprob is not None
        top = [(*self._token_text(t), lp) for t, lp in (tok.top_logprobs or [])[:self._top_logprobs]]
        return Logprob(*self._token_text(tok.token), tok.logprob, top)  # type: ignore[arg-type]

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        raw = self._tokenizer.decode_bytes([token])
        return raw.decode("utf-8", errors="replace"), list(raw)


# ---- OpenAI shapes


def chat_logprobs(steps: list[TokenStep]) -> dict[str, Any]:
    return {"content": [
        {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
         "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, b, v in lp.top]}
        for s in steps if (lp := s.logprob) is not None
    ]}


def completion_logprobs(steps: list[TokenStep], text_offset: int = 0) -> dict[str, Any]:
    """vLLM/OpenAI legacy shape; `text_offset` is where the first step's text starts in the whole output."""
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    for s in steps:
        if s.logprob is not None:
            tokens.append(s.logprob.token)
            values.append(s.logprob.logprob)
            top: dict[str, float] = {}
            for t, _, v in s.logprob.top:  # tokens that decode alike (partial UTF-8) keep the likeliest
                top.setdefault(t, v)
            tops.append(top)
            offsets.append(text_offset)
        text_offset += len(s.text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_delta(deltas: list[StreamDelta]) -> dict[str, Any]:
    """One `delta` object carrying every piece a token released (fields are accumulated separately by clients)."""
    out: dict[str, Any] = {}
    reasoning = "".join(d.reasoning_content for d in deltas if d.reasoning_content)
    content = "".join(d.content for d in deltas if d.content)
    if reasoning:
        out["reasoning_content"] = reasoning
    if content:
        out["content"] = content
    calls = [d.tool_call.to_openai() for d in deltas if d.tool_call is not None]
    if calls:
        out["tool_calls"] = calls
    return out


def chat_message(steps: list[TokenStep]) -> dict[str, Any]:
    parsed = merge_deltas([d for s in steps for d in s.deltas])
    return {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning_content,
            "tool_calls": [c.to_openai() for c in parsed.tool_calls]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ChunkWriter:
    """Builds the SSE events of one streamed response."""

    completion_id: str
    created: int
    model: str
    chat: bool
    logprobs: bool
    index: int = 0  # the choice's
    _text_offset: int = 0
    _sent_role: bool = field(default=False)

    def step_chunk(self, step: TokenStep) -> dict[str, Any] | None:
        """The chunk for one token, or None when it released nothing a client would see."""
        if not (step.text or step.deltas or step.logprob or step.finish_reason):
            return None
        choice: dict[str, Any] = {"index": self.index, "finish_reason": step.finish_reason}
        if self.chat:
            delta = chat_delta(step.deltas)
            if not self._sent_role:
                delta = {"role": "assistant", **delta}
                self._sent_role = True
            choice |= {"delta": delta, "logprobs": chat_logprobs([step]) if self.logprobs else None}
        else:
            choice |= {"text": step.text,
                       "logprobs": completion_logprobs([step], self._text_offset) if self.logprobs else None}
            self._text_offset += len(step.text)
        return self._chunk([choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._chunk([]) | {"usage": usage(prompt_tokens, completion_tokens)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.completion_id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}


def sse_event(data: dict[str, Any] | str, event_id: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {body}\n\n".encode()


def event_id(chain_id: str, index: int) -> str:
    return f"{chain_id}:{index}"


def parse_event_id(value: str) -> tuple[str, int]:
    """`<chain_id>:<index>` → (chain_id, index); ValueError naming the header otherwise."""
    chain_id, sep, index = value.rpartition(":")
    if not sep or not chain_id or not index.isdigit():
        raise ValueError(f"Last-Event-ID: expected '<chain_id>:<token index>', got {value!r}")
    return chain_id, int(index)


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of every stream as they come; one stream is read directly (no task per item). A stream left
    unfinished (the consumer stopped) is closed."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[bool, T | None]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream) as it:  # type: ignore[type-var]
                async for item in it:
                    queue.put_nowait((False, item))
        finally:
            queue.put_nowait((True, None))

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        for _ in tasks:
            while not (item := await queue.get())[0]:
                yield item[1]  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
