"""An indexed share for in-memory tests (not a test module itself).

The peer answers from its share's index (L{p2p.index.ShareIndex}); these
helpers build one whose pool work runs inline, on an in-memory database,
and index the whole share before returning, so a test's peer serves its
files at once.  A test that needs to see a request *while* its file is
being indexed passes a L{StepPool} instead, and runs the pool's work by
hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p.index import ShareIndex
from p2p.peer import DEFAULT_IDLE_TIMEOUT_SECONDS, PeerFactory
from p2p.share import ShareFolder


def run_inline(work):
    """Run pool work at once, on the calling thread."""
    return maybeDeferred(work)


class StepPool:
    """
    A pool runner that queues work until the test runs it, one call at a
    time, so a test can look at the peer between two hashing steps.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((work, d))
        return d

    def run_next(self) -> None:
        """Run the oldest queued work and fire its Deferred."""
        work, d = self.pending.pop(0)
        try:
            result = work()
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)

    def run_all(self) -> None:
        """Run queued work, and the work it queues, until none is left."""
        for _ in range(10_000):
            if not self.pending:
                return
            self.run_next()
        raise AssertionError("the pool never drained")


def indexed(
    case: SynchronousTestCase,
    share: ShareFolder,
    clock: Clock | None = None,
    index_now: bool = True,
    run_in_pool: Callable[[Callable[[], Any]], Deferred[Any]] = run_inline,
    **options: Any,
) -> ShareIndex:
    """
    A started L{ShareIndex} of C{share} (in-memory database, no inotify),
    stopped when C{case} ends.  With C{index_now} (the default) every file
    is indexed before it returns; without, the index is empty until
    something asks for a file (or the clock runs a rescan).

    :param run_in_pool: inline by default; with a L{StepPool} nothing runs
        (not even the database's opening) until the test runs the pool.
    :param options: more L{ShareIndex} arguments (C{step_bytes},
        C{rescan_interval}, ...).
    """
    clock = clock or Clock()
    index = ShareIndex(share, ":memory:", clock, run_in_pool, watch=False, **options)
    if index_now:
        index.start()
    else:
        _start_without_scan(index)
    case.addCleanup(_stop, case, index, run_in_pool)
    return index


def _stop(case: SynchronousTestCase, index: ShareIndex, run_in_pool: object) -> None:
    d = index.stop()
    # stop() waits for the pool calls in flight: let a StepPool run them.
    drain = getattr(run_in_pool, "run_all", None)
    if drain is not None:
        drain()
    case.successResultOf(d)


def _start_without_scan(index: ShareIndex) -> None:
    # Load the (empty) database but keep the first scan from running.  The
    # load may finish later (a StepPool), so restore the scan only then.
    index._start_scan = lambda: None  # type: ignore[method-assign]

    def restore(result: object) -> object:
        del index._start_scan  # back to the class's method
        return result

    index.start().addBoth(restore)


def peer_factory(
    case: SynchronousTestCase,
    share: ShareFolder,
    clock: Clock,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_SECONDS,
    limits=None,
    index_now: bool = True,
    index_clock: Clock | None = None,
    run_in_pool: Callable[[Callable[[], Any]], Deferred[Any]] = run_inline,
) -> PeerFactory:
    """
    A L{PeerFactory} serving C{share} through a fresh L{indexed} index.

    :param index_clock: the index's own clock (its rescan timer), so that
        C{clock.getDelayedCalls()} shows only the peer's timers; C{clock}
        when not given.
    """
    index = indexed(
        case,
        share,
        clock if index_clock is None else index_clock,
        index_now,
        run_in_pool,
    )
    return PeerFactory(share, index, clock, idle_timeout, limits)
