"""Helpers shared by the in-memory test modules (not a test module itself)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from p2p.endpoints import RELAY_ENVIRONMENT_VARIABLE


def set_environment(case: SynchronousTestCase, name: str, value: str | None) -> None:
    """Set (or unset, for C{None}) $C{name} for the duration of C{case}."""
    saved = os.environ.get(name)

    def restore() -> None:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved

    case.addCleanup(restore)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def set_relay_environment(case: SynchronousTestCase, value: str | None) -> None:
    """Set (or unset, for C{None}) $P2P_RELAY for the duration of C{case}."""
    set_environment(case, RELAY_ENVIRONMENT_VARIABLE, value)


def is_path_only(fd: int | str) -> bool:
    """
    Whether this process's descriptor C{fd} was opened ``O_PATH`` (Linux
    /proc): every L{p2p.share.ShareFolder} holds one of its folder for as
    long as it lives, and a garbage collection may close those of earlier
    tests at any time, so descriptor counts leave them out.  Nothing opened
    to serve, hash or walk is ``O_PATH``: leaks of those still count.
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            flags = next(line for line in info if line.startswith("flags:"))
    except OSError:
        return False  # closed by now (the listing's own descriptor, say)
    return bool(int(flags.split()[1], 8) & os.O_PATH)
