"""Group commit of the live turns' checkpoints: when one turn's buffered tokens are due, every live turn's
buffered tokens go to the store in the same transaction (one commit, one fsync). Turns written together stay in
step, so while chains run one commit serves all of them instead of one per chain — the checkpoint writes were a
fifth of the router's CPU per token. No turn's tokens wait longer to be durable than before: each is still
written at least every `checkpoint_every` tokens, most of them sooner.

Tokens leave the turns' buffers on the event loop (`ChainCheckpointer.take`) and are written on the store's
threads, one group write at a time, so a chain's writes never overtake each other. A group write that fails is
redone chain by chain, so one chain's error (a turn closed under it, say) fails that chain's turn only, and the
tokens of a chain whose write failed are buffered again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from k2serve.router.chains.checkpoint import ChainCheckpointer
from k2serve.router.chains.store import ChainStore

Write = tuple[ChainCheckpointer, int, list[int]]  # (the turn's checkpointer, start, tokens)


class BatchedCommit:
    def __init__(self, store: ChainStore, run: Callable[..., Awaitable[Any]],
                 on_written: Callable[[int], Any] | None = None) -> None:
        self.store = store
        self._run = run  # runs a blocking store call on the store's threads
        self._on_written = on_written  # told how many chains' appends each group write made durable
        self._members: dict[int, ChainCheckpointer] = {}  # id() -> the live turns' checkpointers
        self._due: dict[int, asyncio.Future[None]] = {}  # turns waiting for their tokens to be durable
        self._writer: asyncio.Task[None] | None = None

    def join(self, ckpt: ChainCheckpointer) -> None:
        self._members[id(ckpt)] = ckpt

    async def leave(self, ckpt: ChainCheckpointer) -> None:
        """Writes of `ckpt` are its own again: no later group write takes its tokens, and one in flight that holds
        some has ended (so what the turn writes next starts where the store ends)."""
        self._members.pop(id(ckpt), None)
        while ckpt.inflight and self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def kick(self, ckpt: ChainCheckpointer) -> None:
        """Has `ckpt`'s buffered tokens written with the next group write, without waiting for it: while tokens
        arrive, group writes follow each other back to back, each taking what every turn buffered meanwhile
        (`ckpt.on_settled` hears when they are durable). A failed write leaves them buffered for the next."""
        if id(ckpt) not in self._due:
            fut = self._due[id(ckpt)] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # failures retry: nobody awaits
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_due(), name="k2serve-group-commit")

    async def flush(self, ckpt: ChainCheckpointer) -> None:
        """Returns once every token `ckpt` has buffered is durable, written with every other member's; raises
        the store's error for this chain."""
        loop = asyncio.get_running_loop()
        fut = self._due.get(id(ckpt))
        if fut is None:
            fut = self._due[id(ckpt)] = loop.create_future()
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_due(), name="k2serve-group-commit")
        await asyncio.shield(fut)  # a turn cancelled meanwhile leaves the write to finish

    async def _write_due(self) -> None:
        while self._due:
            due, self._due = self._due, {}
            batch = [(c, *c.take()) for c in self._members.values() if c.pending]
            try:
                results: list[int | BaseException] = await self._run(self._write, batch)
            except Exception as e:  # the store's threads are gone: nothing was written
                results = [e] * len(batch)
            if self._on_written is not None:
                self._on_written(sum(not isinstance(r, BaseException) for r in results))
            for (ckpt, _, tokens), result in zip(batch, results):
                fut = due.pop(id(ckpt), None)
                if isinstance(result, BaseException):
                    ckpt.restore(tokens)
                    if fut is not None and not fut.done():
                        fut.set_exception(result)
                else:
                    ckpt.settle(result)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
            for fut in due.values():  # turns that left meanwhile: their own last write takes their tokens
                if not fut.done():
                    fut.set_result(None)

    def _write(self, batch: list[Write]) -> list[int | BaseException]:
        """On a store thread: every write in one transaction, or, when that fails, each in its own."""
        try:
            with self.store.batch():
                return [self._append(write) for write in batch]
        except Exception:  # one chain's error rolled back all of them: write each alone so only it fails
            return [self._try_append(write) for write in batch]

    def _append(self, write: Write) -> int:
        ckpt, start, tokens = write
        return self.store.append_tokens(ckpt.chain_id, ckpt.turn, start, tokens)

    def _try_append(self, write: Write) -> int | BaseException:
        try:
            return self._append(write)
        except Exception as e:
            return e
