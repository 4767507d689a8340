"""The committed generated proto code is what `python -m k2serve.proto.generate` makes from k2serve.proto."""

from __future__ import annotations

from pathlib import Path

from k2serve.proto import generate


def test_generated_code_is_current(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    for name in generate.GENERATED:
        assert (tmp_path / name).read_bytes() == (generate.HERE / name).read_bytes(), (
            f"k2serve/proto/{name} is stale: run python -m k2serve.proto.generate")
