"""A turn whose client left generates on only within its detached budget (`router.limits.detached_max_tokens`,
`detached_timeout_s`), then stops with its tokens durable, the turn "running" and the chain released; a later
resume generates it on to the end, continuing what the client saw."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from k2serve.config import ServingConfig
from k2serve.sampling_params import SamplingParams
from k2serve.stack.inproc import start_local_stack

MAX_TOKENS = 600


@pytest.mark.parametrize("budget", [{"detached_max_tokens": 6}, {"detached_timeout_s": 0.2},
                                    {"detached_max_tokens": 1}])
def test_a_detached_turn_stops_within_its_budget_and_resumes(tmp_path: Path, budget: dict[str, Any]) -> None:
    config = ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")},
                                           "model": {"max_context": 2048},
                                           "router": {"aggregated": True, "limits": budget}})

    async def go() -> dict[str, Any]:
        stack = await start_local_stack(config)
        core = stack.core
        try:
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
            reader = core.generate([1, 2, 3], params)
            seen = [await anext(reader) for _ in range(3)]
            chain = seen[0].chain_id
            await reader.aclose()  # the client is gone
            live = core.turns.live[chain]
            left_at = len(live.items)
            assert live.task is not None
            await asyncio.wait_for(asyncio.shield(live.task), 120)  # it stops by itself
            stopped = core.store.get_chain(chain).turns[-1]
            released = core.store.claim(chain, "another-router", 1.0)
            core.store.release(chain, "another-router")
            resumed = [t async for t in core.resume(chain, 0)]
            return {"seen": [t.token for t in seen], "left_at": left_at, "stopped": stopped, "released": released,
                    "resumed": [t.token for t in resumed], "final": core.store.get_chain(chain).turns[-1]}
        finally:
            await stack.aclose()

    out = asyncio.run(go())
    stopped, final = out["stopped"], out["final"]
    assert stopped.status == "running" and out["released"]
    assert out["left_at"] <= len(stopped.generated) < MAX_TOKENS
    if "detached_max_tokens" in budget:
        assert len(stopped.generated) == out["left_at"] + budget["detached_max_tokens"]
    assert len(out["resumed"]) == MAX_TOKENS and out["resumed"][:3] == out["seen"]
    assert out["resumed"][:len(stopped.generated)] == stopped.generated
    assert final.status == "finished" and final.generated == out["resumed"]


def test_a_reader_keeps_a_turn_going_past_the_budget(tmp_path: Path) -> None:
    config = ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")},
                                           "model": {"max_context": 2048},
                                           "router": {"aggregated": True, "limits": {"detached_max_tokens": 2}}})

    async def go() -> tuple[int, str]:
        stack = await start_local_stack(config)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
            got = [t async for t in stack.core.generate([1, 2, 3], params)]
            return len(got), stack.core.store.get_chain(got[0].chain_id).turns[-1].status
        finally:
            await stack.aclose()

    assert asyncio.run(go()) == (40, "finished")
