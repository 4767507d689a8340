"""The seams between the planes, read from the source: every import statement, at any depth (a function-level
import counts too), of every module under the three planes and the shared floor."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"k2serve": ROOT / "k2serve", "k2serve.operator": ROOT / "operator", "k2serve.worker": ROOT / "worker",
           "k2serve.router": ROOT / "router"}
PLANES = ("k2serve.operator", "k2serve.worker", "k2serve.router")
# The floor's modules that compose planes, and so may import them; no plane imports these.
COMPOSERS = ("k2serve.stack", "k2serve.cli")
FORBIDDEN = {  # importer prefix -> imported prefixes it must never reach
    "k2serve.router": ("k2serve.worker", "k2serve.operator", *COMPOSERS),
    "k2serve.operator": ("k2serve.worker", "k2serve.router", *COMPOSERS),
    "k2serve.worker": ("k2serve.router", "k2serve.operator", *COMPOSERS),
}


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def modules() -> Iterator[tuple[str, Path]]:
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            name = _module_name(package, folder, path)
            if package == "k2serve" and name.split(".")[1:2] in (["operator"], ["worker"], ["router"]):
                continue
            yield name, path


def imports(name: str, path: Path) -> set[str]:
    """Every module `path` imports, absolute, relative imports resolved."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations() -> list[str]:
    bad = []
    for name, path in modules():
        rules = [banned for importer, banned in FORBIDDEN.items() if _within(name, (importer,))]
        if not rules and not _within(name, COMPOSERS):  # the shared floor: imports no plane
            rules = [PLANES + COMPOSERS]
        for banned in rules:
            bad += [f"{name} imports {m}" for m in sorted(imports(name, path)) if _within(m, banned)]
    return bad


def test_no_import_crosses_a_seam() -> None:
    assert violations() == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from k2serve.worker.loader import load_weights\n"
                   "from ..chains import store\n")
    found = imports("k2serve.router.http.x", src)
    assert "k2serve.worker.loader" in found and "k2serve.router.chains.store" in found
    assert _within("k2serve.worker.loader", FORBIDDEN["k2serve.router"])


@pytest.mark.parametrize("package", ["k2serve.k2format", "k2serve.router"])
def test_router_side_packages_import_without_torch(package: str) -> None:
    names = sorted(n for n, _ in modules() if _within(n, (package,)))
    code = ("import importlib, sys\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'k2serve.worker'))))")
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
