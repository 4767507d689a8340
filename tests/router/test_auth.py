"""Authentication and ownership on every surface: the worker group's gRPC needs the cluster token; the router's
HTTP routes and gRPC RPCs need an API key (one policy); a chain belongs to the key that created it and is
NOT_FOUND / 404 for any other; both secrets rotate by replacing their file, without a restart."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from k2serve.config import ServingConfig
from k2serve.metrics import Metrics
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.proto.convert import sampling_to_proto
from k2serve.router.http.app import create_app
from k2serve.router.http.uvicorn_runner import serving
from k2serve.stack.inproc import start_local_stack
from k2serve.worker.parallel.inproc_group import InProcessGroup
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.loader import resolve_checkpoint
from helpers.router_fronts import grpc_code, router_fronts

GREEDY = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
MESSAGES = [{"role": "user", "content": "hi"}]


def replace_file(path: Path, text: str) -> None:
    """Writes `text` as a new file renamed over `path` — how Kubernetes updates a mounted Secret."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def _config(tmp: Path, **top: Any) -> ServingConfig:
    return ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp / "chains.sqlite3")},
                                         "model": {"max_context": 256}, **top})


def _worker_calls(stub: pb_grpc.WorkerGroupStub) -> dict[str, Any]:
    """Every WorkerGroup RPC, as a coroutine function of the call's metadata."""

    async def decode_many(md: Any) -> Any:
        async def one() -> Any:
            yield pb.DecodeManyRequest(cancel="x")
        # The call stays open for more requests: a deadline ends it (DEADLINE_EXCEEDED when it was let in).
        return [m async for m in stub.DecodeMany(one(), metadata=md, timeout=1.0)]

    return {
        "Prefill": lambda md: stub.Prefill(pb.PrefillRequest(request_id="p", prompt=[1, 2, 3], sampling=GREEDY),
                                           metadata=md),
        "Decode": lambda md: _drain(stub.Decode(pb.DecodeRequest(request_id="d", prompt=[1, 2, 3], sampling=GREEDY),
                                                metadata=md)),
        "DecodeMany": decode_many,
        "Cancel": lambda md: stub.Cancel(pb.CancelRequest(request_id="x"), metadata=md),
        "Health": lambda md: stub.Health(pb.HealthRequest(), metadata=md),
        "Stats": lambda md: stub.Stats(pb.StatsRequest(), metadata=md),
    }


async def _drain(call: Any) -> list[Any]:
    return [m async for m in call]


def test_worker_grpc_refuses_calls_without_the_cluster_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-secret\n")
    config = _config(tmp_path, cluster_token_file=str(token))
    assert sorted(_worker_calls(None).keys()) == sorted(  # type: ignore[arg-type]
        pb.DESCRIPTOR.services_by_name["WorkerGroup"].methods_by_name)

    async def go() -> dict[str, dict[str, grpc.StatusCode]]:
        group = await InProcessGroup.start(resolve_checkpoint("builtin:tiny-k2"), config.decode, config, group_id="g0",
                                       role="both", eos_ids=[])
        out: dict[str, dict[str, grpc.StatusCode]] = {}
        try:
            async with grpc.aio.insecure_channel(group.address) as ch:
                calls = _worker_calls(pb_grpc.WorkerGroupStub(ch))
                for name, md in {"none": None, "wrong": (("authorization", "Bearer first-secreT"),),
                                 "not_bearer": (("authorization", "first-secret"),),
                                 "right": (("authorization", "Bearer first-secret"),)}.items():
                    out[name] = {rpc: await grpc_code(call(md)) for rpc, call in calls.items()}
                replace_file(token, "second-secret")
                out["old_after_rotation"] = {"Health": await grpc_code(calls["Health"](
                    (("authorization", "Bearer first-secret"),)))}
                out["new_after_rotation"] = {"Health": await grpc_code(calls["Health"](
                    (("authorization", "Bearer second-secret"),)))}
        finally:
            await group.stop()
        return out

    out = asyncio.run(go())
    for name in ("none", "wrong", "not_bearer"):
        assert set(out[name].values()) == {grpc.StatusCode.UNAUTHENTICATED}, (name, out[name])
    assert out["right"]["Health"] == out["right"]["Prefill"] == out["right"]["Stats"] == grpc.StatusCode.OK
    assert grpc.StatusCode.UNAUTHENTICATED not in out["right"].values()
    assert out["old_after_rotation"]["Health"] == grpc.StatusCode.UNAUTHENTICATED
    assert out["new_after_rotation"]["Health"] == grpc.StatusCode.OK


