"""
Tests for the relay's defences against a hostile network (issue 9): request
budgets, the token-guess brake, lease caps per network, verified leases
listed first, saturated filters, and errors that never echo a secret.

All in memory: a relay on a Clock, connections on StringTransports (the
helpers of L{tests.test_relay}).
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2p import hints, wire
from p2p import relay as relay_module
from p2p.limits import ConnectionPolicy
from p2p.peer import PeerFactory
from p2p.ratelimit import GuessBrake, RequestBudget
from p2p.registry import MemoryRegistry
from p2p.relay import Relay, RelayFactory
from p2p.share import ShareFolder
from p2p.wire import Code

from ._indexed import indexed
from .test_relay import Connection

TTL = 60
TOKEN = "s3cret-token"


def source(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class HostileRelayTestCase(SynchronousTestCase):
    """A relay with the defences the tap builds (no dial-back: see
    L{tests.test_dialback}), with small limits."""

    token: str | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.registry = MemoryRegistry(
            TTL, max_peers=1000, max_per_host=5, max_per_network=8
        )
        self.relay = Relay(
            self.registry,
            self.clock,
            ttl=TTL,
            token=self.token,
            budget=RequestBudget(self.clock, 10, 10, 40, 40),
            brake=GuessBrake(self.clock) if self.token else None,
        )
        self.factory = RelayFactory(
            self.relay, 30, policy=ConnectionPolicy(self.clock, None)
        )

    def connect(self, host: str) -> Connection:
        connection = Connection(self.factory, source(host))
        connection.output()
        return connection

    def ask(self, host: str, line: bytes) -> list[bytes]:
        return self.connect(host).request(line)

    def listed(self, host: str = "10.9.0.1") -> list[tuple[str, int]]:
        reply = self.ask(host, b"PEERS")
        return [
            (entry.host, entry.port)
            for entry in map(wire.PeerEntry.from_line, reply[1:])
        ]


class RequestBudgetTests(HostileRelayTestCase):
    def test_flood_gets_429_with_retry_after(self) -> None:
        """Past its burst a source gets ERR 429 with a retry-after; once the
        wait is over it is served again."""
        replies = [
            self.ask("127.1.0.1", b"PEERS hint=0123456789abcdef") for _ in range(6)
        ]
        self.assertEqual([r[0][:6] for r in replies[:3]], [b"OK 0"] * 3)
        refused = replies[3][0].decode()
        self.assertTrue(refused.startswith("ERR 429 too many requests"), refused)
        wait = wire.retry_after(refused)
        self.assertIsNotNone(wait)
        self.clock.advance(wait)
        self.assertEqual(self.ask("127.1.0.1", b"PEERS")[0], b"OK 0")

    def test_well_behaved_neighbour_network_is_served(self) -> None:
        """A flood from one network leaves other networks' requests alone."""
        for n in range(100):
            self.ask(f"127.1.0.{n % 50 + 1}", b"PEERS")
        self.assertEqual(self.ask("127.0.0.1", b"PEERS")[0], b"OK 0")

    def test_renewals_survive_a_neighbours_flood(self) -> None:
        """
        A flood from the peer's own /24 empties the network budget; the
        peer's renewals are charged to its own address only and go on.
        """
        self.assertTrue(self.ask("10.0.0.5", b"REGISTER 9000")[0].startswith(b"OK "))
        for n in range(200):
            self.ask(f"10.0.0.{n % 200 + 10}", b"PEERS")
        self.assertTrue(
            self.ask("10.0.0.77", b"PEERS")[0].startswith(b"ERR 429")
        )  # the network is out of budget
        for _ in range(3):
            self.clock.advance(20)
            reply = self.ask("10.0.0.5", b"REGISTER 9000")
            self.assertTrue(reply[0].startswith(b"OK "), reply)


