"""Closed-loop load for the serving benchmarks: a workload of random prompts, `drive` (requests kept
`concurrency` in flight, TTFT and inter-token latency per token), the result rows and their markdown tables,
and the CPU each process of a Ray stack used. Imported by the scripts beside it (bench/ is a folder of scripts,
not a package)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from dataclasses import dataclass

import psutil


@dataclass
class Row:
    system: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    tok_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, int(q * len(s)))]


Item = tuple[list[int], int]  # (prompt, max_tokens)


def workload(n: int, lens: tuple[int, int], outs: tuple[int, int], vocab: int, seed: int) -> list[Item]:
    """n requests: prompt lengths uniform in `lens`, generated lengths uniform in `outs` (a second generator, so
    the prompts are the same whatever `outs` is)."""
    rng, out_rng = random.Random(seed), random.Random(seed + 7919)
    return [([rng.randrange(vocab) for _ in range(rng.randint(*lens))], out_rng.randint(*outs)) for _ in range(n)]


async def drive(open_stream, items: list[Item], concurrency: int, label: str) -> Row:
    """Runs every request through `open_stream(prompt, max_tokens)` (an async iterator of tokens), `concurrency`
    at once."""
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    itls: list[float] = []
    counts: list[int] = []

    async def one(prompt: list[int], max_tokens: int) -> None:
        async with sem:
            last = time.perf_counter()
            n = 0
            async for _ in open_stream(prompt, max_tokens):
                now = time.perf_counter()
                (itls if n else ttfts).append(now - last)
                last, n = now, n + 1
            counts.append(n)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p, m) for p, m in items))
    wall = time.perf_counter() - t0
    total = sum(counts)
    return Row(label, concurrency, len(items), total, wall, total / wall, pct(ttfts, 0.5), pct(ttfts, 0.99),
               pct(itls, 0.5), pct(itls, 0.99))


class CpuMeter:
    """CPU each part of the stack used over a window, in % of one core: this process (the router and the
    clients), and Ray's processes by role (rank actors, group leaders — a group of one steps its engine in its
    leader —, the rest of Ray)."""

    ROLES = (("RankWorker", "rank actors"), ("GroupLeader", "group leaders"))

    def __init__(self) -> None:
        self.start: dict[int, tuple[str, float]] = {}
        self.t0 = 0.0
        self.shares: dict[str, float] = {}  # role -> % of one core over the window

    def _sample(self) -> dict[int, tuple[str, float]]:
        out = {}
        for proc, role in stack_processes():
            with contextlib.suppress(psutil.Error):
                out[proc.pid] = (role, sum(proc.cpu_times()[:2]))
        return out

    def __enter__(self) -> "CpuMeter":
        self.start, self.t0 = self._sample(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end, wall = self._sample(), time.perf_counter() - self.t0
        self.shares = {}
        for pid, (role, cpu) in end.items():
            if pid in self.start:
                self.shares[role] = self.shares.get(role, 0.0) + 100 * (cpu - self.start[pid][1]) / wall

    def table(self, label: str) -> str:
        rows = sorted(self.shares.items(), key=lambda kv: -kv[1])
        return "\n".join([f"CPU per process, {label} (% of one core):", "| process | CPU % |", "|---|---|",
                          *(f"| {role} | {pct:.0f} |" for role, pct in rows)])


def stack_processes() -> list[tuple[psutil.Process, str]]:
    """This process (the router and the clients) and Ray's, each with its role in `CpuMeter.ROLES`' terms."""
    me = psutil.Process()
    out = [(me, "router + clients (this process)")]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or ())
        if proc.pid == me.pid or "ray" not in cmd.lower():
            continue
        role = next((name for key, name in CpuMeter.ROLES if key in cmd), "Ray (raylet, GCS, other actors)")
        out.append((proc, role))
    return out


def table(rows: list[Row]) -> str:
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.1f}"

    out = ["| system | conc. | requests | tokens | s | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r.system} | {r.concurrency} | {r.requests} | {r.tokens} | {r.seconds:.2f} | {r.tok_per_s:.1f} | "
            f"{f(r.ttft_p50_ms)} | {f(r.ttft_p99_ms)} | {f(r.itl_p50_ms)} | {f(r.itl_p99_ms)} |" for r in rows]
    return "\n".join(out)


def overhead_summary(pairs: list[Row]) -> str:
    """Router overhead on ITL p50: the median of the routed runs against the median of the direct runs (each
    run alone moves by a few ms on a shared 2-core machine), and every pair's own ratio."""
    direct = [r.itl_p50_ms for r in pairs[0::2] if r.itl_p50_ms]
    routed = [r.itl_p50_ms for r in pairs[1::2] if r.itl_p50_ms]
    if not direct or not routed:
        return "\nrouter overhead: no inter-token latencies measured"
    each = ", ".join(f"{100 * (r - d) / d:+.1f}%" for d, r in zip(direct, routed))
    d, r = statistics.median(direct), statistics.median(routed)
    return (f"\nrouter overhead on ITL p50: {100 * (r - d) / d:+.1f}% (median of {len(routed)} routed runs "
            f"{r:.1f} ms vs {len(direct)} direct {d:.1f} ms; per pair: {each})")


def lengths(text: str) -> tuple[int, int]:
    """`N` or `LO-HI` -> (lo, hi), 1 <= lo <= hi."""
    lo, _, hi = text.partition("-")
    try:
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or LO-HI") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= LO <= HI")
    return bounds

