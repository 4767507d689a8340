"""How the router reaches worker groups: it learns them from a `GroupDirectory`, keeps their health and load
fresh, picks one per role through the `Scheduler`, and runs one dispatch attempt of a turn — P/D: `Prefill`
on a prefill group, then a Decode stream on a decode group that takes the KV handle; aggregated: one Decode
stream. Decode streams to a group share one `DecodeMany` call (`router/mux.py`: a message per step, not per
token). Any group failure (RPC error, stall past the deadline) surfaces as `GroupFailed`, which `RouterCore`
answers by re-dispatching the rest of the turn elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from k2serve.cluster_auth import cluster_token, internal_channel
from k2serve.config import ServingConfig
from k2serve.faults import RouterFaults
from k2serve.metrics import Metrics
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.proto.convert import sampling_to_proto
from k2serve.router.live import LiveTurn
from k2serve.router.mux import DecodeMux, GroupFailed, MuxStream
from k2serve.router.schedule import GroupDirectory, GroupState, NoGroupAvailable, Scheduler
from k2serve.router.stall import StallWatch
from k2serve.sampling_params import SamplingParams

RPC_TIMEOUT_S = 2.0
# How long a request waits for some healthy group of a role. It must outlast a lost worker pod: Kubernetes
# replaces it, the new pod joins Ray and the pool controller rebuilds the group on it (in the pod harness on a
# 2-core machine under heavy load, a turn whose decode pod was killed streamed again 62-120 s later).
GROUP_WAIT_S = 180.0
PICK_POLL_S = 0.1  # health re-polls while a request waits for a group (failover time rides on it)


@dataclass
class GroupClient:
    """A worker group as the router sees it: its state (health, load, cached prefixes), gRPC stub, and the one
    call its turns' Decode streams share."""

    state: GroupState
    channel: grpc.aio.Channel
    stub: pb_grpc.WorkerGroupStub
    mux: DecodeMux

    async def aclose(self) -> None:
        await self.mux.aclose()
        await self.channel.close()


