"""k2serve: Kubernetes-native distributed serving for K2-class thinking MoE models.

The planes (`k2serve.operator`, `k2serve.worker`, `k2serve.router`), the shared floor they stand on, a request's
hops through the code, the process edges and what runs where in Kubernetes: docs/architecture.md.
"""

__version__ = "0.1.0"
