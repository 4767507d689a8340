"""Serving benchmark: tokens/s, TTFT and inter-token latency at several concurrencies through the full stack
(gRPC router → prefill group → KV handoff via Ray's object store → decode group, then the same with one
aggregated group), Hugging Face transformers `generate` in static batches on the same architecture and prompts
as the baseline, and the router's overhead (the same load streamed straight from an aggregated group vs through
the router, in alternating runs).

    python bench/serve.py [--smoke] [--json out.json] [--overhead-runs 5] [--rank-cpus 1] [--max-tokens 64]
                          [--requests-per-slot 4] [--cpu-binding auto|none] [--json-schema]

`--json-schema` measures constrained decoding instead: the engine alone, the same load twice in one run, every
request free and then every request under a JSON schema (xgrammar bitmask in every step, answer from the
first token; compilation cached after the first request).

Requests: 4 x concurrency per level (a client takes the next as soon as one ends), prompts of 16-256 tokens,
and `--max-tokens` generated tokens each: one number (every request the same), or LO-HI (uniform, per request).
With one length for all, a closed loop stays in waves: requests admitted together finish together and their
successors arrive together, so a prefill pool and a decode pool take turns instead of overlapping; mixed
lengths are what serving traffic looks like.

The transformers baseline runs `DeepseekV3ForCausalLM` built from the served model's config with dense float
experts (transformers cannot run the INT4 pack-quantized experts here), every request forced to its full
max_tokens like ours (ignore_eos) — the same work, shapes and prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from k2serve.config import ServingConfig
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.router.core import RouterCore
from k2serve.cpu_binding import allowed_cores, bind_tree
from k2serve.router.directory import RegistryDirectory
from k2serve.stack.inproc import start_local_stack
from k2serve.router.grpc_api import start_router_server
from k2serve.sampling_params import Constraint
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.proto.convert import sampling_to_proto

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts: import its siblings
from _loadgen import CpuMeter, Row, drive, lengths, overhead_summary, pct, table, workload  # noqa: E402


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


# An answer that can go on for as long as max_tokens: the bitmask is filled by xgrammar in every step.
BENCH_SCHEMA = ('{"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}}, '
                '"required": ["notes"], "additionalProperties": false}')


def constrained(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, max_reasoning_tokens=0,
                          constraint=Constraint(kind="json", json_schema=BENCH_SCHEMA, after_think=False))


def serving_config(tmp: Path, aggregated: bool, rank_cpus: float, groups: int,
                   cpu_binding: str = "auto") -> ServingConfig:
    pool = {"groups": groups, "max_running": 64, "num_cpus_per_actor": rank_cpus}
    return ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp / f"chains-{aggregated}.sqlite3")},
                                         "router": {"aggregated": aggregated}, "prefill": pool, "decode": pool,
                                         "cpu_binding": cpu_binding})


@dataclass
class Stack:
    """A router core over worker groups, and the address of one group serving both roles (aggregated)."""

    core: RouterCore
    group_address: str | None
    close: Callable[[], Awaitable[None]]


async def start_stack(config: ServingConfig, groups_in: str) -> Stack:
    """`inproc`: groups inside this process (`worker/parallel/inproc_group.py`); `ray`: groups as Ray actors under the pool
    controller, each in its own process, as `k2serve up` runs them."""
    if groups_in == "inproc":
        local = await start_local_stack(config)
        return Stack(local.core, local.groups[0].address if config.router.aggregated else None, local.aclose)
    from k2serve.worker.parallel.pools import PoolController

    controller = PoolController(config, namespace=f"k2serve-bench-{config.router.aggregated}")
    await asyncio.to_thread(controller.start)
    own_cores = allowed_cores()
    if controller.cores is not None:  # the router, the clients and Ray off the ranks' cores, as `k2serve up` does
        bind_tree(controller.cores.front, skip=[pid for g in controller.groups() for pid in g["rank_pids"]])
    core = RouterCore(config, RegistryDirectory(controller.namespace))
    await core.start()
    both = controller.groups(role="both")

    async def close() -> None:
        await core.aclose()
        await asyncio.to_thread(controller.stop)
        if controller.cores is not None and own_cores:  # every core back for what runs after this stack
            bind_tree(own_cores)

    return Stack(core, both[0]["address"] if both else None, close)


async def bench_stack(tmp: Path, levels: list[int], per_level: int, lens: tuple[int, int], outs: tuple[int, int],
                      groups_in: str, rank_cpus: float, groups: int, overhead_runs: int, cpu: list[str],
                      cpu_binding: str = "auto") -> tuple[list[Row], list[Row]]:
    """The stack's rows and the router-overhead pairs; appends a CPU-per-process table per mode to `cpu`."""
    rows: list[Row] = []
    overhead: list[Row] = []
    where = "groups in Ray actors" if groups_in == "ray" else "groups in the router's process"
    for aggregated in (False, True):
        stack = await start_stack(serving_config(tmp, aggregated, rank_cpus, groups, cpu_binding), groups_in)
        server, port = await start_router_server(stack.core, "127.0.0.1", 0)
        vocab = stack.core.tokenizer.vocab_size
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                router = pb_grpc.RouterStub(ch)

                async def via_router(prompt: list[int], max_tokens: int):  # noqa: ANN202 - an async generator
                    sampling = sampling_to_proto(greedy(max_tokens))
                    async for chunk in router.Generate(pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)):
                        yield chunk.token

                mode = "aggregated" if aggregated else "P/D"
                for c in levels:
                    items = workload(per_level * c, lens, outs, vocab, seed=c)
                    with CpuMeter() as meter:
                        rows.append(await drive(via_router, items, c, f"k2serve {mode}, {where}"))
                    if c == levels[-1]:
                        cpu.append(meter.table(f"k2serve {mode}, {c} concurrent"))
                if not aggregated:
                    continue
                assert stack.group_address is not None
                async with grpc.aio.insecure_channel(stack.group_address) as gch:
                    worker = pb_grpc.WorkerGroupStub(gch)

                    async def direct(prompt: list[int], max_tokens: int):  # noqa: ANN202 - an async generator
                        request = pb.DecodeRequest(prompt=prompt, sampling=sampling_to_proto(greedy(max_tokens)))
                        async for ev in worker.Decode(request):
                            yield ev.token

                    c = levels[min(1, len(levels) - 1)]
                    items = workload(per_level * c, lens, outs, vocab, seed=100 + c)
                    for _ in range(overhead_runs):  # alternating, so drift on a shared machine hits both alike
                        overhead.append(await drive(direct, items, c, f"aggregated group, direct ({where})"))
                        overhead.append(await drive(via_router, items, c, f"aggregated group, via router ({where})"))
        finally:
            await server.stop(0)
            await stack.close()
    return rows, overhead


