"""Untrusted SMTP strings become one short printable line."""

from __future__ import annotations

import sys

import pytest

from guard.logsafe import printable


@pytest.mark.parametrize(("raw", "want"), [
    ("plain@example.org", "plain@example.org"),
    ("a\r\nFAKE: line", "a\\r\\nFAKE: line"),
    ("nul\x00", "nul\\0"),
    ("bell\x07esc\x1b", "bell\\x07esc\\x1b"),
    (b"bad \xff utf8", "bad \\xff utf8"),
    ("bad \udcff utf8", "bad \\xff utf8"),
    ("line\u2028sep", "line\\u2028sep"),
    ("back\\slash", "back\\\\slash"),
    ("ünïcode", "ünïcode"),
    (None, "-"),
])
def test_printable(raw: str | bytes | None, want: str) -> None:
    assert printable(raw) == want


def test_long_values_are_cut_and_say_so() -> None:
    out = printable("x" * 65536)
    assert out.startswith("x" * 200) and out.endswith("...(+65336 chars)")
    assert len(out) < 250


def test_the_plain_ascii_fast_path_escapes_exactly_like_the_slow_one() -> None:
    from guard.logsafe import _escape_char

    for code in range(128):
        ch = chr(code)
        assert printable(f"a{ch}b") == f"a{_escape_char(ch)}b", repr(ch)


def test_tracebacks_cannot_forge_a_line_or_a_journal_priority() -> None:
    import logging

    from guard.logsetup import SafeFormatter

    formatter = SafeFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("bad HELO\n<0>EMERG forged line\r\x1b[2J")
    except ValueError:
        record = logging.LogRecord("guard.milter", logging.ERROR, __file__, 1,
                                   "conn=%s callback failed", (7,), sys.exc_info())
    text = formatter.format(record)
    first, *rest = text.split("\n")
    assert first == "ERROR guard.milter: conn=7 callback failed"
    assert rest and all(line.startswith("  | ") for line in rest)
    assert all(line.isprintable() for line in text.split("\n"))
    assert "  | <0>EMERG forged line\\r\\x1b[2J" in text
