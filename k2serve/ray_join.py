"""Joining a Ray cluster. From a pod the head may not answer yet, since nothing orders pods' start in Kubernetes:
waiting here (with a bounded back-off) converges faster than crashing into the kubelet's growing restart back-off
and leaves restart counts to real failures. From a terminal, a cluster that stopped leaves its address behind
and `ray.init` would hang on it: the address is checked to answer first, so that fails in seconds."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from k2serve.errors import UserError

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0


def _answering(address: str | None) -> str:
    """The address `ray.init(address=...)` would use ("auto"/None: $RAY_ADDRESS, else the cluster last started on
    this machine), once a TCP connect to it succeeds; ConnectionError otherwise."""
    from ray._private.services import get_ray_address_from_environment

    resolved = get_ray_address_from_environment(address or "auto", None)  # ConnectionError when none is known
    host, _, port = resolved.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"no Ray cluster address known (got {resolved!r})")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {host}:{port} ({e.strerror or e})") from e
    return resolved


def join_ray(address: str | None, namespace: str, *, wait_s: float = 300.0, hint: str = "", **kwargs: Any) -> None:
    """`ray.init` on the cluster at `address`, retried while it does not answer until `wait_s` has passed; then a
    UserError naming the address and `hint`."""
    import ray

    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            ray.init(address=_answering(address), namespace=namespace, **kwargs)
            return
        except ConnectionError as e:
            if time.monotonic() + delay > deadline:
                waited = f" after {wait_s:g} s" if wait_s > 0 else ""
                raise UserError(f"{e}{waited}{'; ' + hint if hint else ''}") from e
            log.warning("Ray cluster at %s not reachable yet (%s); retrying in %.0f s", address or "auto", e, delay)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)
