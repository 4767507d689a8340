"""The KV handoff played by an attacker: a peer sends a decode group a crafted `kv_handle` — a pickle that runs
code, a pickled Ray ObjectRef whose owner is the attacker, a well-formed handle naming a group that is not one
of ours. Nothing runs, no outbound connection is made, the call is refused."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ray.core.generated.common_pb2 import Address
from ray._private.serialization import _object_ref_deserializer

from k2serve.config import ServingConfig
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto.convert import sampling_to_proto
from k2serve.worker.parallel.inproc_group import start_inprocess_groups
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.kv_handoff import make_handle

PROMPT = [(5 * i + 1) % 500 for i in range(40)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
DECODE = "/k2serve.v1.WorkerGroup/Decode"


class _Touches:
    """Pickles as a call of Path.touch: what a plain unpickler would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return Path.touch, (self.path,)


class _ForeignRef:
    """Pickles as Ray's ObjectRef deserializer with an owner the attacker chose: an unpickler that admits it
    makes the worker fetch the object from that owner (and unpickle whatever it serves)."""

    def __init__(self, owner_port: int) -> None:
        self.owner = Address(ip_address="127.0.0.1", port=owner_port, worker_id=os.urandom(28)).SerializeToString()

    def __reduce__(self) -> tuple[Any, ...]:
        return _object_ref_deserializer, (os.urandom(28), "", self.owner, 0, None)


@pytest.fixture
def fake_owner() -> Iterator[list[tuple[str, int]]]:
    """A loopback listener standing for the attacker's Ray worker: yields the list of connections it got."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.1)
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = srv.accept()
            except TimeoutError:
                continue
            seen.append(peer)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    seen.append(("port", srv.getsockname()[1]))  # first entry: where it listens
    yield seen
    stop.set()
    thread.join()
    srv.close()


def _field6(payload: bytes) -> bytes:
    """DecodeRequest field 6 (kv_handle) as raw length-delimited bytes, whatever they hold."""
    n, out = len(payload), bytearray([6 << 3 | 2])
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out) + payload


def test_crafted_kv_handles_are_refused_and_run_nothing(ray_cluster: None, tmp_path: Path,
                                                        fake_owner: list[tuple[str, int]]) -> None:
    owner_port = fake_owner[0][1]
    config = ServingConfig.model_validate({"model": {"max_context": 256}})
    base = pb.DecodeRequest(request_id="d", prompt=PROMPT, sampling=sampling_to_proto(GREEDY),
                            output_prefix=[7]).SerializeToString()
    raw = {"pickle_runs_code": base + _field6(pickle.dumps(_Touches(tmp_path / "ran"))),
           "pickled_foreign_ref": base + _field6(pickle.dumps(_ForeignRef(owner_port)))}
    # Well-formed, with the right digest, but naming a group that is not one of ours.
    foreign = make_handle("attacker-0", os.urandom(16), PROMPT, config.decode.block_size)
    typed = pb.DecodeRequest(request_id="d", prompt=PROMPT, sampling=sampling_to_proto(GREEDY),
                             output_prefix=[7], kv_handle=foreign).SerializeToString()

    async def go() -> dict[str, grpc.StatusCode]:
        groups = await start_inprocess_groups(config)
        decode = next(g for g in groups if g.service.role == "decode")
        codes: dict[str, grpc.StatusCode] = {}
        try:
            async with grpc.aio.insecure_channel(decode.address) as ch:
                call = ch.unary_stream(DECODE, request_serializer=lambda b: b,
                                       response_deserializer=pb.TokenEvent.FromString)
                for name, body in {**raw, "foreign_group": typed}.items():
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        _ = [ev async for ev in call(body)]
                    codes[name] = err.value.code()
            await asyncio.sleep(0.5)  # time for any connection the worker might have started
            assert decode.service.handoffs.ok == decode.service.handoffs.fallback == 0
        finally:
            for g in groups:
                await g.stop()
        return codes

    codes = asyncio.run(go())
    # Bytes that are no KVHandle message are refused by gRPC before any servicer code runs (UNKNOWN: "wire
    # format was corrupt"); a well-formed handle naming a stranger is refused by the service.
    assert codes == {"pickle_runs_code": grpc.StatusCode.UNKNOWN, "pickled_foreign_ref": grpc.StatusCode.UNKNOWN,
                     "foreign_group": grpc.StatusCode.INVALID_ARGUMENT}
    assert not (tmp_path / "ran").exists()
    assert fake_owner[1:] == []  # the attacker's "owner" never got a connection
