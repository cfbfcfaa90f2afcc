"""
Tests for ``p2p.relay_list``: relays asked in order, the first answer used.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.errors import RELAY_FAILURES, describe
from p2p.relay_list import RelayFailure, RelayList, RelaysFailed, reasons

A, B, C = "127.0.0.1:9", "127.0.0.2:9", "tcp:host=127.0.0.3:port=9"


class FirstAnswerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.asked: list[str] = []

    def relays(self, *texts: str) -> RelayList:
        return RelayList(MemoryReactorClock(), texts)

    def ask(self, relays: RelayList, outcomes: dict[str, Deferred]):
        """An C{ask} that plays each relay's outcome and records the order."""

        def ask(endpoint):
            text = relays.texts[relays.endpoints.index(endpoint)]
            self.asked.append(text)
            return outcomes[text]

        return ask

    def test_first_answers(self) -> None:
        """The first relay's answer is the result; no other is asked."""
        relays = self.relays(A, B)
        d = relays.first_answer(self.ask(relays, {A: succeed("a"), B: succeed("b")}))
        self.assertEqual(self.successResultOf(d), "a")
        self.assertEqual(self.asked, [A])
        self.assertEqual((relays.answered, relays.failures), (0, []))
        self.assertEqual(relays.text, A)
        self.assertIs(relays.endpoint, relays.endpoints[0])

    def test_moves_on_in_order(self) -> None:
        """A relay that fails is skipped for the next, in the given order;
        the failures before the answer are kept, each said in one line."""
        relays = self.relays(A, B, C)
        pending: Deferred[str] = Deferred()
        d = relays.first_answer(
            self.ask(
                relays,
                {
                    A: fail(ConnectionRefusedError()),
                    B: pending,
                    C: succeed("c"),
                },
            )
        )
        self.assertEqual(self.asked, [A, B])
        self.assertNoResult(d)
        pending.errback(wire.RemoteError(503, "busy"))
        self.assertEqual(self.successResultOf(d), "c")
        self.assertEqual(self.asked, [A, B, C])
        self.assertEqual(relays.answered, 2)
        self.assertEqual(relays.text, C)
        self.assertEqual(
            relays.failures,
            [
                RelayFailure(A, describe(Failure(ConnectionRefusedError()))),
                RelayFailure(B, "refused: ERR 503 busy"),
            ],
        )

    def test_all_fail(self) -> None:
        """Every relay failing ends in one RelaysFailed that lists them all:
        a relay failure for every caller."""
        relays = self.relays(A, B)
        d = relays.first_answer(
            self.ask(
                relays,
                {
                    A: fail(ConnectionRefusedError()),
                    B: fail(wire.RemoteError(429, "x")),
                },
            )
        )
        failure = self.failureResultOf(d, RelaysFailed)
        self.assertTrue(failure.check(*RELAY_FAILURES))
        self.assertEqual([f.relay for f in failure.value.failures], [A, B])
        self.assertEqual(failure.value.reason, reasons(failure.value.failures))
        self.assertIn(f"{B}: refused: ERR 429 x", str(failure.value))
        self.assertIsNone(relays.answered)
        self.assertIsNone(relays.endpoint)
        self.assertEqual(relays.text, f"{A}, {B}")

    def test_one_relay_keeps_its_failure(self) -> None:
        """With a single relay, its own failure is the failure (the error
        line stays what it always was)."""
        relays = self.relays(A)
        d = relays.first_answer(self.ask(relays, {A: fail(ConnectionRefusedError())}))
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual(len(relays.failures), 1)

    def test_a_bug_is_not_a_relay_failure(self) -> None:
        """An unexpected error propagates at once: no other relay is asked."""
        relays = self.relays(A, B)
        d = relays.first_answer(
            self.ask(relays, {A: fail(ZeroDivisionError()), B: succeed("b")})
        )
        self.failureResultOf(d, ZeroDivisionError)
        self.assertEqual(self.asked, [A])

    def test_again_from_the_first(self) -> None:
        """Each question starts at the first relay again (it may be back)."""
        relays = self.relays(A, B)
        outcomes = {A: fail(ConnectionRefusedError()), B: succeed("b")}
        self.successResultOf(relays.first_answer(self.ask(relays, outcomes)))
        outcomes[A] = succeed("a")
        d = relays.first_answer(self.ask(relays, outcomes))
        self.assertEqual(self.successResultOf(d), "a")
        self.assertEqual(self.asked, [A, B, A])
        self.assertEqual((relays.answered, relays.failures), (0, []))

    def test_bad_relay(self) -> None:
        """An unusable description is a ValueError naming it; none at all
        too."""
        with self.assertRaises(ValueError) as caught:
            self.relays(A, "127.0.0.1:99999")
        self.assertIn("99999", str(caught.exception))
        with self.assertRaises(ValueError):
            self.relays()
