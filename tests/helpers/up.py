"""`k2serve up` as a user starts it, for end-to-end tests: a subprocess whose printed endpoints the test reads."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


GROUP_LINE = re.compile(r"k2serve up: (\w+) group (\S+) \(EP \d+\) on (\S+), metrics on :(\d+)")


@dataclass
class Stack:
    url: str  # the router's HTTP base (its /metrics too)
    grpc: str  # the router's gRPC address
    groups: list[str]  # "ID=ROLE@HOST:PORT" of every group's gRPC service (`k2serve.router.process --group`)
    metrics: str  # "host:port" of every group's metrics, merged (the pool controller's /metrics)


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, pattern: str, timeout_s: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if m := re.search(pattern, log.read_text()):
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"{proc.args}: no {pattern!r} in {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def k2serve_up(config: Path, workdir: Path) -> Iterator[Stack]:
    """`k2serve up --port 0 --config ...` until the block exits (then Ctrl-C, as a user stops it)."""
    log = workdir / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "k2serve.cli", "up", "--port", "0", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        url = wait_for_line(proc, log, r"serving \S+ at (http://\S+)/v1", 150).group(1)
        lines = [m.groups() for m in GROUP_LINE.finditer(log.read_text())]
        grpc_addr = wait_for_line(proc, log, r"\(gRPC (\S+)\)", 5).group(1)
        merged = wait_for_line(proc, log, r"metrics, merged, at http://(\S+)/metrics", 5).group(1)
        yield Stack(url=url, grpc=grpc_addr, groups=[f"{gid}={role}@{address}" for role, gid, address, _ in lines],
                    metrics=merged)
    finally:
        stop(proc)
