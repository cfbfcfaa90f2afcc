"""
Tests for L{p2p.batching}: when a receiving socket's low-water mark goes up
and, above all, that it always comes down before bytes could wait unread.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2p.batching import (
    BATCH_BYTES,
    CHECK_SECONDS,
    FAST_READ_BYTES,
    ReceiveBatching,
)

MIB = 1024 * 1024


class ReceiveBatchingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.marks: list[int] = []
        self.settable = True
        self.batching = ReceiveBatching(self.set_mark, self.clock)

    def set_mark(self, size: int) -> bool:
        if not self.settable:
            return False
        self.marks.append(size)
        return True

    def test_raised_by_a_fast_read(self) -> None:
        """A large read with much still to come raises the mark, once."""
        self.batching.received(FAST_READ_BYTES, 100 * MIB)
        self.batching.received(BATCH_BYTES, 99 * MIB)
        self.assertEqual(self.marks, [BATCH_BYTES])
        self.assertEqual(self.batching.mark, BATCH_BYTES)

    def test_not_raised_by_small_reads(self) -> None:
        """A peer whose bytes come in small reads (a slow one) is read as
        its bytes come."""
        for _ in range(100):
            self.batching.received(FAST_READ_BYTES - 1, 100 * MIB)
        self.assertEqual(self.marks, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_raised_near_the_end(self) -> None:
        """With less than two batches to come, nothing is gained."""
        self.batching.received(FAST_READ_BYTES, 2 * BATCH_BYTES - 1)
        self.assertEqual(self.marks, [])

    def test_lowered_before_the_end(self) -> None:
        """
        As soon as fewer bytes than the mark remain, the mark is 1: the
        content's last bytes would never reach it.
        """
        self.batching.received(FAST_READ_BYTES, 3 * BATCH_BYTES)
        self.batching.received(BATCH_BYTES, 2 * BATCH_BYTES)
        self.batching.received(BATCH_BYTES, BATCH_BYTES)
        self.assertEqual(self.marks, [BATCH_BYTES])
        self.batching.received(1, BATCH_BYTES - 1)
        self.assertEqual(self.marks, [BATCH_BYTES, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lowered_when_the_peer_slows_down(self) -> None:
        """
        Nothing read for a check's length: the mark goes back to 1, so a
        slow peer's bytes are read as they come (the idle timeout and the
        minimum rate judge what it sent).  Reads meanwhile keep it up.
        """
        self.batching.received(FAST_READ_BYTES, 100 * MIB)
        for _ in range(5):
            self.clock.advance(CHECK_SECONDS / 2)
            self.batching.received(BATCH_BYTES, 90 * MIB)
            self.clock.advance(CHECK_SECONDS / 2)
        self.assertEqual(self.marks, [BATCH_BYTES])
        self.clock.advance(CHECK_SECONDS)
        self.assertEqual(self.marks, [BATCH_BYTES, 1])
        self.assertEqual(self.batching.mark, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_raised_again_when_fast_again(self) -> None:
        self.batching.received(FAST_READ_BYTES, 100 * MIB)
        self.clock.advance(CHECK_SECONDS)
        self.batching.received(1000, 99 * MIB)
        self.batching.received(FAST_READ_BYTES, 98 * MIB)
        self.assertEqual(self.marks, [BATCH_BYTES, 1, BATCH_BYTES])

    def test_stop_lowers_and_cancels(self) -> None:
        """A fetch that ends (failed, cancelled) leaves a kept connection
        reading every byte, and no timer behind."""
        self.batching.received(FAST_READ_BYTES, 100 * MIB)
        self.batching.stop()
        self.assertEqual(self.marks, [BATCH_BYTES, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.batching.stop()
        self.assertEqual(self.marks, [BATCH_BYTES, 1])

    def test_stop_without_a_mark_does_nothing(self) -> None:
        self.batching.stop()
        self.assertEqual(self.marks, [])

    def test_unsettable_mark_is_not_asked_again(self) -> None:
        """TLS and test transports have no mark: asked once, then left."""
        asked: list[int] = []

        def refuse(size: int) -> bool:
            asked.append(size)
            return False

        batching = ReceiveBatching(refuse, self.clock)
        for _ in range(3):
            batching.received(FAST_READ_BYTES, 100 * MIB)
        self.assertEqual(asked, [BATCH_BYTES])
        self.assertEqual(batching.mark, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
