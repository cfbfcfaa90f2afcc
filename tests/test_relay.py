"""
Tests for ``p2p.relay``: the relay's policy and its line protocol.

Every connection is a ``StringTransport`` whose peer address plays the
observed source, and every time comes from a ``Clock``; nothing touches the
network or the global reactor.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from p2p import wire
from p2p.interfaces import ISharedRegistry
from p2p.limits import MAX_ERRORS_PER_CONNECTION, ConnectionPolicy
from p2p.registry import MemoryRegistry, RegistryFull, RegistryUnavailable
from p2p.relay import (
    MAX_PEERS_PER_REPLY,
    REPLY_CHUNK_BYTES,
    Activity,
    LinesProducer,
    Relay,
    RelayFactory,
    RelayProtocol,
    default_renew_interval,
    observed_host,
)
from p2p.wire import Code

TTL = 60
IDLE = 30.0
# Start the clock well away from zero, so an age or expiry computed from
# absolute times instead of differences shows up.
START = 1000.0

PEER_A = IPv4Address("TCP", "10.0.0.5", 5555)
PEER_B = IPv4Address("TCP", "10.0.0.6", 6666)
PEER_A_OTHER_PORT = IPv4Address("TCP", "10.0.0.5", 7777)


class Connection:
    """One in-memory client connection to a ``RelayProtocol``."""

    def __init__(self, factory: RelayFactory, peer) -> None:
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)

    def output(self) -> list[bytes]:
        """Lines written since the last call (each must end with LF)."""
        data = self.transport.value()
        self.transport.clear()
        if data and not data.endswith(b"\n"):
            raise AssertionError(f"unterminated output {data!r}")
        return data.split(b"\n")[:-1]

    def send(self, data: bytes) -> list[bytes]:
        """Deliver raw bytes; return the lines written in response."""
        self.output()
        self.protocol.dataReceived(data)
        return self.output()

    def request(self, line: bytes) -> list[bytes]:
        """Send one request line; return the reply lines."""
        return self.send(line + b"\n")

    @property
    def open(self) -> bool:
        """False once the protocol asked for the connection to close."""
        return not self.transport.disconnecting

    def lose(self) -> None:
        """Deliver the end of the connection, as a real transport would."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class RelayTestCase(SynchronousTestCase):
    """A relay on a fresh registry and clock, plus connection helpers."""

    max_peers = 0
    max_per_host = 0
    allow_claimed_host = False
    renew: int | None = None
    idle_timeout: float | None = IDLE
    # The idle tests below time a connection from its start: no separate
    # first-request deadline unless a test asks for one.
    first_request_timeout: float | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.registry = MemoryRegistry(TTL, self.max_peers, self.max_per_host)
        self.relay = Relay(
            self.registry,
            self.clock,
            ttl=TTL,
            renew=self.renew,
            allow_claimed_host=self.allow_claimed_host,
        )
        self.factory = RelayFactory(
            self.relay,
            self.idle_timeout,
            policy=ConnectionPolicy(self.clock, self.first_request_timeout),
        )

    def connect(self, peer=PEER_A) -> Connection:
        """Open a connection from ``peer`` and swallow the banner."""
        connection = Connection(self.factory, peer)
        self.assertEqual(connection.output(), [b"P2P/1 relay"])
        return connection

    def advance_to(self, offset: float) -> None:
        """Move the clock to ``START + offset`` seconds."""
        self.clock.advance(START + offset - self.clock.seconds())

    def register(self, connection: Connection, line: bytes) -> wire.Registered:
        """Send a REGISTER line and parse the (single-line) reply."""
        reply = connection.request(line)
        self.assertEqual(len(reply), 1, reply)
        return wire.Registered.from_line(reply[0])

    def peers(self, connection: Connection | None = None) -> list[wire.PeerEntry]:
        """Ask for PEERS and parse the listing, checking its header count."""
        reply = (connection or self.connect(PEER_B)).request(b"PEERS")
        count = wire.parse_count(reply[0], MAX_PEERS_PER_REPLY)
        self.assertEqual(count, len(reply) - 1)
        return [wire.PeerEntry.from_line(line) for line in reply[1:]]

    def assertError(self, reply: list[bytes], code: Code) -> str:
        """``reply`` is one ``ERR <code> <message>`` line; return the message."""
        self.assertEqual(len(reply), 1, reply)
        self.assertRegex(reply[0], rb"\AERR [0-9]{3} \S[ -~]*\Z")
        error = self.assertRaises(wire.RemoteError, wire.parse_ok, reply[0].decode())
        self.assertEqual(error.code, code, reply)
        return error.message


class HelperTests(SynchronousTestCase):
    """The relay module's small functions."""

    def test_default_renew_interval(self) -> None:
        """Peers are asked to renew three times per lease, at least every 1 s."""
        self.assertEqual(default_renew_interval(60), 20)
        self.assertEqual(default_renew_interval(10), 3)
        self.assertEqual(default_renew_interval(2), 1)
        self.assertEqual(default_renew_interval(1), 1)

    def test_observed_host(self) -> None:
        """The source IP, with IPv4-mapped IPv6 shown as IPv4."""
        self.assertEqual(observed_host(PEER_A), "10.0.0.5")
        self.assertEqual(
            observed_host(IPv6Address("TCP", "::ffff:10.0.0.5", 1)), "10.0.0.5"
        )
        self.assertEqual(
            observed_host(IPv6Address("TCP", "2001:db8::1", 1)), "2001:db8::1"
        )

    def test_observed_host_not_ip(self) -> None:
        """A non-IP connection cannot register: 400."""
        error = self.assertRaises(
            wire.WireError, observed_host, UNIXAddress(b"/tmp/sock")
        )
        self.assertIs(error.code, Code.BAD_REQUEST)