class NameQueryBudgetTests(HostileRelayTestCase):
    """The relay-wide budget of name queries (``PEERS hint=``), counted in
    full scans (here of 4 leases: MAX_HINT_SCAN patched)."""

    HINT = b"PEERS hint=0123456789abcdef"

    def setUp(self) -> None:
        super().setUp()
        self.patch(relay_module, "MAX_HINT_SCAN", 4)
        self.relay.name_queries = Relay(
            self.registry, self.clock, ttl=TTL, name_queries_per_second=20
        ).name_queries

    def fill(self, count: int) -> None:
        now = self.clock.seconds()
        for n in range(count):
            self.registry.register(f"10.{n + 1}.0.1", 9000, None, now)

    def test_many_networks_share_one_budget(self) -> None:
        """
        Name queries over a full table from 40 /24s, each well within its
        own budget, get ERR 429 once the relay's 20 a second are spent;
        plain listings are still answered, and a second later name
        queries are again.
        """
        self.fill(4)
        replies = [self.ask(f"127.{n + 1}.0.1", self.HINT)[0] for n in range(40)]
        self.assertEqual(replies[:20], [b"OK 0"] * 20)
        for refused in replies[20:]:
            text = refused.decode()
            self.assertTrue(
                text.startswith("ERR 429 the relay's name queries are spent"), text
            )
            self.assertIsNotNone(wire.retry_after(text))
        self.assertTrue(self.ask("127.99.0.1", b"PEERS")[0].startswith(b"OK 4"))
        self.clock.advance(1)
        self.assertEqual(self.ask("127.98.0.1", self.HINT)[0], b"OK 0")

    def test_a_smaller_table_allows_more(self) -> None:
        """A query over 1 lease of a 4-lease scan costs a quarter: 80 in
        the same second."""
        self.fill(1)
        replies = [self.ask(f"127.{n + 1}.0.1", self.HINT)[0] for n in range(100)]
        self.assertEqual(replies[:80], [b"OK 0"] * 80)
        self.assertTrue(replies[80].startswith(b"ERR 429"), replies[80])

    def test_no_limit(self) -> None:
        """0: no relay-wide limit (the per-source budgets still hold)."""
        self.fill(4)
        self.relay.name_queries = Relay(
            self.registry, self.clock, ttl=TTL, name_queries_per_second=0
        ).name_queries
        replies = {self.ask(f"127.{n + 1}.0.1", self.HINT)[0] for n in range(100)}
        self.assertEqual(replies, {b"OK 0"})


class LeaseCapTests(HostileRelayTestCase):
    def test_per_network_cap(self) -> None:
        """Several addresses of one /24 share its lease cap; the next /24
        still registers."""
        granted = 0
        for n in range(1, 5):
            for port in range(1, 6):
                reply = self.ask(f"127.1.0.{n}", b"REGISTER %d" % (9000 + port))
                granted += reply[0].startswith(b"OK ")
                self.clock.advance(0.5)  # stay within the request budget
        self.assertEqual(granted, 8)
        self.assertTrue(self.ask("127.2.0.1", b"REGISTER 9000")[0].startswith(b"OK "))
        refused = self.ask("127.1.0.9", b"REGISTER 9000")[0]
        self.assertEqual(
            refused,
            b"ERR 429 at most 8 registrations per network (127.1.0.0/24)",
        )


