"""An indexed share for in-memory tests (not a test module itself).

The peer answers from its share's index (L{p2p.index.ShareIndex}); these
helpers build one whose pool work runs inline, on an in-memory database,
and index the whole share before returning, so a test's peer serves its
files at once.
"""

from __future__ import annotations

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2p.index import ShareIndex
from p2p.peer import DEFAULT_IDLE_TIMEOUT_SECONDS, PeerFactory
from p2p.share import ShareFolder


def run_inline(work):
    """Run pool work at once, on the calling thread."""
    return maybeDeferred(work)


def indexed(
    case: SynchronousTestCase,
    share: ShareFolder,
    clock: Clock | None = None,
    index_now: bool = True,
) -> ShareIndex:
    """
    A started L{ShareIndex} of C{share} (inline pool, in-memory database,
    no inotify), stopped when C{case} ends.  With C{index_now} (the
    default) every file is indexed before it returns; without, the index
    is empty until something asks for a file (or the clock runs a rescan).
    """
    clock = clock or Clock()
    index = ShareIndex(share, ":memory:", clock, run_inline, watch=False)
    if index_now:
        index.start()
    else:
        _start_without_scan(index)
    case.addCleanup(index.stop)
    return index


def _start_without_scan(index: ShareIndex) -> None:
    # Load the (empty) database but keep the first scan from running.
    scan = index._start_scan
    index._start_scan = lambda: None  # type: ignore[method-assign]
    index.start()
    index._start_scan = scan  # type: ignore[method-assign]


def peer_factory(
    case: SynchronousTestCase,
    share: ShareFolder,
    clock: Clock,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_SECONDS,
    limits=None,
    index_now: bool = True,
) -> PeerFactory:
    """A L{PeerFactory} serving C{share} through a fresh L{indexed} index."""
    index = indexed(case, share, clock, index_now)
    return PeerFactory(share, index, clock, idle_timeout, limits)
