"""Durable chains end to end, over real processes: worker groups in their own process (they outlive the
router), the router process (`python -m k2serve.router.process`), a real SQLite file or redis-server.

- a decode group killed mid-stream by a configured fault: the stream completes, identical to the fault-free run
  (greedy and seeded temperature 1.0), indices contiguous;
- the router process killed mid-stream by a configured fault: a new router process on the same store resumes,
  the client reconnects by chain id and gets the identical, complete turn;
- redis-server restarted mid-run: no chain lost;
- a scripted agent: 300 tool-call turns in one chain through the HTTP stack with 5 kinds of faults.

The agent: runs 300 sequential tool-call turns in one chain through the HTTP stack (groups process,
router process, redis-server) while faults of five kinds hit it: a group killed by a configured fault
(restarted 0.3 s later), a stalled group stream (configured hang → deadline → re-dispatch),
a client disconnect (reconnect by Last-Event-ID), the router process SIGKILLed mid-turn (a new router resumes;
reconnect by `GET /v1/chains/{id}/stream?from=N`), and redis-server restarted. Every turn completes and the
chain's transcript holds all 300 tool calls with their results, in order.

The random tiny model emits no real tool calls: the agent writes each assistant tool-call turn into the
conversation itself. It keeps its context under the model's 16384 tokens the way agents do, by dropping old
turns in blocks of 25 (so the prompt prefix stays stable, and cached, between drops).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from k2serve.router.chains import open_store
from k2serve.config import ServingConfig
from helpers.processes import Cluster

MESSAGES = [{"role": "user", "content": "Count with me."}]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def base_config(tmp_path: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"deterministic": True, "router": {"http_port": 0},
                           "chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")}}
    cfg.update(over)
    return cfg


def sse_events(r: httpx.Response) -> Iterator[tuple[str | None, Any]]:
    event_id: str | None = None
    for line in r.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
            yield event_id, (data if data == "[DONE]" else json.loads(data))
            event_id = None


def delta_text(chunk: dict[str, Any]) -> str:
    delta = chunk["choices"][0]["delta"]
    return (delta.get("reasoning_content") or "") + (delta.get("content") or "")


def raw_tokens(url: str, chain_id: str, start: int = 0) -> list[dict[str, Any]]:
    with httpx.stream("GET", f"{url}/v1/chains/{chain_id}/stream", params={"from": start}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [d for _, d in sse_events(r) if d != "[DONE]"]


def completion(url: str, body: dict[str, Any], **headers: str) -> tuple[str, list[dict[str, Any]]]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        chain_id = r.headers["x-k2-chain-id"]
        return chain_id, [d for _, d in sse_events(r) if d != "[DONE]"]


def test_decode_group_killed_mid_stream_identical(tmp_path: Path, cluster: Cluster) -> None:
    # The fault kills decode-0 after 40 decode tokens, twice: in the greedy run at index 40 or 41, in the sampled
    # run at index 33-35 (the greedy run's tokens after the restart count toward the second firing; how many
    # reached the router before the kill varies). The group restarts 0.3 s later.
    faults = [{"kind": "kill_group", "pool": "decode", "group": 0, "after_tokens": 40, "times": 2}]
    cluster.start_groups(cluster.write("groups.json", base_config(tmp_path, faults=faults)))
    _, url = cluster.start_router(cluster.write("router.json", base_config(tmp_path)))
    for temperature in (0.0, 1.0):
        body = {"messages": MESSAGES, "max_tokens": 48, "ignore_eos": True, "seed": 7, "temperature": temperature,
                "stream": True}
        chain_id, _ = completion(url, body)
        got = raw_tokens(url, chain_id)
        assert [t["index"] for t in got] == list(range(48))
        reference = reference_tokens(tmp_path, temperature)
        assert [t["token"] for t in got] == [t for t, _ in reference], (  # for a post-mortem: how far off, where
            f"temperature {temperature}\n{difference_report(got, reference)}\n{cluster.log_tails()}")
    metrics = httpx.get(f"{url}/metrics").text
    assert "k2serve_migrations_total 2.0" in metrics


def difference_report(got: list[dict[str, Any]], reference: list[tuple[int, float]]) -> str:
    """(index, token, logprob) served vs the reference's, from one before the first difference: a logprob equal
    to the last bit up to it says the served logits drifted only there."""
    first = next(i for i, (t, (r, _)) in enumerate(zip(got, reference)) if t["token"] != r)
    return "\n".join(f"{i}: got {t['token']} ({t['logprob']!r}), reference {r} ({lp!r})"
                     for i, (t, (r, lp)) in enumerate(zip(got, reference)) if first - 1 <= i <= first + 3)


def reference_tokens(tmp_path: Path, temperature: float) -> list[tuple[int, float]]:
    """The fault-free run, in this process (aggregated: in deterministic mode P/D equals one engine)."""
    import asyncio

    from k2serve.stack.inproc import start_local_stack
    from k2serve.worker.engine.sampling import SamplingParams

    cfg = ServingConfig.model_validate(base_config(tmp_path / "ref", router={"aggregated": True}))
    (tmp_path / "ref").mkdir(exist_ok=True)

    async def go() -> list[tuple[int, float]]:
        stack = await start_local_stack(cfg)
        try:
            prompt = stack.core.tokenizer.encode_chat(MESSAGES)
            params = SamplingParams(temperature=temperature, seed=7, max_tokens=48, ignore_eos=True)
            return [(t.token, t.logprob) async for t in stack.core.generate(prompt, params)]
        finally:
            await stack.aclose()

    return asyncio.run(go())


def test_router_killed_mid_stream_new_router_resumes(tmp_path: Path, cluster: Cluster) -> None:
    cluster.start_groups(cluster.write("groups.json", base_config(tmp_path, router={"aggregated": True})))
    doomed = base_config(tmp_path, router={"aggregated": True, "http_port": 0},
                         faults=[{"kind": "kill_router", "after_tokens": 20}])
    router, url = cluster.start_router(cluster.write("router1.json", doomed))
    body = {"messages": MESSAGES, "max_tokens": 60, "ignore_eos": True, "seed": 11, "temperature": 1.0,
            "stream": True}
    seen: list[tuple[str, Any]] = []
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            for event_id, data in sse_events(r):
                if data != "[DONE]":
                    seen.append((event_id, data))
    router.proc.wait(10)
    assert router.proc.returncode == -signal.SIGKILL and 0 < len(seen) < 60
    chain_id = seen[0][0].rsplit(":", 1)[0]
    _, url2 = cluster.start_router(cluster.write("router2.json", base_config(tmp_path, router={"aggregated": True})))
    # Reconnect with Last-Event-ID: the rest of the turn's chunks; and the raw tokens from index 0.
    with httpx.stream("POST", f"{url2}/v1/chat/completions", json=body, timeout=120,
                      headers={"Last-Event-ID": seen[-1][0]}) as r:
        rest = [(i, d) for i, d in sse_events(r) if d != "[DONE]"]
    tokens = [t["token"] for t in raw_tokens(url2, chain_id)]
    assert 'k2serve_chain_resumes_total{cause="router"} 1.0' in httpx.get(f"{url2}/metrics").text
    with httpx.stream("POST", f"{url2}/v1/chat/completions", json=body, timeout=120) as r:  # fault-free
        reference = [(i, d) for i, d in sse_events(r) if d != "[DONE]"]
    chain_ref = reference[0][0].rsplit(":", 1)[0]
    assert tokens == [t["token"] for t in raw_tokens(url2, chain_ref)]
    # Event by event (index and text): nothing missing or repeated across the reconnect.
    assert [(int(i.rsplit(":", 1)[1]), delta_text(d)) for i, d in seen + rest] == [
        (int(i.rsplit(":", 1)[1]), delta_text(d)) for i, d in reference]
    turn = httpx.get(f"{url2}/v1/chains/{chain_id}").json()["turns"][0]
    assert turn["status"] == "finished" and turn["generated"] == tokens


def test_redis_restart_mid_run_loses_no_chain(tmp_path: Path, redis_server: Any) -> None:
    import asyncio

    from k2serve.stack.inproc import start_local_stack
    from k2serve.worker.engine.sampling import SamplingParams

    cfg = ServingConfig.model_validate(base_config(tmp_path, router={"aggregated": True}, chain_store={
        "backend": "redis", "redis_url": redis_server.url, "checkpoint_every": 4}))
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=64, ignore_eos=True)

    async def go() -> tuple[list[list[int]], list[list[int]], list[str]]:
        stack = await start_local_stack(cfg)
        try:
            prompts = [[3 + i, 40, 41, 42, 43] for i in range(3)]
            refs = [[t.token async for t in stack.core.generate(p, params)] for p in prompts]

            async def run(prompt: list[int], restart: bool) -> list[int]:
                out = []
                async for tok in stack.core.generate(prompt, params):
                    out.append(tok.token)
                    if restart and len(out) == 10:
                        redis_server.kill()  # SIGKILL: only the fsynced AOF survives
                        await asyncio.sleep(0.5)
                        redis_server.start()
                return out

            got = await asyncio.gather(*(run(p, i == 0) for i, p in enumerate(prompts)))
            chains = await asyncio.to_thread(lambda: [stack.core.store.get_chain(c.chain_id)
                                                      for c in stack.core.store.list_chains()])
            return refs, list(got), [c.turns[0].status for c in chains if len(c.turns[0].generated) == 64]
        finally:
            await stack.aclose()

    refs, got, statuses = asyncio.run(go())
    assert got == refs
    assert statuses == ["finished"] * 6  # the 3 reference chains and the 3 that ran through the outage
    with open_store(cfg.chain_store) as store:
        assert len(store.list_chains()) == 6


TURNS = 300
WINDOW = 25
TOOLS = [{"type": "function", "function": {"name": "t", "description": "step",
                                           "parameters": {"type": "object", "properties": {}}}}]
DISCONNECT_AT, ROUTER_KILL_AT, REDIS_RESTART_AT = 40, 150, 220


def call_id(i: int) -> str:
    return f"functions.t:{i}"


def conversation(i: int) -> list[dict[str, Any]]:
    """Turn i's messages: the task, then the agent's calls and their results, older blocks dropped."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for k in range(max(0, (i // WINDOW - 1) * WINDOW), i):
        msgs.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id(k), "type": "function", "function": {"name": "t", "arguments": str(k)}}]})
        msgs.append({"role": "tool", "tool_call_id": call_id(k), "content": str(k)})
    return msgs


