"""Serving processes for end-to-end tests: worker groups in their own process (they outlive any router) and router
processes (`python -m k2serve.router.process`), each from a config file, their stdout collected by a thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from k2serve.config import ServingConfig


@dataclass
class Proc:
    """A child process whose stdout lines are collected by a thread (so its pipe never fills)."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, args: list[str], log: Path) -> "Proc":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=log.open("a"),
                                text=True, env=env)
        p = cls(proc)
        threading.Thread(target=p._read, daemon=True).start()
        return p

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hit = next((line for line in self.lines if line.startswith(prefix)), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args} exited with {self.proc.returncode}: {self.lines}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.proc.args}: no line starting {prefix!r} in {timeout_s} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Cluster:
    """Groups process + router processes over one store, all from config files in `dir`."""

    dir: Path
    groups: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    def write(self, name: str, config: dict[str, Any]) -> Path:
        path = self.dir / name
        path.write_text(ServingConfig.model_validate(config).model_dump_json())
        return path

    def start_groups(self, config: Path, restart_after_s: float = 0.3) -> None:
        p = Proc.start(["k2serve.worker.parallel.inproc_group", "--config", str(config),
                        "--restart-after", str(restart_after_s)], self.dir / "groups.log")
        self.procs.append(p)
        p.wait_for("READY", 120)
        self.groups = [line.split(" ", 1)[1] for line in p.lines if line.startswith("GROUP ")]

    def log_tails(self, lines: int = 30) -> str:
        return "".join(f"--- {name} (last {lines} lines)\n" + "\n".join(
            (self.dir / name).read_text(errors="replace").splitlines()[-lines:]) + "\n"
            for name in ("groups.log", "router.log") if (self.dir / name).exists())

    def start_router(self, config: Path, stall_timeout_s: float = 30.0) -> tuple[Proc, str]:
        args = ["k2serve.router.process", "--config", str(config), "--stall-timeout", str(stall_timeout_s)]
        for g in self.groups:
            args += ["--group", g]
        p = Proc.start(args, self.dir / "router.log")
        self.procs.append(p)
        url = p.wait_for("k2serve router: HTTP ", 120).split()[3].removesuffix("/v1")
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "router never became ready"
            time.sleep(0.1)
        return p, url

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
