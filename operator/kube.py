"""The few Kubernetes API calls the reconciler makes, for any resource kind, through the kubernetes client.

One generic path (create / get / list / merge-patch / delete on a `Ref`) instead of a typed API per kind:
children are plain dicts rendered by render.py, and every call the operator makes is visible here, which the
RBAC test relies on. Merge-patch only: no server-side apply, no update-with-resourceVersion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import kubernetes.client
import kubernetes.config


@dataclass(frozen=True)
class Ref:
    group: str  # "" for the core API
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


CONFIGMAP = Ref("", "v1", "configmaps", "ConfigMap")
SERVICE = Ref("", "v1", "services", "Service")
POD = Ref("", "v1", "pods", "Pod")
DEPLOYMENT = Ref("apps", "v1", "deployments", "Deployment")
PDB = Ref("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
NETWORKPOLICY = Ref("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
RAYCLUSTER = Ref("ray.io", "v1", "rayclusters", "RayCluster")
SERVICEMONITOR = Ref("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor")
JOB = Ref("batch", "v1", "jobs", "Job")
SERVICEACCOUNT = Ref("", "v1", "serviceaccounts", "ServiceAccount")
ROLE = Ref("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLEBINDING = Ref("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
SECRET = Ref("", "v1", "secrets", "Secret")
INFERENCEPOOL = Ref("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool")
HTTPROUTE = Ref("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
CHILD_REFS: dict[str, Ref] = {r.kind: r for r in (CONFIGMAP, SERVICE, DEPLOYMENT, PDB, NETWORKPOLICY, RAYCLUSTER,
                                                  SERVICEMONITOR, JOB, SERVICEACCOUNT, ROLE, ROLEBINDING, SECRET,
                                                  INFERENCEPOOL, HTTPROUTE)}


class KubeError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status


def ref_of(obj: dict[str, Any]) -> Ref:
    try:
        return CHILD_REFS[obj["kind"]]
    except KeyError:
        raise ValueError(f"no API mapping for kind {obj.get('kind')!r}") from None


class Kube:
    """Synchronous calls on one kubernetes ApiClient (kopf runs sync handlers in its thread pool)."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api

    @classmethod
    def from_environment(cls, kubeconfig: str | None) -> "Kube":
        """In-cluster service account when present, else the given (or default) kubeconfig."""
        try:
            kubernetes.config.load_incluster_config()
            return cls(kubernetes.client.ApiClient())
        except kubernetes.config.ConfigException:
            return cls(kubernetes.config.new_client_from_config(config_file=kubeconfig))

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
              query: dict[str, str] | None = None) -> dict[str, Any] | None:
        """Returns the decoded body, or None on 404."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        full = f"{path}?{urlencode(query)}" if query else path
        _, url, headers, data, _ = self.api.param_serialize(
            method, full, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self.api.call_api(method, url, header_params=headers, body=data)
        text = response.read().decode() if response.status != 204 else ""
        if response.status == 404:
            return None
        if not 200 <= response.status < 300:
            raise KubeError(response.status, method, path, text)
        return json.loads(text) if text else {}

    def get(self, ref: Ref, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._call("GET", ref.path(namespace, name))

    def list(self, ref: Ref, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())}
        found = self._call("GET", ref.path(namespace), query=query) or {}
        # Filtered here too: some API servers (and emulators) ignore label selectors.
        return [item for item in found.get("items", [])
                if all(item.get("metadata", {}).get("labels", {}).get(k) == v for k, v in selector.items())]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        ref = ref_of(obj)
        created = self._call("POST", ref.path(obj["metadata"]["namespace"]), body=obj)
        if created is None:
            raise KubeError(404, "POST", ref.path(obj["metadata"]["namespace"]), "resource not served")
        return created

    def patch(self, ref: Ref, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        return self._call("PATCH", ref.path(namespace, name), body=patch, content_type="application/merge-patch+json")

    def delete(self, ref: Ref, namespace: str, name: str) -> bool:
        """True when something was deleted; an absent object is not an error (deletion is idempotent)."""
        return self._call("DELETE", ref.path(namespace, name)) is not None

    def served(self, ref: Ref) -> bool:
        """Whether the API server serves this resource now (e.g. KubeRay's CRD is installed)."""
        found = self._call("GET", ref.path().rsplit("/", 1)[0])
        return found is not None and any(r.get("name") == ref.plural for r in found.get("resources", []))
