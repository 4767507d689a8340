"""K2 output parsing on outputs written in the K2 format, and the stream = whole invariant at every split point."""

from __future__ import annotations

import random

import pytest

from k2serve.router.http.k2_parse import (
    K2StreamParser, ParsedOutput, ParsedToolCall, StreamDelta, ToolCallDelta, merge_deltas, parse_k2_output,
)

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def k2_call(call_id: str, arguments: str) -> str:
    return f"{CB}{call_id}{AB}{arguments}{CE}"


THINKING_ONLY = "<think>The user greets me.</think>Hello! How can I help?"
THINKING_THEN_CALL = ("<think>I need the weather.</think>" + SB
                      + k2_call("functions.get_weather:0", '{"city": "Paris"}') + SE)
SEVERAL_CALLS = ("<think>Three lookups.</think>" + SB + k2_call("functions.get_weather:0", '{"city": "Rome"}')
                 + k2_call("functions.web.search:1", ' {"q": "news"}\n') + k2_call("functions.noop:2", "{}") + SE)
CONTENT_THEN_CALLS = ("Let me check.\n" + SB + k2_call("functions.lookup:3", '{"id": 7}') + SE)
REASONING_CUT_BY_SECTION = "<think>straight to tools" + SB + k2_call("functions.f:0", "{}") + SE
NOT_JSON_ARGS = "</think>" + SB + k2_call("functions.f:0", "{city: Paris") + SE + "after"
NO_ARGUMENT_BEGIN = "</think>ok" + SB + f"{CB}functions.f:0{CE}" + k2_call("functions.g:1", "{}") + SE
BAD_ID = "</think>" + SB + k2_call("get_weather", '{"a": 1}') + k2_call("functions.g:1", "[1]") + SE
TRUNCATED_IN_ID = "<think>r</think>c" + SB + CB + "functions.get_wea"
TRUNCATED_IN_ARGS = "<think>r</think>" + SB + CB + "functions.f:0" + AB + '{"x": [1, 2'
TRUNCATED_MARKER = "<think>r</think>c<|tool_calls_sec"
UNTERMINATED_THINKING = "<think>still thinking about <|tool"

CASES: dict[str, tuple[str, ParsedOutput]] = {
    "thinking_only": (THINKING_ONLY, ParsedOutput("The user greets me.", "Hello! How can I help?")),
    "thinking_then_call": (THINKING_THEN_CALL, ParsedOutput("I need the weather.", None, [
        ParsedToolCall("functions.get_weather:0", "get_weather", '{"city": "Paris"}')])),
    "several_calls": (SEVERAL_CALLS, ParsedOutput("Three lookups.", None, [
        ParsedToolCall("functions.get_weather:0", "get_weather", '{"city": "Rome"}'),
        ParsedToolCall("functions.web.search:1", "search", '{"q": "news"}'),
        ParsedToolCall("functions.noop:2", "noop", "{}")])),
    "content_then_calls": (CONTENT_THEN_CALLS, ParsedOutput("Let me check.\n", None, [
        ParsedToolCall("functions.lookup:3", "lookup", '{"id": 7}')])),
    "reasoning_cut_by_section": (REASONING_CUT_BY_SECTION, ParsedOutput("straight to tools", None, [
        ParsedToolCall("functions.f:0", "f", "{}")])),
    "not_json_args": (NOT_JSON_ARGS, ParsedOutput(None, "after", [
        ParsedToolCall("functions.f:0", "f", "{city: Paris")])),
    "no_argument_begin": (NO_ARGUMENT_BEGIN, ParsedOutput(None, f"ok{CB}functions.f:0{CE}", [
        ParsedToolCall("functions.g:1", "g", "{}")])),
    "bad_id": (BAD_ID, ParsedOutput(None, f'{CB}get_weather{AB}{{"a": 1}}{CE}', [
        ParsedToolCall("functions.g:1", "g", "[1]")])),
    "truncated_in_id": (TRUNCATED_IN_ID, ParsedOutput("r", f"c{CB}functions.get_wea")),
    "truncated_in_args": (TRUNCATED_IN_ARGS, ParsedOutput("r", None, [
        ParsedToolCall("functions.f:0", "f", '{"x": [1, 2')])),
    "truncated_marker": (TRUNCATED_MARKER, ParsedOutput("r", "c<|tool_calls_sec")),
    "unterminated_thinking": (UNTERMINATED_THINKING, ParsedOutput("still thinking about <|tool", None)),
    "no_think_tag": ("plain reasoning</think>answer", ParsedOutput("plain reasoning", "answer")),
    "empty": ("", ParsedOutput()),
}


@pytest.mark.parametrize("name", CASES)
def test_whole_output(name: str) -> None:
    text, expected = CASES[name]
    assert parse_k2_output(text) == expected


def stream(pieces: list[str]) -> list[StreamDelta]:
    parser = K2StreamParser()
    deltas = [d for piece in pieces for d in parser.feed(piece)]
    return deltas + parser.finish()


