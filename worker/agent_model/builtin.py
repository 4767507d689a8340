"""`builtin:tiny-k2-agent`: the trained tiny K2 agent shipped in the repository (INT4 QAT checkpoint in K2's
layout, tiny K2 tokenizer, `training.json` recording how `bench/train_agent.py` made it)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

WEIGHTS_PACKAGE = "k2serve.worker.agent_model"
WEIGHTS_FOLDER = "weights"


def agent_model_dir() -> Path:
    path = Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_FOLDER)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the builtin:tiny-k2-agent weights are missing from this install; "
                                "rebuild them with `python -P bench/train_agent.py`")
    return path
