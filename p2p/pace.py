"""What a peer must keep up to while it serves the client.

An idle timeout alone is not enough: a peer that trickles one byte every few
seconds is never silent for long, and would keep a fetch waiting for ever.
So, as curl's ``--speed-limit``/``--speed-time`` do, a transfer must average
at least C{min_rate} bytes a second over every stretch of C{min_rate_time}
seconds (L{RateWatch}), and a reply's header, piece list included, must
arrive within C{header_timeout} seconds of the connection, however its bytes
trickle (time the peer spends indexing the file, showing progress, does not
count).  A peer that fails either is skipped like one that broke.

Only the peer is judged: while the client itself pauses the connection (its
verify-and-write queue is full: a slow disk, a slow reader of stdout) the
stretch is suspended, and a check that runs late (this process was stopped,
say by ``SIGSTOP``, or its reactor was busy) starts a new stretch instead of
blaming the peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from p2p.units import format_bytes

# curl's --speed-limit defaults to 1 B/s when only --speed-time is given;
# ours is on by default, at a rate far below any working link and far above
# a trickle: 40 KiB per 10 s.
DEFAULT_MIN_RATE = 4 * 1024
DEFAULT_MIN_RATE_SECONDS = 10.0
# Banner, header line and piece list (32 bytes per MiB of file: 640 KiB for
# 20 GiB) in this long.
DEFAULT_HEADER_TIMEOUT_SECONDS = 30.0
# A check this much later than due says nothing about the peer.
LATE_FACTOR = 1.5


@dataclass(frozen=True)
class Pace:
    """
    The bounds a serving peer must keep (``p2p get --min-rate``,
    ``--min-rate-time``, ``--header-timeout``).

    :ivar min_rate: bytes per second a transfer must average over every
        stretch of C{min_rate_time} seconds (0: any rate).
    :ivar header_timeout: seconds from the connection to the end of the
        reply's header and piece list (C{None}: no bound).
    """

    min_rate: int = DEFAULT_MIN_RATE
    min_rate_time: float = DEFAULT_MIN_RATE_SECONDS
    header_timeout: float | None = DEFAULT_HEADER_TIMEOUT_SECONDS


DEFAULT_PACE = Pace()
# No bound but the idle timeout: what a client had before these.
UNBOUNDED = Pace(0, DEFAULT_MIN_RATE_SECONDS, None)


class RateWatch:
    """
    Calls C{too_slow} (once, with a reason) when fewer than C{rate} x
    C{period} bytes were L{count}ed in a stretch of C{period} seconds.

    Stretches follow each other from L{start}; L{stop} ends the current one
    without a verdict (a later L{start} begins a new one).  Timed by
    C{clock}, so a L{twisted.internet.task.Clock} drives it in tests.
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: int,
        period: float,
        too_slow: Callable[[str], object],
    ) -> None:
        self.clock = clock
        self.rate = rate
        self.period = period
        self.too_slow = too_slow
        self._timer: IDelayedCall | None = None
        self._started = 0.0
        self._bytes = 0

    @property
    def running(self) -> bool:
        return self._timer is not None

    def start(self) -> None:
        """Begin a stretch now (ending any current one without a verdict)."""
        self.stop()
        self._started = self.clock.seconds()
        self._bytes = 0
        self._timer = self.clock.callLater(self.period, self._check)

    def count(self, received: int) -> None:
        self._bytes += received

    def stop(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        elapsed = self.clock.seconds() - self._started
        if elapsed > LATE_FACTOR * self.period:
            self.start()  # we were not running: no verdict on the peer
            return
        if self._bytes >= self.rate * self.period:
            self.start()
            return
        self.too_slow(
            f"too slow: {format_bytes(self._bytes)} in {self.period:g} s, less than "
            f"--min-rate {format_bytes(self.rate)}/s"
        )
