"""The worker group's gRPC service (`k2serve.v1.WorkerGroup`), served by the group leader over an `EngineLoop`.

Prefill runs the prompt as a one-token request that holds its KV and exports that KV into Ray's object store
(an expert-parallel group leaves it where its rank put it; a single-process engine's is `ray.put` here), keeps
the ObjectRef in its own table under a random id for a TTL, and returns a `KVHandle` descriptor — group id, that
id, token count, digest of the tokens (worker/kv_handoff.py). Decode checks the handle against its own prompt,
asks the named group — found through trusted `KVPeers`, never an address from the message — for the ref, brings
the object to its node and hands it to the engine — to a group as the ref, which its rank resolves, so KV bytes
never pass through a leader. Nothing a peer sends is unpickled. A handle naming a group no trusted source knows
is refused (INVALID_ARGUMENT); an unusable one (another prompt's, expired, object gone, owner dead) makes the
engine re-prefill instead, so a failed handoff costs time, never tokens. Without a Ray connection Prefill returns
no handle and Decode always re-prefills.
DecodeMany is Decode for many requests over one call (what routers use): one message per engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import grpc
from prometheus_client import Counter

from k2serve import grpc_tls
from k2serve.cluster_auth import ClusterToken, server_interceptors
from k2serve.config import TLSConfig
from k2serve.groups import Role
from k2serve.metrics import Metrics
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.proto.convert import sampling_from_proto
from k2serve.faults import GroupFaults
from k2serve.worker.engine.requests import KVHandoff, KVHandoffLost, TokenEvent
from k2serve.worker.kv_handoff import HeldKV, KVPeers, LocalPeers, UnknownPeer, check_handle, make_handle
from k2serve.worker.engine.loop import EngineLoop
from k2serve.worker.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

KV_FETCH_TIMEOUT_S = 10.0


def event_to_proto(ev: TokenEvent, seed: int | None = None, kv_handoff: str = "") -> pb.TokenEvent:
    return pb.TokenEvent(request_id=ev.request_id, index=ev.index, token=ev.token, logprob=ev.logprob,
                         top_logprobs=[pb.TopLogprob(token=t, logprob=lp) for t, lp in ev.top_logprobs or ()],
                         finish_reason=ev.finish_reason or "", seed=seed or 0, kv_handoff=kv_handoff)


@dataclass
class HandoffCounts:
    ok: int = 0
    fallback: int = 0


class WorkerService(pb_grpc.WorkerGroupServicer):
    """One group's service. `loop.engine` is an `Engine` or an expert-parallel group with the same surface
    (`add_request/cancel/has_work/step/export_kv`, and `running`, `waiting`, `blocks`, `stats` for Stats)."""

    def __init__(self, loop: EngineLoop, *, group_id: str, role: Role, block_size: int,
                 metrics: Metrics | None = None, kv_ttl_s: float = 60.0, faults: GroupFaults | None = None,
                 peers: KVPeers | None = None, token: ClusterToken | None = None,
                 tls: TLSConfig | None = None) -> None:
        """`peers`: where handed-off KV is fetched from (default: none, every handle is refused); `token`: the
        cluster token every call must carry (None: open); `tls`: serve TLS (None: plaintext)."""
        self.loop = loop
        self.faults = faults
        self.dead = asyncio.Event()  # set once a fault killed this group (its host may start a new one)
        self.group_id = group_id
        self.role: Role = role
        self.block_size = block_size
        self.metrics = metrics
        self.handoffs = HandoffCounts()
        self.held = HeldKV(kv_ttl_s)  # KV this group exported, by handle id
        self.peers: KVPeers = peers if peers is not None else LocalPeers()
        self.token = token
        self.tls = tls
        self._reported: dict[Counter, int] = {}  # cumulative values already exported, per counter
        self._server: grpc.aio.Server | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self.failed: str | None = None  # set when the engine broke; Health reports it
        # Set when the pool controller scales this group away: Health says unhealthy, so routers send it nothing
        # new, while the turns it runs finish on it.
        self.draining = False
        if metrics is not None:
            metrics.init_group(role, group_id)

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Starts the engine loop and the gRPC server; returns the bound `host:port`."""
        self.loop.start()
        self._server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20),
                                                ("grpc.max_receive_message_length", 64 << 20)],
                                       interceptors=server_interceptors(self.token))
        pb_grpc.add_WorkerGroupServicer_to_server(self, self._server)
        bound = grpc_tls.bind(self._server, f"{host}:{port}", self.tls)
        if bound == 0:
            raise RuntimeError(f"worker group {self.group_id}: cannot bind gRPC on {host}:{port}")
        await self._server.start()
        self._gc_task = asyncio.get_running_loop().create_task(self._housekeeping())
        return f"{host}:{bound}"

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stops serving; in-flight streams end with an error (what a router sees when a group dies)."""
        if self._gc_task is not None:
            self._gc_task.cancel()
            self._gc_task = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        self.held.clear()
        await self.loop.stop()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.held.expire()
            if self.metrics is not None:
                await self._export_gauges()

    # ---- RPCs -----------------------------------------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        params = await self._params(request.sampling, context)
        limit = self.loop.engine.max_model_len
        if len(request.prompt) + params.max_tokens > limit:  # the one-token request below would not notice
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(request.prompt)} prompt tokens + max_tokens "
                                f"{params.max_tokens} exceed the context limit {limit}")
        one = params.model_copy(update={"max_tokens": len(request.output_prefix) + 1})
        rid = request.request_id or uuid.uuid4().hex
        try:
            seed, events = await self.loop.submit(rid, list(request.prompt), one,
                                                  output_prefix=list(request.output_prefix),
                                                  deterministic=request.deterministic, hold_kv=True)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        first = [ev async for ev in events]
        if len(first) != 1:
            await context.abort(grpc.StatusCode.ABORTED, f"prefill of {rid} produced {len(first)} tokens")
        ev = first[0]
        # The engine ends the one-token request with "length"; the real request is finished only if its own
        # limits say so.
        produced = len(request.output_prefix) + 1
        finished = ev.finish_reason == "stop" or produced >= params.max_tokens
        ev.finish_reason = ev.finish_reason if finished else None
        tokens = list(request.prompt) + list(request.output_prefix)
        handle = None if finished else await self._export(rid, tokens)
        if finished:
            await self.loop.call(self.loop.engine.release, rid)
        await self._maybe_die(context)
        return pb.PrefillResponse(first=event_to_proto(ev, seed), kv_handle=handle,
                                  kv_tokens=handle.tokens if handle is not None else 0)

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TokenEvent]:
        params = await self._params(request.sampling, context)
        rid = request.request_id or uuid.uuid4().hex
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        if request.forks:  # this stream carries one request's events
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "forks (n > 1) need DecodeMany")
        try:
            seed, outcome = await self._attach(rid, request, params, queue)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        first = True
        try:
            async for ev in self.loop.stream(rid, queue):
                yield event_to_proto(ev, seed if first else None, outcome if first else "")
                first = False
                await self._maybe_die(context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # the engine or group failed: everything it held is lost, this request with it
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker group {self.group_id} lost {rid}: {e}")

    async def DecodeMany(self, request_iterator: AsyncIterator[pb.DecodeManyRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TokenEvents]:
        """Decode for many requests over one call (see the proto): the engine loop puts every request's events
        in one queue, and each message carries what is there — all that a step produced."""
        sink: asyncio.Queue[TokenEvent | BaseException | pb.RequestError] = asyncio.Queue()
        live: set[str] = set()  # started on this call and not finished or cancelled
        firsts: dict[str, tuple[int, str]] = {}  # (seed, kv handoff outcome) for a request's first event
        starts: set[asyncio.Task[None]] = set()

        async def start(request: pb.DecodeRequest) -> None:
            rid = request.request_id
            try:
                seed, outcome = await self._attach(rid, request, sampling_from_proto(request.sampling), sink)
            except Exception as e:  # refused (a bad request), or the engine loop is gone: this request only
                code = "INVALID_ARGUMENT" if isinstance(e, ValueError) else "UNAVAILABLE"
                for r in (rid, *(f.request_id for f in request.forks)):
                    live.discard(r)
                    sink.put_nowait(pb.RequestError(request_id=r, code=code, detail=str(e)))
                return
            for r, s in ((rid, seed), *((f.request_id, f.seed) for f in request.forks)):
                if r in live:
                    firsts[r] = (s, outcome)  # its first event comes from a later step
                else:  # cancelled while it was being added
                    await self.loop.cancel(r)

        async def read() -> None:
            async for msg in request_iterator:
                if msg.WhichOneof("op") == "decode":
                    live.update([msg.decode.request_id, *(f.request_id for f in msg.decode.forks)])  # now: a cancel
                    # may arrive before `start` runs
                    task = asyncio.get_running_loop().create_task(start(msg.decode))
                    starts.add(task)
                    task.add_done_callback(starts.discard)
                elif msg.cancel in live:
                    live.discard(msg.cancel)
                    firsts.pop(msg.cancel, None)
                    await self.loop.cancel(msg.cancel)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                items = [await sink.get()]
                while not sink.empty():
                    items.append(sink.get_nowait())
                out = pb.TokenEvents()
                for item in items:
                    if isinstance(item, pb.RequestError):
                        out.errors.append(item)
                    elif isinstance(item, asyncio.CancelledError):
                        continue  # the end of a request this call cancelled
                    elif isinstance(item, BaseException):  # the engine broke: every request is lost
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker group {self.group_id}: {item!r}")
                    elif item.request_id in live:
                        out.events.append(event_to_proto(item, *firsts.pop(item.request_id, (None, ""))))
                        if item.finish_reason is not None:
                            live.discard(item.request_id)
                if out.events or out.errors:
                    yield out
                for _ in out.events:
                    await self._maybe_die(context)
        finally:
            for task in [reader, *starts]:
                task.cancel()
            # The reader ends with the call's error when the router goes away: nothing to report.
            await asyncio.gather(reader, *starts, return_exceptions=True)
            for rid in list(live):  # the router went away or the call failed: stop computing its requests
                with contextlib.suppress(RuntimeError):  # the engine loop is already stopped (group dying)
                    await self.loop.cancel(rid)

    async def _maybe_die(self, context: grpc.aio.ServicerContext) -> None:
        """Injected group death (`kill_group`/`kill_actor`): the whole group stops serving, every stream of it
        fails, as when its process or one of its actors dies."""
        kind = self.faults.token() if self.faults is not None else None
        if kind is None:
            return
        asyncio.get_running_loop().create_task(self._die())
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker group {self.group_id}: {kind} (fault injection)")

    async def _die(self) -> None:
        await self.stop()
        self.dead.set()

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        return pb.CancelResponse(cancelled=await self.loop.cancel(request.request_id))

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        broken = self.loop.error
        detail = self.failed or (f"engine failed: {broken!r}" if broken is not None else "") or (
            "draining: scaled down, takes no new requests" if self.draining else "")
        return pb.HealthResponse(healthy=not detail, role=self.role, group_id=self.group_id, detail=detail)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        return await self.load()

    # ---- KV handoff -----------------------------------------------------------------------------------
    async def _export(self, rid: str, tokens: list[int]) -> pb.KVHandle | None:
        """The handle of a finished hold_kv request's KV (`tokens`: its prompt + output_prefix); None without Ray."""
        import ray

        engine = self.loop.engine
        if getattr(engine, "kv_in_object_store", False):
            ref, n = await self.loop.call(engine.export_kv_ref, rid)
        else:
            kv: KVHandoff = await self.loop.call(engine.export_kv, rid)
            if not ray.is_initialized():
                return None
            ref, n = ray.put(kv), len(kv.tokens)
        return make_handle(self.group_id, self.held.put(ref), tokens[:n], self.block_size)

    async def _attach(self, rid: str, request: pb.DecodeRequest, params: SamplingParams,
                      sink: asyncio.Queue[Any]) -> tuple[int, str]:
        """Queues a decode request whose events go to `sink`, with its handed-off KV when that is usable;
        returns (seed, handoff outcome: "" without a handle, else "ok" or "fallback" = re-prefilled)."""
        kwargs: dict[str, Any] = {"output_prefix": list(request.output_prefix), "deterministic": request.deterministic}
        has_handle = request.HasField("kv_handle")
        if request.forks:  # the engine refuses them with an output_prefix; a KV handle is not for them either
            if has_handle:
                raise ValueError(f"request {rid!r}: forks (n > 1) with a kv_handle")
            kwargs["forks"] = [(f.request_id, f.seed) for f in request.forks]
        kv = await self._fetch(request.kv_handle, request) if has_handle else None
        if kv is not None:
            try:
                seed = await self.loop.attach(rid, list(request.prompt), params, sink, kv=kv, **kwargs)
                self.handoffs.ok += 1
                return seed, "ok"
            except KVHandoffLost as e:  # lost between the check and the rank reading it
                log.warning("group %s: KV handoff for %s failed, re-prefilling: %s", self.group_id, rid, e)
        seed = await self.loop.attach(rid, list(request.prompt), params, sink, **kwargs)
        if not has_handle:
            return seed, ""
        self.handoffs.fallback += 1
        return seed, "fallback"

    async def _fetch(self, handle: pb.KVHandle, request: pb.DecodeRequest) -> Any:
        """What the engine imports — the KVHandoff, or for a group its ObjectRef, brought to this node — or None
        (re-prefill) when the handle is unusable. Raises UnknownPeer (a ValueError: the request is refused) for a
        handle naming a group no trusted source knows."""
        try:
            import ray

            ref = await self.peers.ref(handle.group_id, handle.id)  # the group first: an unknown one is refused
            if ref is None or not ray.is_initialized():
                raise LookupError(f"group {handle.group_id} holds no such KV (expired, restarted, or no Ray)")
            check_handle(handle, list(request.prompt) + list(request.output_prefix), self.block_size)
            if getattr(self.loop.engine, "kv_in_object_store", False):
                # Here, not on the rank: a slow transfer must not hold up the rank's steps.
                ready, _ = await asyncio.to_thread(ray.wait, [ref], num_returns=1, timeout=KV_FETCH_TIMEOUT_S,
                                                   fetch_local=True)
                if not ready:
                    raise TimeoutError(f"KV not on this node after {KV_FETCH_TIMEOUT_S} s")
                return ref
            kv = await asyncio.wait_for(asyncio.wrap_future(ref.future()), KV_FETCH_TIMEOUT_S)
            if not isinstance(kv, KVHandoff):
                raise TypeError(f"kv_handle's object is a {type(kv).__name__}, not a KVHandoff")
            return kv
        except UnknownPeer:
            raise
        except Exception as e:  # any failure to fetch means: recompute the prompt here
            log.warning("group %s: KV handoff for %s failed, re-prefilling: %s", self.group_id, request.request_id, e)
            return None

    # ---- stats ----------------------------------------------------------------------------------------
    async def _params(self, s: pb.SamplingParams, context: grpc.aio.ServicerContext) -> SamplingParams:
        try:
            return sampling_from_proto(s)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad sampling parameters: {e}")
            raise  # abort raises; this keeps type checkers aware

    def _stats(self) -> pb.StatsResponse:
        """Runs on the engine thread (consistent snapshot between steps)."""
        eng = self.loop.engine
        return pb.StatsResponse(
            group_id=self.group_id, role=self.role, running=len(eng.running), waiting=len(eng.waiting),
            kv_blocks_used=eng.blocks.num_used_blocks, kv_blocks_free=eng.blocks.num_free_blocks,
            prefill_tokens=eng.stats.prefill_tokens, decode_tokens=eng.stats.decode_tokens,
            prefix_hit_tokens=eng.blocks.prefix_hit_tokens, kv_handoffs_ok=self.handoffs.ok,
            kv_handoffs_fallback=self.handoffs.fallback)

    async def load(self) -> pb.StatsResponse:
        """The counts the pool controller scales on (running, waiting, KV blocks), between two steps."""
        return await self.loop.call(self._stats)

    async def _export_gauges(self) -> None:
        assert self.metrics is not None
        s, counters = await self.loop.call(lambda: (self._stats(), replace(self.loop.engine.stats)))
        m, labels = self.metrics, {"role": self.role, "group": self.group_id}
        m.running.labels(**labels).set(s.running)
        m.queue_depth.labels(**labels).set(s.waiting)
        m.kv_blocks_used.labels(**labels).set(s.kv_blocks_used)
        m.kv_blocks_free.labels(**labels).set(s.kv_blocks_free)
        m.group_healthy.labels(**labels).set(0 if self.loop.error is not None or self.failed else 1)
        totals = [(m.engine_counters[name], value) for name, value in asdict(counters).items()]
        for counter, value in [*totals, (m.prefix_hit_tokens, s.prefix_hit_tokens)]:
            counter.labels(**labels).inc(max(0, value - self._reported.get(counter, 0)))
            self._reported[counter] = value
