"""What the CLI writes to a terminal: never a control character from the server.

Notices, file names, versions and error messages come from the server (or a
database it read them from). Written raw, an escape sequence in one of them
could clear the screen, rewrite earlier lines or retitle the window, so the
CLI shows every control and format character (C0, DEL, C1, and invisible
format characters such as bidi overrides) as a visible escape instead.
"""

from __future__ import annotations

import sys
import unicodedata
from typing import TextIO


def printable(text: str) -> str:
    """text with each control or format character written as a \\x.. or \\u.... escape."""
    if text.isprintable():
        return text
    return "".join(
        ch
        if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
        else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        for ch in text
    )


def say(text: str, file: TextIO | None = None) -> None:
    """Print one line of text whose parts may have come from the server."""
    print(printable(text), file=file or sys.stdout)
