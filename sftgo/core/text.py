"""Text from the data, made safe for a terminal.

Input: any string (ids, field names, tokens, file names from the user's data).
Output: the same string with control and other non-printing characters (C0, C1, DEL, bidi
overrides, unpaired surrogates) written as visible escapes (\\x1b, \\u202e), so data can never
move the cursor, retitle the terminal or reorder what is shown.
Cost: linear in the string.
"""
from __future__ import annotations

import unicodedata

_SAFE_CATEGORIES_PREFIX = ("L", "M", "N", "P", "S", "Z")


def _visible(ch: str) -> str:
    if ch in (" ",):
        return ch
    cat = unicodedata.category(ch)
    if cat[0] in _SAFE_CATEGORIES_PREFIX and cat not in ("Zl", "Zp"):
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe_text(text: str) -> str:
    """`text` with every non-printing character escaped (printable text unchanged)."""
    if text.isprintable():
        return text
    return "".join(_visible(ch) for ch in text)