class ConnectionTests(RelayTestCase):
    """Connection setup and framing."""

    def test_banner(self) -> None:
        """The relay greets first with a banner a client accepts."""
        connection = Connection(self.factory, PEER_A)
        [banner] = connection.output()
        wire.check_banner(banner, "relay")
        self.assertTrue(connection.open)

    def test_factory(self) -> None:
        """Each connection gets its own protocol sharing the one Relay."""
        one = self.factory.buildProtocol(PEER_A)
        two = self.factory.buildProtocol(PEER_B)
        self.assertIsInstance(one, RelayProtocol)
        self.assertIsNot(one, two)
        self.assertIs(one.relay, self.relay)
        self.assertIs(two.relay, self.relay)
        self.assertIs(one.factory, self.factory)

    def test_several_requests_in_one_write(self) -> None:
        """Requests arriving together are answered in order."""
        connection = self.connect()
        reply = connection.send(b"REGISTER 9000\nPEERS\nUNREGISTER 9000\nPEERS\n")
        peer_id = wire.peer_id_for("10.0.0.5", 9000)
        self.assertEqual(len(reply), 5, reply)
        self.assertEqual(wire.Registered.from_line(reply[0]).peer_id, peer_id)
        self.assertEqual(reply[1], b"OK 1")
        self.assertEqual(wire.PeerEntry.from_line(reply[2]).peer_id, peer_id)
        self.assertEqual(reply[3], f"OK {peer_id}".encode())
        self.assertEqual(reply[4], b"OK 0")

    def test_many_requests_one_connection(self) -> None:
        """A connection serves any number of requests in sequence."""
        connection = self.connect()
        for port in range(9000, 9010):
            self.register(connection, b"REGISTER %d" % (port,))
        self.assertEqual(len(self.peers(connection)), 10)
        self.assertTrue(connection.open)

    def test_split_request(self) -> None:
        """A request split across segments is answered once complete."""
        connection = self.connect()
        self.assertEqual(connection.send(b"PE"), [])
        self.assertEqual(connection.send(b"ER"), [])
        self.assertEqual(connection.send(b"S\n"), [b"OK 0"])

    def test_crlf(self) -> None:
        """CRLF line ends (telnet, nc -C) work."""
        connection = self.connect()
        self.assertEqual(connection.send(b"PEERS\r\n"), [b"OK 0"])
        self.assertEqual(len(connection.send(b"REGISTER 9000\r\n")), 1)

    def test_lower_case(self) -> None:
        """Verbs are case-insensitive."""
        self.assertEqual(self.connect().request(b"peers"), [b"OK 0"])

    def test_blank_lines_ignored(self) -> None:
        """Empty and whitespace-only lines get no reply and no error."""
        connection = self.connect()
        self.assertEqual(connection.send(b"\n\r\n   \n\t\n"), [])
        self.assertEqual(connection.request(b"PEERS"), [b"OK 0"])
        self.assertTrue(connection.open)


class RegisterTests(RelayTestCase):
    """REGISTER: leases at the observed address."""

    def test_reply(self) -> None:
        """The reply names the peer id, the lease times and the observed host."""
        reply = self.register(self.connect(), b"REGISTER 9000 name=box")
        self.assertEqual(
            reply,
            wire.Registered(
                wire.peer_id_for("10.0.0.5", 9000), TTL, TTL // 3, "10.0.0.5"
            ),
        )

    def test_lease_at_observed_address(self) -> None:
        """The lease is recorded at the transport's peer address."""
        self.register(self.connect(), b"REGISTER 9000 name=box")
        [lease] = list(self.registry)
        self.assertEqual(
            (lease.host, lease.port, lease.name), ("10.0.0.5", 9000, "box")
        )
        self.assertEqual(lease.registered, START)
        self.assertEqual(lease.expires, START + TTL)

    def test_source_port_irrelevant(self) -> None:
        """The source port of the connection plays no part in the lease."""
        first = self.register(self.connect(PEER_A), b"REGISTER 9000")
        second = self.register(self.connect(PEER_A_OTHER_PORT), b"REGISTER 9000")
        self.assertEqual(first, second)
        self.assertEqual(len(self.registry), 1)

    def test_ipv4_mapped_source(self) -> None:
        """A dual-stack listener's IPv4-mapped source is recorded as IPv4."""
        peer = IPv6Address("TCP", "::ffff:10.0.0.5", 5555)
        reply = self.register(self.connect(peer), b"REGISTER 9000")
        self.assertEqual(reply.observed, "10.0.0.5")
        self.assertEqual(reply.peer_id, wire.peer_id_for("10.0.0.5", 9000))

    def test_ipv6_source(self) -> None:
        """IPv6 sources are recorded and listed in canonical form."""
        peer = IPv6Address("TCP", "2001:DB8:0::1", 5555)
        reply = self.register(self.connect(peer), b"REGISTER 9000")
        self.assertEqual(reply.observed, "2001:db8::1")
        [entry] = self.peers()
        self.assertEqual(entry.address, "[2001:db8::1]:9000")

    def test_claimed_host_refused(self) -> None:
        """host= naming another address is a 403, and nothing is recorded."""
        connection = self.connect()
        reply = connection.request(b"REGISTER 9000 host=192.0.2.1")
        self.assertIn("host=", self.assertError(reply, Code.FORBIDDEN))
        self.assertEqual(len(self.registry), 0)
        self.assertTrue(connection.open)

    def test_claimed_host_matching_source(self) -> None:
        """host= equal to the observed address is harmless and accepted."""
        reply = self.register(self.connect(), b"REGISTER 9000 host=::ffff:10.0.0.5")
        self.assertEqual(reply.observed, "10.0.0.5")

    def test_renewal(self) -> None:
        """A second REGISTER renews: same id, later expiry, one lease."""
        connection = self.connect()
        first = self.register(connection, b"REGISTER 9000")
        self.advance_to(20)
        second = self.register(connection, b"REGISTER 9000 name=new")
        self.assertEqual(first, second)
        [lease] = list(self.registry)
        self.assertEqual((lease.registered, lease.renewed), (START, START + 20))
        self.assertEqual(lease.name, "new")

    def test_renewal_postpones_expiry(self) -> None:
        """A renewed lease outlives its first ttl and ends ttl after renewal."""
        self.register(self.connect(), b"REGISTER 9000")
        self.advance_to(50)
        # Each exchange on its own connection, as a peer does: one left open
        # for 50 s would have hit the idle timeout.
        self.register(self.connect(), b"REGISTER 9000")
        self.advance_to(TTL + 10)
        self.assertEqual(len(self.peers()), 1)
        self.advance_to(50 + TTL - 0.1)
        self.assertEqual(len(self.peers()), 1)
        self.advance_to(50 + TTL)
        self.assertEqual(self.peers(), [])

    def test_register_after_expiry(self) -> None:
        """After its lease ran out, a peer's REGISTER starts a new lease."""
        self.register(self.connect(), b"REGISTER 9000")
        self.advance_to(TTL + 5)
        self.register(self.connect(), b"REGISTER 9000")
        [lease] = list(self.registry)
        self.assertEqual(lease.registered, START + TTL + 5)
        [entry] = self.peers()
        self.assertEqual(entry.age, 0)

    def test_malformed(self) -> None:
        """A malformed REGISTER is a 400 and registers nothing."""
        for line in [b"REGISTER", b"REGISTER 0", b"REGISTER 9000 name=a/b"]:
            self.assertError(self.connect().request(line), Code.BAD_REQUEST)
        self.assertEqual(len(self.registry), 0)


class CustomRenewTests(RelayTestCase):
    """The renew interval given to the Relay is what peers are told."""

    renew = 7

    def test_renew(self) -> None:
        """REGISTER replies carry the configured renew interval."""
        reply = self.register(self.connect(), b"REGISTER 9000")
        self.assertEqual((reply.ttl, reply.renew), (TTL, 7))


