"""
Tests for L{p2p.limits}: connection limits, wired into both servers.

The counters are tested on their own, then one suite runs against the
relay's and the peer's factory (a mixin per server, as transit-relay runs
one suite over several transports): connections are StringTransports whose
peer address plays the source, and closing one is delivered by hand.
"""

from __future__ import annotations

import tempfile

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.limits import (
    CLOSE_GRACE_SECONDS,
    DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_HOST,
    REFUSAL_LOG_PERIOD_SECONDS,
    REFUSALS_LOGGED_PER_PERIOD,
    ConnectionLimits,
    ConnectionPolicy,
    IdleTimeouts,
    ReadGate,
    RefusingProtocol,
    ServerLineProtocol,
    source_host,
)
from p2p.peer import PeerFactory, PeerProtocol
from p2p.registry import MemoryRegistry
from p2p.relay import Relay, RelayFactory, RelayProtocol
from p2p.share import ShareFolder

from ._indexed import peer_factory

HOST_A = "10.0.0.5"
HOST_B = "10.0.0.6"


def address(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class ConnectionLimitsTests(SynchronousTestCase):
    """The counters on their own."""

    def test_defaults(self) -> None:
        """10,000 connections in total, 32 per source and 256 per network,
        no reserve, unless told otherwise."""
        limits = ConnectionLimits()
        self.assertEqual(
            (limits.max_total, limits.max_per_host, limits.max_per_network),
            (10_000, 32, 256),
        )
        self.assertEqual(limits.reserve, 0)
        self.assertEqual(
            (DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_HOST),
            (10_000, 32),
        )

    def test_per_host(self) -> None:
        """The N+1th connection from one host is refused; others are not."""
        limits = ConnectionLimits(max_total=10, max_per_host=2)
        self.assertIsNone(limits.admit(HOST_A))
        self.assertIsNone(limits.admit(HOST_A))
        self.assertEqual(
            limits.admit(HOST_A), "too many connections from your address (limit 2)"
        )
        self.assertIsNone(limits.admit(HOST_B))
        self.assertEqual((limits.total, limits.open_from(HOST_A)), (3, 2))

    def test_total(self) -> None:
        """The total limit refuses every host once reached."""
        limits = ConnectionLimits(max_total=2, max_per_host=5)
        limits.admit(HOST_A)
        limits.admit(HOST_B)
        self.assertEqual(limits.admit("10.0.0.7"), "too many connections (limit 2)")
        self.assertEqual(limits.total, 2)

    def test_release(self) -> None:
        """Releasing frees the place, and forgets a host with none left."""
        limits = ConnectionLimits(max_total=1, max_per_host=1)
        limits.admit(HOST_A)
        self.assertIsNotNone(limits.admit(HOST_A))
        limits.release(HOST_A)
        self.assertEqual((limits.total, limits.open_from(HOST_A)), (0, 0))
        self.assertIsNone(limits.admit(HOST_B))

    def test_per_network(self) -> None:
        """Addresses of one /24 share its limit; another /24 is untouched."""
        limits = ConnectionLimits(max_total=100, max_per_host=5, max_per_network=4)
        for n in range(4):
            self.assertIsNone(limits.admit(f"127.1.0.{n + 1}"))
        self.assertEqual(
            limits.admit("127.1.0.99"),
            "too many connections from your network 127.1.0.0/24 (limit 4)",
        )
        self.assertIsNone(limits.admit("127.2.0.1"))
        self.assertEqual(limits.open_from_network("127.1.0.200"), 4)
        limits.release("127.1.0.1")
        self.assertIsNone(limits.admit("127.1.0.99"))

    def test_ipv6_source_is_its_64(self) -> None:
        """Every address of one IPv6 /64 counts as one source."""
        limits = ConnectionLimits(max_total=100, max_per_host=2, max_per_network=0)
        self.assertIsNone(limits.admit("2001:db8::1"))
        self.assertIsNone(limits.admit("2001:db8::2"))
        self.assertEqual(
            limits.admit("2001:db8::3"),
            "too many connections from your address (limit 2)",
        )
        self.assertIsNone(limits.admit("2001:db8:0:1::1"))
        self.assertEqual(limits.open_from("2001:db8::ffff"), 2)

    def test_reserve_for_members(self) -> None:
        """
        The last places of the total are kept for members (the relay's
        registered peers): a flood fills the rest, a member still gets in.
        """
        members = {"10.9.9.9"}
        limits = ConnectionLimits(
            max_total=10,
            max_per_host=0,
            max_per_network=0,
            reserve=2,
            is_member=members.__contains__,
        )
        for n in range(8):
            self.assertIsNone(limits.admit(f"10.0.{n}.1"))
        refusal = limits.admit("10.0.99.1")
        self.assertIn("kept for verified peers", refusal)
        self.assertIsNone(limits.admit("10.9.9.9"))
        self.assertIsNone(limits.admit("10.9.9.9"))
        self.assertEqual(limits.admit("10.9.9.9"), "too many connections (limit 10)")

    def test_reserve_shared_among_members(self) -> None:
        """
        Into the reserve, a member's source may hold two connections and
        its network a sixteenth of the reserve: ten verified addresses with
        32 connections each once took a reserve of 200 whole (e2).
        """
        members = {f"10.{n // 8}.0.{n % 8}" for n in range(64)}
        limits = ConnectionLimits(
            max_total=1000,
            max_per_host=32,
            max_per_network=256,
            reserve=200,
            is_member=members.__contains__,
        )
        for n in range(800):
            self.assertIsNone(limits.admit(f"10.{100 + n // 200}.{n % 200}.1"))
        tries = [member for member in sorted(members) for _ in range(32)]
        admitted = sum(limits.admit(member) is None for member in tries)
        # 8 networks of 8 members: 12 places per network, 2 per member.
        self.assertEqual(admitted, 8 * 12)
        self.assertEqual(limits.open_from("10.0.0.0"), 2)
        self.assertIn("2 each", limits.admit("10.0.0.0"))
        members.add("10.60.0.1")
        self.assertIsNone(limits.admit("10.60.0.1"))

    def test_default_reserve(self) -> None:
        """A tenth of the total is reserved when there are members."""
        limits = ConnectionLimits(max_total=1000, is_member=lambda host: False)
        self.assertEqual(limits.reserve, 100)
        self.assertEqual(ConnectionLimits(max_total=1000).reserve, 0)
        self.assertRaises(ValueError, ConnectionLimits, 10, reserve=11)

    def test_zero_means_unlimited(self) -> None:
        """0 disables a limit."""
        limits = ConnectionLimits(max_total=0, max_per_host=0, max_per_network=0)
        for _ in range(5000):
            self.assertIsNone(limits.admit(HOST_A))
        self.assertEqual(limits.total, 5000)

    def test_negative_refused(self) -> None:
        """A negative limit (which would refuse everyone) is a ValueError."""
        self.assertRaises(ValueError, ConnectionLimits, -1, 1)
        self.assertRaises(ValueError, ConnectionLimits, 1, -1)

    def test_source_host(self) -> None:
        """IP sources count by address (IPv4-mapped as IPv4); others as '?'."""
        self.assertEqual(source_host(address(HOST_A)), HOST_A)
        self.assertEqual(source_host(IPv6Address("TCP", "::ffff:10.0.0.5", 1)), HOST_A)
        self.assertEqual(source_host(UNIXAddress(b"/tmp/s")), "?")
        self.assertEqual(source_host(None), "?")

    def test_build_failure_releases(self) -> None:
        """A protocol that cannot be built does not keep its place."""
        limits = ConnectionLimits(max_total=1, max_per_host=1)

        def broken(host, release):
            raise RuntimeError("bug")

        self.assertRaises(
            RuntimeError, limits.protocol_for, address(HOST_A), "relay", broken
        )
        self.assertEqual(limits.total, 0)


class Idle:
    """A connection as IdleTimeouts sees it: records when it timed out."""

    def __init__(self, clock: Clock, fail: bool = False) -> None:
        self.clock = clock
        self.fail = fail
        self.timed_out_at: float | None = None

    def timeoutConnection(self) -> None:
        self.timed_out_at = self.clock.seconds()
        if self.fail:
            raise RuntimeError("bug")


class IdleTimeoutsTests(SynchronousTestCase):
    """Many connections' idle deadlines on one timer."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.timeouts = IdleTimeouts(self.clock, 30)

    def test_one_timer_for_many(self) -> None:
        """Ten connections, one timed call; each times out at its deadline."""
        connections = [Idle(self.clock) for _ in range(10)]
        for connection in connections:
            self.timeouts.restart(connection)
            self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.timeouts), 10)
        self.clock.pump([30 - 10] + [1] * 9)
        self.assertEqual(
            [c.timed_out_at for c in connections], [1030.0 + n for n in range(10)]
        )
        self.assertEqual(len(self.timeouts), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def at(self, moment: float) -> None:
        """Move the clock to C{moment}."""
        self.clock.advance(moment - self.clock.seconds())

    def test_restart_postpones(self) -> None:
        """A restarted connection times out a full period after the restart,
        not at its first deadline; the others keep theirs."""
        first, second = Idle(self.clock), Idle(self.clock)
        self.timeouts.restart(first)
        self.at(1005)
        self.timeouts.restart(second)
        self.at(1025)
        self.timeouts.restart(first)
        self.at(1030)  # first's old deadline
        self.assertEqual((first.timed_out_at, second.timed_out_at), (None, None))
        self.at(1035)
        self.assertEqual((first.timed_out_at, second.timed_out_at), (None, 1035.0))
        self.at(1054.5)
        self.assertIsNone(first.timed_out_at)
        self.at(1055)
        self.assertEqual(first.timed_out_at, 1055.0)

    def test_stopped_connection_never_times_out(self) -> None:
        """Stopping the first deadline leaves the next one exact."""
        first, second = Idle(self.clock), Idle(self.clock)
        self.timeouts.restart(first)
        self.clock.advance(3)
        self.timeouts.restart(second)
        self.timeouts.stop(first)
        self.clock.advance(27)  # first's old deadline: nothing due
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(3)
        self.assertEqual((first.timed_out_at, second.timed_out_at), (None, 1033.0))

    def test_stopping_the_last_cancels_the_timer(self) -> None:
        connection = Idle(self.clock)
        self.timeouts.restart(connection)
        self.timeouts.stop(connection)
        self.timeouts.stop(connection)  # twice is harmless
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.timeouts.restart(connection)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_failure_does_not_stop_the_others(self) -> None:
        """A connection whose timeout raises is logged; the rest time out."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        broken, fine = Idle(self.clock, fail=True), Idle(self.clock)
        self.timeouts.restart(broken)
        self.timeouts.restart(fine)
        self.clock.advance(30)
        self.assertEqual(fine.timed_out_at, 1030.0)
        [event] = [e for e in events if e.get("log_level") == LogLevel.critical]
        self.assertIsInstance(event["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)


class RefusingProtocolTests(SynchronousTestCase):
    """What a refused client sees."""

    def test_banner_error_close(self) -> None:
        """The banner, one ERR 503 line naming the limit, then a close."""
        protocol = RefusingProtocol("peer", "too many connections (limit 3)")
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(
            transport.value(),
            b"P2P/2 peer\nERR 503 too many connections (limit 3)\n",
        )
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"GET a.txt\n")
        self.assertEqual(transport.value().count(b"\n"), 2)


class FactoryLimitsMixin:
    """
    The limits as a client sees them, for one server's factory.  Subclasses
    give C{role}, the C{banner} its server greets with,
    C{make_factory(limits)} and a C{request} that server answers with an
    ``OK`` line.
    """

    role: str
    banner: bytes
    request: bytes

    def make_factory(self, limits: ConnectionLimits):
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.limits = ConnectionLimits(max_total=6, max_per_host=3)
        self.factory = self.make_factory(self.limits)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def connect(self, host: str, port: int = 40000):
        """Open a connection from C{host}; return (protocol, transport)."""
        peer = address(host, port)
        protocol = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def lose(self, protocol) -> None:
        protocol.connectionLost(Failure(ConnectionDone()))

    def assertServed(self, protocol, transport) -> None:
        """A connection that was greeted and answers a request."""
        self.assertNotIsInstance(protocol, RefusingProtocol)
        self.assertEqual(transport.value(), self.banner + b"\n")
        transport.clear()
        protocol.dataReceived(self.request + b"\n")
        self.assertTrue(transport.value().startswith(b"OK "), transport.value())
        self.assertFalse(transport.disconnecting)

    def assertRefused(self, protocol, transport, reason: str) -> None:
        """A connection that got the banner, ERR 503 <reason>, and a close."""
        self.assertIsInstance(protocol, RefusingProtocol)
        self.assertEqual(
            transport.value(),
            self.banner + f"\nERR 503 {reason}\n".encode(),
        )
        self.assertTrue(transport.disconnecting)

    def test_first_request_deadline(self) -> None:
        """
        A connection that sends no complete request within the first-request
        timeout gets ERR 408 and a close, long before the idle timeout.
        """
        protocol, transport = self.connect(HOST_A)
        transport.clear()
        protocol.dataReceived(b"PEE")  # trickled, never finished
        self.clock.advance(DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS)
        self.assertEqual(transport.value(), b"ERR 408 no request within 5 s\n")
        self.assertTrue(transport.disconnecting)

    def test_first_request_then_idle_timeout(self) -> None:
        """After the first request, the (longer) idle timeout applies."""
        protocol, transport = self.connect(HOST_A)
        self.clock.advance(DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS - 1)
        protocol.dataReceived(self.request + b"\n")
        transport.clear()
        self.clock.advance(DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS + 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(30)
        self.assertEqual(transport.value(), b"ERR 408 idle timeout\n")

    def test_request_count(self) -> None:
        """Past its request count a connection is refused (429) and closed."""
        self.factory.policy = ConnectionPolicy(self.clock, max_requests=2)
        protocol, transport = self.connect(HOST_A)
        protocol.dataReceived(self.request + b"\n" + self.request + b"\n")
        transport.clear()
        protocol.dataReceived(self.request + b"\n")
        self.assertEqual(
            transport.value(),
            b"ERR 429 2 requests on one connection; reconnect\n",
        )
        self.assertTrue(transport.disconnecting)

    def test_lifetime(self) -> None:
        """
        A connection kept open by a cheap request every few seconds is
        refused and closed at its first request past the lifetime.
        """
        self.factory.policy = ConnectionPolicy(self.clock, max_lifetime=60)
        protocol, transport = self.connect(HOST_A)
        for _ in range(6):
            transport.clear()
            protocol.dataReceived(self.request + b"\n")
            self.assertTrue(transport.value().startswith(b"OK "))
            self.clock.advance(11)
        self.assertFalse(transport.disconnecting)  # 66 s old, quiet for 11
        transport.clear()
        protocol.dataReceived(self.request + b"\n")
        self.assertEqual(
            transport.value(), b"ERR 429 connection older than 60 s; reconnect\n"
        )
        self.assertTrue(transport.disconnecting)

    def test_client_that_stops_reading_is_cut(self) -> None:
        """
        Over any transport (TLS included), a client whose answers pile up
        pauses our reading (the transport's producer API); if it has not
        read by the idle timeout, the connection is aborted.
        """
        protocol, transport = self.connect(HOST_A)
        protocol.dataReceived(self.request + b"\n")
        gate = transport.producer
        self.assertIsInstance(gate, ReadGate)
        self.assertTrue(transport.streaming)
        gate.pauseProducing()  # what the transport does when full
        self.assertTrue(protocol.paused)
        protocol.dataReceived(self.request + b"\n")  # held, not answered
        before = transport.value()
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)  # first period: reset
        self.clock.advance(30)
        self.assertEqual(transport.value(), before)
        self.assertTrue(transport.disconnecting)

    def test_client_that_reads_slowly_is_kept(self) -> None:
        """Resumed (it read) since the last idle period: more time."""
        protocol, transport = self.connect(HOST_A)
        protocol.dataReceived(self.request + b"\n")
        gate = transport.producer
        gate.pauseProducing()
        for _ in range(3):
            self.clock.advance(30)
            gate.resumeProducing()
            gate.pauseProducing()
        self.assertFalse(transport.disconnecting)

    def test_refusals_logged_within_a_budget(self) -> None:
        """A flood of refused connections logs a bounded number of events
        and one summary."""
        for n in range(200):
            self.connect(HOST_A, 40000 + n)
        refusal_events = [
            event
            for event in self.events
            if event.get("log_namespace") == "p2p.limits.RefusalLog"
        ]
        self.assertEqual(len(refusal_events), REFUSALS_LOGGED_PER_PERIOD)
        self.clock.advance(REFUSAL_LOG_PERIOD_SECONDS)
        summaries = [
            event
            for event in self.events
            if "not logged one by one" in event.get("log_format", "")
        ]
        self.assertEqual(len(summaries), 1)
        self.assertEqual(summaries[0]["count"], 200 - 3 - REFUSALS_LOGGED_PER_PERIOD)

    def test_per_host_limit(self) -> None:
        """
        The 4th connection from one host (limit 3) is refused with the
        documented line; the three open ones, and other hosts, are served.
        """
        open_ = [self.connect(HOST_A, 40000 + n) for n in range(3)]
        refused = self.connect(HOST_A, 40010)
        self.assertRefused(*refused, "too many connections from your address (limit 3)")
        for protocol, transport in open_:
            self.assertServed(protocol, transport)
        self.assertServed(*self.connect(HOST_B))
        self.assertEqual(self.limits.open_from(HOST_A), 3)

    def test_slot_frees_on_close(self) -> None:
        """Once a connection is lost, its host may connect again."""
        first = [self.connect(HOST_A, 40000 + n) for n in range(3)]
        self.assertRefused(
            *self.connect(HOST_A), "too many connections from your address (limit 3)"
        )
        self.lose(first[0][0])
        self.assertEqual(self.limits.open_from(HOST_A), 2)
        self.assertServed(*self.connect(HOST_A))
        self.assertRefused(
            *self.connect(HOST_A), "too many connections from your address (limit 3)"
        )

    def test_release_once(self) -> None:
        """A connection lost twice (or refused ones lost) releases only once."""
        protocol, _ = self.connect(HOST_A)
        other, _ = self.connect(HOST_A)
        self.lose(protocol)
        self.lose(protocol)
        self.assertEqual((self.limits.total, self.limits.open_from(HOST_A)), (1, 1))
        for n in range(2):
            self.connect(HOST_A, 40100 + n)
        refused, _ = self.connect(HOST_A, 40200)
        self.lose(refused)
        self.assertEqual(self.limits.open_from(HOST_A), 3)
        self.lose(other)
        self.assertEqual(self.limits.open_from(HOST_A), 2)

    def test_total_limit(self) -> None:
        """Past the total limit every host is refused, with its own message."""
        for host in (HOST_A, HOST_B):
            for n in range(3):
                self.connect(host, 40000 + n)
        self.assertRefused(*self.connect("10.0.0.7"), "too many connections (limit 6)")

    def test_timed_out_connection_frees_its_slot(self) -> None:
        """
        A silent connection is closed by the idle timeout, and releases its
        place once the transport reports it lost; no timer is left.
        """
        connections = [self.connect(HOST_A, 40000 + n) for n in range(3)]
        self.clock.advance(31)
        for protocol, transport in connections:
            self.assertTrue(transport.disconnecting)
            self.lose(protocol)
        self.assertEqual(self.limits.total, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusal_logged_without_address(self) -> None:
        """A refusal is a warning naming the limit, not the client's address."""
        for n in range(4):
            self.connect(HOST_A, 40000 + n)
        [event] = [
            event
            for event in self.events
            if event.get("log_namespace") == "p2p.limits.RefusalLog"
        ]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["role"], self.role)
        self.assertNotIn(HOST_A, formatEvent(event))


class RelayLimitsTests(FactoryLimitsMixin, SynchronousTestCase):
    role = "relay"
    banner = b"P2P/1 relay"
    request = b"PEERS"

    def make_factory(self, limits: ConnectionLimits) -> RelayFactory:
        relay = Relay(MemoryRegistry(60), self.clock)
        return RelayFactory(relay, 30, limits)

    def test_default_limits(self) -> None:
        """Without limits given, a factory gets the defaults (never none)."""
        factory = RelayFactory(Relay(MemoryRegistry(60), self.clock))
        self.assertEqual(
            (factory.limits.max_total, factory.limits.max_per_host), (10_000, 32)
        )
        self.assertIsInstance(factory.buildProtocol(address(HOST_A)), RelayProtocol)


class PeerLimitsTests(FactoryLimitsMixin, SynchronousTestCase):
    role = "peer"
    banner = b"P2P/2 peer"
    request = b"LIST"

    def make_factory(self, limits: ConnectionLimits) -> PeerFactory:
        root = tempfile.mkdtemp(prefix="p2p-limits-")
        self.addCleanup(_rmtree, root)
        # The index's rescan timer runs on a clock of its own: the tests
        # count the connections' timers on self.clock.
        return peer_factory(
            self, ShareFolder(root), self.clock, 30, limits, index_clock=Clock()
        )

    def test_default_limits(self) -> None:
        """Without limits given, a factory gets the defaults (never none)."""
        factory = PeerFactory(self.factory.share, self.factory.index, self.clock)
        self.assertEqual(
            (factory.limits.max_total, factory.limits.max_per_host), (10_000, 32)
        )
        self.assertIsInstance(factory.buildProtocol(address(HOST_A)), PeerProtocol)


class ServerLineProtocolTests(SynchronousTestCase):
    """The shared base on its own."""

    def test_both_servers_share_it(self) -> None:
        """The relay and the peer use the one framing with its limits."""
        self.assertTrue(issubclass(RelayProtocol, ServerLineProtocol))
        self.assertTrue(issubclass(PeerProtocol, ServerLineProtocol))
        for protocol in (RelayProtocol, PeerProtocol):
            self.assertEqual(protocol.MAX_LENGTH, wire.MAX_LINE_LENGTH + 1)
            self.assertEqual(protocol.delimiter, b"\n")


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class SocketTransportBuffers:
    """The buffer attributes of Twisted's socket transports, nothing else."""

    def __init__(
        self, dataBuffer: bytes = b"", offset: int = 0, _tempDataLen: int = 0
    ) -> None:
        self.dataBuffer = dataBuffer
        self.offset = offset
        self._tempDataLen = _tempDataLen


class HalfCloseTests(SynchronousTestCase):
    """A client that half-closes after its requests still gets every answer
    (``printf 'PEERS\\n' | nc -N``), then the server closes."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from p2p.registry import MemoryRegistry
        from p2p.relay import Relay, RelayFactory

        self.clock = Clock()
        relay = Relay(MemoryRegistry(60), self.clock)
        self.relay_factory = RelayFactory(relay)

    def connect(self, factory):
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 5000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_relay_answers_then_closes(self) -> None:
        """The relay answers what was sent, then closes on end of input."""
        from twisted.internet.interfaces import IHalfCloseableProtocol

        protocol, transport = self.connect(self.relay_factory)
        # What Twisted asks at the end of input; a StringTransport cannot
        # say whether it sent everything, so the answer is yes.
        self.assertIs(IHalfCloseableProtocol(protocol, None), protocol)
        protocol.dataReceived(b"REGISTER 9001\nPEERS\n")
        protocol.readConnectionLost()
        lines = transport.value().splitlines()
        self.assertEqual(lines[0], b"P2P/1 relay")
        self.assertTrue(lines[1].startswith(b"OK "))
        self.assertEqual(lines[2], b"OK 1")
        self.assertTrue(transport.disconnecting)

    def test_half_close_only_while_output_is_unsent(self) -> None:
        """
        On a socket transport that has sent every byte, the protocol does
        not adapt to IHalfCloseableProtocol (Twisted then closes at once);
        with bytes still buffered, it does.
        """
        from twisted.internet.interfaces import IHalfCloseableProtocol

        protocol, _ = self.connect(self.relay_factory)
        protocol.transport = SocketTransportBuffers()
        self.assertIsNone(IHalfCloseableProtocol(protocol, None))
        for pending in [
            {"dataBuffer": b"OK 0\n"},
            {"dataBuffer": b"OK 0\n", "offset": 2},
            {"_tempDataLen": 5},
        ]:
            protocol.transport = SocketTransportBuffers(**pending)
            self.assertIs(IHalfCloseableProtocol(protocol, None), protocol, pending)
        protocol.transport = SocketTransportBuffers(dataBuffer=b"OK 0\n", offset=5)
        self.assertIsNone(IHalfCloseableProtocol(protocol, None))

    def test_half_close_while_a_request_is_in_progress(self) -> None:
        """Reading paused (a peer sending a file): half-close, buffers empty."""
        from twisted.internet.interfaces import IHalfCloseableProtocol

        protocol, _ = self.connect(self.relay_factory)
        protocol.transport = SocketTransportBuffers()
        protocol.paused = True
        self.assertIs(IHalfCloseableProtocol(protocol, None), protocol)

    def test_peer_finishes_the_transfer_first(self) -> None:
        """A peer closes a half-closed connection only after the file and
        every further request were answered."""
        import os
        import tempfile

        from p2p.share import ShareFolder

        from .test_share import root_hex

        root = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, root)
        content = b"x" * 300_000
        with open(os.path.join(root, "a.txt"), "wb") as stream:
            stream.write(content)
        factory = peer_factory(self, ShareFolder(root), self.clock, index_clock=Clock())
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"GET a.txt\nLIST\n")
        protocol.readConnectionLost()
        self.assertFalse(transport.disconnecting)  # the file is on its way
        # The file producer, then (a StringTransport cannot say it sent the
        # listing) the connection's read gate, until the close.
        while transport.producer is not None and not transport.disconnecting:
            transport.producer.resumeProducing()
        listing = f"OK 1\nFILE 300000 {root_hex(content)} a.txt\n".encode()
        self.assertTrue(transport.value().endswith(listing))
        self.assertTrue(transport.disconnecting)


class PlainHangUpTests(SynchronousTestCase):
    """A plain TCP transport that holds nothing unsent closes at once: a
    close sets up no abort timer (one per request cost the relay CPU)."""

    def test_no_timer_when_nothing_is_held(self) -> None:
        clock = Clock()
        protocol = RelayFactory(Relay(MemoryRegistry(60), clock)).buildProtocol(
            address(HOST_A)
        )
        transport = StringTransport(peerAddress=address(HOST_A))
        # What p2p.transports.unsent_bytes reads of a Twisted TCP transport.
        transport.dataBuffer, transport.offset, transport._tempDataLen = b"", 0, 0
        protocol.makeConnection(transport)
        timers = len(clock.getDelayedCalls())
        protocol.hang_up()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(clock.getDelayedCalls()), timers)
        transport.dataBuffer = b"unsent"
        protocol._abort_call = None
        protocol.hang_up()
        self.assertEqual(len(clock.getDelayedCalls()), timers + 1)


class TLSHangUpTests(SynchronousTestCase):
    """
    A close the server decides is final within CLOSE_GRACE_SECONDS over
    Twisted's real TLS layer (in memory), whatever the client does: its
    polite close waits for the handshake, for a registered producer to
    leave, then for the client's close.  150 silent TLS connections, 150
    that sent part of a ClientHello and 150 that made a handshake and no
    request were all still open after 100 s; closed by their client, the
    first kind stayed in CLOSE-WAIT for good.
    """

    def setUp(self) -> None:
        from twisted.internet.ssl import DefaultOpenSSLContextFactory
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from ._certs import Authority

        credentials = Authority(self.mktemp()).issue("relay", ips=["127.0.0.1"])
        self.clock = Clock()
        relay = Relay(MemoryRegistry(60), self.clock)
        self.factory = TLSMemoryBIOFactory(
            DefaultOpenSSLContextFactory(credentials.key, credentials.certificate),
            False,
            RelayFactory(relay),
            self.clock,
        )

    def connect(self):
        """A TLS connection to the relay: its TLS protocol and the TCP
        transport under it."""
        peer = address(HOST_A)
        server = self.factory.buildProtocol(peer)
        tcp = StringTransport(peerAddress=peer)
        server.makeConnection(tcp)
        return server, tcp

    def assertGone(self, server, tcp) -> None:
        """Aborted; once lost, no timer is left."""
        self.assertTrue(tcp.disconnected)
        server.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.clock.getDelayedCalls())

    def test_silent_client_aborted_at_the_deadline(self) -> None:
        """No ClientHello by the first-request deadline: aborted (nothing we
        send can be read before a handshake)."""
        server, tcp = self.connect()
        self.clock.advance(DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS - 0.1)
        self.assertFalse(tcp.disconnecting)
        self.clock.advance(0.1)
        self.assertGone(server, tcp)

    def test_partial_hello_aborted_at_the_deadline(self) -> None:
        from .test_transports import tls_over

        server, tcp = self.connect()
        client_wire = StringTransport()
        tls_over(client_wire)
        server.dataReceived(client_wire.value()[:20])
        self.clock.advance(DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS)
        self.assertGone(server, tcp)

    def handshake(self):
        """A connection whose client made the handshake; the client's
        received bytes, and a function moving bytes from server to client
        only (this client never answers TLS's close)."""
        from .test_transports import exchange, tls_over

        server, tcp = self.connect()
        client_wire = StringTransport()
        client = tls_over(client_wire)
        # A turn after each round: TLS gathers small writes until then.
        exchange(server, tcp, client, client_wire, lambda: self.clock.advance(0))

        def deliver() -> None:
            self.clock.advance(0)
            if tcp.value():
                client.dataReceived(tcp.value())
                tcp.clear()

        deliver()
        return server, tcp, client, client_wire, deliver

    def test_handshaken_client_told_then_aborted(self) -> None:
        """After a handshake and no request: ERR 408, then an abort once the
        grace time is over, though the client never closes."""
        server, tcp, client, _, deliver = self.handshake()
        received = client.wrappedProtocol
        self.assertEqual(received.data, b"P2P/1 relay\n")
        self.clock.advance(DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS)
        deliver()
        self.assertEqual(received.data, b"P2P/1 relay\nERR 408 no request within 5 s\n")
        self.clock.advance(CLOSE_GRACE_SECONDS - 0.1)
        self.assertFalse(tcp.disconnected)
        self.clock.advance(0.1)
        self.assertGone(server, tcp)

    def test_polite_client_closes_politely(self) -> None:
        """A client that answers TLS's close is closed without an abort."""
        server, tcp, client, client_wire, deliver = self.handshake()
        self.clock.advance(DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS)
        deliver()
        server.dataReceived(client_wire.value())  # its close_notify
        self.assertTrue(tcp.disconnecting)
        self.assertFalse(tcp.disconnected)
        server.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.clock.getDelayedCalls())

    def test_refused_connection_aborted_after_the_grace(self) -> None:
        """A refused TLS client has the grace time to make its handshake and
        read the ERR 503; a silent one is then aborted."""
        self.factory.wrappedFactory.limits = ConnectionLimits(max_total=1)
        held, _ = self.connect()
        server, tcp = self.connect()
        self.assertIsInstance(server.wrappedProtocol, RefusingProtocol)
        self.clock.advance(CLOSE_GRACE_SECONDS - 0.1)
        self.assertFalse(tcp.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(tcp.disconnected)
        server.connectionLost(Failure(ConnectionDone()))
        held.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.clock.getDelayedCalls())
