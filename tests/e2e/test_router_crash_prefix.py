"""Durability before visibility, end to end: the router process is SIGKILLed mid-stream at random points (the
client kills it after a random number of events), a new router resumes the turn, and everything the client saw
before the kill is exactly what the resumed turn holds at those indices — in the default, non-deterministic
mode, where a regenerated token may differ from one generated before."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx

from e2e.test_chain_failover import Cluster, base_config, cluster, delta_text, sse_events  # noqa: F401

KILLS = 6
MAX_TOKENS = 64


def _events(r: httpx.Response, limit: int | None = None) -> list[tuple[int, str]]:
    """(index, delta text) per chunk, up to `limit` chunks."""
    out: list[tuple[int, str]] = []
    for event_id, data in sse_events(r):
        if data == "[DONE]" or event_id is None:
            continue
        out.append((int(event_id.rsplit(":", 1)[1]), delta_text(data)))
        if limit is not None and len(out) >= limit:
            break
    return out


def test_what_a_client_saw_survives_router_kills(tmp_path: Path, cluster: Cluster) -> None:
    rng = random.Random(20261207)
    config = base_config(tmp_path, deterministic=False)
    config["router"]["aggregated"] = True
    cluster.start_groups(cluster.write("groups.json", config))
    router_config = cluster.write("router.json", config)
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Count with me."}], "max_tokens": MAX_TOKENS,
                            "ignore_eos": True, "temperature": 1.0, "stream": True}
    router, url = cluster.start_router(router_config)
    for attempt in range(KILLS):
        stop_after = rng.randint(1, MAX_TOKENS - 8)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            chain_id = r.headers["x-k2-chain-id"]
            seen = _events(r, stop_after)
            router.kill()  # SIGKILL while the turn is still generating
        router, url = cluster.start_router(router_config)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120,
                          headers={"Last-Event-ID": f"{chain_id}:0"}) as r:
            assert r.status_code == 200, r.read()
            resumed = dict(_events(r))
        stored = httpx.get(f"{url}/v1/chains/{chain_id}").json()["turns"][-1]
        assert stored["status"] == "finished" and len(stored["generated"]) == MAX_TOKENS, (attempt, stored["status"])
        diverged = [(i, text, resumed.get(i)) for i, text in seen if i > 0 and resumed.get(i) != text]
        assert not diverged, (f"kill {attempt} after {stop_after} events: the client saw text the resumed turn "
                              f"does not hold: {diverged[:5]}\n{cluster.log_tails()}")
