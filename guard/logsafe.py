"""Escaping untrusted SMTP input before it reaches a log line.

Everything a client sends (HELO, MAIL FROM, RCPT TO, header values) may hold CR, LF,
NUL, other control characters, invalid UTF-8 or megabytes of junk. ``printable``
turns any of it into one short line of printable text, so a client can neither forge
log lines nor flood the log.
"""

from __future__ import annotations

MAX_LOGGED = 200  # characters of one untrusted value kept in a log line

_ESCAPES = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", "\t": "\\t", "\0": "\\0"}


def _escape_char(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
        return f"\\x{code:02x}"
    if 0xD800 <= code <= 0xDFFF:  # surrogateescape'd byte from invalid UTF-8
        return f"\\x{code & 0xFF:02x}"
    if not ch.isprintable():  # line and paragraph separators, bidi controls, ...
        return f"\\u{code:04x}"
    return ch


def printable(value: str | bytes | None, limit: int = MAX_LOGGED) -> str:
    """One line of printable text, at most about ``limit`` characters."""
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    head = value[:limit]
    # Nearly everything a client sends is plain printable ASCII: three C-speed checks
    # let it through as is; anything else is escaped character by character.
    if head.isascii() and head.isprintable() and "\\" not in head:
        out = head
    else:
        out = "".join(_escape_char(c) for c in head)
    if len(value) > limit:
        out += f"...(+{len(value) - limit} chars)"
    return out
