"""Kimi K2 output → OpenAI fields: `reasoning_content`, `content` and `tool_calls`, streamed or whole.

One state machine serves both: `parse_k2_output` is the streaming parser fed the whole text, so a stream's deltas
always add up to the non-streamed answer. The parser holds back only a tail that could still grow into a marker.

Format (K2-FORMAT.md): `[<think>]reasoning</think>content<|tool_calls_section_begin|><|tool_call_begin|>
functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>...<|tool_calls_section_end|>`; reasoning
also ends at the section begin. A call whose id is bad, that lacks the argument marker, or that the output cuts
off before its arguments start is kept as content text; arguments are passed through even when not valid JSON.

Newer K2 releases also emit ids without the function name: a bare counter (`0`), or a client-style id copied
from the history (`call_3`, `functions_get_weather_1`). Given the request's tools, as vLLM and SGLang do, the
parser names such a call after its arguments are complete: the only tool, else the one tool whose schema takes
exactly those argument keys (every key declared, every required key present). Such a call's deltas come out at
its end, in one piece; one that no tool fits is kept as content text.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"

_CALL_ID = re.compile(r"\s*([^<]+:\d+)\s*")
_SANITISED_ID = re.compile(r"functions_(.+)_\d+")  # functions.NAME:IDX as clients restricted to [\w-] echo it


class _State(enum.Enum):
    START = "start"  # nothing seen yet: an opening <think> is swallowed
    REASONING = "reasoning"
    CONTENT = "content"
    SECTION = "section"  # inside the tool-calls section, between calls
    CALL_ID = "call_id"  # after <|tool_call_begin|>, collecting the id
    CALL_ARGS = "call_args"
    BAD_CALL = "bad_call"  # a call with a malformed id: passed through as content up to its end


# The markers each state reacts to; anything else is text of that state.
_MARKERS: dict[_State, tuple[str, ...]] = {
    _State.REASONING: (THINK_END, SECTION_BEGIN),
    _State.CONTENT: (SECTION_BEGIN,),
    _State.SECTION: (CALL_BEGIN, SECTION_END),
    _State.CALL_ID: (ARG_BEGIN, CALL_END, CALL_BEGIN, SECTION_END),
    _State.CALL_ARGS: (CALL_END, CALL_BEGIN, SECTION_END),
    _State.BAD_CALL: (CALL_END, CALL_BEGIN, SECTION_END),
}


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of the call at `index`: its first delta carries id and name, later ones argument text."""
    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": self.arguments}
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out |= {"id": self.id, "type": "function"}
            function = {"name": self.name, **function}
        return out | {"function": function}


@dataclass(frozen=True)
class StreamDelta:
    """Exactly one of the three fields is set."""
    reasoning_content: str | None = None
    content: str | None = None
    tool_call: ToolCallDelta | None = None

    def to_openai(self) -> dict[str, Any]:
        """The `delta` object of a chat.completion.chunk choice."""
        if self.tool_call is not None:
            return {"tool_calls": [self.tool_call.to_openai()]}
        if self.reasoning_content is not None:
            return {"reasoning_content": self.reasoning_content}
        return {"content": self.content}


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ParsedToolCall] = field(default_factory=list)


def _call_name(call_id: str) -> str:
    # functions.get_weather:0 -> get_weather (as vLLM's and SGLang's kimi_k2 parsers name it)
    return call_id.split(":")[0].split(".")[-1]


