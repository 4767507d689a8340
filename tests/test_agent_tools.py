"""The demo tools, the agent loop's context window and the loop itself (scripted model turns)."""

from __future__ import annotations

import json

import pytest

from k2serve.agent_loop import ModelTurn, run_agent
from k2serve.agent_tools import WINDOW_KEEP, WINDOW_MAX, Chain, DemoTools, windowed


@pytest.mark.parametrize("expression,result", [("17 * 23", "391"), ("19.31 + 5", "24.31"), ("7 / 2", "3.50"),
                                               ("-4 - 10", "-14"), ("1/3", "0.33")])
def test_calculator(expression: str, result: str) -> None:
    assert DemoTools().call("calculator", json.dumps({"expression": expression})) == result


@pytest.mark.parametrize("name,args,error", [
    ("calculator", {"expression": "__import__('os')"}, "error: only numbers"),
    ("calculator", {"expression": "1/0"}, "error: division by zero"),
    ("calculator", {"expression": "9" * 80}, "error: expression longer"),
    ("weather", {"city": "zorvak"}, "error: unknown city zorvak; did you mean Zorvak?"),
    ("weather", {"city": "x1"}, "error: unknown city x1"),
    ("convert", {"value": "3 mi", "to": "kg"}, "error: cannot convert"),
    ("next", {"id": "zzzz"}, "error: no chain"),
    ("nope", {"a": "b"}, "error: no tool nope"),
])
def test_bad_calls_get_error_texts(name: str, args: dict, error: str) -> None:
    assert DemoTools().call(name, json.dumps(args)).startswith(error)
    assert DemoTools().call("calculator", "{not json").startswith("error: arguments are not JSON")


def test_weather_and_convert_are_deterministic() -> None:
    first = DemoTools().call("weather", '{"city": "Zorvak"}')
    assert first == DemoTools().call("weather", '{"city": "Zorvak"}') and first.startswith("Zorvak: ")
    assert DemoTools().call("convert", '{"value": "12 mi", "to": "km"}') == "19.31"


def test_chain_walks_to_its_end() -> None:
    chain = Chain("s", 5)
    tools, current, seen = DemoTools(chain), chain.start, []
    for _ in range(5):
        current = tools.call("next", json.dumps({"id": current}))
        seen.append(current)
    assert seen[-1] == f"END {chain.end_value}" and len(set(seen)) == 5
    assert chain.ids()[1:-1] == seen[:-1]


def test_window_cuts_in_steps() -> None:
    rounds: list[list[dict]] = []
    sizes = []
    for i in range(10):
        rounds = windowed(rounds + [[{"i": i}]])
        sizes.append(len(rounds))
    assert max(sizes) == WINDOW_MAX and sizes[WINDOW_MAX] == WINDOW_KEEP
    assert rounds[-1] == [{"i": 9}]


def test_agent_loop_executes_calls_and_windows_the_context() -> None:
    chain = Chain("loop", 7)
    seen_lengths = []

    def scripted(messages: list[dict], tools: list[dict]) -> ModelTurn:
        seen_lengths.append(len(messages))
        last = messages[-1]
        if last["role"] == "tool" and last["content"].startswith("END "):
            return ModelTurn("done", f"The end value is {last['content'][4:]}.", [])
        current = chain.start if last["role"] == "user" else last["content"]
        n = sum(1 for m in messages if m["role"] == "assistant")
        return ModelTurn("follow", "", [{"id": f"functions.next:{n}", "name": "next",
                                         "arguments": json.dumps({"id": current})}])

    run = run_agent("follow", scripted, DemoTools(chain))
    assert run.answer == f"The end value is {chain.end_value}." and len(run.calls) == 7
    assert [json.loads(c.arguments)["id"] for c in run.calls] == chain.ids()[:-1]
    assert max(seen_lengths) == 1 + 2 * WINDOW_MAX  # task + at most WINDOW_MAX (call, result) rounds
