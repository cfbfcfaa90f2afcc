"""
Tests for PEERS paging: ``limit=``, ``cursor=`` and ``next=``.

The relay encodes a position (the registration sequence number of the last
peer sent) in the cursor and keeps nothing per client, so pages survive
registrations, expiries and even another relay process over the same table.
Everything runs on a ``Clock`` and ``StringTransport``s.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import relay as relay_module
from p2p import wire
from p2p.client import list_peers
from p2p.registry import UNVERIFIED_TIER, MemoryRegistry
from p2p.relay import Relay, RelayProtocol
from p2p.wire import Code, WireError

TTL = 60
START = 1000.0
CLIENT = IPv4Address("TCP", "10.9.9.9", 5555)


class PagingTestCase(SynchronousTestCase):
    """A relay over a fresh registry, and helpers to fill it and page it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.registry = MemoryRegistry(TTL)
        self.relay = Relay(self.registry, self.clock, ttl=TTL)

    def fill(self, count: int, host: str = "10.0.0.1", first_port: int = 1) -> None:
        now = self.clock.seconds()
        for port in range(first_port, first_port + count):
            self.registry.register(host, port, None, now)

    def ask(self, line: bytes, relay: Relay | None = None) -> list[bytes]:
        """One request on a fresh connection; the reply lines."""
        transport = StringTransport(peerAddress=CLIENT)
        protocol = RelayProtocol(relay or self.relay, None)
        protocol.makeConnection(transport)
        transport.clear()
        protocol.dataReceived(line + b"\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        data = transport.value()
        self.assertTrue(data.endswith(b"\n"), data)
        return data.split(b"\n")[:-1]

    def page(
        self, limit: int | None, cursor: str | None = None, relay: Relay | None = None
    ) -> tuple[list[int], str | None]:
        """One PEERS page: the ports listed and the next cursor."""
        request = wire.Peers(limit=limit, cursor=cursor).to_line()
        reply = self.ask(request, relay)
        count, next_cursor = wire.parse_listing_header(reply[0], 1000)
        self.assertEqual(count, len(reply) - 1)
        return [wire.PeerEntry.from_line(line).port for line in reply[1:]], next_cursor

    def walk(self, limit: int, between=None) -> list[int]:
        """Follow next= to the end; call C{between(page_number)} between pages."""
        seen: list[int] = []
        cursor = None
        for number in range(10_000):
            ports, cursor = self.page(limit, cursor)
            seen.extend(ports)
            if cursor is None:
                return seen
            if between is not None:
                between(number)
        raise AssertionError("paging never ended")

    def assertRefused(self, line: bytes) -> str:
        reply = self.ask(line)
        self.assertEqual(len(reply), 1, reply)
        error = self.assertRaises(wire.RemoteError, wire.parse_ok, reply[0].decode())
        self.assertEqual(error.code, Code.BAD_REQUEST)
        return error.message


class LimitTests(PagingTestCase):
    """``limit=`` is 1..1000; without paging options the old reply."""

    def test_limit_bounds(self) -> None:
        """0, 1001, negative and non-numbers are ERR 400; 1 and 1000 work."""
        self.fill(1005)
        for bad in [b"0", b"1001", b"-1", b"x", b"", b"1e3"]:
            self.assertRefused(b"PEERS limit=" + bad)
        # Unverified leases (no dial-back here): their tier's positions.
        self.assertEqual(self.page(1), ([1], wire.format_cursor(UNVERIFIED_TIER | 1)))
        ports, cursor = self.page(1000)
        self.assertEqual(ports, list(range(1, 1001)))
        self.assertIsNotNone(cursor)

    def test_repeated_option(self) -> None:
        """limit= or cursor= twice is ERR 400."""
        self.assertRefused(b"PEERS limit=1 limit=2")
        self.assertRefused(b"PEERS cursor=1 cursor=2")

    def test_exact_fit_has_no_next(self) -> None:
        """A page that ends exactly at the last peer says it is the end."""
        self.fill(3)
        self.assertEqual(self.page(3), ([1, 2, 3], None))
        self.assertEqual(self.page(5), ([1, 2, 3], None))

    def test_empty_table(self) -> None:
        """An empty table: OK 0 without next=."""
        self.assertEqual(self.ask(b"PEERS limit=5"), [b"OK 0"])

    def test_unpaged_request_never_has_next(self) -> None:
        """Plain PEERS (an old client) gets at most 1000 and no next=."""
        self.fill(1005)
        reply = self.ask(b"PEERS")
        self.assertEqual(reply[0], b"OK 1000")
        self.assertEqual(len(reply), 1001)

    def test_cursor_alone_pages(self) -> None:
        """cursor= without limit= pages with the default limit of 1000."""
        self.fill(1500)
        ports, cursor = self.page(None, wire.format_cursor(0))
        self.assertEqual(ports, list(range(1, 1001)))
        self.assertEqual(self.page(None, cursor), (list(range(1001, 1501)), None))


class CursorTests(PagingTestCase):
    """Following next= lists every peer once, whatever happens between pages."""

    def test_walk(self) -> None:
        """Pages of 3 over 10 peers: every peer once, in registration order."""
        self.fill(10)
        self.assertEqual(self.walk(3), list(range(1, 11)))

    def test_malformed_cursor(self) -> None:
        """A cursor that is not 1-16 lowercase hex digits is ERR 400."""
        for bad in [b"", b"xyz", b"ABC", b"-1", b"1" * 17, b"0x10", b"1.5"]:
            message = self.assertRefused(b"PEERS limit=2 cursor=" + bad)
            self.assertIn("cursor", message)

    def test_cursor_past_the_end(self) -> None:
        """A cursor beyond every registration gives an empty last page."""
        self.fill(3)
        self.assertEqual(self.page(2, "ffffffffffffffff"), ([], None))

    def test_registered_between_pages(self) -> None:
        """A peer registered after the walk began is listed on a later page."""
        self.fill(6)

        def register(number: int) -> None:
            if number == 0:
                self.fill(1, first_port=100)

        self.assertEqual(self.walk(2, register), [1, 2, 3, 4, 5, 6, 100])

    def test_renewed_between_pages(self) -> None:
        """A renewal keeps a peer's place: no duplicate, nothing skipped."""
        self.fill(6)

        def renew(number: int) -> None:
            self.registry.register("10.0.0.1", 1, None, self.clock.seconds())
            self.registry.register("10.0.0.1", 5, None, self.clock.seconds())

        self.assertEqual(self.walk(2, renew), [1, 2, 3, 4, 5, 6])

    def test_expired_between_pages(self) -> None:
        """Peers that expire between pages vanish; the walk goes on."""
        self.fill(3)  # at START: these expire first
        self.clock.advance(10)
        self.fill(3, first_port=10)

        def expire(number: int) -> None:
            if number == 0:
                self.clock.advance(TTL - 5)

        self.assertEqual(self.walk(2, expire), [1, 2, 10, 11, 12])

    def test_cursor_peer_unregistered(self) -> None:
        """The peer a cursor points at may be gone: the walk resumes after it."""
        self.fill(6)

        def unregister(number: int) -> None:
            if number == 0:
                self.registry.unregister("10.0.0.1", 2)  # the cursor's peer
                self.registry.unregister("10.0.0.1", 3)

        self.assertEqual(self.walk(2, unregister), [1, 2, 4, 5, 6])

    def test_reregistered_peer_moves_to_the_end(self) -> None:
        """
        A peer that unregisters and registers again is a new registration:
        it is listed after the peers already there, once.
        """
        self.fill(6)

        def reregister(number: int) -> None:
            if number == 0:
                self.registry.unregister("10.0.0.1", 1)
                self.fill(1, first_port=1)

        self.assertEqual(self.walk(2, reregister), [1, 2, 3, 4, 5, 6, 1])

    def test_many_pages_under_churn(self) -> None:
        """
        1000 peers paged 7 at a time while peers come and go: no duplicate
        registration, and every peer present throughout is listed.
        """
        self.fill(1000)
        added = iter(range(2000, 3000))

        def churn(number: int) -> None:
            now = self.clock.seconds()
            self.registry.unregister("10.0.0.1", 1000 - number)
            self.registry.register("10.0.0.2", next(added), None, now)

        cursor = None
        seen: list[tuple[str, int]] = []
        while True:
            reply = self.ask(wire.Peers(limit=7, cursor=cursor).to_line())
            _, cursor = wire.parse_listing_header(reply[0], 1000)
            seen.extend(
                (entry.host, entry.port)
                for entry in map(wire.PeerEntry.from_line, reply[1:])
            )
            if cursor is None:
                break
            churn(len(seen))
        self.assertEqual(len(seen), len(set(seen)))
        survivors = {("10.0.0.1", port) for port in range(1, 1000 - len(seen))}
        self.assertLessEqual(survivors, set(seen))


class StatelessTests(PagingTestCase):
    """The relay keeps no state per cursor (GHSA-v5hw-cv9c-rpg7)."""

    def sizes(self) -> dict[str, object]:
        """Every attribute of the relay and registry, containers by length."""
        state: dict[str, object] = {}
        for owner in (self.relay, self.registry):
            for name, value in vars(owner).items():
                key = f"{type(owner).__name__}.{name}"
                state[key] = len(value) if hasattr(value, "__len__") else value
        return state

    def test_no_state_per_cursor(self) -> None:
        """Thousands of distinct cursors leave the relay's state unchanged."""
        self.fill(50)
        self.page(1000)  # fills the (bounded, per-lease) line cache
        before = self.sizes()
        for position in range(0, 5000):
            self.page(1, wire.format_cursor(position))
        self.assertEqual(self.sizes(), before)

    def test_cursor_valid_on_another_relay(self) -> None:
        """
        A cursor from one relay object works on another over the same table:
        it carries the position, not a key into per-client memory.
        """
        self.fill(5)
        ports, cursor = self.page(2)
        other = Relay(self.registry, self.clock, ttl=TTL)
        self.assertEqual(self.page(10, cursor, relay=other), ([3, 4, 5], None))
        self.assertEqual(ports, [1, 2])


class LineCacheTests(PagingTestCase):
    """The relay caches PEER lines with the age and name they show; what it
    sends stays exact."""

    def test_name_and_age_stay_current(self) -> None:
        """A renamed, renewed peer is listed with its new name and age."""
        self.registry.register("10.0.0.1", 1, "old", self.clock.seconds())
        self.assertEqual(
            self.ask(b"PEERS")[1:],
            [b"PEER %s 10.0.0.1 1 age=0 name=old" % self.peer_id(1)],
        )
        self.clock.advance(7)
        self.assertEqual(
            self.ask(b"PEERS")[1:],
            [b"PEER %s 10.0.0.1 1 age=7 name=old" % self.peer_id(1)],
        )
        self.registry.register("10.0.0.1", 1, None, self.clock.seconds())
        self.clock.advance(2)
        self.assertEqual(
            self.ask(b"PEERS")[1:], [b"PEER %s 10.0.0.1 1 age=2" % self.peer_id(1)]
        )

    def test_age_ticks_over_on_the_second(self) -> None:
        """The cached line's age changes exactly when int(now - renewed) does."""
        self.clock.advance(0.3)
        self.registry.register("10.0.0.1", 1, None, self.clock.seconds())
        renewed = self.clock.seconds()
        for offset, age in [(0.0, 0), (0.999, 0), (1.0, 1), (1.5, 1), (2.0, 2)]:
            self.clock.advance(renewed + offset - self.clock.seconds())
            expected = int(self.clock.seconds() - renewed)
            self.assertEqual(expected, age)
            self.assertEqual(
                self.ask(b"PEERS")[1:],
                [b"PEER %s 10.0.0.1 1 age=%d" % (self.peer_id(1), age)],
            )

    def test_renamed_within_the_same_second(self) -> None:
        """A rename shows at once, even when the age has not changed."""
        self.registry.register("10.0.0.1", 1, "old", self.clock.seconds())
        self.ask(b"PEERS")
        self.registry.register("10.0.0.1", 1, "new", self.clock.seconds())
        self.assertEqual(
            self.ask(b"PEERS")[1:],
            [b"PEER %s 10.0.0.1 1 age=0 name=new" % self.peer_id(1)],
        )

    def test_bounded(self) -> None:
        """The cache never holds more than its bound (plus one page)."""
        self.patch(relay_module, "LINE_CACHE_ENTRIES", 10)
        self.fill(100)
        cursor = None
        while True:
            ports, cursor = self.page(7, cursor)
            self.assertLessEqual(len(self.relay._lines), 10 + 7)
            if cursor is None:
                break

    def test_matches_peer_entry(self) -> None:
        """The fast formatting gives exactly PeerEntry's lines."""
        self.registry.register("2001:db8::1", 7001, "v6", self.clock.seconds())
        self.fill(2)
        self.clock.advance(3.9)
        reply = self.ask(b"PEERS")
        for line in reply[1:]:
            self.assertEqual(wire.PeerEntry.from_line(line).to_line(), line)

    def peer_id(self, port: int) -> bytes:
        return wire.peer_id_for("10.0.0.1", port).encode()


class _RelayEndpoint:
    """A client endpoint connected in memory to a real L{RelayProtocol}."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.requests: list[bytes] = []

    def connect(self, factory):
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4001))
        client_transport = StringTransport()
        server = RelayProtocol(self.relay, None)
        server_transport = StringTransport(peerAddress=CLIENT)
        server.makeConnection(server_transport)
        client.makeConnection(client_transport)
        client.dataReceived(server_transport.value())
        server_transport.clear()
        request = client_transport.value()
        self.requests.append(request)
        server.dataReceived(request)
        client.dataReceived(server_transport.value())
        server.connectionLost(Failure(ConnectionDone()))
        return succeed(client)


class _OldRelay(Relay):
    """A relay from before paging: limit= and cursor= are unknown options."""

    def handle(self, request, source):
        if isinstance(request, wire.Peers) and request.paged:
            raise WireError(Code.BAD_REQUEST, "unexpected argument 'limit=...'")
        return super().handle(request, source)


class ClientTests(PagingTestCase):
    """L{list_peers} follows next= to the end or its maximum."""

    def test_small_table_one_request(self) -> None:
        """Fewer than a page of peers: the plain request, nothing more."""
        self.fill(5)
        endpoint = _RelayEndpoint(self.relay)
        d = list_peers(endpoint, self.clock, 3)
        self.assertEqual([p.port for p in self.successResultOf(d)], [1, 2, 3, 4, 5])
        self.assertEqual(endpoint.requests, [b"PEERS\n"])

    def test_follows_next(self) -> None:
        """2500 peers: a full first page, then pages of 1000 along next=."""
        self.fill(2500)
        endpoint = _RelayEndpoint(self.relay)
        d = list_peers(endpoint, self.clock, 3)
        self.assertEqual(
            [p.port for p in self.successResultOf(d)], list(range(1, 2501))
        )
        self.assertEqual(len(endpoint.requests), 4)
        self.assertEqual(endpoint.requests[1], b"PEERS limit=1000\n")
        thousandth = self.registry.active(self.clock.seconds(), 1000)[-1]
        self.assertEqual(thousandth.port, 1000)
        self.assertEqual(
            endpoint.requests[2],
            b"PEERS limit=1000 cursor=%s\n"
            % wire.format_cursor(self.registry.position(thousandth)).encode(),
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_maximum(self) -> None:
        """The walk stops at the maximum, asking only for what it needs."""
        self.fill(2500)
        endpoint = _RelayEndpoint(self.relay)
        d = list_peers(endpoint, self.clock, 3, maximum=1500)
        self.assertEqual(
            [p.port for p in self.successResultOf(d)], list(range(1, 1501))
        )
        self.assertTrue(endpoint.requests[-1].startswith(b"PEERS limit=500 cursor="))

    def test_default_maximum(self) -> None:
        """By default at most 10,000 peers are read."""
        self.fill(10_050)
        d = list_peers(_RelayEndpoint(self.relay), self.clock, 3)
        self.assertEqual(len(self.successResultOf(d)), 10_000)

    def test_old_relay(self) -> None:
        """A relay that refuses limit= gives its one page of 1000."""
        self.fill(1200)
        relay = _OldRelay(self.registry, self.clock, ttl=TTL)
        d = list_peers(_RelayEndpoint(relay), self.clock, 3)
        self.assertEqual(
            [p.port for p in self.successResultOf(d)], list(range(1, 1001))
        )

    def test_malformed_page(self) -> None:
        """A malformed listing header (a bad next=) fails the listing with WireError."""
        self.fill(1000)
        self.patch(
            Relay, "peers", lambda self, request=None: [b"OK 1 next=zz", b"PEER x"]
        )
        d = list_peers(_RelayEndpoint(self.relay), self.clock, 3)
        self.failureResultOf(d, WireError)
