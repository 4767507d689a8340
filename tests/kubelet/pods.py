"""A pod as the harness holds it: its manifest, address, folder, owner and containers, with the kubelet's
per-container state (process, restarts and back-off, probes) and the status a real API server would report."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubelet.network import Endpoint

BACKOFF_START_S, BACKOFF_MAX_S = 10.0, 300.0  # the kubelet's crash-loop back-off


@dataclass
class Container:
    spec: dict[str, Any]
    init: bool
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    not_before: float = 0.0  # back-off: no restart before this monotonic time
    backoff_s: float = BACKOFF_START_S
    started_at: float = 0.0
    ready: bool = False
    done: bool = False  # init containers: exited 0
    probe_due: dict[str, float] = field(default_factory=dict)
    probe_runs: dict[str, list[bool]] = field(default_factory=dict)


@dataclass
class Pod:
    manifest: dict[str, Any]
    endpoint: Endpoint
    dir: Path
    owner: str  # "Deployment/<name>" or "RayCluster/<name>/<group>"
    containers: list[Container]
    deleted: bool = False
    pause: subprocess.Popen[bytes] | None = None  # the shared PID namespace's holder (shareProcessNamespace)

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    @property
    def ip(self) -> str:
        return self.endpoint.ip

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.manifest["metadata"].get("labels", {}))

    def is_ready(self) -> bool:
        inits_done = all(c.done for c in self.containers if c.init)
        return inits_done and all(c.ready for c in self.containers if not c.init)

    def status(self) -> dict[str, Any]:
        ready = "True" if self.is_ready() else "False"
        return {"phase": "Running", "podIP": self.ip,
                "conditions": [{"type": "Ready", "status": ready}, {"type": "ContainersReady", "status": ready}],
                "containerStatuses": [{"name": c.spec["name"], "ready": c.ready, "restartCount": c.restarts}
                                      for c in self.containers if not c.init],
                "initContainerStatuses": [{"name": c.spec["name"], "ready": c.done, "restartCount": c.restarts}
                                          for c in self.containers if c.init]}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