class ClaimedHostTests(RelayTestCase):
    """With allow_claimed_host, host= is recorded (trusted proxy setups)."""

    allow_claimed_host = True

    def test_claimed_host_recorded(self) -> None:
        """The lease uses the claimed host; the reply still shows the source."""
        reply = self.register(self.connect(), b"REGISTER 9000 host=192.0.2.1")
        self.assertEqual(reply.peer_id, wire.peer_id_for("192.0.2.1", 9000))
        self.assertEqual(reply.observed, "10.0.0.5")
        [entry] = self.peers()
        self.assertEqual(entry.address, "192.0.2.1:9000")

    def test_without_claim(self) -> None:
        """Without host=, the observed address is used as usual."""
        self.register(self.connect(), b"REGISTER 9000")
        [entry] = self.peers()
        self.assertEqual(entry.host, "10.0.0.5")

    def test_unregister_claimed_host(self) -> None:
        """
        A lease registered under a claimed host ends with UNREGISTER naming
        that host (before host= was accepted there, it could never end).
        """
        connection = self.connect()
        reply = self.register(connection, b"REGISTER 9000 host=192.0.2.1")
        self.assertError(connection.request(b"UNREGISTER 9000"), Code.NOT_FOUND)
        self.assertEqual(len(self.peers()), 1)
        self.assertEqual(
            connection.request(b"UNREGISTER 9000 host=192.0.2.1"),
            [f"OK {reply.peer_id}".encode()],
        )
        self.assertEqual(self.peers(), [])

    def test_unregister_claimed_host_normalised(self) -> None:
        """The claimed host is matched in its canonical form."""
        reply = self.register(self.connect(), b"REGISTER 9000 host=2001:db8::7")
        self.assertEqual(
            self.connect(PEER_B).request(b"UNREGISTER 9000 host=2001:0db8:0:0:0:0:0:7"),
            [f"OK {reply.peer_id}".encode()],
        )


class UnregisterTests(RelayTestCase):
    """UNREGISTER: only ever the observed host's own entry."""

    def test_unregister(self) -> None:
        """OK <peer-id>, and the peer leaves the listing."""
        connection = self.connect()
        reply = self.register(connection, b"REGISTER 9000")
        self.assertEqual(
            connection.request(b"UNREGISTER 9000"), [f"OK {reply.peer_id}".encode()]
        )
        self.assertEqual(self.peers(), [])

    def test_unknown(self) -> None:
        """Unregistering what is not registered is a 404."""
        connection = self.connect()
        self.assertError(connection.request(b"UNREGISTER 9000"), Code.NOT_FOUND)
        self.register(connection, b"REGISTER 9000")
        connection.request(b"UNREGISTER 9000")
        self.assertError(connection.request(b"UNREGISTER 9000"), Code.NOT_FOUND)
        self.assertTrue(connection.open)

    def test_other_hosts_entry_untouched(self) -> None:
        """Another host cannot end a peer's lease by naming its port."""
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        reply = self.connect(PEER_B).request(b"UNREGISTER 9000")
        self.assertError(reply, Code.NOT_FOUND)
        [entry] = self.peers()
        self.assertEqual(entry.address, "10.0.0.5:9000")

    def test_only_that_port(self) -> None:
        """Only the named port's lease ends; the host's others stay."""
        connection = self.connect()
        self.register(connection, b"REGISTER 9000")
        self.register(connection, b"REGISTER 9001")
        self.register(self.connect(PEER_B), b"REGISTER 9000")
        connection.request(b"UNREGISTER 9000")
        self.assertEqual(
            sorted(entry.address for entry in self.peers()),
            ["10.0.0.5:9001", "10.0.0.6:9000"],
        )

    def test_claimed_host_refused(self) -> None:
        """
        Without --allow-claimed-host, UNREGISTER host=<another address> is a
        403 and the lease at that address stays.
        """
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        reply = self.connect(PEER_B).request(b"UNREGISTER 9000 host=10.0.0.5")
        self.assertIn("host=", self.assertError(reply, Code.FORBIDDEN))
        self.assertEqual(len(self.peers()), 1)

    def test_own_host_named(self) -> None:
        """host= equal to the observed address is accepted as it is in REGISTER."""
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        reply = self.connect(PEER_A).request(b"UNREGISTER 9000 host=10.0.0.5")
        self.assertTrue(reply[0].startswith(b"OK "), reply)
        self.assertEqual(self.peers(), [])

    def test_from_another_connection(self) -> None:
        """Any connection from the same host may end the host's lease."""
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        reply = self.connect(PEER_A_OTHER_PORT).request(b"UNREGISTER 9000")
        self.assertEqual(len(reply), 1)
        self.assertTrue(reply[0].startswith(b"OK "))
        self.assertEqual(self.peers(), [])


class PeersTests(RelayTestCase):
    """PEERS: the listing of live leases."""

    def test_empty(self) -> None:
        """No peers: just the header."""
        self.assertEqual(self.connect().request(b"PEERS"), [b"OK 0"])

    def test_format(self) -> None:
        """One PEER line per lease, oldest registration first."""
        self.register(self.connect(PEER_A), b"REGISTER 9000 name=alpha")
        self.advance_to(1)
        self.register(self.connect(PEER_B), b"REGISTER 9001")
        reply = self.connect().request(b"PEERS")
        self.assertEqual(
            reply,
            [
                b"OK 2",
                b"PEER %s 10.0.0.5 9000 age=1 name=alpha"
                % (wire.peer_id_for("10.0.0.5", 9000).encode(),),
                b"PEER %s 10.0.0.6 9001 age=0"
                % (wire.peer_id_for("10.0.0.6", 9001).encode(),),
            ],
        )

    def test_ages(self) -> None:
        """Ages are whole seconds since the last renewal."""
        connection = self.connect()
        self.register(connection, b"REGISTER 9000")
        self.advance_to(7.5)
        self.assertEqual([entry.age for entry in self.peers()], [7])
        self.register(connection, b"REGISTER 9000")
        self.advance_to(9.9)
        self.assertEqual([entry.age for entry in self.peers()], [2])
        self.advance_to(TTL + 7.4)
        self.assertEqual([entry.age for entry in self.peers()], [59])

    def test_expired_missing(self) -> None:
        """A lease is listed up to ttl - 0.1 and missing from ttl on."""
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        self.advance_to(30)
        self.register(self.connect(PEER_B), b"REGISTER 9000")
        self.advance_to(TTL - 0.1)
        self.assertEqual(len(self.peers()), 2)
        self.advance_to(TTL)
        self.assertEqual([e.host for e in self.peers()], ["10.0.0.6"])
        self.advance_to(30 + TTL)
        self.assertEqual(self.peers(), [])

    def test_reply_bounded(self) -> None:
        """At most MAX_PEERS_PER_REPLY peers are listed, however many exist."""
        for port in range(1, MAX_PEERS_PER_REPLY + 6):
            self.registry.register("10.0.0.9", port, None, START)
        reply = self.connect().request(b"PEERS")
        self.assertEqual(reply[0], b"OK %d" % (MAX_PEERS_PER_REPLY,))
        self.assertEqual(len(reply), MAX_PEERS_PER_REPLY + 1)

    def test_token_accepted(self) -> None:
        """A token is accepted (and, with no auth configured, ignored)."""
        self.assertEqual(self.connect().request(b"PEERS token=abc"), [b"OK 0"])


