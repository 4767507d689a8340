"""Generating a chain's turn on this router: the task that streams it from the groups (re-dispatching after a
group failure with the tokens so far as `output_prefix`), publishes each token to the turn's readers once the
chain store holds it, and ends the turn in the store. `RouterCore` decides which turn to run; this runs it.

A turn nobody reads (its client left) generates on only within `router.limits.detached_max_tokens` and
`detached_timeout_s`; then it stops as if its router shut down: its tokens durable, the turn "running" in the store
and the chain released, so a later resume (here or on another router) claims it and generates on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from k2serve.config import ServingConfig
from k2serve.faults import RouterFaults
from k2serve.metrics import Metrics
from k2serve.router.chains import ChainCheckpointer, ChainStore
from k2serve.router.chains.batched_commit import BatchedCommit
from k2serve.router.dispatch import Dispatcher, GroupFailed
from k2serve.router.live import ChainToken, LiveTurn
from k2serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class _DetachedBudgetSpent(Exception):
    """The turn's readers left and its detached budget is spent."""


class TurnRunner:
    def __init__(self, config: ServingConfig, store: ChainStore, io: Callable[..., asyncio.Future[Any]],
                 dispatcher: Dispatcher, metrics: Metrics, faults: RouterFaults, router_id: str) -> None:
        """`io(fn, *args)` runs a blocking store call on the store's threads."""
        self.config = config
        self.store = store
        self._io = io
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.faults = faults
        self.router_id = router_id
        self.live: dict[str, LiveTurn] = {}  # chain id -> its turn generating here
        # The live turns' checkpoints, written together.
        self._commits = BatchedCommit(store, io, metrics.chain_checkpoints.inc)

    def launch(self, chain_id: str, turn: int, prompt: list[int], params: SamplingParams, det: bool,
               done: list[int], *, began_here: bool) -> LiveTurn:
        """Registers the turn as live here (stored tokens replayed into it) and starts its generating task."""
        live = LiveTurn(chain_id, turn, len(prompt))
        live.replay(done)
        ckpt = ChainCheckpointer(self.store, chain_id, turn, self.config.chain_store.checkpoint_every,
                                 durable=len(done), on_settled=live.reveal)
        self.live[chain_id] = live
        self._commits.join(ckpt)
        live.task = asyncio.get_running_loop().create_task(
            self._drive(live, prompt, params, det, ckpt, began_here), name=f"turn {chain_id}:{turn}")
        return live

    async def _drive(self, live: LiveTurn, prompt: list[int], params: SamplingParams, det: bool,
                     ckpt: ChainCheckpointer, began_here: bool) -> None:
        """Generates the rest of a live turn, re-dispatching after group failures; ends it in the store
        before its last token is published, so a reader that stops at the last token sees a finished turn."""
        chain_id = live.chain_id
        tokens = [t.token for t in live.items]
        n_done = len(tokens)
        self.metrics.router_queue.inc()
        t0 = last = time.monotonic()
        failed_at: float | None = None
        migrations = 0
        exclude: set[str] = set()
        error: BaseException | None = None
        status, reason = "failed", "error"
        try:
            while True:
                stream = self.dispatcher.dispatch(prompt, params, det, tokens, live, exclude)
                try:
                    async for ev in stream:
                        if ev.index < len(tokens):
                            continue  # already streamed before a re-dispatch
                        if ev.index > len(tokens):
                            raise RuntimeError(f"worker skipped from index {len(tokens)} to {ev.index}")
                        tokens.append(ev.token)
                        finish = ev.finish_reason or None
                        now = time.monotonic()
                        if failed_at is not None:
                            self.metrics.failover_seconds.observe(now - failed_at)
                            failed_at = None
                        (self.metrics.ttft if ev.index == n_done else self.metrics.itl).observe(now - last)
                        last = now
                        self.metrics.generation_tokens.inc()
                        tok = ChainToken(chain_id, live.turn, ev.index, ev.token, ev.logprob,
                                         [(t.token, t.logprob) for t in ev.top_logprobs] or None, finish,
                                         len(prompt))
                        live.publish(tok)  # seen by readers once durable (live.reveal)
                        ckpt.pending.append(ev.token)
                        if finish is not None:
                            status, reason = "finished", finish
                            self.metrics.e2e.observe(now - t0)
                            # Ended in the store and the lease released before the last token is out, so the
                            # client's next turn on the chain finds it free.
                            await self._close(ckpt, status, reason)
                            status = ""
                            self._unregister(live)  # also before the last token: a next turn may start at once
                            live.reveal(ckpt.durable)
                            return
                        if self._detached_spent(live, len(tokens) - n_done, now):
                            raise _DetachedBudgetSpent
                        if len(ckpt.pending) >= ckpt.every:  # the store fell behind: wait for it
                            await self._commits.flush(ckpt)
                        else:  # durable with the next group write, then visible
                            self._commits.kick(ckpt)
                        self.faults.after_token(len(tokens), began_here)
                    raise GroupFailed(live.group_id, "stream ended without a finish reason")
                except GroupFailed as e:
                    if live.cancelled:
                        raise asyncio.CancelledError from e
                    migrations += 1
                    self.dispatcher.mark_failed(e.group_id)
                    exclude.add(e.group_id)
                    if migrations > self.config.chain_store.migration_limit:
                        raise RuntimeError(f"chain {chain_id}: gave up after {migrations - 1} re-dispatches; "
                                           f"last failure: {e}") from e
                    log.warning("chain %s: %s; re-dispatching at token %d", chain_id, e, len(tokens))
                    self.metrics.migrations.inc()
                    self.metrics.chain_resumes.labels(cause="group").inc()
                    failed_at = time.monotonic()
                finally:
                    await stream.aclose()
        except asyncio.CancelledError:
            status, reason = "cancelled", "cancelled"
        except _DetachedBudgetSpent:
            log.info("chain %s: turn %d has no reader and spent its detached budget; stopped, resumable at token %d",
                     chain_id, live.turn, len(tokens))
            live.abandoned = True
        except Exception as e:  # the readers get it; the turn ends "failed"
            log.warning("chain %s: turn %d failed: %s", chain_id, live.turn, e)
            error = e
        finally:
            self.metrics.router_queue.dec()
            self._unregister(live)
            if live.abandoned:  # make what we have durable and leave the turn "running" for another router
                await asyncio.shield(self._close(ckpt))
            elif status:  # else it ended with its last token
                await asyncio.shield(self._close(ckpt, status, reason))
            live.reveal(ckpt.durable)
            live.end(error)

    def _detached_spent(self, live: LiveTurn, generated: int, now: float) -> bool:
        """Whether a turn without readers has generated `detached_max_tokens` or run `detached_timeout_s` since
        its last reader left (a reader coming back resets the budget)."""
        if live.readers:
            live.detached_at = None
            return False
        if live.detached_at is None:  # the token just generated is the first nobody waited for
            live.detached_at = (now, generated - 1)
        since, at = live.detached_at
        limits = self.config.router.limits
        return generated - at >= limits.detached_max_tokens or now - since >= limits.detached_timeout_s

    def _unregister(self, live: LiveTurn) -> None:
        if self.live.get(live.chain_id) is live:
            del self.live[live.chain_id]

    async def _close(self, ckpt: ChainCheckpointer, status: str | None = None, reason: str | None = None) -> None:
        """The turn's last writes (`_leave`), once no group write holds its tokens."""
        await self._commits.leave(ckpt)
        await self._io(self._leave, ckpt, status, reason)

    def _leave(self, ckpt: ChainCheckpointer, status: str | None = None, reason: str | None = None) -> None:
        """Makes the turn's tokens durable, ends it with `status` (none: it stays "running" for another router to
        resume) and releases the chain: one thread hop and one commit. A store that is down loses only the tokens
        since the last checkpoint: the turn stays "running" and a resume regenerates them."""
        try:
            with self.store.batch():
                if status is None:
                    ckpt.flush()
                else:
                    ckpt.finish(status, reason)  # type: ignore[arg-type]
                self.store.release(ckpt.chain_id, self.router_id)
            self.metrics.chain_checkpoints.inc()
        except Exception:
            log.exception("chain %s: could not %s turn %d", ckpt.chain_id, "end" if status else "checkpoint",
                          ckpt.turn)
            with contextlib.suppress(Exception):  # an unreleased lease lapses by itself
                self.store.release(ckpt.chain_id, self.router_id)
