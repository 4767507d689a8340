"""`k2serve agent "TASK"`: a minimal agent over the OpenAI API of a running stack. It sends the task with the
built-in demo tools (calculator, weather, convert, next), executes each call the model emits locally, and prints
thinking, calls, results and the answer as they stream, until the model answers.

Long chains keep the task plus a window of the most recent rounds (k2serve.agent_tools.windowed), as K2's own
long-horizon runs manage context in the agent loop rather than in the model."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import httpx

from k2serve.agent_loop import ExecutedCall, ModelTurn, run_agent
from k2serve.agent_tools import Chain, DemoTools
from k2serve.errors import UserError
from k2serve.helptext import summary
from k2serve.router.chat import add_client_args, connected, stream_chat
from k2serve.terminal import printable


def http_completer(client: httpx.Client, model: str, max_tokens: int, out: TextIO) -> Any:
    def complete(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> ModelTurn:
        body = {"model": model, "messages": messages, "tools": tools, "max_tokens": max_tokens, "temperature": 0}
        result = stream_chat(client, body, out)
        return ModelTurn(result["reasoning"], result["content"], result["tool_calls"])
    return complete


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve agent", description=summary(__doc__))
    ap.add_argument("task", help="what the agent should do, e.g. \"What is 17 * 23?\"")
    add_client_args(ap)
    ap.add_argument("--max-tokens", type=int, default=200, help="per model turn")
    ap.add_argument("--max-turns", type=int, default=400, help="most model turns before giving up (400)")
    ap.add_argument("--chain", metavar="SEED:LINKS", help="set up the chain that `next` walks, e.g. demo:10")
    args = ap.parse_args(argv)
    chain = None
    if args.chain:
        seed, _, links = args.chain.rpartition(":")
        if not seed or not links.isdigit() or int(links) < 1:
            raise UserError("--chain wants SEED:LINKS with LINKS >= 1")
        chain = Chain(seed, int(links))
        print(f"[chain] starts at {chain.start}", flush=True)

    def show(call: ExecutedCall) -> None:
        print(printable(f"[result {call.id}] {call.result}"), flush=True)

    with connected(args) as (client, model):
        run = run_agent(args.task, http_completer(client, model, args.max_tokens, sys.stdout), DemoTools(chain),
                        args.max_turns, show)
    if not run.answer:  # none, or a turn that ended without text or calls (e.g. at max_tokens)
        print(f"k2serve agent: no answer after {run.turns} turns", file=sys.stderr)
        return 1
    print(printable(f"\n[answer after {len(run.calls)} calls] {run.answer}"))
    return 0