class ErrorTests(RelayTestCase):
    """Every refusal is one ``ERR <code> <message>`` line; the link survives."""

    def assertRefusedThenUsable(self, line: bytes, code: Code) -> None:
        """``line`` gets an ERR ``code``; the next request is still served."""
        connection = self.connect()
        message = self.assertError(connection.request(line), code)
        self.assertTrue(message, line)
        self.assertTrue(connection.open, line)
        self.assertEqual(connection.request(b"PEERS")[0][:3], b"OK ", line)

    def test_bad_request(self) -> None:
        """Malformed requests, bad bytes and control characters are a 400."""
        for line in [
            b"REGISTER",
            b"REGISTER 70000",
            b"REGISTER 9000 colour=red",
            b"UNREGISTER",
            b"PEERS now",
            b"PEERS token=",
            b" PEERS",
            b"PEERS\xff",
            b"\xc3\x28",
            b"PEERS\x00",
            b"PEERS\x1b[2J",
            b"PEERS\x7f",
            b"PEERS\xc2\x85",
        ]:
            self.assertRefusedThenUsable(line, Code.BAD_REQUEST)

    def test_forbidden(self) -> None:
        """A claimed host is a 403."""
        self.assertRefusedThenUsable(b"REGISTER 9000 host=192.0.2.1", Code.FORBIDDEN)

    def test_not_found(self) -> None:
        """Unregistering nothing is a 404."""
        self.assertRefusedThenUsable(b"UNREGISTER 9000", Code.NOT_FOUND)

    def test_unknown_command(self) -> None:
        """Unknown verbs, including a peer's, are a 501."""
        for line in [b"HELLO", b"GET file.txt", b"LIST", b"X" * 1000]:
            self.assertRefusedThenUsable(line, Code.UNKNOWN_COMMAND)

    def test_non_ip_connection(self) -> None:
        """A connection without an IP source is refused with a 400."""
        connection = self.connect(UNIXAddress(b"/tmp/relay.sock"))
        self.assertError(connection.request(b"REGISTER 9000"), Code.BAD_REQUEST)
        self.assertTrue(connection.open)
        self.assertEqual(len(self.registry), 0)


class FullRegistryTests(RelayTestCase):
    """429 when a registry limit is reached; nobody is evicted."""

    max_peers = 2
    max_per_host = 1

    def test_max_per_host(self) -> None:
        """A second port from one host is a 429; the first lease stays."""
        connection = self.connect()
        self.register(connection, b"REGISTER 9000")
        message = self.assertError(connection.request(b"REGISTER 9001"), Code.TOO_MANY)
        self.assertIn("per address", message)
        self.assertTrue(connection.open)
        self.assertEqual([e.port for e in self.peers()], [9000])

    def test_max_peers(self) -> None:
        """A newcomer to a full relay is a 429; current peers stay."""
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        self.register(self.connect(PEER_B), b"REGISTER 9000")
        connection = self.connect(IPv4Address("TCP", "10.0.0.7", 1))
        message = self.assertError(connection.request(b"REGISTER 9000"), Code.TOO_MANY)
        self.assertIn("maximum", message)
        self.assertEqual(len(self.peers()), 2)

    def test_renewal_when_full(self) -> None:
        """Peers already registered can renew when the relay is full."""
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        self.register(self.connect(PEER_B), b"REGISTER 9000")
        self.advance_to(40)
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        self.advance_to(TTL + 1)
        self.assertEqual([e.host for e in self.peers()], ["10.0.0.5"])

    def test_expired_leases_make_room(self) -> None:
        """
        Leases whose time is up free their place at once, even if no sweep
        has run since: a dead peer must not keep a live one out.
        """
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        self.register(self.connect(PEER_B), b"REGISTER 9000")
        self.advance_to(TTL)
        newcomer = self.connect(IPv4Address("TCP", "10.0.0.7", 1))
        self.register(newcomer, b"REGISTER 9000")
        self.assertEqual([e.host for e in self.peers()], ["10.0.0.7"])


class FloodTests(RelayTestCase):
    """
    Thousands of registrations from one address, each on its own
    connection (so the error budget does not cut them short): 429 past the
    per-address limit, and nobody else is evicted or kept out.
    """

    max_peers = 300
    max_per_host = 100

    def register_from(self, host: str, port: int) -> list[bytes]:
        """One REGISTER on a fresh connection from ``host``, closed after."""
        connection = self.connect(IPv4Address("TCP", host, 40000))
        reply = connection.request(b"REGISTER %d" % (port,))
        connection.lose()
        return reply

    def test_flood_from_one_address(self) -> None:
        """
        3000 ports from one address: the first 100 are registered, the rest
        refused with 429; the victim is not evicted and can renew, and a
        newcomer from another address still gets in.
        """
        victim = self.register(self.connect(PEER_B), b"REGISTER 9000")
        accepted = refused = 0
        for port in range(1, 3001):
            reply = self.register_from("10.6.6.6", port)
            self.assertEqual(len(reply), 1, reply)
            if reply[0].startswith(b"OK "):
                accepted += 1
            else:
                self.assertError(reply, Code.TOO_MANY)
                refused += 1
        self.assertEqual((accepted, refused), (100, 2900))
        message = self.assertError(self.register_from("10.6.6.6", 9999), Code.TOO_MANY)
        self.assertIn("per address", message)
        # The victim is still listed and can renew; a newcomer still fits.
        self.assertIn(victim.peer_id, {entry.peer_id for entry in self.peers()})
        self.assertEqual(self.register(self.connect(PEER_B), b"REGISTER 9000"), victim)
        self.assertTrue(self.register_from("10.0.0.7", 9000)[0].startswith(b"OK "))
        self.assertEqual(len(self.registry), 102)
        # Every flood connection was released again.
        self.assertEqual(self.factory.limits.open_from("10.6.6.6"), 0)

    def test_total_limit(self) -> None:
        """
        Several flooding addresses fill the table to max_peers and no
        further: then every newcomer gets 429, the peers in it stay.
        """
        victim = self.register(self.connect(PEER_B), b"REGISTER 9000")
        for host in ("10.6.6.1", "10.6.6.2", "10.6.6.3", "10.6.6.4"):
            for port in range(1, 201):
                self.register_from(host, port)
        self.assertEqual(len(self.registry), self.max_peers)
        message = self.assertError(self.register_from("10.0.0.7", 1), Code.TOO_MANY)
        self.assertIn("maximum of 300 peers", message)
        self.assertEqual(self.register(self.connect(PEER_B), b"REGISTER 9000"), victim)
        listed = self.connect(PEER_B).request(b"PEERS")
        self.assertEqual(listed[0], b"OK 300")


