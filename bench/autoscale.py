"""Autoscaling load ramp: `k2serve up` with an autoscaled decode pool (1 to 3 groups of the tiny model) under a
closed-loop load that ramps up, holds and stops; the decode pool must grow 1 → 3 and shrink back to 1 once the
load is gone, with no failed or truncated request and every chain finished.

Every request is a streamed completion of exactly `--tokens` tokens (ignore_eos) on a chain of its own; afterwards
each chain is read back (`GET /v1/chains/{id}`): its turn must be `finished` with `--tokens` tokens. Once a second
the bench reads the pool controller's `/autoscaling` report and merged `/metrics` (decode groups desired, serving
and draining; decode queue depth); TTFT is measured at the client. Prints a Markdown table per 5 s and a summary.

    nice -n 10 python -P bench/autoscale.py [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

# (seconds, concurrent clients): a ramp, a hold, then no load while the pool shrinks.
RAMP = [(10, 2), (10, 4), (60, 8)]


def config(tmp: Path, max_groups: int) -> dict[str, Any]:
    pool = {"groups": 1, "kv_blocks": 512, "max_running": 2, "num_cpus_per_actor": 0.25}
    return {
        "model": {"source": "builtin:tiny-k2"},
        "prefill": {**pool, "max_running": 16},
        "decode": {**pool, "autoscaling": {
            "min_groups": 1, "max_groups": max_groups, "target_queue_depth": 1.0, "target_running_fraction": 0.8,
            "target_kv_use": None, "interval_s": 1.0, "scale_up_window_s": 3.0, "scale_down_window_s": 10.0,
            "drain_timeout_s": 120.0}},
        "chain_store": {"sqlite_path": str(tmp / "chains.sqlite3")},
        "cpu_binding": "none",
    }


@dataclass
class Results:
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (t since start, TTFT s)
    chains: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)


def endpoints(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300.0) -> tuple[str, str]:
    """(router URL, pool controller URL) once `k2serve up` printed both."""
    ready = re.compile(r"metrics, merged, at (http://\S+)/metrics.*?serving \S+ at (http://\S+)/v1", re.S)
    deadline = time.monotonic() + timeout_s
    while not (m := ready.search(log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"k2serve up did not start (exit code {proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    return m.group(2), m.group(1)


def sample(controller: str, t: float) -> dict[str, float]:
    report = json.loads(urllib.request.urlopen(f"{controller}/autoscaling", timeout=5).read())
    decode = report["pools"].get("decode", {"desired": 0, "ready": 0, "draining": 0})
    queue = 0.0
    decisions = {"up": 0.0, "down": 0.0}
    for family in text_string_to_metric_families(urllib.request.urlopen(f"{controller}/metrics", timeout=5)
                                                 .read().decode()):
        if family.name == "k2serve_queue_depth":
            queue += sum(s.value for s in family.samples if s.labels.get("role") == "decode")
        if family.name == "k2serve_autoscale_decisions":
            decisions |= {s.labels["direction"]: s.value for s in family.samples
                          if s.name.endswith("_total") and s.labels.get("pool") == "decode"}
    return {"t": t, "desired": decode["desired"], "ready": decode["ready"], "draining": decode["draining"],
            "queue": queue, "decisions_up": decisions["up"], "decisions_down": decisions["down"]}


async def client(http: httpx.AsyncClient, url: str, model: str, tokens: int, until: float, t0: float,
                 out: Results) -> None:
    n = 0
    while time.monotonic() < until:
        n += 1
        body = {"model": model, "prompt": f"load {n} {time.monotonic():.6f}", "max_tokens": tokens,
                "ignore_eos": True, "temperature": 0.0, "stream": True}
        start = time.monotonic()
        try:
            async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    out.failed.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                out.chains.append(r.headers["X-K2-Chain-Id"])
                first = True
                async for line in r.aiter_lines():
                    if first and line.startswith("data: ") and line != "data: [DONE]":
                        out.ttft.append((start - t0, time.monotonic() - start))
                        first = False
        except httpx.HTTPError as e:
            out.failed.append(f"{type(e).__name__}: {e}")


async def drive(url: str, controller: str, tokens: int, cooldown_s: float, out: Results) -> None:
    t0 = time.monotonic()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(1.0):
            try:
                out.samples.append(sample(controller, time.monotonic() - t0))
            except OSError:
                pass  # one missed second

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
        model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
        started = 0.0
        tasks = []
        end = t0 + sum(s for s, _ in RAMP)
        for seconds, clients in RAMP:  # each step adds clients that run until the load ends
            tasks += [asyncio.create_task(client(http, url, model, tokens, end, t0, out)) for _ in range(clients - len(tasks))]
            started += seconds
            await asyncio.sleep(max(0.0, t0 + started - time.monotonic()))
        await asyncio.gather(*tasks)
        # No load: wait for the pool to shrink back to its minimum (or give up after cooldown_s).
        deadline = time.monotonic() + cooldown_s
        while time.monotonic() < deadline:
            last = out.samples[-1] if out.samples else {}
            if last.get("desired") == 1 and last.get("draining") == 0 and last.get("t", 0) > end - t0 + 5:
                break
            await asyncio.sleep(1.0)
        for chain in out.chains:
            r = await http.get(f"{url}/v1/chains/{chain}")
            turn = r.json()["turns"][-1] if r.status_code == 200 and r.json().get("turns") else {}
            if turn.get("status") != "finished" or len(turn.get("generated", [])) != tokens:
                out.failed.append(f"chain {chain}: {turn.get('status')} with {len(turn.get('generated', []))} tokens")
    stop.set()
    thread.join()


def table(out: Results, load_end: float) -> str:
    rows = ["| t (s) | load | decode groups desired / serving / draining | decode queue depth | TTFT p50 (s) |",
            "|---:|---:|:---:|---:|---:|"]
    for lo in range(0, int(out.samples[-1]["t"]) + 1, 5):
        window = [s for s in out.samples if lo <= s["t"] < lo + 5]
        if not window:
            continue
        s = window[-1]
        ttfts = [v for t, v in out.ttft if lo <= t < lo + 5]
        clients = next((c for i, (_, c) in enumerate(RAMP) if lo < sum(x for x, _ in RAMP[:i + 1])), 0)
        rows.append(f"| {lo} | {clients if lo < load_end else 0} clients | {s['desired']:.0f} / {s['ready']:.0f} / "
                    f"{s['draining']:.0f} | {max(w['queue'] for w in window):.0f} | "
                    f"{statistics.median(ttfts) if ttfts else float('nan'):.3f} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request (default 48)")
    ap.add_argument("--max-groups", type=int, default=3, help="decode pool's max_groups (default 3)")
    ap.add_argument("--cooldown", type=float, default=120.0, help="most seconds to wait for the scale-down")
    ap.add_argument("--json", help="write the samples and summary here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="k2serve-autoscale-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = tmp / "config.yaml"
        cfg.write_text(yaml.safe_dump(config(tmp, args.max_groups)))
        log = tmp / "up.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-P", "-m", "k2serve.cli", "up", "--port", "0", "--config",
                                     str(cfg)], stdout=sink, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            url, controller = endpoints(proc, log)
            out = Results()
            asyncio.run(drive(url, controller, args.tokens, args.cooldown, out))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        decisions = [line for line in log.read_text().splitlines() if "autoscale decode:" in line]
    load_end = sum(s for s, _ in RAMP)
    peak = max(s["desired"] for s in out.samples)
    final = out.samples[-1]
    summary = {"requests": len(out.chains), "failed_or_truncated": len(out.failed), "peak_decode_groups": peak,
               "final_decode_groups": final["desired"], "final_draining": final["draining"],
               "ttft_p50_s": statistics.median(v for _, v in out.ttft) if out.ttft else None,
               "decisions_total": {"up": final["decisions_up"], "down": final["decisions_down"]},
               "decisions": decisions}
    print(table(out, load_end))
    print(json.dumps(summary, indent=2))
    for problem in out.failed[:10]:
        print("FAILED:", problem)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "samples": out.samples, "ttft": out.ttft}))
    ok = not out.failed and peak == args.max_groups and final["desired"] == 1 and final["draining"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
