"""Runs the operator's rendered children as Kubernetes and KubeRay would, on one machine (docs/kube-harness.md)."""
