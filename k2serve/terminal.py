"""Model text shown in a terminal: control characters are printed escaped, never interpreted."""

from __future__ import annotations

import unicodedata

# Bidirectional overrides and isolates reorder what a terminal shows (the "Trojan Source" characters).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every control character (C0, DEL, C1, bidi controls) escaped; newlines and tabs kept."""
    if text.isprintable():
        return text
    return "".join(_escape(ch) if (ch not in "\n\t" and unicodedata.category(ch) == "Cc") or ch in _BIDI else ch
                   for ch in text)
