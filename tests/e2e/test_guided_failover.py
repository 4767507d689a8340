"""A constrained stream whose decode group is killed mid-answer resumes to the same valid output (deterministic
mode), over real processes: the P/D groups process and the router process of tests/e2e/test_chain_failover.py.

The re-dispatched request replays the tokens so far through a fresh grammar matcher on the new engine (the
`output_prefix` of a resumed request), so the rest of the answer is drawn under the same constraint state, from
the same (seed, position) draws, as without the failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from e2e.test_chain_failover import Cluster, base_config, cluster, raw_tokens, sse_events  # noqa: F401 (fixture)

MESSAGES = [{"role": "user", "content": "Answer in JSON."}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "tag", "n"], "additionalProperties": False}
KILL_AFTER = 12  # decode tokens: the thinking section is closed after 4 (max_reasoning_tokens), so mid-JSON


def answer(url: str, body: dict[str, Any]) -> tuple[str, str, list[int]]:
    """(chain id, streamed answer content, indices of the events that carried content)."""
    content, indices = "", []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=180) as r:
        assert r.status_code == 200, r.read()
        chain_id = r.headers["x-k2-chain-id"]
        for event_id, data in sse_events(r):
            if data == "[DONE]":
                continue
            piece = data["choices"][0]["delta"].get("content") or ""
            if piece:
                content += piece
                indices.append(int(str(event_id).rsplit(":", 1)[1]))
            finish = data["choices"][0]["finish_reason"]
    assert finish == "stop", finish
    return chain_id, content, indices


def test_json_schema_stream_survives_decode_group_kill(tmp_path: Path, cluster: Cluster) -> None:
    faults = [{"kind": "kill_group", "pool": "decode", "group": 0, "after_tokens": KILL_AFTER, "times": 1}]
    cluster.start_groups(cluster.write("groups.json", base_config(tmp_path, faults=faults)))
    _, url = cluster.start_router(cluster.write("router.json", base_config(tmp_path)))
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    body = {"messages": MESSAGES, "max_tokens": 200, "seed": 3, "temperature": 1.0, "stream": True,
            "response_format": fmt, "max_reasoning_tokens": 4}

    chain_id, content, indices = answer(url, body)  # the fault fires during this one
    assert "k2serve_migrations_total 1.0" in httpx.get(f"{url}/metrics").text
    # The kill came after some answer tokens and before its end: the decode group emits indices 1.. (the prefill
    # group index 0), so it died with at most index KILL_AFTER out.
    assert indices[0] < KILL_AFTER - 2 and indices[-1] > KILL_AFTER + 2, indices
    jsonschema.validate(json.loads(content), SCHEMA)

    ref_chain, ref_content, ref_indices = answer(url, body)  # the fault is spent: a fault-free run
    assert "k2serve_migrations_total 1.0" in httpx.get(f"{url}/metrics").text
    assert (content, indices) == (ref_content, ref_indices)
    got, ref = raw_tokens(url, chain_id), raw_tokens(url, ref_chain)
    assert [t["index"] for t in got] == list(range(len(ref)))
    assert [t["token"] for t in got] == [t["token"] for t in ref]
