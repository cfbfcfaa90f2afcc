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
