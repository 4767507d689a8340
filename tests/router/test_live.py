"""LiveTurn readers end at the turn's last token without waiting for its task's cleanup and see only durable
tokens; ChainLocks serialize
starting turns per chain, never across chains, and forget a chain nobody holds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from k2serve.router.live import ChainLocks, LiveTurn


@dataclass
class Tok:
    index: int
    finish_reason: str | None = None


def test_a_reader_ends_at_the_token_with_a_finish_reason() -> None:
    async def go() -> tuple[list[int], bool]:
        live = LiveTurn("chain", 0, prompt_tokens=3)
        got: list[int] = []

        async def read() -> None:
            async for item in live.follow(0):
                got.append(item.index)

        reader = asyncio.create_task(read())
        live.publish(Tok(0))
        live.reveal(1)
        await asyncio.sleep(0)
        live.publish(Tok(1, "stop"))
        live.reveal(2)
        await asyncio.wait_for(reader, 5)  # no live.end(): the generating task may still be cleaning up
        return got, live.done

    assert asyncio.run(go()) == ([0, 1], False)


def test_a_late_reader_of_a_finished_turn_gets_its_tokens_from_any_index() -> None:
    async def go() -> list[int]:
        live = LiveTurn("chain", 0, prompt_tokens=3)
        for i in range(4):
            live.publish(Tok(i, "length" if i == 3 else None))
        live.reveal(4)
        return [t.index async for t in live.follow(2)]

    assert asyncio.run(go()) == [2, 3]


def test_readers_see_only_durable_tokens_even_after_the_turn_ends() -> None:
    """Durability before visibility: a token published but never made durable (the router stopped first) is
    never shown, so a resumption that generates it differently contradicts no reader."""

    async def go() -> tuple[list[int], list[int]]:
        live = LiveTurn("chain", 0, prompt_tokens=3)
        seen: list[int] = []

        async def read() -> None:
            async for item in live.follow(0):
                seen.append(item.index)

        reader = asyncio.create_task(read())
        for i in range(5):
            live.publish(Tok(i))
        await asyncio.sleep(0.01)
        early = list(seen)  # nothing durable yet
        live.reveal(3)
        await asyncio.sleep(0.01)
        live.end()
        await asyncio.wait_for(reader, 5)
        return early, seen

    assert asyncio.run(go()) == ([], [0, 1, 2])


def test_chain_locks_serialize_one_chain_only() -> None:
    async def go() -> tuple[bool, list[str], int, int]:
        locks = ChainLocks()
        release = asyncio.Event()
        holding = asyncio.Event()

        async def hold_a() -> None:
            async with locks.hold("a"):
                holding.set()
                await release.wait()

        entered: list[str] = []

        async def enter(chain: str) -> None:
            async with locks.hold(chain):
                entered.append(chain)

        first = asyncio.create_task(hold_a())
        await holding.wait()
        await asyncio.wait_for(enter("b"), 5)  # another chain goes ahead while "a" is held
        second = asyncio.create_task(enter("a"))
        await asyncio.sleep(0.05)
        waited = not second.done()
        during = len(locks)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        return waited, entered, during, len(locks)

    assert asyncio.run(go()) == (True, ["b", "a"], 1, 0)
