"""An upload budget shared by a peer's transfers (``--max-upload-rate``).

A token bucket: C{rate} bytes per second accrue, up to C{burst} bytes (a
tenth of a second's worth by default, so the rate holds over any window
longer than that).  A transfer takes what it may send now; with nothing
left it waits L{TokenBucket.delay} seconds and asks again, so all the
peer's connections together stay under the cap, each getting a share
(none is starved: the bucket never holds more than one burst).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

# The smallest burst: below this, per-write overheads dominate.
MIN_BURST_BYTES = 64 * 1024


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
        # At most a second's worth: at a low rate, a quantum of half a burst
        # would keep the connection silent for longer than a client's idle
        # timeout (10 s) between sends.
        return min(wanted, max(1, min(self.burst // 2, self.rate)))

    def take(self, wanted: int) -> int:
        """
        Take up to C{wanted} bytes of budget; return how many: 0 until at
        least a L{quantum} accrued.
        """
        self._refill()
        if self.tokens < self.quantum(wanted):
            return 0
        granted = int(min(wanted, self.tokens))
        self.tokens -= granted
        return granted

    def give_back(self, count: int) -> None:
        """Return budget taken but not used (the socket took fewer bytes)."""
        self.tokens = min(float(self.burst), self.tokens + count)

    def delay(self, wanted: int) -> float:
        """Seconds until L{take} grants some of C{wanted} bytes."""
        self._refill()
        missing = self.quantum(wanted) - self.tokens
        return max(missing / self.rate, 0.001)
