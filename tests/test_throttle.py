"""Tests for L{p2p.throttle} and the throttled L{p2p.peer.FileRangeProducer}."""

from __future__ import annotations

import os
import tempfile

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2p.peer import FileRangeProducer
from p2p.throttle import MIN_BURST_BYTES, TokenBucket
from p2p.units import format_bytes, parse_bytes

MIB = 1024 * 1024


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """A full bucket grants one burst; then the rate, in quanta."""
        clock = Clock()
        bucket = TokenBucket(clock, 10 * MIB)
        self.assertEqual(bucket.burst, MIB)
        self.assertEqual(bucket.take(5 * MIB), MIB)
        self.assertEqual(bucket.take(MIB), 0)
        # Half a burst (the quantum) accrues in 0.05 s.
        self.assertAlmostEqual(bucket.delay(MIB), 0.05)
        clock.advance(0.04)
        self.assertEqual(bucket.take(MIB), 0)
        clock.advance(0.01)
        self.assertEqual(bucket.take(MIB), MIB // 2)

    def test_small_wants_are_granted_whole(self) -> None:
        """The quantum never exceeds what is wanted: a 1 KiB tail goes out."""
        clock = Clock()
        bucket = TokenBucket(clock, MIB)
        bucket.take(bucket.burst)
        clock.advance(0.001)
        self.assertEqual(bucket.take(1024), 1024)

    def test_low_rate_sends_every_second(self) -> None:
        """At a low rate the quantum is a second's worth at most: the
        connection is never silent for longer than a client's idle timeout."""
        clock = Clock()
        bucket = TokenBucket(clock, 2048)
        bucket.take(bucket.burst)
        self.assertEqual(bucket.quantum(MIB), 2048)
        self.assertAlmostEqual(bucket.delay(MIB), 1.0)

    def test_give_back(self) -> None:
        clock = Clock()
        bucket = TokenBucket(clock, 10 * MIB)
        bucket.take(MIB)
        bucket.give_back(MIB // 2)
        self.assertEqual(bucket.take(MIB), MIB // 2)

    def test_minimum_burst(self) -> None:
        self.assertEqual(TokenBucket(Clock(), 1000).burst, MIN_BURST_BYTES)
        self.assertRaises(ValueError, TokenBucket, Clock(), 0)

    def test_waiters_served_in_order(self) -> None:
        """
        Whoever finds the budget short queues; later takers never overtake
        the queue (take() grants nothing while anyone waits), and turns go
        first come, first served.
        """
        clock = Clock()
        bucket = TokenBucket(clock, MIB)
        bucket.take(bucket.burst)
        served: list[tuple[str, int]] = []
        bucket.wait(MIB, lambda granted: served.append(("first", granted)))
        bucket.wait(MIB, lambda granted: served.append(("second", granted)))
        clock.advance(1)  # a whole burst accrued
        self.assertEqual(bucket.take(1024), 0, "the queue goes first")
        clock.advance(1)
        self.assertEqual([name for name, _ in served], ["first", "second"])
        self.assertTrue(all(granted > 0 for _, granted in served))
        self.assertEqual((bucket.waiting, clock.getDelayedCalls()), (0, []))

    def test_every_waiter_served_about_once_a_second(self) -> None:
        """
        200 connections at 1 MiB/s, each asking again as soon as it was
        served: the grants shrink so that the queue goes round in about a
        second, and nobody waits 2 s (a client's idle timeout is 10 s; half a
        burst each, 32 KiB, took 6 s a round, and those served last were
        overtaken by those just served).
        """
        clock = Clock()
        bucket = TokenBucket(clock, MIB)
        last = [0.0] * 200
        longest = [0.0]
        sent = [0]

        def ask(number: int) -> None:
            def served(granted: int) -> None:
                longest[0] = max(longest[0], clock.seconds() - last[number])
                last[number] = clock.seconds()
                sent[0] += granted
                ask(number)

            bucket.wait(MIB, served)

        for number in range(200):
            ask(number)
        while clock.seconds() < 20:
            clock.advance(0.01)
        self.assertLess(longest[0], 2.0)
        self.assertLess(abs(sent[0] / 20 - MIB), 0.05 * MIB)  # the rate holds

    def test_charged_answers_put_the_bucket_in_debt(self) -> None:
        """Bytes charged after they went out (banners) may put the
        bucket below zero; a wait for 0 bytes is served once that is paid."""
        clock = Clock()
        bucket = TokenBucket(clock, MIB)
        bucket.charge(bucket.burst + MIB // 2)
        self.assertEqual(bucket.take(1024), 0)
        paid: list[float] = []
        bucket.wait(0, lambda granted: paid.append(clock.seconds()))
        clock.advance(0.49)
        self.assertEqual(paid, [])
        clock.advance(0.02)
        self.assertEqual(len(paid), 1)
        self.assertEqual(bucket.take(1), 1)

    def test_cancelled_waiter_is_never_called(self) -> None:
        clock = Clock()
        bucket = TokenBucket(clock, MIB)
        bucket.take(bucket.burst)
        waiter = bucket.wait(MIB, lambda granted: self.fail("called"))
        bucket.cancel(waiter)
        bucket.cancel(waiter)  # twice: a no-op
        self.assertEqual((bucket.waiting, clock.getDelayedCalls()), (0, []))
        self.assertEqual(bucket.take(1024), 0)  # still empty, not blocked
        clock.advance(0.1)
        self.assertEqual(bucket.take(1024), 1024)

    def test_long_run_rate(self) -> None:
        """Over ten seconds, what is granted is the rate (plus one burst)."""
        clock = Clock()
        bucket = TokenBucket(clock, 2 * MIB)
        granted = 0
        while clock.seconds() < 10:
            granted += bucket.take(8 * MIB)
            clock.advance(bucket.delay(8 * MIB))
        self.assertLessEqual(granted, 20 * MIB + bucket.burst)
        self.assertGreaterEqual(granted, 19 * MIB)


class ThrottledProducerTests(SynchronousTestCase):
    """A file range through a transport, under an upload budget."""

    def test_rate_is_held(self) -> None:
        data = os.urandom(4 * MIB)
        fd, path = tempfile.mkstemp()
        os.write(fd, data)
        os.unlink(path)
        self.addCleanup(os.close, fd)
        clock = Clock()
        transport = StringTransport()
        bucket = TokenBucket(clock, MIB)  # 4 MiB take about 4 s
        producer = FileRangeProducer(
            fd, 0, len(data), transport, chunk_bytes=64 * 1024, throttle=bucket
        )
        done = producer.start()
        sent_at: list[tuple[float, int]] = []
        while not done.called and clock.seconds() < 20:
            # A drained transport asks for more; a waiting producer sends
            # nothing until its timer fires.
            if transport.producer is not None:
                transport.producer.resumeProducing()
            sent_at.append((clock.seconds(), len(transport.value())))
            clock.advance(0.01)
        self.successResultOf(done)
        self.assertEqual(transport.value(), data)
        seconds = sent_at[-1][0]
        self.assertGreater(seconds, 3.5)
        self.assertLess(seconds, 4.5)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_cancels_the_wait(self) -> None:
        fd, path = tempfile.mkstemp()
        os.write(fd, b"x" * MIB)
        os.unlink(path)
        self.addCleanup(os.close, fd)
        clock = Clock()
        transport = StringTransport()
        bucket = TokenBucket(clock, 64 * 1024)
        producer = FileRangeProducer(fd, 0, MIB, transport, throttle=bucket)
        done = producer.start()
        transport.producer.resumeProducing()  # the first burst
        transport.producer.resumeProducing()  # nothing left: wait
        self.assertEqual(len(transport.value()), bucket.burst)
        self.assertTrue(clock.getDelayedCalls())
        self.assertEqual(bucket.waiting, 1)
        producer.stopProducing()
        self.failureResultOf(done)
        self.assertEqual((bucket.waiting, clock.getDelayedCalls()), (0, []))


class UnitsTests(SynchronousTestCase):
    def test_parse(self) -> None:
        for text, value in [
            ("512", 512),
            ("64K", 64 * 1024),
            ("20M", 20 * MIB),
            ("20m", 20 * MIB),
            ("1.5G", 3 * 512 * MIB),
            ("20MiB", 20 * MIB),
            ("20M/s", 20 * MIB),
            (" 7 ", 7),
        ]:
            self.assertEqual(parse_bytes(text), value, text)
        for bad in ["", "M", "-1", "1X", "1 2", "0x10"]:
            self.assertRaises(ValueError, parse_bytes, bad)

    def test_format(self) -> None:
        self.assertEqual(format_bytes(512), "512 B")
        self.assertEqual(format_bytes(1536), "1.5 KiB")
        self.assertEqual(format_bytes(20 * MIB), "20.0 MiB")
