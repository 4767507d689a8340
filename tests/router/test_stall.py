"""StallWatch: a deadline on each wait of a stream, as one `asyncio.timeout` scope per wait would give."""

from __future__ import annotations

import asyncio
import time

import pytest

from k2serve.router.stall import StallWatch


async def later(value: int, delay: float) -> int:
    await asyncio.sleep(delay)
    return value


def test_waits_in_time_return_their_values_and_time_between_waits_does_not_count() -> None:
    async def main() -> list[int]:
        watch = StallWatch()
        got = []
        for i in range(5):
            got.append(await watch.wait(later(i, 0.01), 0.1))
            await asyncio.sleep(0.15)  # longer than the allowance, but outside any wait
        watch.close()
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("first_allowance", [0.2, 30.0])
def test_a_wait_past_its_allowance_raises_timeout_error(first_allowance: float) -> None:
    """Also when the wait before had a longer allowance (the first event may wait for a prefill): the timer
    armed for that one must not delay this deadline."""

    async def main() -> float:
        watch = StallWatch()
        await watch.wait(later(1, 0.01), first_allowance)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await watch.wait(later(2, 5.0), 0.1)
        watch.close()
        return time.monotonic() - t0

    assert 0.05 < asyncio.run(main()) < 1.0


def test_cancelling_the_task_is_a_cancellation_not_a_timeout() -> None:
    async def main() -> None:
        watch = StallWatch()

        async def reader() -> int:
            return await watch.wait(later(1, 5.0), 10.0)

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        watch.close()

    asyncio.run(main())
