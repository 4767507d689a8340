"""Per-key quotas (router/quotas.py): a key's concurrent turns and its token bucket, each at the limit and one past
it — 429 with `Retry-After` over HTTP, RESOURCE_EXHAUSTED with `retry-after` over gRPC — and a key's own limits
from the keys file over `router.limits`' defaults."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers.router_fronts import router_fronts

from k2serve.config import RequestLimits, ServingConfig
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.proto.convert import sampling_to_proto
from k2serve.router.api_keys import APIKeys
from k2serve.router.grpc_api import RETRY_AFTER_KEY
from k2serve.router.quotas import KeyLimits, RateLimited, TenantQuotas
from k2serve.sampling_params import SamplingParams

ONE, TWO, RATED = "sk-one-0123456789", "sk-two-0123456789", "sk-rated-0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refusal(quotas: TenantQuotas, limits: KeyLimits, prompt_tokens: int, max_tokens: int) -> RateLimited:
    """Key "a"'s turn, refused."""
    with pytest.raises(RateLimited) as refused:
        quotas.admit("a", limits, prompt_tokens, max_tokens)
    return refused.value


def test_concurrency_at_and_past_the_limit() -> None:
    quotas = TenantQuotas(Clock())
    limits = KeyLimits(max_concurrent=2)
    held = [quotas.admit("a", limits, 10, 5) for _ in range(2)]  # at the limit
    refused = refusal(quotas, limits, 10, 5)
    assert refused.limit == "max_concurrent_per_key" and refused.retry_after_s >= 1
    quotas.admit("b", limits, 10, 5)  # another key is not affected
    held[0].release(5, 5)
    held[0].release(5, 5)  # idempotent: frees one slot, not two
    quotas.admit("a", limits, 10, 5)
    refusal(quotas, limits, 10, 5)


def test_token_bucket_at_and_past_the_limit_refills_and_refunds() -> None:
    clock = Clock()
    quotas = TenantQuotas(clock)
    limits = KeyLimits(tokens_per_minute=600)  # 10 tokens a second
    first = quotas.admit("a", limits, 100, 500)  # exactly the bucket: admitted
    refused = refusal(quotas, limits, 1, 0)  # one token past it
    assert refused.limit == "tokens_per_minute_per_key"
    assert refused.retry_after_s == 1  # 1 token at 10/s: 0.1 s, rounded up to a whole second
    first.release(generated=200, max_tokens=500)  # 300 unused tokens come back
    quotas.admit("a", limits, 100, 200)
    refused = refusal(quotas, limits, 50, 0)
    assert refused.retry_after_s == 5  # 50 tokens at 10/s
    clock.now += 5.0
    quotas.admit("a", limits, 50, 0)
    clock.now += 3600.0  # the bucket holds at most a minute's worth
    quotas.admit("a", limits, 300, 300)
    refusal(quotas, limits, 1, 0)


def test_a_turn_bigger_than_the_bucket_waits_for_a_full_one() -> None:
    clock = Clock()
    quotas = TenantQuotas(clock)
    limits = KeyLimits(tokens_per_minute=60)
    quotas.admit("a", limits, 100, 20).release(20, 20)  # full bucket: admitted, 60 in debt
    refused = refusal(quotas, limits, 100, 20)
    assert refused.retry_after_s == 120  # from -60 back to a full 60 at 1 token/s
    clock.now += 120.0
    quotas.admit("a", limits, 100, 20)


def test_key_file_options_override_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{ONE} max_concurrent=1\n{TWO}\n{RATED} tokens_per_minute=50 max_concurrent=7\n")
    keys = APIKeys(str(path))
    defaults = RequestLimits(max_concurrent_per_key=3, tokens_per_minute_per_key=1000)
    assert keys.limits(ONE, defaults) == KeyLimits(max_concurrent=1, tokens_per_minute=1000)
    assert keys.limits(TWO, defaults) == KeyLimits(max_concurrent=3, tokens_per_minute=1000)
    assert keys.limits(RATED, defaults) == KeyLimits(max_concurrent=7, tokens_per_minute=50)
    assert keys.limits("sk-nope-0123456789", defaults) is None
    assert APIKeys(None).limits(None, defaults) is None  # an open API has no keys to limit
    path.write_text(f"{ONE} max_turns=3\n")
    with pytest.raises(ValueError, match="max_turns"):
        APIKeys(str(path))