def test_router_sends_the_cluster_token(tmp_path: Path) -> None:
    """A stack whose groups demand the token serves turns: the router's every call to them carries it."""
    token = tmp_path / "token"
    token.write_text("s3cret")
    config = _config(tmp_path, cluster_token_file=str(token), router={"aggregated": True})

    async def go() -> int:
        stack = await start_local_stack(config)
        try:
            # ignore_eos: a sampled end-of-text would end the turn early
            params = SamplingParams(max_tokens=4, ignore_eos=True)
            return len([t async for t in stack.core.generate([1, 2, 3], params)])
        finally:
            await stack.aclose()

    assert asyncio.run(go()) == 4


KEY_A, KEY_B = "sk-alpha-0123456789", "sk-bravo-0123456789"


def _router_rpcs(stub: pb_grpc.RouterStub, chain_id: str) -> dict[str, Any]:
    """Every Router RPC on `chain_id` ("" for a new chain), as a coroutine function of the call's metadata."""
    return {
        "Generate": lambda md: _drain(stub.Generate(pb.GenerateRequest(
            chain_id=chain_id, chat_json=json.dumps({"messages": MESSAGES}), sampling=GREEDY), metadata=md)),
        "ResumeChain": lambda md: _drain(stub.ResumeChain(pb.ResumeChainRequest(chain_id=chain_id), metadata=md)),
        "Cancel": lambda md: stub.Cancel(pb.CancelChainRequest(chain_id=chain_id), metadata=md),
        "GetChain": lambda md: stub.GetChain(pb.GetChainRequest(chain_id=chain_id), metadata=md),
    }


