"""A container spec of a pod, as the kubelet turns it into a process (`sandbox.ContainerRun`): the pod's and the
container's security context merged, volume mounts, env with `$(VAR)` references and `fieldRef`/`secretKeyRef`
sources resolved, and the command. What the harness does not model raises."""

from __future__ import annotations

import re
from typing import Any

from kubelet.pods import Pod
from kubelet.sandbox import IMAGE_HOME, IMAGE_PATH, ContainerRun, Mount

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(word: str, env: dict[str, str]) -> str:
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), word)


def _field(pod: Pod, path: str) -> str:
    if path == "metadata.name":
        return pod.name
    if path == "metadata.namespace":
        return str(pod.manifest["metadata"]["namespace"])
    if path == "status.podIP":
        return pod.ip
    if m := re.fullmatch(r"metadata\.labels\['(.+)'\]", path):
        return pod.labels.get(m.group(1), "")
    raise ValueError(f"pod {pod.name}: fieldRef {path!r} is not modelled")


def _env(pod: Pod, spec: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    env = {"PATH": IMAGE_PATH, "HOME": IMAGE_HOME, "HOSTNAME": pod.name}
    # The kubelet's service links (FOO_SERVICE_HOST, ...) are left out; nothing here reads them.
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
        elif ref := var.get("valueFrom", {}).get("fieldRef"):
            env[var["name"]] = _field(pod, ref["fieldPath"])
        elif ref := var.get("valueFrom", {}).get("secretKeyRef"):
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            raise ValueError(f"pod {pod.name}: env {var['name']!r} has a source the harness does not model")
    return env


def container_run(pod: Pod, spec: dict[str, Any], secrets: dict[str, dict[str, str]], hosts_file: str) -> ContainerRun:
    """How the container `spec` of `pod` runs: uid, groups, mounts, env, argv."""
    pod_sec = pod.manifest["spec"].get("securityContext", {})
    sec = {**pod_sec, **spec.get("securityContext", {})}
    uid = int(sec.get("runAsUser", 0))
    if sec.get("runAsNonRoot") and uid == 0:
        raise ValueError(f"pod {pod.name}: runAsNonRoot with no non-root runAsUser")
    if set(sec.get("capabilities", {}).get("add", [])):
        raise ValueError(f"pod {pod.name}: added capabilities are not modelled")
    if "command" not in spec:
        raise ValueError(f"pod {pod.name}: container {spec['name']} relies on the image's entrypoint")
    vols = {v["name"]: pod.dir / "volumes" / v["name"] for v in pod.manifest["spec"].get("volumes", [])}
    mounts = [Mount(str(vols[m["name"]]), m["mountPath"], bool(m.get("readOnly"))) for m in spec.get("volumeMounts", [])]
    env = _env(pod, spec, secrets)
    fs_group = pod_sec.get("fsGroup")
    return ContainerRun(name=spec["name"], workdir=pod.dir / "containers" / spec["name"],
                        argv=[_expand(w, env) for w in spec["command"] + spec.get("args", [])], env=env,
                        mounts=mounts, hosts_file=hosts_file, hostname=pod.name, uid=uid,
                        gid=int(sec.get("runAsGroup", 0)), groups=[fs_group] if fs_group is not None else [],
                        read_only_root=bool(sec.get("readOnlyRootFilesystem")),
                        working_dir=spec.get("workingDir", "/"))
