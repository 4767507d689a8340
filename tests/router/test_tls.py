"""TLS on the internal gRPC planes (`ServingConfig.tls`), with a CA and certificates made here: the router reaches
its worker groups over mutual TLS and serves a turn; a TLS client with a certificate from the CA is served by the
router's and a worker group's gRPC, while a plaintext client, or a TLS client without a certificate, is refused."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers.router_fronts import grpc_code

from k2serve.config import ServingConfig, TLSConfig
from k2serve.grpc_tls import channel_credentials
from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc
from k2serve.proto.convert import sampling_to_proto
from k2serve.router.grpc_api import start_router_server
from k2serve.sampling_params import SamplingParams
from k2serve.stack.inproc import start_local_stack

GREEDY = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_pem(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def make_pki(tmp: Path) -> TLSConfig:
    """A self-signed CA and one certificate it signs for 127.0.0.1/localhost (server and client use)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("k2serve test CA")).issuer_name(_name("k2serve test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("k2serve")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path = tmp / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path, key_path = _write_pem(tmp / "node", key, cert)
    return TLSConfig(cert_file=cert_path, key_file=key_path, ca_file=str(ca_path))


def test_internal_grpc_over_mutual_tls(tmp_path: Path) -> None:
    tls = make_pki(tmp_path)
    config = ServingConfig.model_validate({"chain_store": {"sqlite_path": str(tmp_path / "chains.sqlite3")},
                                           "model": {"max_context": 256}, "router": {"aggregated": True},
                                           "tls": tls.model_dump()})
    no_client_cert = grpc.ssl_channel_credentials(root_certificates=Path(tls.ca_file).read_bytes())

    async def go() -> dict[str, Any]:
        stack = await start_local_stack(config)
        server, port = await start_router_server(stack.core, "127.0.0.1", 0)
        out: dict[str, Any] = {}
        try:
            # The router's calls to its groups went over mutual TLS: a turn is served.
            turn = [t async for t in stack.core.generate([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))]
            out["turn"] = len(turn)
            targets = {"router": f"127.0.0.1:{port}", "worker": stack.groups[0].group_address.address}
            for name, address in targets.items():
                def health(ch: grpc.aio.Channel) -> Any:
                    if name == "router":
                        return pb_grpc.RouterStub(ch).GetChain(pb.GetChainRequest(chain_id=turn[0].chain_id),
                                                               timeout=10)
                    return pb_grpc.WorkerGroupStub(ch).Health(pb.HealthRequest(), timeout=10)

                async with grpc.aio.secure_channel(address, channel_credentials(tls)) as ch:
                    out[f"{name}_tls"] = await grpc_code(health(ch))
                async with grpc.aio.insecure_channel(address) as ch:
                    out[f"{name}_plaintext"] = await grpc_code(health(ch))
                async with grpc.aio.secure_channel(address, no_client_cert) as ch:
                    out[f"{name}_no_client_cert"] = await grpc_code(health(ch))
            async with grpc.aio.secure_channel(targets["router"], channel_credentials(tls)) as ch:
                chunks = [c async for c in pb_grpc.RouterStub(ch).Generate(pb.GenerateRequest(
                    chat_json=json.dumps({"messages": [{"role": "user", "content": "hi"}]}), sampling=GREEDY))]
                out["router_generate"] = len(chunks)
        finally:
            await server.stop(0)
            await stack.aclose()
        return out

    out = asyncio.run(go())
    assert out["turn"] == 3 and out["router_generate"] == 3
    for name in ("router", "worker"):
        assert out[f"{name}_tls"] == grpc.StatusCode.OK, out
        assert out[f"{name}_plaintext"] == grpc.StatusCode.UNAVAILABLE, out
        assert out[f"{name}_no_client_cert"] == grpc.StatusCode.UNAVAILABLE, out


def test_unreadable_tls_files_are_named(tmp_path: Path) -> None:
    from k2serve.grpc_tls import server_credentials

    tls = TLSConfig(cert_file=str(tmp_path / "none.crt"), key_file=str(tmp_path / "none.key"),
                    ca_file=str(tmp_path / "none-ca.crt"))
    with pytest.raises(ValueError, match="tls.key_file .*none.key: cannot read"):
        server_credentials(tls)
