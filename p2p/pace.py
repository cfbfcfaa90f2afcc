"""What a peer must keep up to while it serves the client.

An idle timeout alone is not enough: a peer that trickles one byte every few
seconds is never silent for long, and would keep a fetch waiting for ever.
So, as curl's ``--speed-limit``/``--speed-time`` do, a transfer must average
at least C{min_rate} bytes a second over every stretch of C{min_rate_time}
seconds (L{RateWatch}), and a reply's header, piece list included, must
arrive within C{header_timeout} seconds of the connection, however its bytes
trickle (time the peer spends indexing the file, showing progress, does not
count, within bounds: L{IndexingWatch}).  A peer that fails either is
skipped like one that broke.

Only the peer is judged: while the client itself pauses the connection (its
verify-and-write queue is full: a slow disk, a slow reader of stdout) the
stretch is suspended, and a check that runs late (this process was stopped,
say by ``SIGSTOP``, or its reactor was busy) starts a new stretch instead of
blaming the peer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from p2p import wire
from p2p.errors import FailureKind, PeerFailed
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
# A peer still indexing the file has this many --header-timeouts from its
# first INDEXING line to send its header: 10 min by default.  A real peer
# hashes hundreds of MB/s (a 20 GiB file took 56 s on 2 cores); this allows
# 20 GiB at 36 MB/s, while a peer faking progress on a huge size (4 TiB at
# 41 KB/s: 3.4 years by the minimum rate alone) is bounded by it too.
INDEXING_PATIENCE = 20
# How long a peer may say nothing at all while others wait to be asked in
# its place (p2p.fetch, p2p.choice): far longer than an honest peer takes
# to answer from its index, even over TLS across an ocean, and far shorter
# than the idle timeout a hundred silent fakes would each cost.
SILENT_PATIENCE_SECONDS = 2.0


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


class IndexingTooSlow(Exception):
    """A peer's indexing will not end within the wait allowed (the reason)."""


class IndexingWatch:
    """
    Judges a peer's ``INDEXING`` lines (``done`` of ``total`` bytes
    hashed), for a ``GET`` or a ``RANGE 0 0`` alike.

    A line that shows progress renews the header deadline (L{seen} says
    so).  Past the deadline's length (C{header_timeout}, from the first
    line: a peer busy with other work at first is not blamed), the
    progress must predict the end within L{INDEXING_PATIENCE} header
    timeouts of the first line, at the faster of its rate since the first
    line and its latest; and no line is waited for past that.  So a peer
    that fakes progress on a huge size is skipped once the grace is over,
    and one that fakes it fast enough is still bounded by the patience.
    No bound without a header timeout (C{None}).
    """

    def __init__(self, clock: IReactorTime, pace: Pace) -> None:
        self.clock = clock
        self.pace = pace
        # The first line's time and count, and the last line's.
        self._first: tuple[float, int] | None = None
        self._last: tuple[float, int] = (0.0, 0)

    @property
    def patience(self) -> float | None:
        """Seconds from the first line to the header, at most."""
        grace = self.pace.header_timeout
        return None if grace is None else INDEXING_PATIENCE * grace

    def seen(self, done: int, total: int) -> bool:
        """
        Note a line; True when it shows progress (more hashed than before,
        or the first line).

        :raise IndexingTooSlow: the peer should be given up.
        """
        now = self.clock.seconds()
        if self._first is None:
            self._first = self._last = (now, done)
            return True
        (since, first_done), (last_time, last_done) = self._first, self._last
        progressed = done > last_done
        self._last = (now, max(done, last_done))
        patience, grace = self.patience, self.pace.header_timeout
        if patience is None or grace is None:
            return progressed
        waited = now - since
        limit = f"{patience:g} s ({INDEXING_PATIENCE} x --header-timeout)"
        if waited > patience:
            raise IndexingTooSlow(
                f"too slow: still indexing after {waited:g} s, more than {limit}"
            )
        if waited > grace:
            overall = (done - first_done) / waited
            latest = (done - last_done) / (now - last_time) if now > last_time else 0
            rate = max(overall, latest)
            left = (total - done) / rate if rate > 0 else math.inf
            if waited + left > patience:
                raise IndexingTooSlow(
                    f"too slow: indexing {format_bytes(total)} at "
                    f"{format_bytes(rate)}/s would take {_seconds(waited + left)}, "
                    f"more than {limit}"
                )
        return progressed

    def judge(
        self, progress: wire.Indexing, refusal: Callable[[int], str | None]
    ) -> bool:
        """
        Judge one ``INDEXING`` line, for a ``GET`` or a ``RANGE 0 0``
        alike: True when it renews the header deadline (L{seen}).

        :raise wire.WireError: a line past its own size.
        :raise PeerFailed: a size C{refusal} names (too large), or progress
            too slow for the wait allowed.
        """
        if progress.done > progress.total:
            raise wire.WireError(wire.Code.BAD_REQUEST, "INDEXING past the file's size")
        refused = refusal(progress.total)
        if refused is not None:
            raise PeerFailed(f"too large: {refused}", FailureKind.TOO_LARGE)
        try:
            return self.seen(progress.done, progress.total)
        except IndexingTooSlow as e:
            raise PeerFailed(str(e), FailureKind.SLOW) from None


def _seconds(seconds: float) -> str:
    """A long wait in its largest unit (``3.4 years``)."""
    if math.isinf(seconds):
        return "never"
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