class VerifiedFirstTests(HostileRelayTestCase):
    def test_verified_leases_listed_first(self) -> None:
        """
        Sybil leases registered first, then an honest peer that answered
        the dial-back: the honest peer heads the listing, the suggestions
        and the first page.
        """
        files = hints.build_filter(["a.txt"]).encode()
        for n in range(1, 4):
            for port in range(1, 6):
                self.ask(f"127.{n}.0.1", b"REGISTER %d files=%s" % (port, files))
                self.clock.advance(0.5)
        self.ask("127.0.0.1", b"REGISTER 9000 files=" + files)
        self.relay.answered("127.0.0.1", 9000)
        self.assertEqual(self.listed()[0], ("127.0.0.1", 9000))
        self.assertEqual(len(self.listed()), 16)
        hint = hints.name_hint("a.txt").encode()
        suggested = self.ask("10.9.0.2", b"PEERS hint=" + hint)
        self.assertEqual(wire.PeerEntry.from_line(suggested[1]).port, 9000)
        page = self.ask("10.9.0.3", b"PEERS limit=1")
        self.assertEqual(wire.PeerEntry.from_line(page[1]).port, 9000)
        self.assertEqual(self.relay.activity.verified, 1)

    def test_pages_walk_both_tiers(self) -> None:
        """Paging goes through the verified leases, then the others, each
        once."""
        for port in range(1, 6):
            self.ask("127.1.0.1", b"REGISTER %d" % port)
        for port in (2, 4):
            self.relay.answered("127.1.0.1", port)
        seen = []
        cursor = None
        while True:
            line = b"PEERS limit=2" + (b" cursor=" + cursor if cursor else b"")
            self.clock.advance(1)
            reply = self.ask("10.9.0.1", line)
            count, cursor_text = wire.parse_listing_header(reply[0], 1000)
            seen += [wire.PeerEntry.from_line(x).port for x in reply[1:]]
            if cursor_text is None:
                break
            cursor = cursor_text.encode()
        self.assertEqual(seen, [2, 4, 1, 3, 5])

    def test_suggestions_spread_over_networks(self) -> None:
        """
        Verified fakes from one network that match every name cannot push
        an honest holder from another network down the suggestions: the
        networks take turns, so the holder comes second.
        """
        files = hints.build_filter(["a.txt"]).encode()
        for port in range(1, 6):  # the source's cap here
            self.ask("127.1.0.1", b"REGISTER %d files=%s" % (port, files))
            self.relay.answered("127.1.0.1", port)
        self.ask("127.0.0.1", b"REGISTER 9000 files=" + files)
        self.relay.answered("127.0.0.1", 9000)
        hint = hints.name_hint("a.txt").encode()
        reply = self.ask("10.9.0.1", b"PEERS hint=" + hint)
        ports = [wire.PeerEntry.from_line(x).port for x in reply[1:]]
        self.assertEqual(ports, [1, 9000, 2, 3, 4, 5])

    def test_saturated_filter_is_no_suggestion(self) -> None:
        """A filter with every bit set is listed, never suggested."""
        self.ask("127.1.0.1", b"REGISTER 9001 files=" + b"f" * 512)
        files = hints.build_filter(["a.txt"]).encode()
        self.ask("127.2.0.1", b"REGISTER 9002 files=" + files)
        hint = hints.name_hint("a.txt").encode()
        reply = self.ask("10.9.0.1", b"PEERS hint=" + hint)
        self.assertEqual([wire.PeerEntry.from_line(x).port for x in reply[1:]], [9002])
        self.assertEqual(len(self.listed()), 2)


class TokenTests(HostileRelayTestCase):
    token = TOKEN

    def test_guessing_is_braked(self) -> None:
        """
        Each wrong token in a row doubles the wait before the next is
        compared: until then the source gets 429 (the right token too).
        """
        first = self.ask("127.1.0.1", b"REGISTER 9000 token=guess1")
        self.assertEqual(first, [b"ERR 401 wrong token"])
        braked = self.ask("127.1.0.1", b"REGISTER 9000 token=" + TOKEN.encode())
        self.assertTrue(braked[0].startswith(b"ERR 429 too many wrong tokens"))
        self.clock.advance(0.1)
        self.assertEqual(
            self.ask("127.1.0.1", b"REGISTER 9000 token=guess2"),
            [b"ERR 401 wrong token"],
        )
        self.clock.advance(0.1)
        self.assertTrue(
            self.ask("127.1.0.1", b"REGISTER 9000 token=x")[0].startswith(b"ERR 429")
        )
        # Another address is not slowed down.
        ok = self.ask("127.2.0.1", b"REGISTER 9000 token=" + TOKEN.encode())
        self.assertTrue(ok[0].startswith(b"OK "))

    def test_guess_rate(self) -> None:
        """A guesser gets through about ten tokens a minute, not 13,000 a
        second."""
        compared = 0
        for _ in range(600):
            self.clock.advance(0.1)
            reply = self.ask("127.1.0.1", b"REGISTER 9000 token=guess")
            compared += reply == [b"ERR 401 wrong token"]
        self.assertLess(compared, 12)


