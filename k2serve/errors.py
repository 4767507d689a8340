"""The one error type for mistakes a user can act on (a missing model folder, a port in use, a bad config line):
the `k2serve` command prints its message on one line without a traceback (`k2serve --debug …` shows one)."""

from __future__ import annotations


class UserError(Exception):
    """An expected error whose message says what is wrong and what to do; not a bug."""