class LineLengthTests(RelayTestCase):
    """Over-long lines: ERR 413, then the relay hangs up."""

    def test_long_line(self) -> None:
        """
        A complete line over MAX_LINE_LENGTH gets 413 and a disconnect; the
        request after it in the same segment is not answered.
        """
        connection = self.connect()
        reply = connection.send(b"X" * (wire.MAX_LINE_LENGTH + 1) + b"\nPEERS\n")
        self.assertError(reply, Code.LINE_TOO_LONG)
        self.assertFalse(connection.open)

    def test_long_line_crlf(self) -> None:
        """
        MAX_LINE_LENGTH + 1 bytes before CRLF is too long as well, although
        LineReceiver (which counts the CR) lets it through to decode_line.
        """
        connection = self.connect()
        reply = connection.send(b"X" * (wire.MAX_LINE_LENGTH + 1) + b"\r\nPEERS\n")
        self.assertError(reply, Code.LINE_TOO_LONG)
        self.assertFalse(connection.open)

    def test_long_valid_request(self) -> None:
        """An over-long line is refused even if it starts as a valid request."""
        connection = self.connect()
        line = b"PEERS " + b" " * wire.MAX_LINE_LENGTH
        self.assertError(connection.request(line), Code.LINE_TOO_LONG)
        self.assertFalse(connection.open)

    def test_long_partial_line(self) -> None:
        """Buffering stops as soon as an unfinished line is too long."""
        connection = self.connect()
        self.assertEqual(connection.send(b"X" * (wire.MAX_LINE_LENGTH + 1)), [])
        self.assertTrue(connection.open)
        self.assertError(connection.send(b"XX"), Code.LINE_TOO_LONG)
        self.assertFalse(connection.open)

    def test_longest_line_accepted(self) -> None:
        """A line of exactly MAX_LINE_LENGTH bytes is read (and answered)."""
        connection = self.connect()
        reply = connection.request(b"X" * wire.MAX_LINE_LENGTH)
        self.assertError(reply, Code.UNKNOWN_COMMAND)
        self.assertTrue(connection.open)

    def test_longest_line_crlf_accepted(self) -> None:
        """
        Exactly MAX_LINE_LENGTH bytes plus CRLF (nc -C, telnet) is a legal
        line too: the CR is not part of it.
        """
        connection = self.connect()
        line = b"PEERS" + b" " * (wire.MAX_LINE_LENGTH - len(b"PEERS"))
        self.assertEqual(len(line), wire.MAX_LINE_LENGTH)
        self.assertEqual(connection.send(line + b"\r\n"), [b"OK 0"])
        reply = connection.send(b"X" * wire.MAX_LINE_LENGTH + b"\r\n")
        self.assertError(reply, Code.UNKNOWN_COMMAND)
        self.assertTrue(connection.open)

    def test_no_timer_left(self) -> None:
        """Once the hung-up connection is gone, no timer is pending."""
        connection = self.connect()
        connection.send(b"X" * (wire.MAX_LINE_LENGTH + 2))
        connection.lose()
        self.assertFalse(self.clock.getDelayedCalls())


class TimeoutTests(RelayTestCase):
    """The idle timeout, driven by the clock."""

    def assertTimedOut(self, connection: Connection, started: float) -> None:
        """
        ``connection`` is still open at ``started + IDLE - 0.1``, then gets
        ERR 408 and is closed; once lost, no timer is left.
        """
        self.clock.advance(started + IDLE - 0.1 - self.clock.seconds())
        self.assertTrue(connection.open)
        self.assertEqual(connection.output(), [])
        self.clock.advance(0.1)
        self.assertError(connection.output(), Code.TIMEOUT)
        self.assertFalse(connection.open)
        connection.lose()
        self.assertFalse(self.clock.getDelayedCalls())

    def test_idle_timeout(self) -> None:
        """Open at IDLE - 0.1; at IDLE an ERR 408 and a disconnect."""
        self.assertTimedOut(self.connect(), self.clock.seconds())

    def test_request_resets_timeout(self) -> None:
        """Each request line restarts the idle period."""
        connection = self.connect()
        self.clock.advance(IDLE - 1)
        connection.request(b"PEERS")
        self.assertTimedOut(connection, self.clock.seconds())

    def test_refused_request_resets_timeout(self) -> None:
        """A complete line that is refused is still a request: it counts."""
        connection = self.connect()
        self.clock.advance(IDLE - 1)
        self.assertError(connection.request(b"HELLO"), Code.UNKNOWN_COMMAND)
        self.assertTimedOut(connection, self.clock.seconds())

    def test_trickled_bytes_do_not_reset(self) -> None:
        """A client trickling a line byte by byte is still cut off."""
        connection = self.connect()
        for byte in b"PEERS":
            connection.send(bytes([byte]))
            self.clock.advance(IDLE / 6)
        self.assertTrue(connection.open)
        self.clock.advance(IDLE / 6)
        self.assertError(connection.output(), Code.TIMEOUT)
        self.assertFalse(connection.open)

    def test_slowloris(self) -> None:
        """
        One byte a second, never a line end: cut off IDLE seconds after the
        connection was made, however long the trickle goes on.
        """
        connection = self.connect()
        started = self.clock.seconds()
        for _ in range(int(IDLE) - 1):
            self.clock.advance(1)
            self.assertEqual(connection.send(b"P"), [])
        self.assertTimedOut(connection, started)

    def test_bare_newlines_do_not_reset(self) -> None:
        """
        Blank lines (LF, CRLF, spaces) every second are not requests: they
        get no reply and do not keep the connection alive.
        """
        connection = self.connect()
        started = self.clock.seconds()
        for index in range(int(IDLE) - 1):
            self.clock.advance(1)
            blank = [b"\n", b"\r\n", b" \t \n"][index % 3]
            self.assertEqual(connection.send(blank), [])
        self.assertTimedOut(connection, started)

    def test_bare_newlines_after_request(self) -> None:
        """Blank lines after a request do not extend its idle period either."""
        connection = self.connect()
        self.clock.advance(5)
        connection.request(b"PEERS")
        started = self.clock.seconds()
        for _ in range(int(IDLE) - 1):
            self.clock.advance(1)
            connection.send(b"\n")
        self.assertTimedOut(connection, started)

    def test_no_reply_after_timeout(self) -> None:
        """A request arriving after the 408 (the close is under way) is ignored."""
        connection = self.connect()
        self.clock.advance(IDLE)
        self.assertError(connection.output(), Code.TIMEOUT)
        self.assertEqual(connection.send(b"REGISTER 9000\n"), [])
        self.assertEqual(len(self.registry), 0)

    def test_lost_before_timeout(self) -> None:
        """Closing the connection cancels the timer; nothing fires later."""
        connection = self.connect()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        connection.request(b"PEERS")
        connection.lose()
        self.assertFalse(self.clock.getDelayedCalls())
        self.clock.advance(10 * IDLE)
        # No ERR 408 and no close request: the cancelled timer never fired.
        self.assertEqual(connection.output(), [])
        self.assertFalse(connection.transport.disconnecting)

    def test_each_connection_has_its_own_timer(self) -> None:
        """A busy connection does not keep an idle one alive."""
        idle = self.connect(PEER_A)
        busy = self.connect(PEER_B)
        for _ in range(4):
            self.clock.advance(IDLE / 4)
            busy.request(b"PEERS")
        self.assertFalse(idle.open)
        self.assertTrue(busy.open)
        idle.lose()
        busy.lose()
        self.assertFalse(self.clock.getDelayedCalls())


