"""
Tests for L{p2p.dialback}: the relay dials new peers back, a bounded number
at a time, and vouches only for ports that answer with a peer's banner.

Connections are made on a L{MemoryReactorClock}: the test plays the peer by
building the probe's protocol from the recorded factory and feeding it.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p.dialback import DialBack


class DialBackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.answered: list[tuple[str, int]] = []
        self.dialback = DialBack(
            self.reactor,
            lambda host, port: self.answered.append((host, port)),
            concurrency=4,
            per_network=2,
            timeout=3.0,
            retry_after=60.0,
        )

    def attempts(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def accept(self, index: int) -> tuple[object, StringTransport]:
        """Complete connection attempt C{index}: the probe's protocol on a
        StringTransport."""
        host, port, factory, *_ = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return protocol, transport

    def refuse(self, index: int) -> None:
        connector = self.reactor.connectors[index]
        _, _, factory, *_ = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))

    def test_peer_banner_verifies(self) -> None:
        """A port that greets as a peer is reported; the probe hangs up."""
        self.dialback.submit("127.0.0.1", 9000)
        self.assertEqual(self.attempts(), [("127.0.0.1", 9000)])
        protocol, transport = self.accept(0)
        protocol.dataReceived(b"P2P/2 peer\n")
        self.assertEqual(self.answered, [("127.0.0.1", 9000)])
        self.assertTrue(transport.disconnected)
        self.assertEqual((self.dialback.in_flight, self.dialback.answered), (0, 1))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_other_banner_does_not(self) -> None:
        """A relay, an HTTP server or garbage is not a peer."""
        for index, greeting in enumerate(
            [b"P2P/1 relay\n", b"HTTP/1.1 400 Bad Request\r\n", b"x" * 200]
        ):
            self.dialback.submit("127.0.0.1", 9000 + index)
            protocol, _ = self.accept(index)
            protocol.dataReceived(greeting)
        self.assertEqual(self.answered, [])
        self.assertEqual(self.dialback.silent, 3)

    def test_refused_port(self) -> None:
        """Nothing listening: reported as silent, nothing answered."""
        self.dialback.submit("127.1.0.1", 1)
        self.refuse(0)
        self.assertEqual((self.dialback.silent, self.answered), (1, []))
        self.assertEqual(self.dialback.in_flight, 0)

    def test_silent_port_times_out(self) -> None:
        """
        A port that accepts and never speaks: TLS is tried on the same
        connection after a moment, and the probe gives up at its timeout.
        """
        self.dialback.submit("127.1.0.1", 1)
        _, transport = self.accept(0)
        self.reactor.advance(3.0)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.dialback.silent, 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_bounded_per_network_and_in_all(self) -> None:
        """
        At most two probes per network and four in all run at once, and
        networks take turns: one network's thousand leases do not hold up
        another's one.
        """
        for port in range(1, 101):
            self.dialback.submit("127.1.0.1", port)
        self.dialback.submit("127.0.0.1", 9000)
        self.assertEqual(
            self.attempts(),
            [("127.1.0.1", 1), ("127.1.0.1", 2), ("127.0.0.1", 9000)],
        )
        for port in range(1, 51):
            self.dialback.submit(f"127.{port + 10}.0.1", 1)
        self.assertEqual(len(self.attempts()), 4)
        self.assertEqual(self.dialback.pending, 101 + 50 - 4)

    def test_rate(self) -> None:
        """
        Probes refused at once (nothing listens) still start at most
        C{rate} a second: a registration flood costs the relay a bounded
        share of its time.
        """
        dialback = DialBack(self.reactor, lambda *_: None, rate=10, concurrency=1000)
        for number in range(50):
            dialback.submit(f"127.{number}.0.1", 1)
        self.assertEqual(len(self.attempts()), 10)
        for index in range(10):
            self.refuse(index)
        self.assertEqual(len(self.attempts()), 10)
        self.reactor.advance(1)
        self.assertEqual(len(self.attempts()), 20)
        dialback.stop()  # no more starts; the ten in flight end by their timeout
        self.reactor.advance(3)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.attempts()), 20)

    def test_failed_probe_not_repeated_at_once(self) -> None:
        """A silent port is probed again only after retry_after (at a
        renewal), not at every renewal."""
        self.dialback.submit("127.1.0.1", 1)
        self.refuse(0)
        self.assertFalse(self.dialback.submit("127.1.0.1", 1))
        self.reactor.advance(60)
        self.assertTrue(self.dialback.submit("127.1.0.1", 1))

    def test_queued_once(self) -> None:
        self.dialback.submit("127.1.0.1", 1)
        self.assertFalse(self.dialback.submit("127.1.0.1", 1))
        self.assertEqual(len(self.attempts()), 1)

    def test_stop(self) -> None:
        for port in range(1, 10):
            self.dialback.submit("127.1.0.1", port)
        self.dialback.stop()
        self.assertEqual(self.dialback.pending, 0)
        self.assertFalse(self.dialback.submit("127.1.0.1", 99))