def bench_engine(levels: list[int], per_level: int, lens: tuple[int, int], outs: tuple[int, int], vocab: int,
                 params: Callable[[int], SamplingParams] = greedy, label: str = "engine alone") -> list[Row]:
    """The engine alone in this process (no router, gRPC, Ray or second process), the same closed loop of
    `concurrency` requests in flight: the ceiling the stack rows are measured against."""
    import torch

    from k2serve.worker.engine.engine import Engine
    from k2serve.worker.engine.settings import EngineConfig
    from k2serve.worker.engine.grammar import GrammarVocab
    from k2serve.worker.loader import load_weights, resolve_checkpoint
    from k2serve.worker.model.k2 import K2Model

    model_dir = resolve_checkpoint("builtin:tiny-k2")
    weights = load_weights(model_dir)
    model = K2Model(weights.config, weights.dense, weights.experts)
    grammar_vocab = GrammarVocab.from_model_dir(model_dir, weights.config.vocab_size)
    rows = []
    for c in levels:
        engine = Engine(model, EngineConfig(max_running=64), eos_token_ids=[], grammar_vocab=grammar_vocab)
        items = workload(per_level * c, lens, outs, vocab, seed=c)
        pending = deque(enumerate(items))
        last: dict[str, tuple[float, int]] = {}  # request -> (time of its last token or admission, tokens)
        ttfts: list[float] = []
        itls: list[float] = []

        def admit() -> None:
            i, (prompt, max_tokens) = pending.popleft()
            engine.add_request(str(i), prompt, params(max_tokens))
            last[str(i)] = (time.perf_counter(), 0)

        t0 = time.perf_counter()
        for _ in range(min(c, len(pending))):
            admit()
        total = 0
        while engine.has_work():
            events = engine.step()
            now = time.perf_counter()
            for ev in events:
                then, n = last[ev.request_id]
                (itls if n else ttfts).append(now - then)
                last[ev.request_id] = (now, n + 1)
                total += 1
                if ev.finish_reason is not None and pending:
                    admit()
        wall = time.perf_counter() - t0
        n = torch.get_num_threads()
        rows.append(Row(f"k2serve {label}, {n} torch thread{'s' * (n > 1)}", c, len(items), total, wall,
                        total / wall, pct(ttfts, 0.5), pct(ttfts, 0.99), pct(itls, 0.5), pct(itls, 0.99)))
    return rows


