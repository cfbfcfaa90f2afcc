"""Tests for L{p2p.pool}: connections to peers kept between fetches."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import limits, pool, wire
from p2p.endpoints import peer_endpoint
from p2p.transports import no_delay

PEER = wire.PeerEntry("aaaaaaaaaaaaaaaa", "127.0.0.1", 4001)
OTHER = wire.PeerEntry("bbbbbbbbbbbbbbbb", "127.0.0.1", 4002)
GREETING = b"P2P/2 peer\n"


class Asker(LineReceiver):
    """A fetch in miniature: greeted, it asks; answered, it hands the
    connection back (or closes it, if told to)."""

    delimiter = b"\n"

    def __init__(self, request: bytes, keep: bool = True, error: bool = False) -> None:
        self.request = request
        self.keep = keep
        self.error = error  # the reply is an ERR 404 (released as such)
        self.lines: list[bytes] = []
        self.lost: Failure | None = None

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        if len(self.lines) == 1:
            self.sendLine(self.request)
        elif self.keep:
            pool.release(self.transport, error=self.error)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


class _NoDelayTransport(StringTransport):
    """Records each setTcpNoDelay call."""

    def __init__(self) -> None:
        super().__init__()
        self.no_delay: list[bool] = []

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay.append(enabled)


class PoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = pool.ConnectionPool(self.reactor)
        self.endpoint_for = self.pool.wrap(
            lambda peer: peer_endpoint(self.reactor, peer, 5)
        )

    def ask(
        self,
        request: bytes,
        peer: wire.PeerEntry = PEER,
        keep: bool = True,
        error: bool = False,
    ):
        asker = Asker(request, keep, error)
        d = self.endpoint_for(peer).connect(Factory.forProtocol(lambda: asker))
        return asker, d

    def connect(self, index: int, greet: bool = True):
        """Complete the C{index}th TCP connection: its carrier, transport."""
        host, port, factory = self.reactor.tcpClients[index][:3]
        carrier = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        carrier.makeConnection(transport)
        if greet:
            carrier.dataReceived(GREETING)
        return carrier, transport


class BufferedAsker(Asker):
    """An Asker that, once answered, offers a buffer to receive into (a
    fetch receiving content in place)."""

    def __init__(self, request: bytes) -> None:
        super().__init__(request, keep=False)
        self.buffer = bytearray(16)
        self.counts: list[int] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        if len(self.lines) == 1:
            self.sendLine(self.request)

    def receive_buffer(self) -> memoryview | None:
        return memoryview(self.buffer) if len(self.lines) > 1 else None

    def received_into(self, count: int) -> None:
        self.counts.append(count)


class ReceivedInPlaceTests(PoolTestCase):
    """The carrier passes the transport's in-place reads on to the fetch it
    carries, but never while it still reads lines for itself."""

    def test_offered_once_greeted(self) -> None:
        asker = BufferedAsker(b"GET a")
        self.endpoint_for(PEER).connect(Factory.forProtocol(lambda: asker))
        wrapped, _ = self.connect(0, greet=False)
        carrier = asker.transport._carrier
        self.assertIsNone(carrier.receive_buffer(), "the greeting is the carrier's")
        wrapped.dataReceived(GREETING + b"OK a\n")
        self.assertIs(carrier.receive_buffer().obj, asker.buffer)
        carrier.received_into(7)
        self.assertEqual(asker.counts, [7])

    def test_not_before_a_kept_connections_first_reply(self) -> None:
        """On a kept connection the first reply line is the carrier's to
        read (a peer may say ``ERR 429 ...; reconnect``)."""
        first, _ = self.ask(b"GET a")
        wrapped, _ = self.connect(0)
        carrier = first.transport._carrier
        wrapped.dataReceived(b"OK a\n")
        self.assertIsNone(carrier.receive_buffer(), "idle: nothing carried")
        asker = BufferedAsker(b"GET b")
        self.endpoint_for(PEER).connect(Factory.forProtocol(lambda: asker))
        self.assertIs(asker.transport._carrier, carrier)
        self.assertIsNone(carrier.receive_buffer())
        wrapped.dataReceived(b"OK b\n")
        self.assertIs(carrier.receive_buffer().obj, asker.buffer)


class ReuseTests(PoolTestCase):
    def test_second_fetch_takes_the_connection(self) -> None:
        first, d = self.ask(b"GET a")
        carrier, transport = self.connect(0)
        self.assertIs(self.successResultOf(d), first)
        self.assertEqual(transport.value(), b"GET a\n")
        carrier.dataReceived(b"OK a\n")
        self.assertEqual(first.lines, [b"P2P/2 peer", b"OK a"])
        self.assertIsInstance(first.lost.value, ConnectionDone)
        self.assertFalse(transport.disconnecting)
        transport.clear()
        second, d = self.ask(b"GET b")
        self.assertIs(self.successResultOf(d), second)
        self.assertEqual(len(self.reactor.tcpClients), 1, "no new connection")
        self.assertEqual(second.lines, [b"P2P/2 peer"], "greeted as if new")
        self.assertEqual(transport.value(), b"GET b\n")
        carrier.dataReceived(b"OK ")
        carrier.dataReceived(b"b\n")
        self.assertEqual(second.lines[1:], [b"OK b"])

    def test_connection_per_peer(self) -> None:
        self.ask(b"GET a")
        carrier, _ = self.connect(0)
        carrier.dataReceived(b"OK\n")
        self.ask(b"GET a", OTHER)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.reactor.tcpClients[1][1], 4002)

    def test_closed_by_the_fetch_is_not_kept(self) -> None:
        self.ask(b"GET a", keep=False)
        carrier, transport = self.connect(0)
        carrier.dataReceived(b"OK\n")
        self.assertTrue(transport.disconnecting)
        self.ask(b"GET b")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_closed_while_idle(self) -> None:
        """A peer that closes an idle connection: the next fetch connects."""
        self.ask(b"GET a")
        carrier, _ = self.connect(0)
        carrier.dataReceived(b"OK\n")
        carrier.connectionLost(Failure(ConnectionDone()))
        self.ask(b"GET b")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_bytes_while_idle_close_it(self) -> None:
        self.ask(b"GET a")
        carrier, transport = self.connect(0)
        carrier.dataReceived(b"OK\n")
        carrier.dataReceived(b"junk\n")
        self.assertTrue(transport.disconnecting)

    def test_no_delay_set_once_per_connection(self) -> None:
        """The carrier turns Nagle's algorithm off when it connects; a
        fetch that asks again on the kept connection costs no system call."""
        asker, _ = self.ask(b"GET a")
        host, port, factory = self.reactor.tcpClients[0][:3]
        carrier = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = _NoDelayTransport()
        carrier.makeConnection(transport)
        self.assertEqual(transport.no_delay, [True])
        no_delay(asker.transport)
        self.assertEqual(transport.no_delay, [True])
        asker.transport.setTcpNoDelay(False)
        self.assertEqual(transport.no_delay, [True, False])

    def test_release_without_a_pool_closes(self) -> None:
        transport = StringTransport()
        pool.release(transport)
        self.assertTrue(transport.disconnecting)


class LimitTests(PoolTestCase):
    def test_retired_after_max_errors(self) -> None:
        """A connection carries at most MAX_ERRORS_KEPT ERR 404 replies,
        below a peer's error budget (which would close it unasked)."""
        self.ask(b"GET 0", error=True)
        carrier, transport = self.connect(0)
        carrier.dataReceived(b"ERR 404 no such file\n")
        for number in range(1, pool.MAX_ERRORS_KEPT):
            self.assertFalse(transport.disconnecting, number)
            self.ask(b"GET %d" % number, error=True)
            carrier.dataReceived(b"ERR 404 no such file\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(transport.disconnecting)
        self.assertLess(pool.MAX_ERRORS_KEPT, limits.MAX_ERRORS_PER_CONNECTION)

    def test_retired_after_max_uses(self) -> None:
        self.ask(b"GET 0")
        carrier, transport = self.connect(0)
        carrier.dataReceived(b"OK\n")
        for number in range(1, pool.MAX_USES):
            self.ask(b"GET %d" % number)
            carrier.dataReceived(b"OK\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(transport.disconnecting)
        self.ask(b"GET last")
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_not_reused_when_old(self) -> None:
        self.ask(b"GET a")
        carrier, transport = self.connect(0)
        carrier.dataReceived(b"OK\n")
        self.reactor.advance(pool.MAX_AGE_SECONDS)
        self.ask(b"GET b")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertTrue(transport.disconnecting)

    def test_idle_connections_bounded(self) -> None:
        transports = []
        for port in range(pool.MAX_IDLE + 1):
            peer = wire.PeerEntry("cccccccccccccccc", "127.0.0.1", 5000 + port)
            self.ask(b"GET a", peer)
            carrier, transport = self.connect(port)
            self.reactor.advance(1)
            carrier.dataReceived(b"OK\n")
            transports.append(transport)
        self.assertEqual([t.disconnecting for t in transports].count(True), 1)
        self.assertTrue(transports[0].disconnecting, "the longest idle goes")

    def test_close_closes_idle_connections(self) -> None:
        self.ask(b"GET a")
        carrier, transport = self.connect(0)
        carrier.dataReceived(b"OK\n")
        busy, _ = self.ask(b"GET b", OTHER)
        _, busy_transport = self.connect(1)
        self.pool.close()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(busy_transport.disconnecting)


class RetryTests(PoolTestCase):
    """A kept connection that ends before it answers: the request is sent
    again, once, on a new connection; the fetch never sees the difference."""

    def kept(self):
        self.ask(b"GET a")
        carrier, transport = self.connect(0)
        carrier.dataReceived(b"OK a\n")
        second, _ = self.ask(b"GET b")
        return carrier, transport, second

    def test_lost_before_the_reply(self) -> None:
        carrier, _, second = self.kept()
        carrier.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(second.lost)
        fresh, transport = self.connect(1)
        self.assertEqual(transport.value(), b"GET b\n", "asked again")
        fresh.dataReceived(b"OK b\n")
        self.assertEqual(second.lines, [b"P2P/2 peer", b"OK b"], "greeted once")
        self.assertIsInstance(second.lost.value, ConnectionDone)  # released
        self.assertFalse(transport.disconnecting, "kept in its turn")

    def test_told_to_reconnect(self) -> None:
        """``ERR 429 ...; reconnect`` (the peer's limit per connection)."""
        carrier, transport, second = self.kept()
        carrier.dataReceived(b"ERR 429 too many requests on this ")
        carrier.dataReceived(b"connection; reconnect\n")
        self.assertTrue(transport.disconnecting)
        fresh, new_transport = self.connect(1)
        self.assertEqual(new_transport.value(), b"GET b\n")
        fresh.dataReceived(b"OK b\n")
        self.assertEqual(second.lines[1:], [b"OK b"])

    def test_other_errors_pass(self) -> None:
        carrier, _, second = self.kept()
        carrier.dataReceived(b"ERR 404 no such file\nOK")
        self.assertEqual(second.lines[1:], [b"ERR 404 no such file"])
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_once_only(self) -> None:
        """The new connection is not retried: its end is the fetch's."""
        carrier, _, second = self.kept()
        carrier.connectionLost(Failure(ConnectionDone()))
        fresh, _ = self.connect(1)
        fresh.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(second.lost.value, ConnectionDone)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_lost_before_the_greeting(self) -> None:
        carrier, _, second = self.kept()
        carrier.connectionLost(Failure(ConnectionDone()))
        fresh, _ = self.connect(1, greet=False)
        fresh.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(second.lost.value, ConnectionDone)

    def test_cannot_connect_again(self) -> None:
        carrier, _, second = self.kept()
        carrier.connectionLost(Failure(ConnectionDone()))
        factory = self.reactor.tcpClients[1][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[1], Failure(ConnectionRefusedError())
        )
        self.assertIsInstance(second.lost.value, ConnectionRefusedError)

    def test_fetch_gave_up_meanwhile(self) -> None:
        carrier, _, second = self.kept()
        carrier.connectionLost(Failure(ConnectionDone()))
        second.transport.abortConnection()
        fresh, transport = self.connect(1)
        self.assertEqual(transport.value(), b"", "nothing asked")
        self.assertTrue(transport.disconnecting)
        self.assertIsNotNone(second.lost)