def _tool_schemas(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of the request's function tools."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        function = tool.get("function") or {}
        if isinstance(function.get("name"), str):
            out[function["name"]] = function.get("parameters") or {}
    return out


def _infer_name(arguments: str, schemas: dict[str, dict[str, Any]]) -> str | None:
    """The tool a nameless call is for: the only one, else the one whose schema fits the argument keys."""
    if len(schemas) == 1:
        return next(iter(schemas))
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    if not isinstance(args, dict):
        return None
    fits = [name for name, schema in schemas.items()
            if set(args) <= set(schema.get("properties") or {}) and set(schema.get("required") or []) <= set(args)]
    return fits[0] if len(fits) == 1 else None


def _held_tail(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    longest = min(len(text), max(len(m) for m in markers) - 1)
    for size in range(longest, 0, -1):
        tail = text[-size:]
        if any(m.startswith(tail) for m in markers):
            return size
    return 0


class K2StreamParser:
    """Feed text deltas as they are detokenized; each call returns the OpenAI deltas that are now certain."""

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self._schemas = _tool_schemas(tools)
        self._pending_id: str | None = None  # a nameless call whose arguments are being collected
        self._pending_args = ""
        self._state = _State.START
        self._buffer = ""
        self._call_id_text = ""
        self._calls = 0
        self._args_started = False
        self._args_blank_tail = ""  # whitespace after the arguments is dropped unless more arguments follow
        self._out: list[StreamDelta] = []

    def feed(self, text: str) -> list[StreamDelta]:
        self._buffer += text
        self._drain(final=False)
        return self._take()

    def finish(self) -> list[StreamDelta]:
        self._drain(final=True)
        if self._state is _State.CALL_ID:
            self._emit(StreamDelta(content=CALL_BEGIN + self._call_id_text))
        self._settle_pending(closed=False)
        self._state = _State.CONTENT
        return self._take()

    def _take(self) -> list[StreamDelta]:
        out, self._out = self._out, []
        return out

    def _drain(self, final: bool) -> None:
        while True:
            if self._state is _State.START:
                if self._buffer.startswith(THINK_BEGIN):
                    self._buffer = self._buffer[len(THINK_BEGIN):]
                elif THINK_BEGIN.startswith(self._buffer) and not final:
                    return
                self._state = _State.REASONING
            markers = _MARKERS[self._state]
            hits = [(pos, m) for m in markers if (pos := self._buffer.find(m)) >= 0]
            if hits:
                pos, marker = min(hits)
                self._text(self._buffer[:pos])
                self._buffer = self._buffer[pos + len(marker):]
                self._marker(marker)
                continue
            keep = 0 if final else _held_tail(self._buffer, markers)
            self._text(self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return

    def _text(self, text: str) -> None:
        state = self._state
        if state is _State.REASONING:
            self._emit(StreamDelta(reasoning_content=text))
        elif state in (_State.CONTENT, _State.BAD_CALL):
            self._emit(StreamDelta(content=text))
        elif state is _State.CALL_ID:
            self._call_id_text += text
        elif state is _State.CALL_ARGS and self._pending_id is not None:
            self._pending_args += text
        elif state is _State.CALL_ARGS:
            self._arguments(text)
        # Text in a section between calls is stray output; like vLLM's parser we drop it.

    def _arguments(self, text: str) -> None:
        if not self._args_started:
            text = text.lstrip()
            self._args_started = bool(text)
        text = self._args_blank_tail + text
        body = text.rstrip()
        self._args_blank_tail = text[len(body):]
        if body:
            self._emit(StreamDelta(tool_call=ToolCallDelta(index=self._calls - 1, arguments=body)))

    def _marker(self, marker: str) -> None:
        state = self._state
        if state is _State.CALL_ARGS:
            self._settle_pending(closed=marker == CALL_END)
        if state is _State.CALL_ID:
            self._end_call_id(marker)
        elif marker == THINK_END:
            self._state = _State.CONTENT
        elif marker == SECTION_BEGIN:
            self._state = _State.SECTION
        elif marker == CALL_BEGIN:
            self._state, self._call_id_text = _State.CALL_ID, ""
        elif marker == SECTION_END:
            self._state = _State.CONTENT
        elif marker == CALL_END:
            if state is _State.BAD_CALL:
                self._emit(StreamDelta(content=CALL_END))
            self._state = _State.SECTION

    def _end_call_id(self, marker: str) -> None:
        raw = self._call_id_text
        match = _CALL_ID.fullmatch(raw)
        if marker == ARG_BEGIN and match and _call_name(match.group(1)):
            self._start_call(match.group(1), _call_name(match.group(1)))
            return
        call_id = raw.strip()
        sanitised = _SANITISED_ID.fullmatch(call_id)
        if marker == ARG_BEGIN and sanitised and sanitised.group(1) in self._schemas:
            self._start_call(call_id, sanitised.group(1))
            return
        if marker == ARG_BEGIN and call_id and self._schemas:
            self._pending_id, self._pending_args = call_id, ""
            self._state = _State.CALL_ARGS
            return
        # Malformed: the call's text so far goes out as content, markers and all.
        kept = CALL_BEGIN + raw + (marker if marker in (ARG_BEGIN, CALL_END) else "")
        self._emit(StreamDelta(content=kept))
        self._state = {ARG_BEGIN: _State.BAD_CALL, CALL_END: _State.SECTION, SECTION_END: _State.CONTENT,
                       CALL_BEGIN: _State.CALL_ID}[marker]
        self._call_id_text = ""

    def _start_call(self, call_id: str, name: str) -> None:
        self._emit(StreamDelta(tool_call=ToolCallDelta(self._calls, "", call_id, name)))
        self._calls += 1
        self._args_started, self._args_blank_tail = False, ""
        self._state = _State.CALL_ARGS

    def _settle_pending(self, closed: bool) -> None:
        """A nameless call's arguments are complete: name it from the tools, or keep its text as content."""
        call_id, self._pending_id = self._pending_id, None
        if call_id is None:
            return
        name = _infer_name(self._pending_args.strip(), self._schemas)
        if name is None:
            self._emit(StreamDelta(content=CALL_BEGIN + self._call_id_text + ARG_BEGIN + self._pending_args
                                   + (CALL_END if closed else "")))
            return
        self._start_call(call_id, name)
        self._arguments(self._pending_args)

    def _emit(self, delta: StreamDelta) -> None:
        if not (delta.reasoning_content or delta.content or delta.tool_call):
            return
        last = self._out[-1] if self._out else None
        if last and delta.reasoning_content and last.reasoning_content:
            self._out[-1] = StreamDelta(reasoning_content=last.reasoning_content + delta.reasoning_content)
        elif last and delta.content and last.content:
            self._out[-1] = StreamDelta(content=last.content + delta.content)
        elif (last and delta.tool_call and last.tool_call and delta.tool_call.id is None
              and last.tool_call.index == delta.tool_call.index):
            merged = last.tool_call.arguments + delta.tool_call.arguments
            self._out[-1] = StreamDelta(tool_call=ToolCallDelta(last.tool_call.index, merged, last.tool_call.id,
                                                                last.tool_call.name))
        else:
            self._out.append(delta)


def merge_deltas(deltas: list[StreamDelta]) -> ParsedOutput:
    """What a client assembles from a stream: the texts concatenated, each call's argument pieces joined."""
    reasoning = "".join(d.reasoning_content for d in deltas if d.reasoning_content)
    content = "".join(d.content for d in deltas if d.content)
    calls: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    for d in deltas:
        if d.tool_call is None:
            continue
        if d.tool_call.id is not None:
            heads[d.tool_call.index] = (d.tool_call.id, d.tool_call.name or "")
        calls.setdefault(d.tool_call.index, []).append(d.tool_call.arguments)
    tool_calls = [ParsedToolCall(*heads[i], "".join(calls[i])) for i in sorted(calls)]
    return ParsedOutput(reasoning or None, content or None, tool_calls)


def parse_k2_output(text: str, tools: list[dict[str, Any]] | None = None) -> ParsedOutput:
    parser = K2StreamParser(tools)
    return merge_deltas(parser.feed(text) + parser.finish())