class ErrorBudgetTests(RelayTestCase):
    """After MAX_ERRORS_PER_CONNECTION error replies, ERR 429 and a close."""

    def test_budget(self) -> None:
        """
        Nine refusals leave the connection usable; the tenth error reply is
        followed by ``ERR 429 too many errors`` and a close.
        """
        connection = self.connect()
        for _ in range(MAX_ERRORS_PER_CONNECTION - 1):
            self.assertError(connection.request(b"HELLO"), Code.UNKNOWN_COMMAND)
        self.assertTrue(connection.open)
        reply = connection.request(b"REGISTER 0")
        self.assertEqual(len(reply), 2, reply)
        self.assertError(reply[:1], Code.BAD_REQUEST)
        self.assertEqual(reply[1], b"ERR 429 too many errors")
        self.assertFalse(connection.open)
        connection.lose()
        self.assertFalse(self.clock.getDelayedCalls())

    def test_pipelined_errors_stop(self) -> None:
        """
        A thousand bad lines in one segment get exactly ten error replies
        and the 429; the requests after them are not even parsed.
        """
        connection = self.connect()
        reply = connection.send(b"HELLO\n" * 1000 + b"REGISTER 9000\n")
        self.assertEqual(len(reply), MAX_ERRORS_PER_CONNECTION + 1)
        self.assertEqual(reply[-1], b"ERR 429 too many errors")
        self.assertFalse(connection.open)
        self.assertEqual(len(self.registry), 0)

    def test_every_kind_of_error_counts(self) -> None:
        """400, 403, 404 and 501 replies all count; successes do not."""
        connection = self.connect()
        lines = [
            b"REGISTER",
            b"REGISTER 9000 host=192.0.2.1",
            b"UNREGISTER 9000",
            b"HELLO",
            b"PEERS\xff",
        ] * 2
        for index, line in enumerate(lines[:-1]):
            connection.request(line)
            self.assertEqual(connection.request(b"PEERS"), [b"OK 0"])
            self.assertTrue(connection.open, index)
        self.assertEqual(connection.request(lines[-1])[-1], b"ERR 429 too many errors")
        self.assertFalse(connection.open)

    def test_per_connection(self) -> None:
        """The budget is per connection: another one starts afresh."""
        first = self.connect()
        first.send(b"HELLO\n" * MAX_ERRORS_PER_CONNECTION)
        self.assertFalse(first.open)
        second = self.connect()
        self.assertError(second.request(b"HELLO"), Code.UNKNOWN_COMMAND)
        self.assertTrue(second.open)

    def test_refused_registrations_count(self) -> None:
        """
        A flood of REGISTERs refused by the table limits cannot go on over
        one connection either.
        """
        self.registry.max_per_host = 1
        connection = self.connect()
        self.register(connection, b"REGISTER 1")
        reply = connection.send(
            b"".join(b"REGISTER %d\n" % port for port in range(2, 5000))
        )
        self.assertEqual(len(reply), MAX_ERRORS_PER_CONNECTION + 1)
        self.assertEqual(reply[-1], b"ERR 429 too many errors")
        self.assertEqual([e.port for e in self.peers()], [1])


class NoTimeoutTests(RelayTestCase):
    """idle_timeout=None disables the timer entirely."""

    idle_timeout = None

    def test_no_timer(self) -> None:
        """No delayed call is ever scheduled, and the link stays open."""
        connection = self.connect()
        self.assertFalse(self.clock.getDelayedCalls())
        self.clock.advance(10 * IDLE)
        self.assertTrue(connection.open)
        connection.lose()
        self.assertFalse(self.clock.getDelayedCalls())


