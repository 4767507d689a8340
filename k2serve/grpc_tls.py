"""TLS for the gRPC servers and internal channels (`ServingConfig.tls`): a server serves its certificate and, with
`client_auth`, refuses clients whose certificate the deployment's CA did not sign; an internal client verifies the
server against that CA and presents its own certificate. Without a TLS config both sides are plaintext."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from k2serve.config import TLSConfig


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"tls.{what} {path}: cannot read: {e.strerror or e}") from e


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file"))],
                                       root_certificates=_read(tls.ca_file, "ca_file"),
                                       require_client_auth=tls.client_auth)


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca_file, "ca_file"),
                                        private_key=_read(tls.key_file, "key_file"),
                                        certificate_chain=_read(tls.cert_file, "cert_file"))


def bind(server: grpc.aio.Server, address: str, tls: TLSConfig | None) -> int:
    """Adds a listening port, TLS when configured; the bound port (0: could not bind)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def channel(address: str, tls: TLSConfig | None, options: Sequence[tuple[str, Any]] = (),
            interceptors: Sequence[Any] | None = None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=list(options),
                                   interceptors=interceptors)
