"""Model sources as users write them (a directory, `file://DIR`, `builtin:tiny-k2`) resolved to a local Hugging
Face layout directory. Nothing is downloaded."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from k2serve.k2format.tiny import ensure_tiny_format

BUILTIN_TINY = "builtin:tiny-k2"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_model(source: str, cache_dir: str | Path | None = None, *,
                  tiny: Callable[[Path | None], Path] = ensure_tiny_format) -> Path:
    """A model source as users write it -> a local Hugging Face layout directory. `builtin:tiny-k2` is built by
    `tiny`: its config and tokenizer by default (all a router reads); the worker plane passes its builder of the
    full checkpoint."""
    if source == BUILTIN_TINY:
        return tiny(Path(cache_dir) if cache_dir is not None else None)
    if source.startswith("builtin:"):
        raise ValueError(f"unknown built-in model {source!r} (available: {BUILTIN_TINY})")
    if source.startswith("file://"):
        source = source[len("file://"):]
    elif "://" in source:
        raise ValueError(f"{source}: remote model URIs are not supported here; mount the model as a volume "
                         "and pass its local directory")
    path = Path(source).expanduser()
    if not path.exists():
        hint = (" (k2serve never downloads models: fetch it once, mount it as a volume and pass its directory)"
                if _HUB_ID.fullmatch(source) else "")
        raise FileNotFoundError(f"{source}: no such model directory{hint}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path
