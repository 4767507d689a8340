"""A minimal agent loop over any chat completer: send the task and the windowed rounds, execute the calls the
model emits with the demo tools, feed the results back, until the model answers without calling a tool.
`k2serve agent` runs it over the OpenAI HTTP API; the agent eval runs it in-process too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from k2serve.agent_tools import DEMO_TOOLS, DemoTools, windowed


@dataclass(frozen=True)
class ModelTurn:
    """One assistant turn as the API returns it; calls are {"id", "name", "arguments"}."""
    reasoning: str
    content: str
    tool_calls: list[dict[str, str]]


@dataclass(frozen=True)
class ExecutedCall:
    id: str
    name: str
    arguments: str
    result: str


@dataclass
class AgentRun:
    answer: str | None = None  # None: the loop stopped before the model answered
    calls: list[ExecutedCall] = field(default_factory=list)
    turns: int = 0


Complete = Callable[[list[dict[str, Any]], list[dict[str, Any]]], ModelTurn]  # (messages, tools) -> turn


def run_agent(task: str, complete: Complete, tools: DemoTools, max_turns: int = 400,
              on_call: Callable[[ExecutedCall], None] | None = None) -> AgentRun:
    user = {"role": "user", "content": task}
    rounds: list[list[dict[str, Any]]] = []
    run = AgentRun()
    while run.turns < max_turns:
        turn = complete([user] + [m for r in rounds for m in r], DEMO_TOOLS)
        run.turns += 1
        if not turn.tool_calls:
            run.answer = turn.content
            return run
        assistant = {"role": "assistant", "content": turn.content, "reasoning_content": turn.reasoning,
                     "tool_calls": [{"id": c["id"], "type": "function",
                                     "function": {"name": c["name"], "arguments": c["arguments"]}}
                                    for c in turn.tool_calls]}
        results = []
        for c in turn.tool_calls:
            executed = ExecutedCall(c["id"], c["name"], c["arguments"], tools.call(c["name"], c["arguments"]))
            run.calls.append(executed)
            if on_call is not None:
                on_call(executed)
            results.append({"role": "tool", "tool_call_id": c["id"], "content": executed.result})
        rounds = windowed(rounds + [[assistant, *results]])
    return run
