"""Model text in a terminal: control characters escaped, text otherwise unchanged."""

from __future__ import annotations

from k2serve.terminal import printable


def test_control_characters_are_escaped() -> None:
    assert printable("bell\x07 esc\x1b[2J del\x7f c1\x9b") == "bell\\x07 esc\\x1b[2J del\\x7f c1\\x9b"
    assert printable("rtl\u202eevil") == "rtl\\u202eevil"


def test_text_newlines_tabs_and_unicode_stay() -> None:
    text = "think\n\tanswer: 391 — 答え ✓"
    assert printable(text) == text
