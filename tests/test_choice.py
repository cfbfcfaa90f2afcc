"""Tests for L{p2p.choice}: which content a fetch by name takes.

L{choose} is a pure rule, tested as a table.  L{ask_roots} runs against
real peers (in memory, on a Clock: L{tests.test_client.Network}) and
scripted ones that refuse, stay silent or answer something else.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.choice import DISCOVERY_GRACE_SECONDS, Offer, ask_roots, choose
from p2p.client import describe as describe_failure
from p2p.pace import SILENT_PATIENCE_SECONDS
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
        self.progress: list[tuple[wire.PeerEntry, wire.Indexing]] = []
        d = ask_roots(
            NAME,
            self.network.peers,
            self.network.endpoint_for,
            self.clock,
            CONNECT,
            on_failure=lambda peer, failure, seconds: self.failed.append(
                (peer, describe_failure(failure), seconds)
            ),
            on_indexing=lambda peer, progress: self.progress.append((peer, progress)),
        )
        self.network.run(d, limit=100)
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

    def indexer(self, seconds: int, per_second: int, total: int) -> wire.PeerEntry:
        """A holder that answers with C{seconds} INDEXING lines, one a
        second, then the honest content's header."""
        honest = describe(b"the real report\n" * 100)[0]
        header = wire.FileHeader(
            0, honest.root_hex, 0, honest.size, honest.piece_size, 0
        ).to_line()
        return self.network.add(
            lambda: Indexer(self.clock, seconds, per_second, total, header + b"\n")
        )

    def test_a_holder_still_indexing_is_waited_for(self) -> None:
        """
        ``RANGE 0 0`` waits, with INDEXING lines, for a file not indexed
        yet: a holder still indexing is not a protocol error.  Its progress
        is told and renews its request's time (8 s here, past the 5 s
        timeout), and then it offers its content.
        """
        indexing = self.indexer(8, 2**20, 8 * 2**20)
        refusing = self.network.add("refuse")
        offered = self.ask()
        honest = describe(b"the real report\n" * 100)[0]
        self.assertEqual(offered, [Offer(indexing, honest.root_hex, honest.size)])
        self.assertEqual(self.clock.seconds(), 8)
        self.assertEqual(len(self.progress), 8)
        self.assertEqual(
            self.progress[-1], (indexing, wire.Indexing(7 * 2**20, 8 * 2**20))
        )
        self.assertEqual([peer for peer, _, _ in self.failed], [refusing])

    def test_a_holder_still_indexing_when_the_others_answered(self) -> None:
        """Once another holder answered, one still indexing is not waited
        for past the grace period; it is told as skipped, saying why."""
        honest = self.network.add(self.honest)
        indexing = self.indexer(60, 2**20, 60 * 2**20)
        offered = self.ask()
        self.assertEqual([offer.peer for offer in offered], [honest])
        self.assertEqual(
            self.failed,
            [
                (
                    indexing,
                    "still indexing the file (0% of 62914560 bytes) when the "
                    "others had answered",
                    DISCOVERY_GRACE_SECONDS,
                )
            ],
        )

    def test_fake_indexing_is_bounded_as_a_fetch_is(self) -> None:
        """
        A holder faking progress on a huge size (41,000 bytes a second of 4
        TiB) is held to the fetch's bounds (L{p2p.pace.IndexingWatch}):
        given up once the header timeout's length is over.
        """
        liar = self.indexer(3600, 41_000, 4398046511103)
        self.network.add("refuse")
        self.assertEqual(self.ask(), [])
        self.assertEqual(self.clock.seconds(), 31)
        peer, reason, _ = self.failed[-1]
        self.assertEqual(peer, liar)
        self.assertEqual(
            reason,
            "too slow: indexing 4096.0 GiB at 40.0 KiB/s would take 3.4 years, "
            "more than 600 s (20 x --header-timeout)",
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
        """
        Without any offer, nor a holder indexing the file, the question
        ends after SILENT_PATIENCE_SECONDS (not the 5 s request timeout):
        no offer, and the silent holder is dropped unreported, as a
        straggler is (the fetch asks it again).
        """
        self.network.add("silent")
        refusing = self.network.add("refuse")
        self.assertEqual(self.ask(), [])
        self.assertEqual(self.clock.seconds(), SILENT_PATIENCE_SECONDS)
        self.assertLess(SILENT_PATIENCE_SECONDS, CONNECT)
        self.assertEqual(
            [(peer, reason[:14]) for peer, reason, _ in self.failed],
            [(refusing, "cannot connect")],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_every_holder_refuses_at_once(self) -> None:
        """Holders that all fail before the question is even set up (their
        connections refused at once) end it at once, with no offer and no
        timer left."""
        refusing = [self.network.add("refuse"), self.network.add("refuse")]
        self.assertEqual(self.ask(), [])
        self.assertEqual(self.clock.seconds(), 0)
        self.assertEqual([peer for peer, _, _ in self.failed], refusing)

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


class Indexer(LineReceiver):
    """
    A holder still indexing the file: to a request, C{seconds} INDEXING
    lines, one a second (C{per_second} more bytes hashed each, of
    C{total}), then C{reply}.
    """

    delimiter = b"\n"

    def __init__(
        self, clock: Clock, seconds: int, per_second: int, total: int, reply: bytes
    ) -> None:
        self.clock = clock
        self.seconds = seconds
        self.per_second = per_second
        self.total = total
        self.reply = reply
        self.timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.write(b"P2P/2 peer\n")

    def lineReceived(self, line: bytes) -> None:
        self.tick(0)

    def tick(self, second: int) -> None:
        self.timer = None
        if second < self.seconds:
            done = min(self.total, second * self.per_second)
            self.transport.write(wire.Indexing(done, self.total).to_line() + b"\n")
            self.timer = self.clock.callLater(1, self.tick, second + 1)
        else:
            self.transport.write(self.reply)

    def connectionLost(self, reason=None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
