"""Help texts of the `k2serve` subcommands, taken from their modules' docstrings (one source for both)."""

from __future__ import annotations


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph as one line: the description a subcommand's --help shows."""
    return " ".join((doc or "").split("\n\n")[0].split())
