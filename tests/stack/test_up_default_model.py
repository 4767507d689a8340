"""`k2serve up` with neither --model nor a config serves the trained agent; a config or --model decides otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2serve.config import CONFIG_ENV, UP_DEFAULT_MODEL
from k2serve.stack.up import build_config


def _args(**over: object) -> object:
    import argparse

    fields = dict(config=None, model=None, port=None, host=None, aggregated=False, prefill_groups=None,
                  decode_groups=None, ep=None, chain_store=None)
    return argparse.Namespace(**(fields | over))


def test_no_model_no_config_is_the_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert UP_DEFAULT_MODEL == "builtin:tiny-k2-agent"
    assert build_config(_args()).model.source == UP_DEFAULT_MODEL
    assert build_config(_args(model="builtin:tiny-k2")).model.source == "builtin:tiny-k2"
    config = tmp_path / "c.yaml"
    config.write_text("router:\n  http_port: 8123\n")
    assert build_config(_args(config=str(config))).model.source == "builtin:tiny-k2"
    monkeypatch.setenv(CONFIG_ENV, str(config))
    assert build_config(_args()).model.source == "builtin:tiny-k2"
