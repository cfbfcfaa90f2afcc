"""Helpers shared by the in-memory test modules (not a test module itself)."""

from __future__ import annotations

import gc
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


def set_cache_environment(case: SynchronousTestCase) -> str:
    """
    Point $XDG_CACHE_HOME at a new folder of C{case}'s own (returned), so
    that the client's peer cache never touches the real home folder, under
    trial as under pytest (whose conftest does the same for every test).
    """
    folder = os.path.abspath(case.mktemp())
    set_environment(case, "XDG_CACHE_HOME", folder)
    return folder


def descriptors() -> dict[int, str]:
    """
    This process's descriptors (Linux /proc) and what each one names,
    leaving out ``O_PATH`` ones: every L{p2p.share.ShareFolder} holds one of
    its folder for as long as it lives, and a garbage collection may close
    those of earlier tests at any time.  Nothing opened to serve, hash or
    walk is ``O_PATH``, so leaks of those still show.  The collector is
    paused meanwhile: closing a folder's descriptor mid-listing could pass
    it off as another.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        found = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
                with open(f"/proc/self/fdinfo/{name}") as info:
                    flags = next(line for line in info if line.startswith("flags:"))
            except OSError:
                continue  # the listing's own descriptor, closed by now
            if not int(flags.split()[1], 8) & os.O_PATH:
                found[int(name)] = target
        return found
    finally:
        if paused:
            gc.enable()
