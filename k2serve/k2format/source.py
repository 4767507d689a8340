"""Model sources as users write them (a directory, `file://DIR`, `builtin:tiny-k2`, `builtin:tiny-k2-agent`)
resolved to a local Hugging Face layout directory. Nothing is downloaded.

`builtin:tiny-k2-agent` is a whole checkpoint shipped with this package (`models/tiny-k2-agent`: INT4 QAT weights
in K2's layout, the tiny K2 tokenizer, and `training.json` recording how `bench/train_agent.py` made it), so a
router resolves it as a worker does."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from k2serve.k2format.tiny import ensure_tiny_format

BUILTIN_TINY = "builtin:tiny-k2"
BUILTIN_AGENT = "builtin:tiny-k2-agent"
AGENT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "tiny-k2-agent"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_model(source: str, cache_dir: str | Path | None = None, *,
                  tiny: Callable[[Path | None], Path] = ensure_tiny_format) -> Path:
    """A model source as users write it -> a local Hugging Face layout directory. `builtin:tiny-k2` is built by
    `tiny`: its config and tokenizer by default (all a router reads); the worker plane passes its builder of the
    full checkpoint."""
    if source == BUILTIN_TINY:
        return tiny(Path(cache_dir) if cache_dir is not None else None)
    if source == BUILTIN_AGENT:
        if not (AGENT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(f"{AGENT_MODEL_DIR}: the {BUILTIN_AGENT} weights are missing from this install; "
                                    "rebuild them with `python -P bench/train_agent.py`")
        return AGENT_MODEL_DIR
    if source.startswith("builtin:"):
        raise ValueError(f"unknown built-in model {source!r} (available: {BUILTIN_TINY}, {BUILTIN_AGENT})")
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
