"""Untrusted text made safe to show a person: file names, peers' messages.

A file name comes from a peer and may hold anything a protocol line
allows: bidirectional overrides that reorder what a terminal displays
(``invoice\\u202efdp.exe`` shows as ``invoiceexe.pdf``), zero-width and other
invisible characters that make two different names look the same, a TAB.
L{shown} writes every such character as a visible escape, so what a person
reads is what the name is.  It belongs to the presentation layer only: the
protocol, the fetch and the files written use names exactly as they are.
"""

from __future__ import annotations

import re

# Invisible characters that str.isprintable() lets through (the rest of
# Unicode's Default_Ignorable_Code_Point set is in categories it rejects):
# the combining grapheme joiner, the Hangul fillers, the Khmer inherent
# vowels, the Mongolian variation selectors and the variation selectors.
_INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0"
    "\U000e0100-\U000e01ef]"
)


def shown(text: str, backslash: bool = True) -> str:
    """
    C{text} as it may be shown on a terminal: every character that
    C{str.isprintable} rejects (controls, format characters such as the
    bidirectional controls U+202A-U+202E, U+2066-U+2069, U+200E, U+200F,
    U+061C and the zero-width U+200B-U+200D, U+2060, U+FEFF; line and
    paragraph separators; spaces other than the ASCII space; unassigned
    code points) and the invisible characters above become ``\\uXXXX``
    (``\\UXXXXXXXX`` beyond the BMP).  A backslash becomes ``\\\\``, so an
    escape can always be told from the same characters in the name; with
    C{backslash} false it is left alone (for whole lines of our own that
    may quote text already passed through here).
    """
    if text.isprintable() and not _INVISIBLE.search(text):
        if not backslash or "\\" not in text:
            return text  # the common case: nothing to do
    parts = []
    for char in text:
        if char == "\\" and backslash:
            parts.append("\\\\")
        elif not char.isprintable() or _INVISIBLE.match(char):
            code = ord(char)
            parts.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            parts.append(char)
    return "".join(parts)


def quoted(text: str) -> str:
    """
    C{text} as L{shown} shows it, between single quotes: for messages where
    a name's edges matter (spaces, an empty name).  Not C{repr}, which
    would escape L{shown}'s escapes again and write controls its own way.
    """
    return f"'{shown(text)}'"
