"""A Ray cluster on this machine only, for `k2serve up`, `k2serve pools --local`, benchmarks and tests.

Ray turns `_node_ip_address="127.0.0.1"` into the machine's routable address so remote nodes could join, and
its workers then listen on that interface. A local stack wants nothing reachable from outside, so it runs Ray in
its single-node mode (the `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` switch, which Linux honours too): every node,
actor and gRPC server here binds loopback.
"""

from __future__ import annotations

import os

SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(num_cpus: int | None = None, **kwargs: object) -> None:
    """Starts a loopback-only Ray (the caller owns it: `ray.shutdown()` stops it)."""
    os.environ[SINGLE_NODE_ENV] = "0"  # inherited by the raylet and every worker process
    import ray
    from ray._private import ray_constants

    # Already imported in this process: the constant was read at import time.
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, **kwargs)  # type: ignore[arg-type]