def test_agent_300_tool_call_turns_through_faults(tmp_path: Path, redis_server: Any) -> None:
    store = {"backend": "redis", "redis_url": redis_server.url}
    # Aggregated (2 groups serving both roles): a P/D turn without Ray re-prefills on the decode group too.
    common = {"deterministic": False, "router": {"aggregated": True, "http_port": 0}, "chain_store": store,
              "prefill": {"groups": 2}}
    groups_cfg = base_config(tmp_path, **common, faults=[
        {"kind": "kill_group", "pool": "prefill", "group": 0, "after_tokens": 300}])
    router_cfg = base_config(tmp_path, **common, faults=[
        {"kind": "hang_group", "pool": "prefill", "group": 1, "after_tokens": 60}])
    cluster = Cluster(tmp_path)
    try:
        cluster.start_groups(cluster.write("groups.json", groups_cfg))
        router_path = cluster.write("router.json", router_cfg)
        router, url = cluster.start_router(router_path, stall_timeout_s=2.0)
        chain_id = ""
        for i in range(TURNS + 1):
            body = {"messages": conversation(i), "tools": TOOLS, "max_tokens": 4, "ignore_eos": True,
                    "temperature": 0.0, "stream": True}
            headers = {"X-K2-Chain-Id": chain_id} if chain_id else {}
            if i == REDIS_RESTART_AT:
                redis_server.kill()
                threading.Timer(0.5, redis_server.start).start()
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
                assert r.status_code == 200, (i, r.read())
                chain_id = r.headers["x-k2-chain-id"]
                events = sse_events(r)
                first_id, _ = next(events)
                if i == ROUTER_KILL_AT:
                    router.kill()
                    router, url = cluster.start_router(router_path, stall_timeout_s=2.0)
                    n = int(first_id.rsplit(":", 1)[1]) + 1
                    with httpx.stream("GET", f"{url}/v1/chains/{chain_id}/stream", params={"from": n},
                                      timeout=120) as rr:
                        rest = [d for _, d in sse_events(rr) if d != "[DONE]"]
                    assert [d["index"] for d in rest] == list(range(n, 4)) and rest[-1]["finish_reason"]
                    continue
                if i == DISCONNECT_AT:
                    r.close()
                    headers["Last-Event-ID"] = first_id
                    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                                      timeout=120) as rr:
                        events = sse_events(rr)
                        tail = list(events)
                else:
                    tail = list(events)
            finishes = [d["choices"][0]["finish_reason"] for _, d in tail if d != "[DONE]" and d["choices"]]
            assert tail[-1] == (None, "[DONE]") and finishes[-1] == "length", (i, tail)
        chain = httpx.get(f"{url}/v1/chains/{chain_id}").json()
    finally:
        cluster.close()
    assert len(chain["turns"]) == TURNS + 1
    assert all(t["status"] == "finished" and len(t["generated"]) == 4 for t in chain["turns"])
    assert [(c["id"], c["name"], c["arguments"], c["result"]) for c in chain["tool_calls"]] == [
        (call_id(k), "t", str(k), str(k)) for k in range(TURNS)]
    with open_store(ServingConfig.model_validate(router_cfg).chain_store) as s:
        assert len(s.get_chain(chain_id).tool_calls) == TURNS
    logs = (tmp_path / "groups.log").read_text() + (tmp_path / "router.log").read_text()
    for fired in ("kill_group on both-0", "hang_group both-1"):
        assert f"fault injection: {fired}" in logs, fired


def test_bench_failover_smoke() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "bench" / "failover.py"), "--smoke"], capture_output=True,
                          text=True, timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["kills"] == 3 and result["identical"] is True and result["tokens"] == 64
