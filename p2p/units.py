"""Byte counts as people type them: ``512``, ``64K``, ``20M``, ``1.5G``.

Suffixes are powers of 1024, as in curl's ``--limit-rate`` and aria2's
``--max-download-limit``; a trailing ``B``, ``iB`` or ``/s`` is accepted
and ignored (``20MiB``, ``20M/s``).
"""

from __future__ import annotations

import re

_MULTIPLIERS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?(?:/S)?")


def parse_bytes(text: str) -> int:
    """
    The byte count C{text} names.

    :raise ValueError: for anything else (a clear message, for a
        C{UsageError}).
    """
    match = _SIZE.fullmatch(text.strip().upper())
    if match is None:
        raise ValueError(f"{text!r} is not a byte count (e.g. 512, 64K, 20M, 1.5G)")
    number, suffix = match.groups()
    return int(float(number) * _MULTIPLIERS[suffix])


def format_bytes(count: float) -> str:
    """A short human form: C{1536} -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
