"""The kmock emulator with the real kopf operator against it (tests/helpers/kmock_cluster.py), one or more per
module: `cluster_factory(kuberay)` starts one and they all stop at the end of the module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
from helpers.kmock_cluster import Cluster, running_cluster


@pytest.fixture(scope="module")
def cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[bool], Cluster]]:
    """Starts an emulator (with or without KubeRay's CRD) and the operator against it; stops all at the end."""
    with ExitStack() as stack:
        yield lambda kuberay: stack.enter_context(running_cluster(kuberay, tmp_path_factory.mktemp("kube")))
