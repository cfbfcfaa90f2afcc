"""
pytest fixtures (trial never reads this file).

The integration fixtures start real processes (see L{tests._processes}) and
kill every one of them at teardown, whatever the test's outcome.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_twisted
from twisted.trial.unittest import SynchronousTestCase

from ._processes import Daemon, Launcher
from ._redis import REDIS_SERVER, SKIP_REASON, RedisServer


@pytest.fixture(autouse=True)
def _trial_tests_in_tmp_path(request, tmp_path, monkeypatch):
    """
    Under pytest, a SynchronousTestCase's C{mktemp()} is relative to the
    working directory: run those tests in a temporary one, as trial does
    (C{_trial_temp}), so they never litter the checkout.
    """
    if isinstance(request.instance, SynchronousTestCase):
        monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _cache_in_tmp_path(tmp_path_factory, monkeypatch):
    """
    No test writes the client's peer cache (p2p.relay_cache) into the real
    home folder: $XDG_CACHE_HOME is the test's own, for in-process clients
    and (L{Launcher} passes it on) for ``p2p`` processes.  Not inside
    C{tmp_path}, which tests list.
    """
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def reactor():
    """The global reactor pytest-twisted runs."""
    from twisted.internet import reactor

    return reactor


# How pytest-twisted names the call it schedules to run a fixture's teardown.
_PYTEST_TWISTED_CALL = "_run_inline_callbacks.<locals>.in_reactor"


@pytest_twisted.async_yield_fixture
async def launcher(reactor, tmp_path) -> AsyncIterator[Launcher]:
    """Starts processes for one test; all are killed at its end."""
    processes = Launcher(reactor, str(tmp_path))
    try:
        yield processes
    finally:
        await processes.stop_all()
    # Every timeout the test armed was cancelled when its Deferred fired
    # (pytest-twisted has no dirty-reactor check of its own).  Not counted:
    # pytest-twisted's own call that runs this teardown, which may still be
    # pending when the processes' ends, already due, resume it first.
    assert [
        call
        for call in reactor.getDelayedCalls()
        if getattr(call.func, "__qualname__", "") != _PYTEST_TWISTED_CALL
    ] == []


@dataclass
class Seed:
    """The seed scenario: one relay and three peers, one sample file each."""

    launcher: Launcher
    relay: Daemon
    peers: list[Daemon]


@pytest_twisted.async_yield_fixture(scope="module")
async def seed(tmp_path_factory) -> AsyncIterator[Seed]:
    """
    One relay and three peers holding sample1.txt, sample2.txt, sample3.txt.

    The peers start one after the other, so the relay lists them in that
    order and fetching sample2.txt has to fall back past peer1.  Tests must
    not change this cluster (no kills): it is shared by the whole module.
    """
    from twisted.internet import reactor

    processes = Launcher(reactor, str(tmp_path_factory.mktemp("seed")))
    try:
        relay = await processes.relay()
        peers = []
        for index in (1, 2, 3):
            peer = await processes.peer(relay.address, [f"sample{index}.txt"])
            peers.append(peer)
        yield Seed(processes, relay, peers)
    finally:
        await processes.stop_all()


# -- Redis (the shared registry's tests) ---------------------------------------


@pytest.fixture(scope="module")
def redis_installed() -> None:
    """Skip without a redis-server.  A plain fixture, since a skip raised
    inside a module-scoped pytest-twisted fixture left its finalizers
    behind, and every later test of the module then failed in pytest's
    own fixture code instead of being skipped."""
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)


@pytest_twisted.async_yield_fixture(scope="module")
async def redis_server(
    redis_installed: None, tmp_path_factory
) -> AsyncIterator[RedisServer]:
    """A redis-server for a whole module (tests keep apart by key prefix)."""
    from twisted.internet import reactor

    folder = str(tmp_path_factory.mktemp("redis"))
    processes = Launcher(reactor, folder)
    try:
        yield await RedisServer(processes, os.path.join(folder, "data")).start()
    finally:
        await processes.stop_all()


@pytest_twisted.async_yield_fixture
async def redis(
    redis_installed: None, launcher, tmp_path
) -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own, which it may kill and restart."""
    yield await RedisServer(launcher, str(tmp_path / "redis")).start()
