"""The router's request plane as a Python API: the gRPC router service and the OpenAI HTTP front both sit on
`RouterCore`.

One generation (a chain turn): validate → `begin_turn` in the chain store (sampling with its resolved seed,
so a replay after any failure draws the same numbers) → dispatch (P/D: `Prefill` on a prefill group, then a
`Decode` stream on a decode group that takes the KV handle; aggregated: one `Decode` stream) → stream
tokens, checkpointing every `checkpoint_every` → `finish_turn`. When a group fails mid-stream (an RPC error
or a stream that ends without a finish reason) the rest is re-dispatched to a healthy group with the tokens
so far as `output_prefix`; indices the client already has are skipped, so its stream has no gap or repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from k2serve.config import ServingConfig
from k2serve.metrics import Metrics
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.router.chains import Chain, ChainCheckpointer, ChainStore, ToolCall
from k2serve.router.schedule import GroupDirectory, GroupState, NoGroupAvailable, Scheduler
from k2serve.worker.engine.sampling import SamplingParams, resolve_seed
from k2serve.worker.loader import resolve_model
from k2serve.worker.model.config import K2Config
from k2serve.worker.service import sampling_to_proto
from k2serve.worker.tokenizer import K2Tokenizer

log = logging.getLogger(__name__)
REFRESH_S = 0.5
RPC_TIMEOUT_S = 2.0
GROUP_WAIT_S = 30.0  # how long a request waits for some healthy group of a role


@dataclass
class ChainToken:
    chain_id: str
    turn: int
    index: int  # among the turn's generated tokens
    token: int
    logprob: float | None  # None for tokens replayed from the store (only ids are durable)
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # "stop" | "length" on the last token, else None
    prompt_tokens: int


class GroupFailed(Exception):
    def __init__(self, group_id: str, detail: str) -> None:
        self.group_id = group_id
        super().__init__(f"worker group {group_id}: {detail}")


@dataclass
class _Group:
    state: GroupState
    channel: grpc.aio.Channel
    stub: pb_grpc.WorkerGroupStub


@dataclass
class _Active:
    """A turn being generated here: what `cancel` needs to stop it."""

    calls: set[Any] = field(default_factory=set)  # in-flight gRPC calls
    cancelled: bool = False
    group_id: str = ""  # the group of the latest call


class RouterCore:
    def __init__(self, config: ServingConfig, tokenizer: K2Tokenizer, store: ChainStore, metrics: Metrics,
                 groups: GroupDirectory) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.store = store
        self.metrics = metrics
        self.directory = groups
        source = config.model.source
        self.model_name = config.router.served_model_name or source.removeprefix("builtin:").rstrip("/").split("/")[-1]
        model_max = K2Config.from_dir(resolve_model(source)).max_position_embeddings
        self.max_context = min(config.model.max_context, model_max)
        self.scheduler = Scheduler(config.router.routing_policy, config.decode.block_size)
        self._groups: dict[str, _Group] = {}
        self._active: dict[str, _Active] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Learns the groups once, then keeps their health and load fresh in the background."""
        if self._refresher is None:
            await self.refresh()
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        for g in self._groups.values():
            await g.channel.close()
        self._groups.clear()

    def ready(self) -> bool:
        states = [g.state for g in self._groups.values()]
        return any(s.serves("prefill") for s in states) and any(s.serves("decode") for s in states)

    async def refresh(self) -> None:
        async with self._lock:
            known = {a.group_id: a for a in await self.directory.list_groups()}
            for gid in [g for g in self._groups if g not in known or self._groups[g].state.addr != known[g]]:
                await self._groups.pop(gid).channel.close()
            for gid, addr in known.items():
                if gid not in self._groups:
                    channel = grpc.aio.insecure_channel(addr.address, options=[
                        ("grpc.max_receive_message_length", 64 << 20)])
                    self._groups[gid] = _Group(GroupState(addr), channel, pb_grpc.WorkerGroupStub(channel))
        await asyncio.gather(*(self._poll(g) for g in list(self._groups.values())))

    async def _poll(self, g: _Group) -> None:
        try:
            health = await g.stub.Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S)
            g.state.stats = await g.stub.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S)
            g.state.healthy = health.healthy
        except grpc.aio.AioRpcError:
            g.state.healthy = False

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except Exception:  # a flaky registry must not stop health tracking
                log.exception("refreshing worker groups failed")

    # ---- generation -----------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], sampling: SamplingParams, *, chain_id: str | None = None,
                       deterministic: bool = False, request_meta: dict[str, Any] | None = None
                       ) -> AsyncIterator[ChainToken]:
        """Streams one turn. Bad requests raise ValueError before the first token; an unknown `chain_id`
        raises `ChainNotFound` (a KeyError)."""
        self._validate(prompt_ids, sampling)
        await self.start()
        params = sampling.model_copy(update={"seed": resolve_seed(sampling)})
        det = deterministic or self.config.deterministic
        chain_id = await asyncio.to_thread(self._open_chain, chain_id)
        turn = await asyncio.to_thread(self.store.begin_turn, chain_id, request_meta or {},
                                       {**params.model_dump(mode="json"), "deterministic": det}, prompt_ids)
        ckpt = ChainCheckpointer(self.store, chain_id, turn, self.config.chain_store.checkpoint_every)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        async for tok in self._run_turn(chain_id, turn, list(prompt_ids), params, det, ckpt, [], 0):
            yield tok

    async def resume(self, chain_id: str, from_index: int) -> AsyncIterator[ChainToken]:
        """The latest turn of a chain from generated index `from_index` on: replayed from the store, and, if
        the turn was left running (its router died), generated on from the last checkpoint."""
        chain = await asyncio.to_thread(self.store.get_chain, chain_id)
        if not chain.turns:
            raise ValueError(f"chain {chain_id} has no turn to resume")
        if chain_id in self._active:
            raise ValueError(f"chain {chain_id} is being generated by this router now")
        turn = chain.turns[-1]
        if from_index < 0 or from_index > len(turn.generated) and turn.status != "running":
            raise ValueError(f"from_index {from_index} is outside 0..{len(turn.generated)} for chain {chain_id}")
        n_prompt = len(turn.prompt_tokens)
        stored = turn.generated
        if turn.status != "running":
            for i in range(from_index, len(stored)):
                last = i == len(stored) - 1
                yield ChainToken(chain_id, turn.index, i, stored[i], None, None,
                                 turn.finish_reason if last else None, n_prompt)
            return
        self.metrics.chain_resumes.labels(cause="router").inc()
        det = bool(turn.sampling.get("deterministic", False))
        params = SamplingParams.model_validate({k: v for k, v in turn.sampling.items() if k != "deterministic"})
        ckpt = ChainCheckpointer(self.store, chain_id, turn.index, self.config.chain_store.checkpoint_every,
                                 durable=len(stored))
        for i in range(from_index, len(stored)):
            yield ChainToken(chain_id, turn.index, i, stored[i], None, None, None, n_prompt)
        async for tok in self._run_turn(chain_id, turn.index, turn.prompt_tokens, params, det, ckpt, stored,
                                        from_index):
            yield tok

    async def cancel(self, chain_id: str) -> bool:
        active = self._active.get(chain_id)
        if active is None:
            return False
        active.cancelled = True
        for call in list(active.calls):
            call.cancel()
        return True

    async def get_chain(self, chain_id: str) -> Chain:
        return await asyncio.to_thread(self.store.get_chain, chain_id)

    async def delete_chain(self, chain_id: str) -> bool:
        if chain_id in self._active:
            await self.cancel(chain_id)
        return await asyncio.to_thread(self.store.delete_chain, chain_id)

    async def record_tool_calls(self, chain_id: str, turn: int, calls: Sequence[ToolCall]) -> None:
        """The tool calls parsed from a finished turn's output, into the chain's transcript."""
        await asyncio.to_thread(self.store.record_tool_calls, chain_id, turn, calls)

    async def record_tool_results(self, chain_id: str, results: dict[str, str]) -> None:
        """Results the client sent back (tool_call_id → content) for calls already in the transcript."""
        for call_id, result in results.items():
            await asyncio.to_thread(self.store.record_tool_result, chain_id, call_id, result)

    # ---- internals ------------------------------------------------------------------------------------
    def _validate(self, prompt: list[int], sampling: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {bad[:5]}")
        if len(prompt) + sampling.max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                             f"context limit of {self.max_context} tokens")

    def _open_chain(self, chain_id: str | None) -> str:
        if chain_id is None:
            return self.store.create_chain()
        self.store.get_chain(chain_id)  # raises ChainNotFound
        return chain_id

    async def _run_turn(self, chain_id: str, turn: int, prompt: list[int], params: SamplingParams, det: bool,
                        ckpt: ChainCheckpointer, done: list[int], from_index: int) -> AsyncIterator[ChainToken]:
        """Generates the rest of a turn whose first `done` tokens exist, yielding indices >= from_index."""
        tokens = list(done)
        active = self._active[chain_id] = _Active()
        self.metrics.router_queue.inc()
        t0 = last = time.monotonic()
        failed_at: float | None = None
        migrations = 0
        exclude: set[str] = set()
        status, reason = "failed", "error"
        try:
            while True:
                stream = self._dispatch(prompt, params, det, tokens, active, exclude)
                try:
                    async for ev in stream:
                        if ev.index < len(tokens):
                            continue  # already streamed before a re-dispatch
                        if ev.index > len(tokens):
                            raise RuntimeError(f"worker skipped from index {len(tokens)} to {ev.index}")
                        tokens.append(ev.token)
                        ckpt.pending.append(ev.token)
                        if len(ckpt.pending) >= ckpt.every:
                            await asyncio.to_thread(ckpt.flush)
                            self.metrics.chain_checkpoints.inc()
                        now = time.monotonic()
                        if failed_at is not None:
                            self.metrics.failover_seconds.observe(now - failed_at)
                            failed_at = None
                        (self.metrics.ttft if ev.index == len(done) else self.metrics.itl).observe(now - last)
                        last = now
                        self.metrics.generation_tokens.inc()
                        finish = ev.finish_reason or None
                        if ev.index >= from_index:
                            yield ChainToken(chain_id, turn, ev.index, ev.token, ev.logprob,
                                             [(t.token, t.logprob) for t in ev.top_logprobs] or None, finish,
                                             len(prompt))
                        if finish is not None:
                            status, reason = "finished", finish
                            self.metrics.e2e.observe(now - t0)
                            return
                    raise GroupFailed(active.group_id, "stream ended without a finish reason")
                except GroupFailed as e:
                    if active.cancelled:
                        status, reason = "cancelled", "cancelled"
                        return
                    migrations += 1
                    self._mark_failed(e.group_id)
                    exclude.add(e.group_id)
                    if migrations > self.config.chain_store.migration_limit:
                        raise RuntimeError(f"chain {chain_id}: gave up after {migrations - 1} re-dispatches; "
                                           f"last failure: {e}") from e
                    log.warning("chain %s: %s; re-dispatching at token %d", chain_id, e, len(tokens))
                    self.metrics.migrations.inc()
                    failed_at = time.monotonic()
                finally:
                    await stream.aclose()
        except (asyncio.CancelledError, GeneratorExit):
            status, reason = "cancelled", "cancelled"
            raise
        finally:
            self.metrics.router_queue.dec()
            self._active.pop(chain_id, None)
            await asyncio.shield(asyncio.to_thread(self._finish, ckpt, status, reason))

    def _finish(self, ckpt: ChainCheckpointer, status: str, reason: str) -> None:
        try:
            ckpt.finish(status, reason)  # type: ignore[arg-type]
            self.metrics.chain_checkpoints.inc()
        except Exception:  # the store is down: the turn stays "running" and can be resumed later
            log.exception("chain %s: could not finish turn %d", ckpt.chain_id, ckpt.turn)

    def _mark_failed(self, group_id: str) -> None:
        g = self._groups.get(group_id)
        if g is not None:
            g.state.healthy = False  # the next successful health poll brings it back

    def _states(self) -> list[GroupState]:
        return [g.state for g in self._groups.values()]

    async def _pick(self, role: str, tokens: list[int], exclude: set[str]) -> _Group:
        """A group for `role`; with none healthy, waits (re-polling) for one to come back or be replaced."""
        deadline = time.monotonic() + GROUP_WAIT_S
        while True:
            try:
                state = self.scheduler.pick(self._states(), role, tokens, exclude)  # type: ignore[arg-type]
                return self._groups[state.addr.group_id]
            except NoGroupAvailable:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    async def _dispatch(self, prompt: list[int], params: SamplingParams, det: bool, done: list[int],
                        active: _Active, exclude: set[str]) -> AsyncIterator[pb.TokenEvent]:
        """The token events of one attempt, from index len(done) on; group failures raise GroupFailed."""
        sampling = sampling_to_proto(params)
        prefix = list(done)
        kv_handle = b""
        if not self.config.router.aggregated:
            g = await self._pick("prefill", prompt + prefix, exclude)
            resp = await self._call(g, active, g.stub.Prefill, pb.PrefillRequest(
                request_id=uuid.uuid4().hex, prompt=prompt, sampling=sampling, deterministic=det,
                output_prefix=prefix))
            yield resp.first
            if resp.first.finish_reason:
                return
            prefix.append(resp.first.token)
            kv_handle = resp.kv_handle
            g = await self._pick("decode", [], exclude)
        else:
            g = await self._pick("prefill", prompt + prefix, exclude)
        request = pb.DecodeRequest(request_id=uuid.uuid4().hex, prompt=prompt, sampling=sampling,
                                   deterministic=det, output_prefix=prefix, kv_handle=kv_handle)
        call = g.stub.Decode(request, timeout=self.config.router.request_timeout_s)
        first = True
        with self._tracked(g, active, call):
            async for ev in call:
                if first and ev.kv_handoff:
                    self.metrics.kv_handoffs.labels(outcome=ev.kv_handoff).inc()
                first = False
                yield ev

    async def _call(self, g: _Group, active: _Active, method: Any, request: Any) -> Any:
        call = method(request, timeout=self.config.router.request_timeout_s)
        with self._tracked(g, active, call):
            return await call

    @contextlib.contextmanager
    def _tracked(self, g: _Group, active: _Active, call: Any) -> Iterator[None]:
        """Load accounting and `cancel()` reach for one RPC; its failures become GroupFailed (or ValueError)."""
        gid = g.state.addr.group_id
        active.calls.add(call)
        active.group_id = gid
        g.state.inflight += 1
        try:
            yield
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from e
            raise GroupFailed(gid, f"{e.code().name}: {e.details()}") from e
        except asyncio.CancelledError:
            if active.cancelled:  # `cancel()` stopped the call, not our caller
                raise GroupFailed(gid, "cancelled") from None
            raise
        finally:
            g.state.inflight -= 1
            active.calls.discard(call)
            call.cancel()
