"""Tests for L{p2p.ratelimit}: request budgets and the token-guess brake."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2p.ratelimit import BucketTable, GuessBrake, RequestBudget


class BucketTableTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """A full bucket pays C{burst}, then C{rate} per second."""
        table = BucketTable(rate=2, burst=4)
        for _ in range(4):
            self.assertEqual(table.wait("a", 1, 0.0), 0)
            table.take("a", 1, 0.0)
        self.assertAlmostEqual(table.wait("a", 1, 0.0), 0.5)
        self.assertEqual(table.wait("a", 1, 0.5), 0)
        self.assertEqual(table.wait("b", 1, 0.0), 0)  # others are untouched

    def test_zero_rate_is_no_limit(self) -> None:
        table = BucketTable(rate=0, burst=0)
        for _ in range(1000):
            self.assertEqual(table.wait("a", 5, 0.0), 0)
            table.take("a", 5, 0.0)
        self.assertEqual(len(table), 0)

    def test_bounded(self) -> None:
        """The table forgets the least recently used bucket past its size."""
        table = BucketTable(rate=1, burst=1, size=3)
        for key in "abcd":
            table.take(key, 1, 0.0)
        self.assertEqual(len(table), 3)
        self.assertEqual(table.wait("a", 1, 0.0), 0)  # forgotten: full again
        self.assertGreater(table.wait("d", 1, 0.0), 0)

    def test_cost_above_burst_is_possible(self) -> None:
        """A request dearer than the whole burst waits for a full bucket,
        never for ever."""
        table = BucketTable(rate=1, burst=2)
        self.assertEqual(table.wait("a", 10, 0.0), 0)

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, BucketTable, -1, 5)
        self.assertRaises(ValueError, BucketTable, 1, 0.5)


class RequestBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.budget = RequestBudget(self.clock, 10, 10, 25, 25)

    def test_source_limit(self) -> None:
        """One address gets its burst, then a retry-after; a neighbour in
        the same /24 still has its own."""
        for _ in range(10):
            self.assertEqual(self.budget.charge("10.0.0.1", 1), 0)
        wait = self.budget.charge("10.0.0.1", 1)
        self.assertAlmostEqual(wait, 0.1)
        self.assertEqual(self.budget.charge("10.0.0.2", 1), 0)
        self.assertEqual(self.budget.refused, 1)
        self.clock.advance(0.1)
        self.assertEqual(self.budget.charge("10.0.0.1", 1), 0)

    def test_network_limit(self) -> None:
        """Many addresses of one /24 share the network's budget; another
        network is untouched."""
        granted = sum(self.budget.charge(f"10.0.0.{n}", 1) == 0 for n in range(1, 41))
        self.assertEqual(granted, 25)
        self.assertEqual(self.budget.charge("10.0.1.1", 1), 0)

    def test_exempt_from_network(self) -> None:
        """Renewals skip the network budget (but not their source's)."""
        for n in range(1, 26):
            self.budget.charge(f"10.0.0.{n}", 1)
        self.assertGreater(self.budget.charge("10.0.0.99", 1), 0)
        self.assertEqual(self.budget.charge("10.0.0.99", 1, exempt_network=True), 0)

    def test_refused_requests_cost_nothing(self) -> None:
        """A refused request is not charged: asking again does not push the
        wait further out."""
        for _ in range(10):
            self.budget.charge("10.0.0.1", 1)
        first = self.budget.charge("10.0.0.1", 1)
        for _ in range(100):
            self.budget.charge("10.0.0.1", 1)
        self.assertEqual(self.budget.charge("10.0.0.1", 1), first)

    def test_ipv6_source_is_its_64(self) -> None:
        """Addresses of one IPv6 /64 share one source budget."""
        for n in range(10):
            self.assertEqual(self.budget.charge(f"2001:db8::{n + 1:x}", 1), 0)
        self.assertGreater(self.budget.charge("2001:db8::ffff", 1), 0)


class GuessBrakeTests(SynchronousTestCase):
    def test_doubling(self) -> None:
        """Each wrong token in a row doubles the wait, up to the longest."""
        clock = Clock()
        brake = GuessBrake(clock, base=0.1, longest=1.0)
        self.assertEqual(brake.wait("10.0.0.1"), 0)
        waits = []
        for _ in range(6):
            brake.wrong("10.0.0.1")
            waits.append(round(brake.wait("10.0.0.1"), 3))
            clock.advance(brake.wait("10.0.0.1"))
        self.assertEqual(waits, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
        self.assertEqual(brake.wait("10.0.0.2"), 0)

    def test_right_token_resets(self) -> None:
        clock = Clock()
        brake = GuessBrake(clock)
        brake.wrong("10.0.0.1")
        brake.wrong("10.0.0.1")
        brake.right("10.0.0.1")
        self.assertEqual(brake.wait("10.0.0.1"), 0)
        brake.wrong("10.0.0.1")
        self.assertAlmostEqual(brake.wait("10.0.0.1"), 0.1)

    def test_ten_guesses_cost_a_minute(self) -> None:
        """With the defaults, ten wrong tokens in a row take about 50 s."""
        clock = Clock()
        brake = GuessBrake(clock)
        for _ in range(10):
            clock.advance(brake.wait("10.0.0.1"))
            brake.wrong("10.0.0.1")
        self.assertGreater(clock.seconds(), 45)

    def test_bounded(self) -> None:
        clock = Clock()
        brake = GuessBrake(clock, size=2)
        for n in range(5):
            brake.wrong(f"10.0.0.{n}")
        self.assertEqual(len(brake), 2)
