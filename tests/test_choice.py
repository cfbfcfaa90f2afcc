"""Tests for L{p2p.choice}: which content a fetch by name takes.

L{choose} is a pure rule, tested as a table.  L{ask_roots} runs against
real peers (in memory, on a Clock: L{tests.test_client.Network}) and
scripted ones that refuse, stay silent or answer something else.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.choice import DISCOVERY_GRACE_SECONDS, Offer, ask_roots, choose
from p2p.client import describe as describe_failure
from p2p.share import ShareFolder
from tests.test_client import CONNECT, Network, ScriptedServer, describe
from tests.test_share import temp_dir, write

NAME = "report.pdf"
ROOT_A = "a" * 64
ROOT_B = "b" * 64
ROOT_C = "c" * 64


def peer(index: int) -> wire.PeerEntry:
    host = f"10.0.0.{index}"
    return wire.PeerEntry(wire.peer_id_for(host, 7000), host, 7000)


def offers(*roots: str) -> list[Offer]:
    """One offer per root, from peers 1, 2, ... in that (the relay's) order."""
    return [Offer(peer(i), root, 100 + i) for i, root in enumerate(roots, 1)]


class ChooseTests(SynchronousTestCase):
    def test_table(self) -> None:
        """(roots offered in the relay's order, the root taken, tied)"""
        for roots, taken, tied in [
            ((ROOT_A,), ROOT_A, False),
            ((ROOT_A, ROOT_A, ROOT_A), ROOT_A, False),
            # A lone liar listed first loses to the majority.
            ((ROOT_B, ROOT_A, ROOT_A), ROOT_A, False),
            ((ROOT_A, ROOT_B, ROOT_C, ROOT_B), ROOT_B, False),
            # Ties go to the content the relay suggested first.
            ((ROOT_B, ROOT_A), ROOT_B, True),
            ((ROOT_A, ROOT_B, ROOT_B, ROOT_A), ROOT_A, True),
        ]:
            choice = choose(offers(*roots), asked=len(roots))
            assert choice is not None
            self.assertEqual(choice.chosen.root, taken, roots)
            self.assertEqual(choice.tied, tied, roots)
            self.assertEqual(choice.disagree, len(set(roots)) > 1, roots)
            self.assertEqual(choice.answered, len(roots))

    def test_contents_most_holders_first(self) -> None:
        choice = choose(offers(ROOT_C, ROOT_A, ROOT_B, ROOT_A), asked=5)
        assert choice is not None
        self.assertEqual(
            [(c.root, c.holders) for c in choice.contents],
            [
                (ROOT_A, (peer(2), peer(4))),
                (ROOT_C, (peer(1),)),
                (ROOT_B, (peer(3),)),
            ],
        )
        self.assertEqual(choice.asked, 5)
        self.assertEqual(choice.contents[0].size, 102)

    def test_unacceptable_sizes_are_not_chosen(self) -> None:
        """A content the client would refuse (--max-size, no room) is not
        taken, however many offer it; none acceptable: no choice."""
        choice = choose(
            offers(ROOT_A, ROOT_A, ROOT_B), 3, acceptable=lambda size: size == 103
        )
        assert choice is not None
        self.assertEqual(choice.chosen.root, ROOT_B)
        self.assertEqual(len(choice.contents), 2)
        self.assertIsNone(choose(offers(ROOT_A), 1, acceptable=lambda size: False))

    def test_nothing_offered(self) -> None:
        self.assertIsNone(choose([], asked=3))


class AskRootsTests(SynchronousTestCase):
    """``RANGE 0 0 <name>`` to several holders at once."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.network = Network(self, self.clock)
        self.honest = self.share(b"the real report\n" * 100)
        self.fake = self.share(b"something else\n")

    def share(self, data: bytes) -> ShareFolder:
        root = temp_dir(self)
        write(os.path.join(root, NAME), data)
        return ShareFolder(root)

    def ask(self) -> list[Offer]:
        self.failed: list[tuple[wire.PeerEntry, str, float]] = []
        d = ask_roots(
            NAME,
            self.network.peers,
            self.network.endpoint_for,
            self.clock,
            CONNECT,
            on_failure=lambda peer, failure, seconds: self.failed.append(
                (peer, describe_failure(failure), seconds)
            ),
        )
        self.network.run(d)
        offered = self.successResultOf(d)
        self.network.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        return offered

    def test_header_only_from_each(self) -> None:
        """
        Every holder is asked for the header only (no byte of the file
        moves) and the offers come in the holders' order; a refusal, a
        malformed or a non-empty answer offers nothing.
        """
        peers = [
            self.network.add(self.fake),
            self.network.add(self.honest),
            self.network.add(lambda: ScriptedServer(b"ERR 404 no such file\n")),
            self.network.add(lambda: ScriptedServer(b"OK 0 nonsense\n")),
            self.network.add(self.honest),
        ]
        offered = self.ask()
        honest = describe(b"the real report\n" * 100)[0]
        fake = describe(b"something else\n")[0]
        self.assertEqual(
            offered,
            [
                Offer(peers[0], fake.root_hex, fake.size),
                Offer(peers[1], honest.root_hex, honest.size),
                Offer(peers[4], honest.root_hex, honest.size),
            ],
        )
        for asked in peers:
            self.assertEqual(
                self.network.requests(asked), [wire.Range(0, 0, NAME).to_line()]
            )
        self.assertEqual(self.clock.seconds(), 0)
        self.assertEqual(
            self.failed,
            [
                (peers[2], "refused: ERR 404 no such file", 0),
                (peers[3], "protocol error: unexpected argument", 0),
            ],
        )

    def test_stragglers_get_the_grace_period(self) -> None:
        """A silent holder is not waited for past the grace period that
        follows the first answer; a blackholed one neither."""
        self.network.add("silent")
        self.network.add(self.honest)
        self.network.add("blackhole")
        offered = self.ask()
        self.assertEqual([offer.peer for offer in offered], [self.network.peers[1]])
        self.assertEqual(self.clock.seconds(), DISCOVERY_GRACE_SECONDS)
        self.assertEqual(self.failed, [])  # late, not failed

    def test_nobody_answers(self) -> None:
        """Without any answer the request timeout bounds it: no offer."""
        silent = self.network.add("silent")
        refusing = self.network.add("refuse")
        self.assertEqual(self.ask(), [])
        self.assertEqual(self.clock.seconds(), CONNECT)
        self.assertEqual(
            [(peer, reason[:14]) for peer, reason, _ in self.failed],
            [(refusing, "cannot connect"), (silent, "timed out")],
        )

    def test_cancel(self) -> None:
        self.network.add("silent")
        self.network.add("blackhole")
        d = ask_roots(
            NAME, self.network.peers, self.network.endpoint_for, self.clock, CONNECT
        )
        self.network.flush()
        d.cancel()
        self.network.flush()
        self.failureResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bug_after_the_end_is_logged(self) -> None:
        """
        A holder still waited for when the question ends is cancelled; a
        bug in that cancellation (not an expected failure) is logged,
        never dropped, and the answer stands.
        """

        class BuggyCancel(Exception):
            pass

        class Buggy:
            def connect(self, factory):
                return Deferred(lambda d: d.errback(BuggyCancel("bug")))

        honest = self.network.add(self.honest)
        buggy = self.network.add("blackhole")

        def endpoint_for(peer):
            if peer is buggy:
                return Buggy()
            return self.network.endpoint_for(peer)

        d = ask_roots(NAME, [honest, buggy], endpoint_for, self.clock, CONNECT)
        self.network.run(d)
        self.assertEqual([offer.peer for offer in self.successResultOf(d)], [honest])
        self.assertEqual(len(self.flushLoggedErrors(BuggyCancel)), 1)