def _http_routes(chain_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, request kwargs) of every /v1 route, on `chain_id`."""
    chat = {"model": "tiny-k2", "messages": MESSAGES, "max_tokens": 2}
    return [("POST", "/v1/chat/completions", {"json": chat}),
            ("POST", "/v1/completions", {"json": {"model": "tiny-k2", "prompt": "hi", "max_tokens": 2}}),
            ("GET", "/v1/models", {}),
            ("GET", f"/v1/chains/{chain_id}", {}),
            ("POST", f"/v1/chains/{chain_id}/cancel", {}),
            ("GET", f"/v1/chains/{chain_id}/stream", {}),
            ("DELETE", f"/v1/chains/{chain_id}", {})]


def test_api_keys_on_every_surface_and_chains_owned_by_their_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# two tenants\n{KEY_A}\n{KEY_B}\n")
    config = _config(tmp_path, router={"aggregated": True, "api_keys_file": str(keys)})
    bad_keys = {"none": None, "wrong": "sk-alpha-012345678", "other_scheme": "x"}

    def auth(key: str | None) -> dict[str, str]:
        if key is None:
            return {}
        return {"Authorization": f"Basic {KEY_A}" if key == "x" else f"Bearer {key}"}

    def md(key: str | None) -> Any:
        if key is None:
            return None
        return (("authorization", f"Basic {KEY_A}" if key == "x" else f"Bearer {key}"),)

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with router_fronts(config) as fronts:
            app, http, ch = fronts.app, fronts.http, fronts.channel
            routes = {(path, m.upper()) for path, ops in app.openapi()["paths"].items() if path.startswith("/v1")
                      for m in ops}
            assert routes == {(p.replace("abc", "{chain_id}"), m) for m, p, _ in _http_routes("abc")}
            stub = pb_grpc.RouterStub(ch)
            assert set(_router_rpcs(stub, "")) == set(pb.DESCRIPTOR.services_by_name["Router"].methods_by_name)

            # Key A's chains, one made over HTTP, one over gRPC.
            made = await http.post("/v1/chat/completions", headers=auth(KEY_A),
                                   json={"model": "tiny-k2", "messages": MESSAGES, "max_tokens": 3})
            assert made.status_code == 200
            http_chain = made.headers["X-K2-Chain-Id"]
            grpc_chain = (await _drain(stub.Generate(pb.GenerateRequest(
                chat_json=json.dumps({"messages": MESSAGES}), sampling=GREEDY), metadata=md(KEY_A))))[0].chain_id

            for name, key in bad_keys.items():
                out[f"http_{name}"] = {(m, p): (await http.request(m, p, headers=auth(key), **kw)).status_code
                                       for m, p, kw in _http_routes(http_chain)}
                out[f"grpc_{name}"] = {rpc: await grpc_code(call(md(key)))
                                       for rpc, call in _router_rpcs(stub, grpc_chain).items()}
            for chain in (http_chain, grpc_chain):
                out[f"http_b_{chain}"] = {
                    (m, p): (await http.request(m, p, headers=auth(KEY_B), **kw)).status_code
                    for m, p, kw in _http_routes(chain) if "{" not in p and chain in p}
                out[f"http_b_{chain}"]["continue"] = (await http.post(
                    "/v1/chat/completions", headers={**auth(KEY_B), "X-K2-Chain-Id": chain},
                    json={"model": "tiny-k2", "messages": MESSAGES, "max_tokens": 2})).status_code
                out[f"http_b_{chain}"]["replay"] = (await http.post(
                    "/v1/chat/completions", headers={**auth(KEY_B), "Last-Event-ID": f"{chain}:0"},
                    json={"model": "tiny-k2", "messages": MESSAGES, "max_tokens": 2, "stream": True})).status_code
                out[f"grpc_b_{chain}"] = {rpc: await grpc_code(call(md(KEY_B)))
                                          for rpc, call in _router_rpcs(stub, chain).items()}
                out[f"a_{chain}"] = ((await http.get(f"/v1/chains/{chain}", headers=auth(KEY_A))).status_code,
                                     await grpc_code(stub.GetChain(pb.GetChainRequest(chain_id=chain),
                                                                   metadata=md(KEY_A))))
            # Rotation: B's key removed, a new key added — no restart.
            replace_file(keys, f"{KEY_A}\nsk-charlie-0123456789\n")
            out["rotated"] = [(await http.get("/v1/models", headers=auth(k))).status_code
                              for k in (KEY_A, KEY_B, "sk-charlie-0123456789")]
            out["rotated_grpc"] = [await grpc_code(stub.GetChain(pb.GetChainRequest(chain_id=grpc_chain),
                                                                 metadata=md(k))) for k in (KEY_A, KEY_B)]
        return out

    out = asyncio.run(go())
    for name in bad_keys:
        assert set(out[f"http_{name}"].values()) == {401}, (name, out[f"http_{name}"])
        assert set(out[f"grpc_{name}"].values()) == {grpc.StatusCode.UNAUTHENTICATED}, (name, out[f"grpc_{name}"])
    for key, codes in out.items():
        if key.startswith("http_b_"):
            assert set(codes.values()) == {404}, (key, codes)
        if key.startswith("grpc_b_"):
            assert set(codes.values()) == {grpc.StatusCode.NOT_FOUND}, (key, codes)
        if key.startswith("a_"):
            assert codes == (200, grpc.StatusCode.OK)
    assert out["rotated"] == [200, 401, 200]
    assert out["rotated_grpc"] == [grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED]


def test_open_api_keeps_working_without_keys(tmp_path: Path) -> None:
    """No key file: chains are open to every caller (tenant ''), as before keys existed."""
    config = _config(tmp_path, router={"aggregated": True})

    async def go() -> tuple[int, int]:
        metrics = Metrics()
        stack = await start_local_stack(config, metrics)
        try:
            async with serving(create_app(stack.core, config, metrics)) as url, \
                    httpx.AsyncClient(base_url=url, timeout=60) as http:
                made = await http.post("/v1/chat/completions", json={"model": "tiny-k2", "messages": MESSAGES,
                                                                     "max_tokens": 2})
                got = await http.get(f"/v1/chains/{made.headers['X-K2-Chain-Id']}")
                return made.status_code, got.status_code
        finally:
            await stack.aclose()

    assert asyncio.run(go()) == (200, 200)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_key_file_without_keys_is_refused_at_start(tmp_path: Path, text: str) -> None:
    from k2serve.router.api_keys import APIKeys

    keys = tmp_path / "keys"
    keys.write_text(text)
    with pytest.raises(ValueError, match="holds no keys"):
        APIKeys(str(keys))
