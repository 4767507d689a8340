"""bench/gpu_check.sh: its dry run resolves every step on this CPU machine, and its real run fits 9 minutes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench/gpu_check.sh"
KILL_AFTER_S = 10
GPU_FILES = ("tests/worker/test_gpu_engine.py", "tests/worker/test_gpu_triton_moe.py")  # every test marked gpu
MIXED_FILES = ("tests/worker/test_triton_mla.py",)  # gpu-marked tests beside interpreter ones


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900, env=env,
                          cwd=REPO)


def test_dry_run_resolves_every_step(tmp_path: Path) -> None:
    done = run("--dry-run", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = [line.split("\t") for line in (tmp_path / "out/summary.tsv").read_text().splitlines()[1:]]
    assert [(name, status) for name, status, _ in rows] == [
        ("env", "0"), ("install", "0"), ("tests", "0"), ("tune-ep8", "0"), ("kernel", "0")]
    assert "torch" in (tmp_path / "out/env.log").read_text()
    assert "Would install k2serve" in (tmp_path / "out/install.log").read_text()
    tests_log = (tmp_path / "out/tests.log").read_text()
    carried = re.search(r"gpu_check: (\d+) tests carry the gpu marker", tests_log)
    assert carried and int(carried.group(1)) >= 3, tests_log[-2000:]
    assert set(re.findall(r"^(tests/[\w/]+\.py)::", tests_log, flags=re.MULTILINE)) == {*GPU_FILES, *MIXED_FILES}
    assert "--ep" in (tmp_path / "out/tune-ep8.log").read_text() and "--json" in (tmp_path / "out/kernel.log").read_text()


def test_dry_run_fails_when_too_few_tests_carry_the_marker(tmp_path: Path) -> None:
    done = run("--dry-run", str(tmp_path / "out"), env={"MIN_GPU_TESTS": "1000"})
    assert done.returncode == 1
    assert "tests\t1\t" in (tmp_path / "out/summary.tsv").read_text()


def _collect(*args: str, files: tuple[str, ...] = GPU_FILES) -> str:
    done = subprocess.run([sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", *args, *files],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    return done.stdout


def test_default_run_deselects_the_gpu_tests_and_only_them() -> None:
    marked = _collect("-m", "gpu")
    count = int(re.search(r"(\d+) tests? collected", marked).group(1))  # type: ignore[union-attr]
    assert count >= 3 and marked.count("::") == count
    default = _collect()  # the pyproject's addopts: what `make test` runs
    assert re.search(rf"no tests collected \({count} deselected\)", default), default[-1000:]
    # ... and nothing else: a module without the marker loses no test.
    assert re.search(r"^\d+ tests? collected in", _collect(files=("tests/worker/test_engine.py",)), flags=re.MULTILINE)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    assert run().returncode == 2
    assert run("--no-such-option", str(tmp_path)).returncode == 2


def test_real_run_fits_nine_minutes() -> None:
    text = SCRIPT.read_text()
    real = text[text.index("\nelse\n"):text.index("\nfi\n")]
    limits = [int(m) for m in re.findall(r"^\s*step [\w-]+ (\d+) ", real, flags=re.MULTILINE)]
    assert len(limits) == 7  # env, install (two forms, one runs), tests, tune x2, kernel
    install = max(int(m) for m in re.findall(r"step install (\d+)", real))
    worst = sum(limits) - install + (len(limits) - 1) * KILL_AFTER_S  # one install form runs
    assert worst <= 9 * 60, worst
    assert f"--kill-after={KILL_AFTER_S}" in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
