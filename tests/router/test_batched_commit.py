"""Group commit of the live turns' checkpoints (`BatchedCommit`), against both chain-store backends: a due turn's
write carries every live turn's buffered tokens in one transaction; one chain's store error fails that chain
only and buffers its tokens again; tokens buffered while a write is in flight follow it in order; a turn that
leaves waits for the write holding its tokens."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from k2serve.router.chains import ChainCheckpointer, ChainStore, TurnClosed
from k2serve.router.chains.batched_commit import BatchedCommit
from k2serve.router.chains.redis_store import RedisChainStore
from k2serve.router.chains.sqlite_store import SqliteChainStore


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChainStore]:
    s: ChainStore = (SqliteChainStore(tmp_path / "chains.sqlite3") if request.param == "sqlite"
                     else RedisChainStore(request.getfixturevalue("redis_server").url))
    yield s
    s.close()


class CountingStore:
    """The store, counting its transactions (`batch`) and able to hold its writes until released."""

    def __init__(self, store: ChainStore) -> None:
        self.store = store
        self.batches = 0
        self.appends = 0
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()

    def batch(self) -> Any:
        self.batches += 1
        return self.store.batch()

    def append_tokens(self, *args: Any) -> int:
        self.writing.set()
        self.gate.wait(10)
        self.appends += 1
        return self.store.append_tokens(*args)


def turns(store: ChainStore, n: int, every: int = 4) -> list[ChainCheckpointer]:
    out = []
    for _ in range(n):
        chain = store.create_chain()
        out.append(ChainCheckpointer(store, chain, store.begin_turn(chain, {}, {}, [1, 2]), every))
    return out


def run(coro: Any) -> Any:
    threads = concurrent.futures.ThreadPoolExecutor(1)

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        return await coro(lambda fn, *a: loop.run_in_executor(threads, fn, *a))

    try:
        return asyncio.run(main())
    finally:
        threads.shutdown()


def test_a_due_turn_writes_every_live_turn_in_one_commit(store: ChainStore) -> None:
    counting = CountingStore(store)
    a, b, c = turns(store, 3)
    gone = turns(store, 1)[0]

    async def go(io: Any) -> None:
        written: list[int] = []
        commits = BatchedCommit(counting, io, written.append)  # type: ignore[arg-type]
        for ckpt in (a, b, c, gone):
            commits.join(ckpt)
        await commits.leave(gone)
        a.pending += [5, 6, 7, 8]  # due
        b.pending += [9]
        gone.pending += [4]
        await commits.flush(a)
        assert counting.batches == 1 and counting.appends == 2  # one transaction: a and b, not c or gone
        assert written == [2]

    run(go)
    assert (store.generated(a.chain_id, a.turn), store.generated(b.chain_id, b.turn)) == ([5, 6, 7, 8], [9])
    assert (a.durable, a.pending, b.durable, b.pending, c.durable) == (4, [], 1, [], 0)
    assert store.generated(gone.chain_id, gone.turn) == [] and gone.pending == [4]


def test_one_chain_s_store_error_fails_that_chain_only(store: ChainStore) -> None:
    a, b = turns(store, 2)
    store.finish_turn(b.chain_id, b.turn, "cancelled", "cancelled")  # closed under its live turn

    async def go(io: Any) -> None:
        commits = BatchedCommit(store, io)
        commits.join(a)
        commits.join(b)
        a.pending += [5, 6, 7, 8]
        b.pending += [1, 2, 3, 4]
        flushes = await asyncio.gather(commits.flush(a), commits.flush(b), return_exceptions=True)
        assert flushes[0] is None and isinstance(flushes[1], TurnClosed)

    run(go)
    assert store.generated(a.chain_id, a.turn) == [5, 6, 7, 8] and a.durable == 4
    assert (b.durable, b.inflight, b.pending, b.position) == (0, 0, [1, 2, 3, 4], 4)  # buffered again


def test_tokens_buffered_during_a_write_follow_it_and_leave_waits_for_it(store: ChainStore) -> None:
    counting = CountingStore(store)
    (a,) = turns(store, 1)

    async def go(io: Any) -> None:
        commits = BatchedCommit(counting, io)  # type: ignore[arg-type]
        commits.join(a)
        a.pending += [1, 2, 3, 4]
        counting.gate.clear()
        flush = asyncio.ensure_future(commits.flush(a))
        await asyncio.to_thread(counting.writing.wait, 10)
        assert (a.inflight, a.pending, a.position) == (4, [], 4)
        a.pending += [5, 6]  # came in meanwhile
        leave = asyncio.ensure_future(commits.leave(a))
        await asyncio.sleep(0.05)
        assert not leave.done()  # the write holding a's tokens is still out
        counting.gate.set()
        await flush
        await leave
        assert (a.durable, a.inflight, a.pending) == (4, 0, [5, 6])
        await io(a.flush)  # the turn's own last write starts where the store ends

    run(go)
    assert store.generated(a.chain_id, a.turn) == [1, 2, 3, 4, 5, 6]