class LoggingTests(RelayTestCase):
    """Structured log events for registration, renewal, expiry and queries."""

    max_peers = 1

    def setUp(self) -> None:
        super().setUp()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def relay_events(self, **fields) -> list[dict]:
        """Events from the Relay policy object whose fields match ``fields``."""
        return [
            event
            for event in self.events
            if event.get("log_namespace") == "p2p.relay.Relay"
            and all(event.get(key) == value for key, value in fields.items())
        ]

    def test_registered(self) -> None:
        """A new lease logs an info "registered" event with its id and name."""
        self.register(self.connect(), b"REGISTER 9000 name=box")
        [event] = self.relay_events(event="registered")
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["peer_id"], wire.peer_id_for("10.0.0.5", 9000))
        self.assertEqual(event["name"], "box")
        self.assertEqual(event["address"], "10.0.0.5:9000")
        self.assertIs(event["log_source"], self.relay)

    def test_renewed(self) -> None:
        """A renewal logs no event of its own (and no second "registered"):
        it is counted for the activity report."""
        connection = self.connect()
        self.register(connection, b"REGISTER 9000")
        self.advance_to(20)
        before = len(self.events)
        self.register(connection, b"REGISTER 9000")
        self.assertEqual(len(self.events), before)
        self.assertEqual(len(self.relay_events(event="registered")), 1)
        self.assertEqual(
            (self.relay.activity.registered, self.relay.activity.renewed), (1, 1)
        )

    def test_renewed_at_same_instant(self) -> None:
        """A renewal is a renewal even when the clock has not moved."""
        connection = self.connect()
        self.register(connection, b"REGISTER 9000")
        self.register(connection, b"REGISTER 9000")
        self.assertEqual(len(self.relay_events(event="registered")), 1)
        self.assertEqual(self.relay.activity.renewed, 1)

    def test_expired(self) -> None:
        """A sweep after ttl logs one "expired" event per lease, once."""
        self.register(self.connect(), b"REGISTER 9000")
        self.advance_to(TTL - 0.1)
        self.relay.expire()
        self.assertEqual(self.expired_events(), [])
        self.advance_to(TTL)
        self.relay.expire()
        self.relay.expire()
        [event] = self.expired_events()
        self.assertEqual(event["peer_id"], wire.peer_id_for("10.0.0.5", 9000))
        self.assertEqual(event["log_level"], LogLevel.info)

    def test_expired_by_query(self) -> None:
        """Leases found expired while answering PEERS are logged too."""
        self.register(self.connect(), b"REGISTER 9000")
        self.advance_to(TTL)
        self.peers()
        self.assertEqual(len(self.expired_events()), 1)

    def expired_events(self) -> list[dict]:
        """The "expired" events logged so far."""
        return self.relay_events_where(lambda f: f.endswith("expired at {address}"))

    def activity_events(self) -> list[dict]:
        """The activity reports logged so far."""
        return self.relay_events_where(lambda f: f.startswith("activity:"))

    def relay_events_where(self, test) -> list[dict]:
        """The relay's events whose format passes C{test}."""
        return [event for event in self.relay_events() if test(event["log_format"])]

    def test_query(self) -> None:
        """PEERS logs nothing per request; it is counted (hint= apart)."""
        self.register(self.connect(), b"REGISTER 9000")
        before = len(self.events)
        self.peers()
        self.connect(PEER_B).request(b"PEERS hint=0123456789abcdef")
        self.assertEqual(len(self.events), before)
        self.assertEqual(
            (self.relay.activity.lists, self.relay.activity.hinted), (1, 1)
        )

    def test_activity_report(self) -> None:
        """
        report_activity logs one info event with every count since the last
        report and the peers active, then counts afresh.
        """
        connection = self.connect()
        self.register(connection, b"REGISTER 9000")
        self.register(connection, b"REGISTER 9000")
        self.peers()
        connection.request(b"UNREGISTER 9000")
        self.register(connection, b"REGISTER 9001")
        self.relay.report_activity()
        [event] = self.activity_events()
        self.assertEqual(event["log_level"], LogLevel.info)
        counts = {name: event[name] for name in Activity.__slots__ + ("active",)}
        self.assertEqual(
            counts,
            {
                "registered": 2,
                "renewed": 1,
                "unregistered": 1,
                "expired": 0,
                "verified": 0,
                "lists": 1,
                "hinted": 0,
                "active": 1,
            },
        )
        self.assertIn("2 new peers, 1 renewals", formatEvent(event))
        self.assertFalse(self.relay.activity)

    def test_activity_report_counts_expiry(self) -> None:
        """Leases that expired since the last report are in it (the report
        sweeps first)."""
        self.register(self.connect(), b"REGISTER 9000")
        self.relay.report_activity()
        self.advance_to(TTL)
        self.relay.report_activity()
        [_, event] = self.activity_events()
        self.assertEqual(
            (event["expired"], event["registered"], event["active"]), (1, 0, 0)
        )

    def test_quiet_relay_reports_nothing(self) -> None:
        """No activity since the last report: no event."""
        self.relay.report_activity()
        self.register(self.connect(), b"REGISTER 9000")
        self.relay.report_activity()
        self.relay.report_activity()
        self.assertEqual(len(self.activity_events()), 1)

    def test_unregistered(self) -> None:
        """UNREGISTER logs the ended lease."""
        connection = self.connect()
        self.register(connection, b"REGISTER 9000")
        connection.request(b"UNREGISTER 9000")
        [event] = [
            event
            for event in self.relay_events()
            if "unregistered" in event["log_format"]
        ]
        self.assertEqual(event["peer_id"], wire.peer_id_for("10.0.0.5", 9000))

    def test_refused_registration(self) -> None:
        """A 429 logs a warning with the reason."""
        self.register(self.connect(PEER_A), b"REGISTER 9000")
        self.connect(PEER_B).request(b"REGISTER 9000")
        [event] = [
            event
            for event in self.relay_events()
            if event["log_level"] == LogLevel.warn
        ]
        self.assertIn("maximum", event["error"])

    def test_refused_request(self) -> None:
        """Any refused request logs a warning from the protocol."""
        self.connect().request(b"HELLO")
        [event] = [
            event
            for event in self.events
            if event.get("log_namespace") == "p2p.limits.RefusalLog"
        ]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn("501", event["error"])


@implementer(ISharedRegistry)
class HeldRegistry:
    """
    A shared registry whose answers wait until the test releases them: each
    call computes its result on a L{MemoryRegistry} at once and returns a
    Deferred that fires (in call order) on L{release}, or fails with
    L{RegistryUnavailable} on L{fail}.
    """

    def __init__(self, ttl: float, **limits: int) -> None:
        self.memory = MemoryRegistry(ttl, **limits)
        self.held: list[tuple[Deferred, object]] = []
        self.on_expired = None

    def _hold(self, compute) -> Deferred:
        try:
            result = compute()
        except RegistryFull as e:
            result = Failure(e)
        d: Deferred = Deferred()
        self.held.append((d, result))
        return d

    def release(self) -> None:
        d, result = self.held.pop(0)
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    def fail(self) -> None:
        d, _ = self.held.pop(0)
        d.errback(RegistryUnavailable("Redis does not answer"))

    def __len__(self) -> int:
        return len(self.memory)

    def report_expired_to(self, callback) -> None:
        self.on_expired = callback

    def find(self, host, port):
        return self.memory.find(host, port)

    def holds(self, host):
        return self.memory.holds(host)

    def holds_verified(self, host):
        return self.memory.holds_verified(host)

    def position(self, lease):
        return self.memory.position(lease)

    def register(self, host, port, name, now, files=None):
        def compute():
            held = len(self.memory)
            lease = self.memory.register(host, port, name, now, files)
            return _Created(lease, len(self.memory) > held)

        return self._hold(compute)

    def unregister(self, host, port):
        return self._hold(lambda: self.memory.unregister(host, port))

    def mark_verified(self, host, port):
        return self._hold(lambda: self.memory.mark_verified(host, port))

    def expire(self, now):
        def compute():
            expired = self.memory.expire(now)
            if expired and self.on_expired is not None:
                self.on_expired(expired)
            return expired

        return self._hold(compute)

    def page(self, now, after, limit, files=False):
        return self._hold(lambda: self.memory.page(now, after, limit))

    def active(self, now, limit):
        return self._hold(lambda: self.memory.active(now, limit))

    def likely_holders(self, now, hint, limit, scan):
        return self._hold(lambda: self.memory.likely_holders(now, hint, limit, scan))


class _Created:
    """A lease plus whether the call created it (as the Redis registry's)."""

    def __init__(self, lease, created: bool) -> None:
        self._lease = lease
        self.created = created

    def __getattr__(self, name: str):
        return getattr(self._lease, name)