def bench_transformers(levels: list[int], per_level: int, lens: tuple[int, int], outs: tuple[int, int], vocab: int
                       ) -> list[Row]:
    """Static batches of `concurrency` requests in arrival order: each batch generates until its longest request
    is done, and counts the tokens each request asked for (what its client receives)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from k2serve.k2format.source import resolve_model
    from k2serve.k2format.model_config import K2Config

    fields = K2Config.from_dir(resolve_model("builtin:tiny-k2")).to_hf_dict()
    for key in ("model_type", "architectures", "quantization_config"):
        fields.pop(key, None)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields)).eval()
    rows = []
    for c in levels:
        items = workload(per_level * c, lens, outs, vocab, seed=c)
        t0 = time.perf_counter()
        total = 0
        for i in range(0, len(items), c):  # static batches: every batch waits for its longest member
            batch = [p for p, _ in items[i:i + c]]
            wanted = [m for _, m in items[i:i + c]]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # [B, width], left-padded
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(wanted),
                                     min_new_tokens=max(wanted), do_sample=False, pad_token_id=0)
            total += sum(min(m, out.shape[1] - width) for m in wanted)
        wall = time.perf_counter() - t0
        rows.append(Row("transformers generate (static batches)", c, len(items), total, wall, total / wall,
                        None, None, None, None))
    return rows


def bench_constrained(levels: list[int], per_level: int, lens: tuple[int, int], outs: tuple[int, int],
                      out: Path | None) -> int:
    """Free vs JSON-schema-constrained decoding, alternating per level so drift in the machine's load hits both."""
    rows: list[Row] = []
    for c in levels:
        rows += bench_engine([c], per_level, lens, outs, 512, greedy, "engine, free")
        rows += bench_engine([c], per_level, lens, outs, 512, constrained, "engine, JSON schema")
    print(table(rows))
    for free, json_rows in zip(rows[::2], rows[1::2]):
        print(f"concurrency {free.concurrency}: constrained / free tokens/s = "
              f"{json_rows.tok_per_s / free.tok_per_s:.3f}")
    if out:
        out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (numbers mean nothing)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--groups-in", choices=("ray", "inproc"), default="ray",
                    help="worker groups as Ray actors (own processes, as `k2serve up`) or inside this process")
    ap.add_argument("--overhead-runs", type=int, default=5, help="direct/routed pairs for the router overhead")
    ap.add_argument("--rank-cpus", type=float, default=1.0, help="Ray CPUs (= torch threads) of every rank")
    ap.add_argument("--groups", type=int, default=1, help="worker groups per pool (model replicas)")
    ap.add_argument("--requests-per-slot", type=int,
                    help="requests per level = this x its concurrency (default 4; 1 with --smoke): the run's end, "
                         "when fewer than `concurrency` requests are left, is then a smaller part of it")
    ap.add_argument("--cpu-binding", choices=("auto", "none"), default="auto",
                    help="the stack's cpu_binding (k2serve/cpu_binding.py): auto binds each rank to cores of its "
                         "own when the node has a core per rank; none leaves every thread to the OS")
    ap.add_argument("--levels", type=lambda t: [int(x) for x in t.split(",")],
                    help="concurrencies, comma-separated (default 1,8,32; 1,4 with --smoke)")
    ap.add_argument("--json-schema", action="store_true",
                    help="only the engine alone, free vs every request under a JSON schema, in one run")
    ap.add_argument("--max-tokens", type=lengths,
                    help="tokens generated per request: N, or LO-HI for lengths drawn uniformly per request "
                         "(default 64; 4 with --smoke)")
    args = ap.parse_args(argv)
    levels, per_level, lens = ([1, 4], 1, (4, 24)) if args.smoke else ([1, 8, 32], 4, (16, 256))
    per_level = args.requests_per_slot or per_level
    levels = args.levels or levels
    outs = args.max_tokens or ((4, 4) if args.smoke else (64, 64))
    if args.json_schema:
        return bench_constrained(levels, per_level, lens, outs, args.json)

    import ray

    from k2serve.localray import init_local_ray
    from k2serve.worker.allocator import keep_freed_memory

    keep_freed_memory()  # as the CPU ranks do: the engine-alone and transformers rows run in this process

    init_local_ray(8)  # logical CPUs: the groups' actors must fit on a 2-core machine
    cpu: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows, overhead = asyncio.run(bench_stack(Path(tmp), levels, per_level, lens, outs, args.groups_in,
                                                     args.rank_cpus, args.groups,
                                                     1 if args.smoke else args.overhead_runs, cpu, args.cpu_binding))
    finally:
        ray.shutdown()
    import torch

    threads = torch.get_num_threads()
    try:  # as many threads as a rank runs (its Ray CPU reservation): the stack's ceiling on this machine
        torch.set_num_threads(max(1, int(args.rank_cpus)))
        rows += bench_engine(levels, per_level, lens, outs, vocab=512)
    finally:
        torch.set_num_threads(threads)
    rows += bench_engine(levels, per_level, lens, outs, vocab=512)
    rows += bench_transformers(levels, per_level, lens, outs, vocab=512)
    print(table(rows))
    print()
    print(table(overhead))
    print(overhead_summary(overhead))
    for t in cpu:
        print()
        print(t)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows + overhead], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