class Dispatcher:
    def __init__(self, config: ServingConfig, directory: GroupDirectory, metrics: Metrics, faults: RouterFaults,
                 stall_timeout_s: float) -> None:
        self.config = config
        self.directory = directory
        self.metrics = metrics
        self.faults = faults
        self.stall_timeout_s = stall_timeout_s
        self.token = cluster_token(config.cluster_token_file)  # sent on every call to a group
        self.scheduler = Scheduler(config.router.routing_policy, config.decode.block_size)
        self._groups: dict[str, GroupClient] = {}
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        for g in self._groups.values():
            await g.aclose()
        self._groups.clear()

    def ready(self) -> bool:
        states = [g.state for g in self._groups.values()]
        return any(s.serves("prefill") for s in states) and any(s.serves("decode") for s in states)

    async def refresh(self) -> None:
        async with self._lock:
            known = {a.group_id: a for a in await self.directory.list_groups()}
            for gid in [g for g in self._groups if g not in known or self._groups[g].state.addr != known[g]]:
                await self._groups.pop(gid).aclose()
            for gid, addr in known.items():
                if gid not in self._groups:
                    # Short reconnect backoff: a restarted group is usable again within ~0.1 s, not gRPC's 1 s+.
                    channel = internal_channel(addr.address, self.token, options=[
                        ("grpc.max_receive_message_length", 64 << 20), ("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)],
                        tls=self.config.tls)
                    stub = pb_grpc.WorkerGroupStub(channel)
                    self._groups[gid] = GroupClient(GroupState(addr), channel, stub, DecodeMux(stub, gid))
        await asyncio.gather(*(self._poll(g) for g in list(self._groups.values())))

    async def _poll(self, g: GroupClient) -> None:
        try:
            health = await g.stub.Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S)
            g.state.stats = await g.stub.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S)
            g.state.healthy = health.healthy
        except grpc.aio.AioRpcError:
            g.state.healthy = False

    def mark_failed(self, group_id: str) -> None:
        g = self._groups.get(group_id)
        if g is not None:
            g.state.healthy = False  # the next successful health poll brings it back

    def _states(self) -> list[GroupState]:
        return [g.state for g in self._groups.values()]

    async def pick(self, role: str, tokens: list[int], exclude: set[str]) -> GroupClient:
        """A group for `role`; with none healthy, waits (re-polling) for one to come back or be replaced."""
        deadline = time.monotonic() + GROUP_WAIT_S
        while True:
            # A group this turn saw fail is avoided while another is healthy, not forever: it may be back
            # (restarted) and the only one of its role.
            for avoid in (exclude, set()):
                try:
                    state = self.scheduler.pick(self._states(), role, tokens, avoid)  # type: ignore[arg-type]
                    return self._groups[state.addr.group_id]
                except NoGroupAvailable:
                    if time.monotonic() > deadline and not avoid:
                        raise
            await asyncio.sleep(PICK_POLL_S)
            await self.refresh()

    async def dispatch(self, prompt: list[int], params: SamplingParams, det: bool, done: list[int],
                        live: LiveTurn, exclude: set[str]) -> AsyncIterator[pb.TokenEvent]:
        """The token events of one attempt, from index len(done) on; group failures raise GroupFailed."""
        slot, live.fork = live.fork, None
        if slot is not None:  # the first attempt of one of n choices: they start together
            g, call = await slot.start.take(slot.choice, lambda request: self._open_forked(request, exclude))
        else:
            sampling = sampling_to_proto(params)
            prefix = list(done)
            kv_handle: pb.KVHandle | None = None
            if not self.config.router.aggregated:
                g = await self.pick("prefill", prompt + prefix, exclude)
                resp = await self._call(g, live, g.stub.Prefill, pb.PrefillRequest(
                    request_id=uuid.uuid4().hex, prompt=prompt, sampling=sampling, deterministic=det,
                    output_prefix=prefix))
                yield resp.first
                if resp.first.finish_reason:
                    return
                prefix.append(resp.first.token)
                kv_handle = resp.kv_handle if resp.HasField("kv_handle") else None
                g = await self.pick("decode", [], exclude)
            else:
                g = await self.pick("prefill", prompt + prefix, exclude)
            request = pb.DecodeRequest(request_id=uuid.uuid4().hex, prompt=prompt, sampling=sampling,
                                       deterministic=det, output_prefix=prefix, kv_handle=kv_handle)
            call = g.mux.open(request)
        first = True
        events = aiter(call)
        watch = StallWatch()  # one timer per stream, not one per token (stall.py)
        try:
            with self._tracked(g, live, call):
                while True:
                    # The first event may wait for a whole prefill (the request deadline); later ones only for a
                    # decode step.
                    deadline = self.config.router.request_timeout_s if first else self.stall_timeout_s
                    # Without hang faults, the stream is awaited directly: one coroutine less per token.
                    read = self._next_event(g, events, first) if self.faults.hangs else anext(events)
                    try:
                        ev = await watch.wait(read, deadline)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise GroupFailed(g.state.addr.group_id, f"stream stalled for {deadline} s") from None
                    if first and ev.kv_handoff:
                        self.metrics.kv_handoffs.labels(outcome=ev.kv_handoff).inc()
                    first = False
                    yield ev
        finally:
            watch.close()

    async def _open_forked(self, request: pb.DecodeRequest, exclude: set[str]) -> tuple[GroupClient, list[MuxStream]]:
        """n choices on one group, which prefills the prompt once for all (in P/D a decode group: no KV handoff to
        share among them)."""
        g = await self.pick("prefill" if self.config.router.aggregated else "decode", list(request.prompt), exclude)
        return g, g.mux.open_forked(request)

    async def _next_event(self, g: GroupClient, events: AsyncIterator[pb.TokenEvent], first: bool) -> pb.TokenEvent:
        ev = await anext(events)
        await self.faults.stream_event(g.state.addr.group_id, g.state.addr.role, first=first)
        return ev

    async def _call(self, g: GroupClient, live: LiveTurn, method: Any, request: Any) -> Any:
        call = method(request, timeout=self.config.router.request_timeout_s)
        with self._tracked(g, live, call):
            resp = await call
            try:
                await asyncio.wait_for(self.faults.stream_event(g.state.addr.group_id, g.state.addr.role),
                                       self.stall_timeout_s)
            except TimeoutError:
                raise GroupFailed(g.state.addr.group_id, f"call stalled for {self.stall_timeout_s} s") from None
            return resp

    @contextlib.contextmanager
    def _tracked(self, g: GroupClient, live: LiveTurn, call: Any) -> Iterator[None]:
        """Load accounting and `cancel()` reach for one RPC; its failures become GroupFailed (or ValueError)."""
        gid = g.state.addr.group_id
        live.calls.add(call)
        live.group_id = gid
        g.state.inflight += 1
        try:
            yield
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from e
            raise GroupFailed(gid, f"{e.code().name}: {e.details()}") from e
        except asyncio.CancelledError:
            if live.cancelled:  # `cancel()` stopped the call, not our caller
                raise GroupFailed(gid, "cancelled") from None
            raise
        finally:
            g.state.inflight -= 1
            live.calls.discard(call)
            call.cancel()
