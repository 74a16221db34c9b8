"""Text from the data, made safe for a terminal.

Input: any value (ids, field names, tokens, file names, manifest values from the user's data).
Output: its text with control and other non-printing characters (C0, C1, DEL, format characters
such as bidi overrides and zero-width ones, line/paragraph separators, surrogates, private-use and
unassigned code points) written as visible escapes (\\x1b, \\u202e), so data can never move the
cursor, retitle the terminal or reorder what is shown.  Spaces (and the characters in `keep`) stay.
Cost: linear in the text; printable text is returned as it is.
"""

from __future__ import annotations

import unicodedata


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe_text(value, keep: str = "") -> str:
    """`value` as text safe for a terminal (see the module docstring)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        ch if ch in keep or ch.isprintable() or unicodedata.category(ch) == "Zs" else _escape(ch) for ch in text
    )