class SharedRegistryTests(RelayTestCase):
    """A relay on a registry that answers later (Redis): replies in request
    order, charged as before, ERR 503 when the store does not answer."""

    def setUp(self) -> None:
        super().setUp()
        self.registry = HeldRegistry(TTL)
        self.relay = Relay(self.registry, self.clock, ttl=TTL)
        self.factory = RelayFactory(
            self.relay, IDLE, policy=ConnectionPolicy(self.clock, None)
        )

    def test_pipelined_replies_in_order(self) -> None:
        """Two requests in one segment: the second is read only once the
        first is answered, so the answers come in request order."""
        connection = self.connect()
        self.assertEqual(connection.send(b"REGISTER 9000 name=a\nPEERS\n"), [])
        self.assertEqual(len(self.registry.held), 1)
        self.registry.release()
        registered = wire.Registered.from_line(connection.output()[0])
        self.assertEqual(registered.peer_id, wire.peer_id_for("10.0.0.5", 9000))
        self.assertEqual(len(self.registry.held), 1)  # now the PEERS
        self.registry.release()
        reply = connection.output()
        self.assertEqual(reply[0], b"OK 1")
        self.assertIn(b"name=a", reply[1])
        self.assertEqual(self.relay.activity.registered, 1)
        self.assertEqual(self.relay.activity.lists, 1)

    def test_renewal_and_unregister(self) -> None:
        connection = self.connect()
        connection.send(b"REGISTER 9000\n")
        self.registry.release()
        connection.send(b"REGISTER 9000\n")
        self.registry.release()
        self.assertEqual(self.relay.activity.renewed, 1)
        connection.send(b"UNREGISTER 9000\n")
        self.registry.release()
        self.assertEqual(
            connection.output(), [f"OK {wire.peer_id_for('10.0.0.5', 9000)}".encode()]
        )
        connection.send(b"UNREGISTER 9000\n")
        self.registry.release()
        self.assertError(connection.output(), Code.NOT_FOUND)

    def test_full(self) -> None:
        """A cap refusal from the store is ERR 429 and logged, as in memory."""
        self.registry.memory.max_peers = 1
        connection = self.connect()
        connection.send(b"REGISTER 9000\n")
        self.registry.release()
        connection.send(b"REGISTER 9001\n")
        self.registry.release()
        self.assertIn("maximum of 1 peers", self.assertError(connection.output(), 429))

    def test_unavailable(self) -> None:
        """A store that does not answer: ERR 503 registry unavailable, not
        logged per request (the registry logs the outage), and the
        connection goes on."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connection = self.connect()
        connection.send(b"PEERS\nREGISTER 9000\n")
        self.registry.fail()
        self.assertEqual(connection.output(), [b"ERR 503 registry unavailable"])
        self.registry.fail()
        self.assertError(connection.output(), Code.UNAVAILABLE)
        self.assertTrue(connection.open)
        self.assertEqual([e for e in logged if "refused" in e["log_format"]], [])
        connection.send(b"PEERS\n")
        self.registry.release()
        self.assertTrue(connection.output()[0].startswith(b"OK "))

    def test_lost_while_waiting(self) -> None:
        """The client went away before the answer: nothing is written, no
        error."""
        connection = self.connect()
        connection.send(b"PEERS\nPEERS\n")
        connection.lose()
        self.registry.release()
        self.assertEqual(connection.output(), [])
        self.assertEqual(self.registry.held, [])

    def test_half_close_waits_for_the_answer(self) -> None:
        """A client that half-closes after its request still gets the
        answer, then the connection closes."""
        connection = self.connect()
        connection.send(b"PEERS\n")
        self.assertIsNotNone(IHalfCloseableProtocol(connection.protocol, None))
        connection.protocol.readConnectionLost()
        self.assertTrue(connection.open)
        self.registry.release()
        self.assertEqual(connection.output(), [b"OK 0"])
        self.assertFalse(connection.open)

    def test_expired_leases_are_logged(self) -> None:
        """Leases the store's sweep ended are counted and logged by the
        relay that swept them."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connection = self.connect()
        connection.send(b"REGISTER 9000\n")
        self.registry.release()
        self.advance_to(TTL + 1)
        self.relay.expire()
        self.registry.release()
        self.assertEqual(self.relay.activity.expired, 1)
        self.assertEqual(
            [formatEvent(e) for e in logged if "expired at" in e["log_format"]],
            [f"peer {wire.peer_id_for('10.0.0.5', 9000)} expired at 10.0.0.5:9000"],
        )

    def test_background_calls_survive_an_outage(self) -> None:
        """A sweep or a dial-back answer meeting an unavailable store ends
        quietly (no unhandled error)."""
        d = self.relay.expire()
        self.registry.fail()
        self.assertIsNone(self.successResultOf(d))
        self.relay.answered("10.0.0.5", 9000)
        self.registry.fail()
        self.assertEqual(self.relay.activity.verified, 0)


class LongReplyTests(RelayTestCase):
    """
    A reply longer than the socket buffers (``PEERS files=1``: 1,008 peers
    with their name filters, 564 KB) goes out as the client reads it, and a
    client that stops reading is cut off at the idle timeout.  Handed to
    the transport whole, it was copied into every connection that asked
    and never read (2,000 took the relay from 48 to 939 MiB), for ever.
    """

    def setUp(self) -> None:
        super().setUp()
        for n in range(1008):
            host = f"10.1.{n // 63}.{n % 63 + 1}"
            files = bytes((n * 7 + i) % 256 for i in range(256))
            self.registry.register(host, 20000 + n, None, self.clock.seconds(), files)
        self.expected = b"".join(
            line + b"\n" for line in self.relay.peers(wire.Peers(files=True))
        )
        self.assertGreater(len(self.expected), 500_000)

    def test_reply_nobody_reads(self) -> None:
        """The transport holds one chunk, not the reply; a client that takes
        nothing more is aborted at the idle timeout, without an ERR line
        inside the reply."""
        connection = self.connect()
        transport = connection.transport
        connection.protocol.dataReceived(b"PEERS files=1\n")
        producer = transport.producer
        self.assertIsInstance(producer, LinesProducer)
        self.assertFalse(transport.streaming)
        producer.resumeProducing()  # what TCP does when it registers one
        held = transport.value()
        self.assertLess(len(held), REPLY_CHUNK_BYTES + 1024)
        self.assertTrue(self.expected.startswith(held))
        self.clock.advance(IDLE - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)  # aborted
        self.assertEqual(transport.value(), held)
        connection.lose()
        self.assertFalse(self.clock.getDelayedCalls())

    def test_reader_gets_every_line_then_the_next_answer(self) -> None:
        """Each chunk the client takes is progress; the reply is the same
        bytes as ever, and the request pipelined behind it is answered after
        it."""
        connection = self.connect()
        transport = connection.transport
        connection.protocol.dataReceived(b"PEERS files=1\nPEERS limit=1\n")
        for _ in range(2):  # longer apart than the idle timeout
            self.clock.advance(IDLE - 1)
            transport.producer.resumeProducing()
        while isinstance(transport.producer, LinesProducer):
            transport.producer.resumeProducing()
        self.assertFalse(transport.disconnecting)
        data = transport.value()
        self.assertTrue(data.startswith(self.expected))
        self.assertTrue(data[len(self.expected) :].startswith(b"OK 1 next="))

    def test_filter_lines_are_shared(self) -> None:
        """Two replies in the same second hold the same line objects, so a
        slow reader keeps no copy of its own."""
        first = self.relay.peers(wire.Peers(files=True))
        second = self.relay.peers(wire.Peers(files=True))
        self.assertTrue(all(a is b for a, b in zip(first[1:], second[1:], strict=True)))
