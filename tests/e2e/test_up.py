"""`k2serve up` as a user runs it: a subprocess that prints its endpoint, serves chat completions through
prefill → KV handoff → decode, answers `k2serve chat`, and tears everything down on SIGINT."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from k2serve.cpu_binding import allowed_cores
from k2serve.router.chat import main as chat_main


def wait_for_endpoint(proc: subprocess.Popen[str], timeout_s: float) -> tuple[str, list[str]]:
    """The router's base URL, and every line printed up to it."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"k2serve up exited ({proc.poll()}):\n{''.join(lines)}")
        lines.append(line)
        m = re.search(r"serving \S+ at (http://\S+)/v1", line)
        if m:
            return m.group(1), lines
    raise TimeoutError(f"k2serve up printed no endpoint in {timeout_s}s:\n{''.join(lines)}")


def test_up_serves_chat_and_stops_on_sigint(tmp_path: Path, capsys: object) -> None:
    env = {**os.environ, "K2SERVE_CONFIG": ""}
    proc = subprocess.Popen([sys.executable, "-m", "k2serve.cli", "up", "--port", "0", "--chain-store",
                             str(tmp_path / "chains.sqlite3")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=tmp_path)
    try:
        url, lines = wait_for_endpoint(proc, 120)
        # cpu_binding auto: the prefill and the decode rank each on a core of its own where there are two.
        split = [line for line in lines if "ranks bound to cores of their own" in line]
        assert len(split) == (1 if len(allowed_cores()) >= 2 else 0), lines
        merged = next(m.group(1) for line in lines if (m := re.search(r"merged, at (http://\S+)", line)))
        with httpx.Client(base_url=url, timeout=60) as client:
            # no --model and no config: what `make up` serves, the shipped agent model
            assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-k2-agent"
            body = {"model": "builtin:tiny-k2-agent", "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 7, "temperature": 0, "ignore_eos": True}
            reply = client.post("/v1/chat/completions", json=body).json()
            assert reply["usage"]["completion_tokens"] == 7
            metrics = client.get("/metrics").text
        assert re.search(r'k2serve_kv_handoffs_total\{outcome="ok"\} [1-9]', metrics), metrics
        # Both groups' metrics on one port, labelled by leader (groups export their counters every 0.5 s).
        decoded = re.compile(r'k2serve_decode_tokens_total\{group="decode-0",leader="decode-0",role="decode"\} [1-9]')
        deadline = time.monotonic() + 10
        while not decoded.search(groups := httpx.get(merged, timeout=30).text) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert decoded.search(groups), groups[-3000:]
        assert 'k2serve_prefill_tokens_total{group="prefill-0",leader="prefill-0",role="prefill"}' in groups
        assert chat_main(["hello", "--url", url, "--max-tokens", "5", "--seed", "3"]) == 0
        assert "[finish: length]" in capsys.readouterr().out  # type: ignore[attr-defined]
        check_agent_eval(url, merged)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "k2serve up: stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bench_serve_smoke() -> None:
    """The smoke run with mixed generated lengths: every system delivers each request's own max_tokens."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "bench" / "serve.py"), "--smoke", "--max-tokens", "2-6"],
                          capture_output=True, text=True, timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    sys.path.insert(0, str(root / "bench"))
    try:
        from _loadgen import workload
    finally:
        sys.path.remove(str(root / "bench"))
    lengths = [m for _, m in workload(4, (4, 24), (2, 6), 512, seed=4)]
    assert len(set(lengths)) > 1  # the lengths are mixed
    for system in ("k2serve P/D, groups in Ray actors", "k2serve aggregated, groups in Ray actors",
                   "k2serve engine alone, 1 torch thread", "transformers generate (static batches)"):
        assert f"| {system} | 4 | 4 | {sum(lengths)} |" in done.stdout
    assert "router overhead on ITL p50" in done.stdout
    # Where the CPU went: this process (router and clients), the group leaders (with their engines where they run
    # them) and any rank actors.
    for mode in ("P/D", "aggregated"):
        cpu = done.stdout.split(f"CPU per process, k2serve {mode}, 4 concurrent", 1)[1].split("\n\n", 1)[0]
        assert "| router + clients (this process) |" in cpu and "| group leaders |" in cpu



def check_agent_eval(url: str, metrics_url: str) -> None:
    """The agent eval drives every family and a chain over HTTP through this stack; the prefix-cache share comes
    from the groups' Prometheus counters."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "bench" / "agent_eval.py"), "--tasks", "1", "--links", "2",
                           "--chains", "1", "--url", url, "--metrics-url", metrics_url],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    for family in ("calculator", "weather", "two_step", "chain", "no_tool", "retry", "parallel"):
        assert re.search(rf"^{family} +\| +1 \|", done.stdout, re.M), done.stdout
    share = re.search(r"chain   2 links: \d/1 completed .* prefix cache (\d+)%", done.stdout)
    assert share is not None and 0 < int(share.group(1)) <= 100, done.stdout
