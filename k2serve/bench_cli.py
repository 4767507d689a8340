"""`k2serve bench NAME [ARGS...]`: runs `bench/NAME.py` of this checkout (the benchmarks live beside the
package, not inside it, so they need a source checkout)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def available() -> list[str]:
    """The benchmark scripts (`_name.py` files are modules the scripts share)."""
    return sorted(p.stem for p in BENCH_DIR.glob("[!_]*.py")) if BENCH_DIR.is_dir() else []


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: k2serve bench NAME [ARGS...]\n\nbenchmarks: " + (", ".join(names) or
              f"none (no {BENCH_DIR}: `k2serve bench` needs a source checkout)"))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"k2serve bench: unknown benchmark {name!r}; available: {', '.join(names) or 'none'}", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [str(BENCH_DIR / f"{name}.py"), *rest]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = saved
    return 0
