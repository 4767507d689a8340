"""spec → the children that fill the model PVC of an `hf://` source, and the `ModelReady` verdict from what is
observed. Pure, like render.py.

One Job per source revision (its name carries a hash of the source), running `k2serve download` with the PVC
mounted read-write; the workers mount it read-only and start only once the Job has succeeded. Progress comes
back through a ConfigMap that the Job's own ServiceAccount may patch and nothing else (a Role naming only it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from k2serve.download import PROGRESS_KEY, TOKEN_ENV, HubSource, Progress, is_hub_source
from k2serve.operator import pods
from k2serve.operator.spec import K2DeploymentSpec, ModelStatus

BACKOFF_LIMIT = 6  # transient Hub errors: a rerun resumes (completed files are kept) rather than restarts


def downloader_name(name: str) -> str:
    return f"{name}-model-download"


def progress_name(name: str) -> str:
    return f"{name}-model-progress"


def job_name(name: str, source: str) -> str:
    """A new revision is a new Job (a Job's pod template is immutable, and the old one's success says nothing
    about the new folder)."""
    return f"{name}-download-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def hub_source(spec: K2DeploymentSpec) -> HubSource | None:
    return HubSource.parse(spec.model.source) if is_hub_source(spec.model.source) else None


def _job(name: str, namespace: str, spec: K2DeploymentSpec, source: HubSource) -> dict[str, Any]:
    env: list[dict[str, Any]] = [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
                                 {"name": "HF_HOME", "value": "/tmp/hf-home"}]
    if ref := spec.model.hf_token_secret:
        env.append({"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    container = {
        "name": "download",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["k2serve", "download", spec.model.source, "--root", pods.MODEL_DIR,
                    "--progress-configmap", f"{namespace}/{progress_name(name)}"],
        "env": env,
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "volumeMounts": [{"name": "model", "mountPath": pods.MODEL_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": pods.container_security(read_only_root=True),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**pods.metadata(name, namespace, job_name(name, spec.model.source), "model-download"),
                     "annotations": {"k2serve.io/model-source": spec.model.source}},
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "template": {
                "metadata": {"labels": pods.labels(name, "model-download")},
                "spec": {
                    "serviceAccountName": downloader_name(name),
                    "restartPolicy": "Never",
                    # the pods' identity, but with the API token: the Job writes its progress to a ConfigMap
                    "securityContext": pods.pod_security()["securityContext"],
                    "containers": [container],
                    "volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": spec.model.pvc}},
                                {"name": "tmp", "emptyDir": {}}],
                    **pods.scheduling(spec),
                },
            },
        },
    }


def render_download(name: str, namespace: str, spec: K2DeploymentSpec) -> list[dict[str, Any]]:
    """The download's children, in creation order; none for a source that needs no download."""
    source = hub_source(spec)
    if source is None:
        return []
    account = downloader_name(name)
    return [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": pods.metadata(name, namespace, progress_name(name), "model-download"), "data": {}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": pods.metadata(name, namespace, account, "model-download"),
         "automountServiceAccountToken": True},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": pods.metadata(name, namespace, account, "model-download"),
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [progress_name(name)],
                    "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": pods.metadata(name, namespace, account, "model-download"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]},
        _job(name, namespace, spec, source),
    ]


@dataclass(frozen=True)
class ModelVerdict:
    ready: bool
    reason: str
    message: str
    status: ModelStatus


def model_verdict(spec: K2DeploymentSpec, job: dict[str, Any] | None, progress: dict[str, Any] | None) -> ModelVerdict:
    """`ModelReady` from the download Job and its progress ConfigMap (both None for other sources)."""
    source = hub_source(spec)
    if source is None:
        path = pods.serving_config(spec).model.source
        return ModelVerdict(True, "Mounted" if spec.model.pvc else "Local", f"model at {path}", ModelStatus(path=path))
    path = f"{pods.MODEL_DIR}/{source.folder}"
    reported = (progress or {}).get("data", {}).get(PROGRESS_KEY)
    done = Progress.from_json(reported) if reported else Progress(0, 0)
    status = ModelStatus(path=path, bytes_done=done.bytes_done, bytes_total=done.bytes_total)
    job_status = (job or {}).get("status", {})
    where = f"{source.repo_id}@{source.revision} into {spec.model.pvc}:{source.folder}"
    if int(job_status.get("succeeded") or 0) >= 1:
        return ModelVerdict(True, "Downloaded", f"{where}: {done.bytes_total} bytes", status)
    failed = next((c for c in job_status.get("conditions", []) if c.get("type") == "Failed"
                   and c.get("status") == "True"), None)
    if failed:
        why = failed.get("message") or failed.get("reason")
        return ModelVerdict(False, "DownloadFailed", f"{where}: {why}", status)
    return ModelVerdict(False, "Downloading", f"{where}: {done.bytes_done}/{done.bytes_total} bytes", status)
