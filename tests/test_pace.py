"""Tests for L{p2p.pace}: the minimum rate and indexing's bounds, on a Clock.

How a fetch uses it (a trickling peer skipped, paused time not counted, the
header's deadline) is tested with the protocol in L{tests.test_client}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2p.pace import UNBOUNDED, IndexingTooSlow, IndexingWatch, Pace, RateWatch

RATE = 4096
PERIOD = 10.0


class RateWatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.verdicts: list[str] = []
        self.watch = RateWatch(self.clock, RATE, PERIOD, self.verdicts.append)

    def feed(self, seconds: int, per_second: int) -> None:
        """C{per_second} bytes at the start of each of C{seconds} seconds."""
        for _ in range(seconds):
            self.watch.count(per_second)
            self.clock.advance(1)

    def test_steady_rate_passes(self) -> None:
        """At the minimum rate exactly, stretch after stretch: no verdict."""
        self.watch.start()
        self.feed(10 * int(PERIOD), RATE)
        self.assertEqual(self.verdicts, [])
        self.assertTrue(self.watch.running)
        self.watch.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trickle_fails_at_the_end_of_the_stretch(self) -> None:
        """
        One byte every two seconds: nothing is decided before the stretch
        ends, and then the watch says so, once, and stops.
        """
        self.watch.start()
        for _ in range(int(PERIOD / 2) - 1):
            self.clock.advance(2)
            self.watch.count(1)
        self.clock.advance(1.9)
        self.assertEqual(self.verdicts, [])
        self.clock.advance(0.2)
        self.assertEqual(len(self.verdicts), 1)
        self.assertIn("too slow: 4 B in 10 s", self.verdicts[0])
        self.assertIn("--min-rate 4.0 KiB/s", self.verdicts[0])
        self.assertFalse(self.watch.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fast_then_stalled(self) -> None:
        """A good first stretch does not excuse a bad second one."""
        self.watch.start()
        self.feed(int(PERIOD), 10 * RATE)
        self.assertEqual(self.verdicts, [])
        self.feed(int(PERIOD), RATE // 2)
        self.assertEqual(len(self.verdicts), 1)

    def test_stopped_time_is_not_judged(self) -> None:
        """
        While stopped (the client paused the connection for its own sake)
        nothing is decided, however long; a new stretch begins at start().
        """
        self.watch.start()
        self.feed(5, 0)
        self.watch.stop()
        self.clock.advance(1000)
        self.assertEqual(self.verdicts, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.watch.start()
        self.feed(int(PERIOD), RATE)
        self.assertEqual(self.verdicts, [])
        self.feed(int(PERIOD), 0)
        self.assertEqual(len(self.verdicts), 1)

    def test_late_check_gives_no_verdict(self) -> None:
        """
        A check that runs long after it was due (this process was stopped,
        or its reactor blocked) blames nobody: a new stretch begins.
        """
        self.watch.start()
        self.clock.advance(PERIOD * 3)
        self.assertEqual(self.verdicts, [])
        self.assertTrue(self.watch.running)
        self.feed(int(PERIOD), 0)
        self.assertEqual(len(self.verdicts), 1)


class IndexingWatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_progress_is_told(self) -> None:
        """Only a line with more hashed (or the first) renews the deadline."""
        watch = IndexingWatch(self.clock, Pace())
        self.assertTrue(watch.seen(0, 100))
        self.clock.advance(1)
        self.assertFalse(watch.seen(0, 100))
        self.assertTrue(watch.seen(10, 100))
        self.assertFalse(watch.seen(5, 100))

    def test_no_header_timeout_no_bound(self) -> None:
        """--header-timeout 0: progress, however slow, is waited for."""
        watch = IndexingWatch(self.clock, UNBOUNDED)
        self.assertIsNone(watch.patience)
        for second in range(1, 5000):
            self.clock.advance(1)
            self.assertTrue(watch.seen(second, 10**15))

    def test_patience_scales_with_the_header_timeout(self) -> None:
        """A longer --header-timeout waits longer for a huge honest file."""
        watch = IndexingWatch(self.clock, Pace(header_timeout=60.0))
        self.assertEqual(watch.patience, 1200.0)
        total = 1100 * 2**20
        for second in range(1101):
            watch.seen(second * 2**20, total)
            self.clock.advance(1)
        self.clock.advance(100)
        with self.assertRaises(IndexingTooSlow):
            watch.seen(total - 1, total)