async def _grpc_code(call: Any) -> tuple[grpc.StatusCode, dict[str, str]]:
    try:
        [m async for m in call]
    except grpc.aio.AioRpcError as e:
        return e.code(), {k: v for k, v in (e.trailing_metadata() or ())}
    return grpc.StatusCode.OK, {}


def test_http_and_grpc_refuse_past_a_keys_quota(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{ONE} max_concurrent=1\n{TWO}\n{RATED} tokens_per_minute=200\n")
    config = ServingConfig.model_validate({
        "chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")}, "model": {"max_context": 512},
        "router": {"aggregated": True, "api_keys_file": str(keys), "limits": {"max_concurrent_per_key": 4}}})
    long_turn = {"model": "tiny-k2", "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "stream": True}

    def md(key: str) -> Any:
        return (("authorization", f"Bearer {key}"),)

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with router_fronts(config) as fronts:
            stack, http, ch = fronts.stack, fronts.http, fronts.channel
            stub = pb_grpc.RouterStub(ch)
            chat = {"model": "tiny-k2", "messages": MESSAGES, "max_tokens": 2}

            def generate(key: str, max_tokens: int) -> Any:
                sampling = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=max_tokens))
                return stub.Generate(pb.GenerateRequest(chat_json=json.dumps({"messages": MESSAGES}),
                                                        sampling=sampling), metadata=md(key))

            # Concurrency: key ONE (max_concurrent=1) with one turn generating.
            async with http.stream("POST", "/v1/chat/completions", json=long_turn,
                                   headers={"Authorization": f"Bearer {ONE}"}) as streaming:
                assert streaming.status_code == 200
                chain = streaming.headers["X-K2-Chain-Id"]
                await anext(streaming.aiter_lines())  # the turn is generating
                past = await http.post("/v1/chat/completions", json=chat,
                                       headers={"Authorization": f"Bearer {ONE}"})
                out["http_past"] = (past.status_code, past.headers.get("retry-after"),
                                    past.json()["error"]["code"])
                out["grpc_past"] = await _grpc_code(generate(ONE, 2))
                out["other_key"] = (await http.post("/v1/chat/completions", json=chat,
                                                    headers={"Authorization": f"Bearer {TWO}"})).status_code
                await http.post(f"/v1/chains/{chain}/cancel", headers={"Authorization": f"Bearer {ONE}"})
            for _ in range(100):  # the cancelled turn's slot frees when its task ends
                if chain not in stack.core.turns.live:
                    break
                await asyncio.sleep(0.05)
            out["after"] = (await http.post("/v1/chat/completions", json=chat,
                                            headers={"Authorization": f"Bearer {ONE}"})).status_code

            # Token rate: key RATED's bucket holds 200 tokens; a turn reserves prompt + max_tokens.
            first = await http.post("/v1/chat/completions", json={**chat, "max_tokens": 1},
                                    headers={"Authorization": f"Bearer {RATED}"})
            prompt = first.json()["usage"]["prompt_tokens"]
            assert prompt + 1 < 200 - 30, prompt
            fill = 200 - prompt - 1  # what is left: a turn of exactly that fits (at the limit)
            at = await _grpc_code(stub.Generate(pb.GenerateRequest(
                prompt_token_ids=[1] * (fill - 1), sampling=sampling_to_proto(SamplingParams(
                    temperature=0.0, max_tokens=1, ignore_eos=True))), metadata=md(RATED)))
            out["rate_at"] = at[0]
            past_rate = await http.post("/v1/chat/completions", json={**chat, "max_tokens": 30},
                                        headers={"Authorization": f"Bearer {RATED}"})
            out["rate_http_past"] = (past_rate.status_code, past_rate.headers.get("retry-after"),
                                     past_rate.json()["error"]["code"])
            out["rate_grpc_past"] = await _grpc_code(generate(RATED, 30))
        return out

    out = asyncio.run(go())
    assert out["http_past"] == (429, "1", "max_concurrent_per_key")
    assert out["grpc_past"] == (grpc.StatusCode.RESOURCE_EXHAUSTED, {RETRY_AFTER_KEY: "1"})
    assert out["other_key"] == 200 and out["after"] == 200
    assert out["rate_at"] == grpc.StatusCode.OK
    status, retry, code = out["rate_http_past"]
    assert status == 429 and code == "tokens_per_minute_per_key" and 1 <= int(retry) <= 60
    grpc_status, trailing = out["rate_grpc_past"]
    assert grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED and 1 <= int(trailing[RETRY_AFTER_KEY]) <= 60
