"""The kubelet's part for one pod, one tick at a time: init containers in order to completion, then every
container at once; restartPolicy Always with the crash-loop back-off; startup, readiness and liveness probes
(`httpGet`, `tcpSocket`) with their delays, periods, timeouts and thresholds, a failed liveness or startup probe
killing the container."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable
from typing import Any

from kubelet.containers import container_run
from kubelet.pods import BACKOFF_MAX_S, BACKOFF_START_S, Container, Pod
from kubelet.sandbox import kill_container, pause, start

BACKOFF_RESET_S = 600.0  # a container that ran this long starts its back-off afresh


class Kubelet:
    """`hosts_file(pod)` writes the pod's hosts file and returns its path; `in_network(fn)` runs `fn` where the
    pod addresses are reachable (the probes connect from there)."""

    def __init__(self, secrets: dict[str, dict[str, str]], hosts_file: Callable[[Pod], str],
                 in_network: Callable[[Callable[[], bool]], bool]) -> None:
        self.secrets = secrets
        self._hosts_file = hosts_file
        self._in_network = in_network

    def start(self, pod: Pod, c: Container) -> None:
        run = container_run(pod, c.spec, self.secrets, self._hosts_file(pod))
        if pod.manifest["spec"].get("shareProcessNamespace") and pod.pause is None:
            pod.pause = pause()
        pid_ns = f"/proc/{pod.pause.pid}/ns/pid_for_children" if pod.pause is not None else None
        c.proc = start(run, pod.endpoint.netns, pid_ns)
        c.started_at = time.monotonic()
        c.ready = False
        first = ("startupProbe",) if "startupProbe" in c.spec else ("readinessProbe", "livenessProbe")
        c.probe_due = {kind: c.started_at + c.spec[kind].get("initialDelaySeconds", 0)
                       for kind in first if kind in c.spec}
        c.probe_runs = {}

    def probe(self, pod: Pod, c: Container, probe: dict[str, Any]) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        if "exec" in probe:
            raise ValueError(f"pod {pod.name}: exec probes are not modelled")
        action = probe.get("httpGet") or probe.get("tcpSocket")
        if action is None:
            raise ValueError(f"pod {pod.name}: probe without httpGet or tcpSocket")
        port = action["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in c.spec.get("ports", []) if p.get("name") == port)

        def attempt() -> bool:
            try:
                if "httpGet" in probe:
                    conn = http.client.HTTPConnection(pod.ip, port, timeout=timeout)
                    conn.request("GET", action.get("path", "/"))
                    return 200 <= conn.getresponse().status < 400
                with socket.create_connection((pod.ip, port), timeout=timeout):
                    return True
            except OSError:
                return False

        return self._in_network(attempt)

    def tick(self, pod: Pod, now: float) -> None:
        inits = [c for c in pod.containers if c.init]
        pending_init = next((c for c in inits if not c.done), None)
        runnable = [pending_init] if pending_init else [c for c in pod.containers if not c.init]
        for c in runnable:
            if c.proc is not None and c.proc.poll() is not None:  # exited
                code = c.proc.returncode
                c.proc, c.ready = None, False
                if c.init and code == 0:
                    c.done = True
                    continue
                c.restarts += 1
                c.not_before = now + c.backoff_s
                c.backoff_s = min(2 * c.backoff_s, BACKOFF_MAX_S)
            if c.proc is None and not c.done and now >= c.not_before:
                self.start(pod, c)
            if c.proc is None or c.init:
                continue
            if now - c.started_at > BACKOFF_RESET_S:
                c.backoff_s = BACKOFF_START_S
            if "readinessProbe" not in c.spec:
                c.ready = True
            self._run_due_probes(pod, c, now)

    def _run_due_probes(self, pod: Pod, c: Container, now: float) -> None:
        for kind, due in list(c.probe_due.items()):
            if now < due:
                continue
            probe = c.spec[kind]
            c.probe_due[kind] = now + probe.get("periodSeconds", 10)
            runs = c.probe_runs.setdefault(kind, [])
            runs.append(self.probe(pod, c, probe))
            del runs[:-max(probe.get("failureThreshold", 3), probe.get("successThreshold", 1))]
            failed = len(runs) >= probe.get("failureThreshold", 3) and not any(
                runs[-probe.get("failureThreshold", 3):])
            if kind == "startupProbe":
                if runs[-1]:  # started: readiness and liveness take over
                    del c.probe_due[kind]
                    c.probe_due.update({k: now + c.spec[k].get("initialDelaySeconds", 0)
                                        for k in ("readinessProbe", "livenessProbe") if k in c.spec})
                elif failed:
                    self.kill(c)
            elif kind == "readinessProbe":
                succeeded = runs[-probe.get("successThreshold", 1):]
                if all(succeeded) and len(succeeded) >= probe.get("successThreshold", 1):
                    c.ready = True
                elif failed:
                    c.ready = False
            elif failed:  # liveness: the kubelet kills the container; restartPolicy brings it back
                self.kill(c)

    @staticmethod
    def kill(c: Container) -> None:
        if c.proc is not None and c.proc.poll() is None:
            # Every process of the container gets SIGKILL from here: the command runs under another uid, which
            # clears the parent-death signal `unshare --kill-child` relies on.
            kill_container(c.proc)

    def kill_pod(self, pod: Pod) -> None:
        for c in pod.containers:
            self.kill(c)
            c.proc, c.ready = None, False
        if pod.pause is not None:
            kill_container(pod.pause)
            pod.pause = None
