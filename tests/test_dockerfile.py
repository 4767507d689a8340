"""The Dockerfile against pyproject.toml, the chart and the CRD (no registry or Docker daemon here): every
requirement it installs is pyproject's, verbatim; the worker image installs the whole project with the `cluster`
extra; the slim images install every runtime dependency their entry point imports; one version tag everywhere;
pinned bases; non-root."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from k2serve.operator.spec import K2DeploymentSpec

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOCKERFILE = (REPO / "Dockerfile").read_text()
RUNTIME = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
ENTRY_MODULES = {"operator": "k2serve.operator.run", "router": "k2serve.router.process"}


def stages() -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def pip_installs(stage: str) -> tuple[list[Requirement], list[str]]:
    """(requirements, wheel paths) of every `pip install` in a stage."""
    reqs: list[Requirement] = []
    wheels: list[str] = []
    for command in re.findall(r"pip install ([^&\n]*)", stages()[stage]):
        words = iter(shlex.split(command))
        for word in words:
            if word in ("--index-url", "--extra-index-url"):
                next(words)
            elif word.startswith("/"):
                wheels.append(word)
            elif not word.startswith("-"):
                reqs.append(Requirement(word))
    return reqs, wheels


def test_every_installed_requirement_is_pyprojects() -> None:
    declared = {canonicalize_name(r.name): r for r in RUNTIME.values()}
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        declared.update({canonicalize_name(Requirement(r).name): Requirement(r) for r in extra
                         if canonicalize_name(Requirement(r).name) not in declared})
    seen = 0
    for stage in ("operator", "router", "worker"):
        for req in pip_installs(stage)[0]:
            want = declared.get(canonicalize_name(req.name))
            assert want is not None, f"{stage}: {req} is not a dependency in pyproject.toml"
            assert (req.specifier, req.extras) == (want.specifier, want.extras), f"{stage}: {req} != pyproject {want}"
            seen += 1
    assert seen >= 10


def test_worker_installs_the_project_with_the_cluster_extra() -> None:
    reqs, wheels = pip_installs("worker")
    assert [str(r) for r in reqs] == [str(RUNTIME["torch"])]  # the CUDA wheel first, at pyproject's range
    assert wheels == ["/wheels/k2serve-${K2SERVE_VERSION}-py3-none-any.whl[cluster]"]
    assert PYPROJECT["project"]["optional-dependencies"]["cluster"] == ["ray[default]>=2.40"]
    assert "download.pytorch.org/whl/cu" in stages()["worker"]


@pytest.mark.parametrize("stage", sorted(ENTRY_MODULES))
def test_slim_images_install_what_their_entry_point_imports(stage: str) -> None:
    """Runtime dependencies of pyproject that the role's entry module imports, all installed in its image."""
    # Modules are attributed by the file they were loaded from (a namespace like `google` spans several dists).
    probe = ("import sys, json, importlib.metadata as md, " + ENTRY_MODULES[stage] + "\n"
             f"names = {sorted(RUNTIME)!r}\n"
             "owner = {str(d.locate_file(f)): n for n in names if (d := md.distribution(n)).files\n"
             "         for f in d.files if f.suffix == '.py'}\n"
             "files = {getattr(m, '__file__', None) for m in list(sys.modules.values())}\n"
             "print(json.dumps(sorted({owner[f] for f in files if f in owner})))")
    out = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    imported = {canonicalize_name(d) for d in json.loads(out.stdout)} & set(RUNTIME)
    reqs, wheels = pip_installs(stage)
    installed = {canonicalize_name(r.name) for r in reqs}
    assert imported, "the probe saw no runtime dependency at all"
    assert imported <= installed, f"{stage} image lacks {sorted(imported - installed)}"
    assert wheels == ["/wheels/k2serve-*.whl"] and "--no-deps" in stages()[stage]


def _images() -> dict[str, str]:
    """Role -> image reference, from the Dockerfile's header."""
    return dict(re.findall(r"^#\s+(worker|router|operator)\s+(\S+:\S+)", DOCKERFILE, flags=re.MULTILINE))


def test_one_version_tag_everywhere() -> None:
    version = PYPROJECT["project"]["version"]
    assert re.search(rf"^ARG K2SERVE_VERSION={re.escape(version)}$", DOCKERFILE, flags=re.MULTILINE)
    images = _images()
    assert set(images) == {"worker", "router", "operator"}
    assert {ref.rsplit(":", 1)[1] for ref in images.values()} == {version}
    chart = yaml.safe_load((REPO / "charts/k2serve/Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts/k2serve/values.yaml").read_text())
    assert chart["appVersion"] == version
    assert f"{values['image']['repository']}:{values['image']['tag']}" == images["operator"]
    assert K2DeploymentSpec().image == images["worker"]
    crd = yaml.safe_load((REPO / "charts/k2serve/crds/k2deployments.yaml").read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec_schema["properties"]["image"]["default"] == images["worker"]


def test_pinned_bases_and_non_root() -> None:
    bases = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", DOCKERFILE, flags=re.MULTILINE))
    assert set(bases) == {"PYTHON_IMAGE", "CUDA_IMAGE"}
    for ref in bases.values():
        assert re.search(r":\d+\.\d+\.\d+-", ref), f"{ref}: pin a full version tag"
    for stage in ("operator", "router", "worker"):
        users = re.findall(r"^USER (\S+)$", stages()[stage], flags=re.MULTILINE)
        assert users == ["1000:1000"], stage  # the pods' runAsUser
