"""Joining a Ray cluster from a pod: the head may not answer yet, since nothing orders pods' start in Kubernetes.
Waiting here (with a bounded back-off) converges faster than crashing into the kubelet's growing restart back-off
and leaves restart counts to real failures."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def join_ray(address: str, namespace: str, *, wait_s: float = 300.0, **kwargs: Any) -> None:
    """`ray.init(address=...)`, retried on ConnectionError until `wait_s` has passed (then the error is raised)."""
    import ray

    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            ray.init(address=address, namespace=namespace, **kwargs)
            return
        except ConnectionError as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("Ray cluster at %s not reachable yet (%s); retrying in %.0f s", address, e, delay)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)
