"""A real Prometheus server (Debian's /usr/bin/prometheus; .ci/run installs it) on a free loopback port, with a
generated scrape config and a throwaway TSDB, for tests that evaluate dashboard queries."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

BINARY = "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prometheus:
    url: str
    log: Path

    def _get(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at now: the result vector (a scalar comes back as one sample without labels)."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def series(self, match: str) -> list[dict[str, str]]:
        """Label sets of every stored series matching the selector."""
        return list(self._get("/api/v1/series", **{"match[]": match}))

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of `label` on series matching the selector (what Grafana's `label_values()` variables list)."""
        return list(self._get(f"/api/v1/label/{label}/values", **{"match[]": match}))

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets")["activeTargets"])

    def wait_for_scrapes(self, count: int, timeout: float = 20.0) -> None:
        """Until every target is up and has `count` scrapes stored."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self.query("count_over_time(up[10m]) and up == 1")
            targets = self.targets()
            if targets and len(samples) == len(targets) and all(float(s["value"][1]) >= count for s in samples):
                return
            time.sleep(0.2)
        raise TimeoutError(f"targets not scraped {count} times in {timeout}s: {self.targets()}\n"
                           f"{self.log.read_text()[-3000:]}")


    def wait_for_scrape_after(self, t: float, timeout: float = 20.0) -> None:
        """Until every target is up and has been scraped after unix time `t` (so samples taken then are stored)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = self.targets()
            if targets and all(tg["health"] == "up" and _unix(tg["lastScrape"]) > t for tg in targets):
                return
            time.sleep(0.2)
        raise TimeoutError(f"targets not scraped after {t} in {timeout}s: {self.targets()}\n"
                           f"{self.log.read_text()[-3000:]}")


def _unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp()


def scrape_config(jobs: dict[str, list[str]], interval: str) -> dict[str, Any]:
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                               for job, targets in jobs.items()]}


@contextmanager
def running_prometheus(jobs: dict[str, list[str]], workdir: Path, interval: str = "1s",
                       timeout: float = 30.0) -> Iterator[Prometheus]:
    """Prometheus scraping `jobs` (job name -> ["host:port", ...]) until the block exits."""
    binary = shutil.which(BINARY)
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (Debian package `prometheus`; .ci/run installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(jobs, interval)))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready in {timeout}s: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
