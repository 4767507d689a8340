"""The chain store's default file is in the state directory, whatever the working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2serve.config import STATE_DIR_ENV, ChainStoreConfig


def test_default_store_is_in_the_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert ChainStoreConfig().sqlite_file() == tmp_path / "xdg" / "k2serve" / "chains.sqlite3"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ChainStoreConfig().sqlite_file() == tmp_path / "home" / ".local" / "state" / "k2serve" / "chains.sqlite3"
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "explicit"))
    assert ChainStoreConfig(sqlite_path="sub/c.db").sqlite_file() == tmp_path / "explicit" / "sub" / "c.db"
    assert ChainStoreConfig(sqlite_path="/abs/c.db").sqlite_file() == Path("/abs/c.db")
