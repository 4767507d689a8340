"""Router-side fault injection: a `hang_group` stalls a stream between tokens, where the stall deadline applies."""

from __future__ import annotations

import asyncio

import pytest

from k2serve.config import FaultSpec
from k2serve.faults import RouterFaults


def hang(after: int, times: int = 1) -> RouterFaults:
    return RouterFaults([FaultSpec(kind="hang_group", pool="prefill", group=1, after_tokens=after, times=times)])


async def stalls(faults: RouterFaults, group: str = "both-1", role: str = "both", *, first: bool = False) -> bool:
    try:
        async with asyncio.timeout(0.05):
            await faults.stream_event(group, role, first=first)
    except TimeoutError:
        return True
    return False


def test_hang_fires_after_its_count_and_only_its_times() -> None:
    async def go() -> list[bool]:
        faults = hang(3)
        return [await stalls(faults) for _ in range(7)]

    assert asyncio.run(go()) == [False, False, True, False, False, False, False]


def test_hang_due_on_a_first_event_waits_for_the_next_event() -> None:
    async def go() -> list[bool]:
        faults = hang(2)
        return [await stalls(faults), await stalls(faults, first=True), await stalls(faults, first=True),
                await stalls(faults)]

    assert asyncio.run(go()) == [False, False, False, True]


@pytest.mark.parametrize("group,role", [("both-0", "both"), ("decode-1", "decode")])
def test_hang_spares_other_groups(group: str, role: str) -> None:
    async def go() -> list[bool]:
        faults = hang(1)  # aimed at the prefill pool's group 1 (serving "both" when aggregated)
        return [await stalls(faults, group, role) for _ in range(3)]

    assert asyncio.run(go()) == [False, False, False]
