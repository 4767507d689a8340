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


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900, env=env,
                          cwd=REPO)


def test_dry_run_resolves_every_step(tmp_path: Path) -> None:
    done = run("--dry-run", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = [line.split("\t") for line in (tmp_path / "out/summary.tsv").read_text().splitlines()[1:]]
    assert [(name, status) for name, status, _ in rows] == [
        ("env", "0"), ("install", "0"), ("tests", rows[2][1]), ("tune-ep8", "0"), ("kernel", "0")]
    assert rows[2][1] in ("0", "5")  # 5: no test carries the GPU marker in this checkout
    assert "torch" in (tmp_path / "out/env.log").read_text()
    assert "Would install k2serve" in (tmp_path / "out/install.log").read_text()
    assert re.search(r"(\d+ tests? collected|no tests collected)", (tmp_path / "out/tests.log").read_text())
    assert "--ep" in (tmp_path / "out/tune-ep8.log").read_text() and "--json" in (tmp_path / "out/kernel.log").read_text()


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
