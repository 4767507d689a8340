"""Session-wide test settings shared by every folder."""

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Collectives over loopback only, and one intra-op thread per process so several Ray actors on 2 cores
# don't oversubscribe.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Child processes (`python -m k2serve.cli`, `python -c`) must not put the working directory on sys.path: run
# from the repository root, its operator/ folder would hide the standard library's `operator`.
os.environ.setdefault("PYTHONSAFEPATH", "1")


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nothing a test starts writes into the user's state directory (the default chain store lives there)."""
    from k2serve.config import STATE_DIR_ENV

    os.environ[STATE_DIR_ENV] = str(tmp_path_factory.mktemp("state"))
    yield


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the whole session (starting it costs seconds): loopback only, no dashboard, more
    logical CPUs than the 2 cores so several groups fit (actors ask for fractions too)."""
    import ray

    from k2serve.localray import init_local_ray

    init_local_ray(8)
    yield
    ray.shutdown()


# A real redis-server on a free loopback port, in a temp dir, with AOF fsync on every write (chain store tests).
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server process that a test may kill (SIGKILL) and start again on the same port and data."""

    dir: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:  # refused, or still replaying the AOF (BusyLoadingError)
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
                    raise RuntimeError(f"redis-server on port {self.port} did not come up:\n{log[-2000:]}")
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install -y redis-server)")
    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch with one intra-op thread for the test: next to Ray actors (or other busy processes) on 2 cores,
    two spinning OpenMP threads make a tiny model run ~20× slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