class SecretsTests(HostileRelayTestCase):
    def test_token_as_command_not_echoed(self) -> None:
        """A request whose first word is a token is refused without it."""
        reply = self.ask("127.1.0.1", b"token=" + TOKEN.encode())
        self.assertEqual(reply, [b"ERR 501 unknown command"])
        reply = self.ask("127.1.0.2", TOKEN.encode())
        self.assertEqual(reply, [b"ERR 501 unknown command"])

    def test_other_roles_command_named(self) -> None:
        self.assertEqual(
            self.ask("127.1.0.1", b"GET a.txt"), [b"ERR 501 GET is not served here"]
        )

    def test_command_word_not_quoted(self) -> None:
        self.assertEqual(self.ask("127.1.0.1", b"HELLO"), [b"ERR 501 unknown command"])

    def test_bare_argument_not_echoed(self) -> None:
        reply = self.ask("127.1.0.1", b"PEERS " + TOKEN.encode())
        self.assertEqual(reply, [b"ERR 400 unexpected argument"])
        reply = self.ask("127.1.0.1", b"PEERS tokn=" + TOKEN.encode())
        self.assertEqual(reply, [b"ERR 400 unexpected argument"])
        reply = self.ask("127.1.0.1", b"PEERS name=box")
        self.assertEqual(reply, [b"ERR 400 name= is not accepted here"])

    def test_letters_only_token(self) -> None:
        """A token of letters only, where a command or an argument goes, is
        not quoted either (upper-cased or not)."""
        for line in [b"opensesame", b"PEERS opensesame", b"PEERS opensesame=x"]:
            reply = self.ask("127.1.0.1", line)[0]
            self.assertNotIn(b"opensesame", reply.lower())


class RetryAfterTests(SynchronousTestCase):
    def test_format_and_parse(self) -> None:
        error = wire.retry_later("too many requests", 0.234)
        self.assertEqual(error.code, Code.TOO_MANY)
        self.assertEqual(error.message, "too many requests; retry-after=0.3")
        self.assertEqual(wire.retry_after(error.message), 0.3)
        self.assertIsNone(wire.retry_after("table full"))
        self.assertIsNone(wire.retry_after("x; retry-after=soon"))


class PeerBudgetTests(SynchronousTestCase):
    """A peer charges LIST and PIECES to the same kind of budget; transfers
    are not charged."""

    def test_list_flood_gets_429(self) -> None:
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        with open(f"{root}/a.txt", "wb") as stream:
            stream.write(b"hello\n")
        clock = Clock()
        share = ShareFolder(root)
        factory = PeerFactory(
            share,
            indexed(self, share, Clock()),
            clock,
            30,
            policy=ConnectionPolicy(clock, None),
            budget=RequestBudget(clock, 2, 2, 100, 100),
        )
        protocol = factory.buildProtocol(source("127.1.0.1"))
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.clear()
        protocol.dataReceived(b"LIST\nLIST\nLIST\n")
        lines = transport.value().split(b"\n")
        self.assertEqual(lines[0], b"OK 1")
        self.assertEqual(lines[2], b"OK 1")
        self.assertEqual(lines[4], b"ERR 429 too many requests; retry-after=0.5")
        transport.clear()
        protocol.dataReceived(b"GET a.txt\n")
        self.assertTrue(transport.value().startswith(b"OK 6 "))
