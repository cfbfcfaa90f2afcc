"""Option tables whose numbers, when malformed, are named in the error.

Twisted's C{usage.Options} coerces a typed parameter with its type and
reports a failure as "Parameter type enforcement failed: could not convert
string to float: 'abc'", naming neither the option nor what it wants.
L{named_types} gives each int or float parameter of a table a coercion
that says both: "--idle-timeout: not a number: 'abc'".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python import usage

_WHAT = {int: "a whole number", float: "a number"}


def _coercion(kind: type, option: str) -> Callable[[str], Any]:
    def coerce(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            # A UsageError passes through usage.Options unchanged.
            raise usage.UsageError(f"--{option}: not {_WHAT[kind]}: {text!r}") from None

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


def named_types(parameters: list[list]) -> list[list]:
    """C{parameters} (an C{optParameters} table), each int or float
    coercion replaced by one that names its option when it fails."""
    return [
        [*entry[:4], _coercion(entry[4], entry[0]), *entry[5:]]
        if len(entry) > 4 and entry[4] in _WHAT
        else entry
        for entry in parameters
    ]
