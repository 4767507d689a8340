"""Session-wide test settings shared by every folder."""

import os
from collections.abc import Iterator

import pytest

# Collectives over loopback only, and one intra-op thread per process so several Ray actors on 2 cores
# don't oversubscribe.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the whole session (starting it costs seconds): loopback only, no dashboard, more
    logical CPUs than the 2 cores so several groups fit (actors ask for fractions too)."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()
