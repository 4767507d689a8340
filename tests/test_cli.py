"""The `k2serve` command's dispatch table: every subcommand resolves to a real entry point."""

from __future__ import annotations

import importlib

import pytest

from k2serve import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_has_an_entry_point(name: str) -> None:
    module, func, _ = cli.COMMANDS[name]
    assert callable(getattr(importlib.import_module(module), func))


def test_help_unknown_command_and_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0 and "commands:" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2
    assert cli.main(["bench", "no-such-bench"]) == 2
    assert "determinism" in capsys.readouterr().err
    assert cli.main(["bench", "determinism", "--smoke"]) == 0
    assert "deterministic" in capsys.readouterr().out
