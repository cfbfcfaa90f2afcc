"""An upload budget shared by a peer's connections (``--max-upload-rate``).

A token bucket: C{rate} bytes per second accrue, up to C{burst} bytes (a
tenth of a second's worth by default, so the rate holds over any window
longer than that).  Everything the peer sends is paid from it: a
transfer's content, an answer's header, piece list or listing take their
budget before they go out (L{take}, L{wait}), error lines too.  Only what
must go out at once, a connection's banner and a refused connection's
``ERR 503``, is charged after (L{charge}): the bucket may fall into a
small debt, which the next takers wait out.

Whoever finds the budget short waits its turn (L{wait}), first come first
served: a transfer that was just served never overtakes one that waited,
so none is starved, and a turn's grant shrinks as the queue grows, so
every waiting connection is served about once a second (measured before:
200 downloads at 1 MiB/s left the median connection 18 s without a byte,
and the peer's own idle timer cut 25 of them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

# The smallest burst: below this, per-write overheads dominate.
MIN_BURST_BYTES = 64 * 1024


class Waiter:
    """A place in a L{TokenBucket}'s queue (see L{TokenBucket.wait})."""

    __slots__ = ("wanted", "callback")

    def __init__(self, wanted: int, callback: Callable[[int], None]) -> None:
        self.wanted = wanted
        self.callback = callback


class TokenBucket:
    """
    :param clock: the reactor's clock.
    :param rate: bytes per second.
    :param burst: most bytes sent at once (default: 0.1 s worth, at least
        L{MIN_BURST_BYTES}).
    """

    def __init__(
        self, clock: IReactorTime, rate: int, burst: int | None = None
    ) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.clock = clock
        self.rate = rate
        self.burst = burst or max(MIN_BURST_BYTES, rate // 10)
        self.tokens = float(self.burst)
        self._stamp = clock.seconds()
        self._waiters: deque[Waiter] = deque()
        self._timer: IDelayedCall | None = None

    @property
    def waiting(self) -> int:
        """How many wait their turn."""
        return len(self._waiters)

    def _refill(self) -> None:
        now = self.clock.seconds()
        elapsed = max(0.0, now - self._stamp)
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
        self._stamp = now

    def quantum(self, wanted: int) -> int:
        """
        The least worth sending of C{wanted}: half a burst.  Granting every
        crumb that accrued since the last call would send a stream of tiny
        segments (measured: 1.3 KB per receive on the client, most of its
        CPU time, at 20 MiB/s).
        """
        # At most a second's worth, shared by everyone waiting: at a low
        # rate, or with many connections, half a burst each would keep a
        # connection silent for longer than a client's idle timeout (10 s)
        # between sends.
        share = self.rate // (1 + len(self._waiters))
        return min(wanted, max(1, min(self.burst // 2, share)))

    def take(self, wanted: int) -> int:
        """
        Take up to C{wanted} bytes of budget; return how many: 0 until at
        least a L{quantum} accrued, and 0 while others wait their turn.
        """
        if self._waiters:
            return 0
        self._refill()
        if self.tokens < self.quantum(wanted):
            return 0
        granted = int(min(wanted, self.tokens))
        self.tokens -= granted
        return granted

    def charge(self, count: int) -> None:
        """Pay for C{count} bytes sent without asking first (banners):
        the bucket may fall below zero, and its next takers wait longer."""
        self._refill()
        self.tokens -= count

    def give_back(self, count: int) -> None:
        """Return budget taken but not used (the socket took fewer bytes)."""
        self.tokens = min(float(self.burst), self.tokens + count)
        self._schedule(again=True)

    def wait(self, wanted: int, callback: Callable[[int], None]) -> Waiter:
        """
        Queue for C{wanted} bytes: C{callback} is called with the bytes
        granted (up to C{wanted}, at least a L{quantum}) once they accrued
        and everyone queued before was served.  C{wanted} 0: called (with
        0) once the bucket is out of debt.  L{cancel} leaves the queue.
        """
        waiter = Waiter(wanted, callback)
        self._waiters.append(waiter)
        self._schedule()
        return waiter

    def cancel(self, waiter: Waiter) -> None:
        """Leave the queue (a connection gone); a no-op once served."""
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self._schedule(again=True)

    def delay(self, wanted: int) -> float:
        """Seconds until a L{quantum} of C{wanted} bytes (0: until out of
        debt) will have accrued."""
        self._refill()
        missing = self.quantum(wanted) - self.tokens
        return max(missing / self.rate, 0.001)

    def _schedule(self, again: bool = False) -> None:
        """Time the next turn for the head of the queue (C{again}: the head
        or the budget changed, time it anew)."""
        if self._timer is not None:
            if not again:
                return
            self._timer.cancel()
            self._timer = None
        if self._waiters:
            delay = self.delay(self._waiters[0].wanted)
            self._timer = self.clock.callLater(delay, self._serve)

    def _serve(self) -> None:
        self._timer = None
        self._refill()
        while self._waiters:
            head = self._waiters[0]
            turn = self.quantum(head.wanted)
            if self.tokens < turn:
                break
            self._waiters.popleft()
            # A turn's worth while others wait (they come round sooner);
            # alone, whatever accrued.
            limit = turn if self._waiters else head.wanted
            granted = int(min(head.wanted, self.tokens, limit))
            self.tokens -= granted
            head.callback(granted)
        self._schedule()