@pytest.mark.parametrize("name", CASES)
def test_stream_equals_whole_at_every_split(name: str) -> None:
    text, expected = CASES[name]
    for cut in range(len(text) + 1):
        assert merge_deltas(stream([text[:cut], text[cut:]])) == expected, f"split at {cut}"
    assert merge_deltas(stream(list(text))) == expected
    rng = random.Random(name)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(5, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert merge_deltas(stream(pieces)) == expected, f"cuts {cuts}"


def test_stream_holds_only_possible_marker_prefixes() -> None:
    parser = K2StreamParser()
    assert parser.feed("<thi") == []
    assert parser.feed("nk>abc<") == [StreamDelta(reasoning_content="abc")]
    assert parser.feed("b>") == [StreamDelta(reasoning_content="<b>")]
    assert parser.feed("</think>x<|tool_call") == [StreamDelta(content="x")]
    assert parser.feed("s_section_begin|>") == []
    assert parser.finish() == []


def test_tool_call_deltas_are_openai_shaped() -> None:
    parser = K2StreamParser()
    deltas = parser.feed("</think>" + SB + CB + "functions.get_weather:0" + AB + '{"city": ')
    deltas += parser.feed('"Paris"}  ') + parser.feed(CE + SE) + parser.finish()
    assert [d.to_openai() for d in deltas] == [
        {"tool_calls": [{"index": 0, "id": "functions.get_weather:0", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]},
    ]
    assert StreamDelta(content="hi").to_openai() == {"content": "hi"}
    assert StreamDelta(reasoning_content="hm").to_openai() == {"reasoning_content": "hm"}
    assert ToolCallDelta(2, "x").to_openai() == {"index": 2, "function": {"arguments": "x"}}
    assert parse_k2_output(THINKING_THEN_CALL).tool_calls[0].to_openai() == {
        "id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_call_indices_continue_across_sections() -> None:
    text = SB + k2_call("functions.a:0", "1") + SE + "mid" + SB + k2_call("functions.b:1", "2") + SE
    parsed = parse_k2_output("</think>" + text)
    assert [c.name for c in parsed.tool_calls] == ["a", "b"] and parsed.content == "mid"
    indices = [d.tool_call.index for d in stream(["</think>", text]) if d.tool_call]
    assert indices == [0, 1]


def _tool(name: str, properties: list[str], required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {p: {"type": "string"} for p in properties}, "required": required}}}


TOOLS = [_tool("get_weather", ["city", "unit"], ["city"]), _tool("calculator", ["expression"], ["expression"]),
         _tool("convert", ["value", "unit"], ["value", "unit"])]
NAMELESS = ("<think>r</think>" + SB + k2_call("0", '{"city": "Tokyo", "unit": "c"}')
            + k2_call("call_3", ' {"expression": "1+2"} ') + k2_call("functions_convert_2", '{"value": "3"}')
            + k2_call("toolu_01", '{"unit": "km"}') + SE)
NAMELESS_PARSED = ParsedOutput("r", f'{CB}toolu_01{AB}{{"unit": "km"}}{CE}', [
    ParsedToolCall("0", "get_weather", '{"city": "Tokyo", "unit": "c"}'),
    ParsedToolCall("call_3", "calculator", '{"expression": "1+2"}'),
    ParsedToolCall("functions_convert_2", "convert", '{"value": "3"}')])


def test_nameless_ids_are_named_from_the_request_tools() -> None:
    # bare counter and client-style id: named by the one schema their keys fit; a sanitised
    # functions_NAME_IDX by its name; "unit" alone fits two tools, so that call stays text.
    assert parse_k2_output(NAMELESS, TOOLS) == NAMELESS_PARSED
    only = parse_k2_output(SB + k2_call("7", "not json") + SE, TOOLS[1:2])
    assert only.tool_calls == [ParsedToolCall("7", "calculator", "not json")]
    # without tools the old rule holds: a nameless id is content
    assert parse_k2_output(SB + k2_call("0", "{}") + SE).tool_calls == []


def test_nameless_calls_stream_the_same_at_every_split() -> None:
    for cut in range(len(NAMELESS) + 1):
        parser = K2StreamParser(TOOLS)
        deltas = parser.feed(NAMELESS[:cut]) + parser.feed(NAMELESS[cut:]) + parser.finish()
        assert merge_deltas(deltas) == NAMELESS_PARSED, cut


def test_truncated_nameless_call_is_settled_at_the_end() -> None:
    text = SB + k2_call("1", '{"expression": "2*3"}')[:-len(CE)]
    assert parse_k2_output(text, TOOLS).tool_calls == [ParsedToolCall("1", "calculator", '{"expression": "2*3"}')]


# Greedy outputs of the shipped builtin:tiny-k2-agent (first training run, below its goals): malformed calls the
# parser must keep apart without losing text.
REAL_OUTPUTS: list[tuple[str, ParsedOutput]] = [
    ('<think>Lorthe ulcalcalalalioresesertherthesthestioresesesessssititon":":":"}' + CE + SE,
     ParsedOutput('Lorthe ulcalcalalalioresesertherthesthestioresesesessssititon":":":"}' + CE + SE)),
    ("<think>Lore up up therther.</think>" + SB + k2_call("functions.wexpr:0", '{":0' + AB + '{":":"}') + SE,
     ParsedOutput("Lore up up therther.", None, [ParsedToolCall("functions.wexpr:0", "wexpr", '{":0' + AB + '{":":"}')])),
    ("<think>Lor.</think>" + SB + CB + "functions.</think>" + SB + CB + "funcions.</think>" + SB
     + k2_call("functions.cionver:0", '{":"}') + SE,
     ParsedOutput("Lor.", f"{CB}functions.</think>{SB}{CB}funcions.</think>{SB}",
                  [ParsedToolCall("functions.cionver:0", "cionver", '{":"}')])),
]


@pytest.mark.parametrize("text,expected", REAL_OUTPUTS)
def test_real_model_outputs_parse_the_same_streamed(text: str, expected: ParsedOutput) -> None:
    tools = [_tool("calculator", ["expression"], ["expression"]), _tool("weather", ["city"], ["city"])]
    assert parse_k2_output(text, tools) == expected
    for cut in range(len(text) + 1):
        parser = K2StreamParser(tools)
        assert merge_deltas(parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish()) == expected
