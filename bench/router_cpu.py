"""The router's CPU per routed token, alone: a stand-in worker group in another process emits one token per
running request every `--step-ms` (no model), and this process runs the router (`RouterCore` + its gRPC
service) and the clients. Rows, per generated token, in this process: *direct* (the clients read each request's
`Decode` stream from the group: the baseline, what a client costs), *via router* (the same through
`Router.Generate`: client + router) and *router core* (`RouterCore.generate` called in-process: the router
without its `Generate` stream). CPU is split into this process's event-loop thread and its other threads (the
chain store's, grpc's). Unlike ITL on a shared machine, these barely move between runs.

    python bench/router_cpu.py [--smoke] [--runs 5] [--concurrency 8] [--requests-per-slot 8] [--max-tokens 64]
                               [--step-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from k2serve.config import ServingConfig
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.router.core import RouterCore
from k2serve.groups import GroupAddress
from k2serve.router.schedule import StaticDirectory
from k2serve.router.grpc_api import start_router_server
from k2serve.sampling_params import SamplingParams

PROMPT = list(range(5, 40))


class FakeGroup(pb_grpc.WorkerGroupServicer):
    """A group's wire behaviour without a model: every `step_s`, one token for each running request."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self._tick: asyncio.Future[None] | None = None

    async def run_clock(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            if self._tick is not None:
                self._tick.set_result(None)
                self._tick = None

    async def step(self) -> None:
        if self._tick is None:
            self._tick = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._tick)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(healthy=True, role="both", group_id="fake-0")

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        return pb.StatsResponse(group_id="fake-0", role="both")

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[pb.TokenEvent]:
        n = request.sampling.max_tokens
        for i in range(n):
            await self.step()
            yield event(request.request_id, i, n)

    async def DecodeMany(self, requests: AsyncIterator[pb.DecodeManyRequest], context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.TokenEvents]:
        running: dict[str, list[int]] = {}  # request id -> [next index, max_tokens]

        async def admit() -> None:
            async for op in requests:
                if op.HasField("decode"):
                    running[op.decode.request_id] = [len(op.decode.output_prefix), op.decode.sampling.max_tokens]
                else:
                    running.pop(op.cancel, None)

        reader = asyncio.get_running_loop().create_task(admit())
        try:
            while True:
                await self.step()
                if running:
                    events = [event(rid, i, n) for rid, (i, n) in running.items()]
                    for rid in list(running):
                        running[rid][0] += 1
                        if running[rid][0] == running[rid][1]:
                            del running[rid]
                    yield pb.TokenEvents(events=events)
        finally:
            reader.cancel()


def event(request_id: str, index: int, max_tokens: int) -> pb.TokenEvent:
    return pb.TokenEvent(request_id=request_id, index=index, token=(7 * index) % 500 + 3, logprob=-0.5,
                         finish_reason="length" if index == max_tokens - 1 else "")


async def serve_fake_group(port_file: Path, step_s: float) -> None:
    group = FakeGroup(step_s)
    server = grpc.aio.server()
    pb_grpc.add_WorkerGroupServicer_to_server(group, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    clock = asyncio.get_running_loop().create_task(group.run_clock())
    port_file.write_text(str(port))
    try:
        await server.wait_for_termination()
    finally:
        clock.cancel()


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, list[tuple[float, float]]]:
    """(event-loop thread, other threads) µs of CPU per token, per mode, one entry per run."""
    port_file = tmp / "group.port"
    group = subprocess.Popen([sys.executable, __file__, "--fake-group", str(port_file), "--step-ms",
                              str(args.step_ms)])
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text()):
            if group.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the fake group did not start")
            await asyncio.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        config = ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp / "chains.sqlite3")},
                                               "router": {"aggregated": True}})
        core = RouterCore(config, StaticDirectory([GroupAddress("fake-0", "both", address)]))
        server, port = await start_router_server(core, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as rch, grpc.aio.insecure_channel(address) as gch:
                return await run_modes(args, core, pb_grpc.RouterStub(rch), pb_grpc.WorkerGroupStub(gch))
        finally:
            await server.stop(0)
            await core.aclose()
    finally:
        group.kill()
        group.wait()


async def run_modes(args: argparse.Namespace, core: RouterCore, router: pb_grpc.RouterStub,
                    worker: pb_grpc.WorkerGroupStub) -> dict[str, list[tuple[float, float]]]:
    n = args.max_tokens
    wire = pb.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    async def direct() -> int:
        return sum([1 async for _ in worker.Decode(pb.DecodeRequest(prompt=PROMPT, sampling=wire))])

    async def via_router() -> int:
        return sum([1 async for _ in router.Generate(pb.GenerateRequest(prompt_token_ids=PROMPT, sampling=wire))])

    async def router_core() -> int:
        return sum([1 async for _ in core.generate(PROMPT, params)])

    modes: dict[str, Callable[[], Awaitable[int]]] = {
        "direct": direct, "via router": via_router, "router core": router_core}
    out: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    await closed_loop(router_core, args.concurrency, args.concurrency, n)  # warm-up: connections, the store
    for _ in range(args.runs):  # alternating, so drift on a shared machine hits every mode alike
        for name, one in modes.items():
            loop0, all0 = time.thread_time(), time.process_time()
            tokens = await closed_loop(one, args.concurrency, args.concurrency * args.requests_per_slot, n)
            loop_s, all_s = time.thread_time() - loop0, time.process_time() - all0
            out[name].append((1e6 * loop_s / tokens, 1e6 * (all_s - loop_s) / tokens))
    return out


async def closed_loop(one: Callable[[], Awaitable[int]], concurrency: int, requests: int, max_tokens: int) -> int:
    gate = asyncio.Semaphore(concurrency)

    async def bounded() -> int:
        async with gate:
            return await one()

    counts = await asyncio.gather(*(bounded() for _ in range(requests)))
    if any(c != max_tokens for c in counts):
        raise RuntimeError(f"a stream ended early: token counts {sorted(set(counts))}, expected {max_tokens}")
    return sum(counts)


def table(results: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> str:
    lines = [f"CPU µs per generated token in the router's process ({args.concurrency} streams, {args.max_tokens} "
             f"tokens each, a step every {args.step_ms} ms; median of {args.runs} runs)", "",
             "| mode | event-loop thread | other threads | total |", "|---|---|---|---|"]
    med = {m: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
           for m, runs in results.items()}
    for mode, (loop, other) in med.items():
        lines.append(f"| {mode} | {loop:.1f} | {other:.1f} | {loop + other:.1f} |")
    extra = sum(med["via router"]) - sum(med["direct"])
    lines.append(f"\nthe router's own CPU per routed token (via router − direct): {extra:.1f} µs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (numbers mean nothing)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests-per-slot", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--step-ms", type=float, default=5.0, help="the stand-in group's step time")
    ap.add_argument("--fake-group", type=Path, metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fake_group is not None:
        asyncio.run(serve_fake_group(args.fake_group, args.step_ms / 1000))
        return 0
    if args.smoke:
        args.runs, args.concurrency, args.requests_per_slot, args.max_tokens, args.step_ms = 1, 2, 1, 4, 1.0
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    print(table(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
