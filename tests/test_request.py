"""Tests for L{p2p.request}: connect, banner, one request, the reply, close."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.error import ConnectionRefusedError as TCPRefused
from twisted.internet.task import Clock
from twisted.internet.testing import (
    MemoryReactorClock,
    StringTransport,
    StringTransportWithDisconnection,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.request import (
    DEFAULT_REQUEST_TIMEOUT_SECONDS,
    MAX_LISTING_LINES,
    IncompleteReply,
    LineRequestProtocol,
    request_lines,
)
from p2p.wire import Code, WireError

SERVER = IPv4Address("TCP", "192.0.2.1", 4001)


class FakeEndpoint:
    """
    A client endpoint for tests.

    ``mode`` is ``"connect"`` (build the protocol on a StringTransport and
    succeed), ``"refuse"`` (fail with ConnectionRefusedError) or ``"hang"``
    (a connection attempt that never completes).
    """

    def __init__(self, mode: str = "connect", transport_factory=StringTransport):
        self.mode = mode
        self.transport_factory = transport_factory
        self.protocols: list = []
        self.transports: list[StringTransport] = []
        self.hanging: list[Deferred] = []

    def connect(self, factory):
        if self.mode == "refuse":
            return fail(TCPRefused())
        if self.mode == "hang":
            d: Deferred = Deferred()
            self.hanging.append(d)
            return d
        protocol = factory.buildProtocol(SERVER)
        transport = self.transport_factory()
        if isinstance(transport, StringTransportWithDisconnection):
            transport.protocol = protocol
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return succeed(protocol)


class LineRequestProtocolTests(SynchronousTestCase):
    """The protocol, fed by hand on a StringTransport."""

    def make(
        self, role="relay", request=b"PEERS", listing=False, transport=None
    ) -> tuple[LineRequestProtocol, StringTransport]:
        protocol = LineRequestProtocol(role, request, listing)
        transport = transport or StringTransport()
        if isinstance(transport, StringTransportWithDisconnection):
            transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def test_sends_at_once(self) -> None:
        """The request goes out as soon as connected, without waiting for
        the banner (a round trip sooner); nothing more once it arrives."""
        protocol, transport = self.make(request=b"REGISTER 4000")
        self.assertEqual(transport.value(), b"REGISTER 4000\n")
        protocol.dataReceived(b"P2P/1 relay\n")
        self.assertEqual(transport.value(), b"REGISTER 4000\n")
        self.assertNoResult(protocol.result)

    def test_reply_before_banner_checked(self) -> None:
        """A reply is read only after a good banner: a server that greets
        wrongly fails on its banner, whatever follows it."""
        protocol, transport = self.make(role="relay")
        protocol.dataReceived(b"P2P/1 peer\nOK 0\n")
        error = self.failureResultOf(protocol.result, WireError).value
        self.assertEqual(error.code, Code.BAD_REQUEST)

    def test_single_reply(self) -> None:
        """An ``OK`` reply fires the result and closes the connection."""
        protocol, transport = self.make()
        protocol.dataReceived(b"P2P/1 relay\nOK abc\n")
        self.assertEqual(self.successResultOf(protocol.result), [b"OK abc"])
        self.assertTrue(transport.disconnecting)

    def test_reply_in_pieces(self) -> None:
        """Lines split across segments are reassembled; CRLF is accepted."""
        protocol, transport = self.make()
        for piece in (b"P2P/1 re", b"lay\r", b"\nO", b"K\r\n"):
            protocol.dataReceived(piece)
        self.assertEqual(self.successResultOf(protocol.result), [b"OK\r"])

    def test_banner_wrong_role(self) -> None:
        """A peer's banner where a relay was expected is a WireError (400)."""
        protocol, transport = self.make(role="relay")
        protocol.dataReceived(b"P2P/1 peer\n")
        error = self.failureResultOf(protocol.result, WireError).value
        self.assertEqual(error.code, Code.BAD_REQUEST)
        self.assertEqual(transport.value(), b"PEERS\n")  # nothing more
        self.assertTrue(transport.disconnecting)

    def test_banner_wrong_version(self) -> None:
        """Another protocol version or not P2P at all is a 505 WireError."""
        for banner in (b"P2P/2 relay\n", b"HTTP/1.1 400 Bad Request\n", b"SSH-2.0\n"):
            protocol, transport = self.make()
            protocol.dataReceived(banner)
            error = self.failureResultOf(protocol.result, WireError).value
            self.assertEqual(error.code, Code.VERSION, banner)
            self.assertEqual(transport.value(), b"PEERS\n")
            self.assertTrue(transport.disconnecting)

    def test_peer_speaks_the_second_version(self) -> None:
        """
        Peers speak P2P/2 while the relay stays at P2P/1: a peer greeting
        with the first version is refused (505) on its banner, before any
        of its replies is read (they would be misread), and the connection
        is closed.
        """
        protocol, transport = self.make(role="peer", request=b"LIST", listing=True)
        protocol.dataReceived(b"P2P/1 peer\nOK 1\nf.txt 3\n")
        error = self.failureResultOf(protocol.result, WireError).value
        self.assertEqual(error.code, Code.VERSION)
        self.assertIn("'P2P/1'", error.message)
        self.assertTrue(transport.disconnecting)

        protocol, transport = self.make(role="peer", request=b"LIST", listing=True)
        protocol.dataReceived(b"P2P/2 peer\n")
        self.assertEqual(transport.value(), b"LIST\n")
        self.assertNoResult(protocol.result)

    def test_err_reply(self) -> None:
        """``ERR <code> <message>`` is a RemoteError carrying both."""
        protocol, transport = self.make()
        protocol.dataReceived(b"P2P/1 relay\nERR 401 bad token\n")
        error = self.failureResultOf(protocol.result, wire.RemoteError).value
        self.assertEqual((error.code, error.message), (401, "bad token"))
        self.assertTrue(transport.disconnecting)

    def test_malformed_reply(self) -> None:
        """A reply that is neither OK nor ERR is a WireError."""
        protocol, transport = self.make()
        protocol.dataReceived(b"P2P/1 relay\nHELLO\n")
        self.failureResultOf(protocol.result, WireError)

    def test_listing(self) -> None:
        """``OK <n>`` plus n lines: the result holds the header and all n."""
        protocol, transport = self.make(listing=True)
        protocol.dataReceived(b"P2P/1 relay\nOK 2\nPEER a\n")
        self.assertNoResult(protocol.result)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"PEER b\n")
        self.assertEqual(
            self.successResultOf(protocol.result), [b"OK 2", b"PEER a", b"PEER b"]
        )
        self.assertTrue(transport.disconnecting)

    def test_empty_listing(self) -> None:
        """``OK 0`` is a complete listing."""
        protocol, transport = self.make(listing=True)
        protocol.dataReceived(b"P2P/1 relay\nOK 0\n")
        self.assertEqual(self.successResultOf(protocol.result), [b"OK 0"])

    def test_listing_extra_lines_ignored(self) -> None:
        """Lines after the promised count do not change the result."""
        protocol, transport = self.make(listing=True)
        protocol.dataReceived(b"P2P/1 relay\nOK 1\nPEER a\nPEER b\nPEER c\n")
        self.assertEqual(self.successResultOf(protocol.result), [b"OK 1", b"PEER a"])

    def test_listing_count_too_large(self) -> None:
        """A count above MAX_LISTING_LINES is refused before any line is read."""
        protocol, transport = self.make(listing=True)
        protocol.dataReceived(b"P2P/1 relay\nOK %d\n" % (MAX_LISTING_LINES + 1))
        self.failureResultOf(protocol.result, WireError)
        self.assertTrue(transport.disconnecting)

    def test_listing_malformed_count(self) -> None:
        """A listing header with extra fields is a WireError."""
        protocol, transport = self.make(listing=True)
        protocol.dataReceived(b"P2P/1 relay\nOK 2 extra\n")
        self.failureResultOf(protocol.result, WireError)

    def test_listing_err(self) -> None:
        """An ERR reply to a listing request is a RemoteError."""
        protocol, transport = self.make(listing=True)
        protocol.dataReceived(b"P2P/1 relay\nERR 429 too many requests\n")
        self.assertEqual(
            self.failureResultOf(protocol.result, wire.RemoteError).value.code, 429
        )

    def test_closed_before_banner(self) -> None:
        """A connection closed before the banner is an IncompleteReply."""
        protocol, transport = self.make()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(protocol.result, IncompleteReply)

    def test_closed_before_reply(self) -> None:
        """A connection closed after the banner is an IncompleteReply."""
        protocol, transport = self.make()
        protocol.dataReceived(b"P2P/1 relay\n")
        protocol.connectionLost(Failure(ConnectionLost("reset")))
        failure = self.failureResultOf(protocol.result, IncompleteReply)
        self.assertIn("reset", str(failure.value))

    def test_closed_mid_listing(self) -> None:
        """A listing cut short is an IncompleteReply, not a short list."""
        protocol, transport = self.make(listing=True)
        protocol.dataReceived(b"P2P/1 relay\nOK 3\nPEER a\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(protocol.result, IncompleteReply)

    def test_partial_line_then_close(self) -> None:
        """A reply line without its newline does not count."""
        protocol, transport = self.make()
        protocol.dataReceived(b"P2P/1 relay\nOK")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(protocol.result, IncompleteReply)

    def test_line_too_long(self) -> None:
        """A reply line over the limit is a 413 WireError."""
        protocol, transport = self.make()
        protocol.dataReceived(b"P2P/1 relay\n" + b"O" * (wire.MAX_LINE_LENGTH + 2))
        error = self.failureResultOf(protocol.result, WireError).value
        self.assertEqual(error.code, Code.LINE_TOO_LONG)
        self.assertTrue(transport.disconnecting)

    def test_data_after_result(self) -> None:
        """
        Whatever arrives after the result fired (more lines, an over-long
        line, the close) changes nothing and raises nothing.
        """
        protocol, transport = self.make()
        protocol.dataReceived(b"P2P/1 relay\nOK\n")
        protocol.dataReceived(b"ERR 500 late\n" + b"x" * (wire.MAX_LINE_LENGTH + 2))
        protocol.dataReceived(b"y" * (wire.MAX_LINE_LENGTH + 2))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(protocol.result), [b"OK"])

    def test_cancel_aborts(self) -> None:
        """Cancelling the result aborts the connection."""
        protocol, transport = self.make()
        protocol.dataReceived(b"P2P/1 relay\n")
        protocol.result.cancel()
        self.failureResultOf(protocol.result, CancelledError)
        self.assertTrue(transport.disconnected)  # abortConnection, not a close

    def test_synchronous_disconnection(self) -> None:
        """
        On a transport that reports connectionLost from inside
        loseConnection, a complete reply is still the result (not an
        IncompleteReply, and no AlreadyCalledError).
        """
        for listing, data, expected in [
            (False, b"P2P/1 relay\nOK\n", [b"OK"]),
            (True, b"P2P/1 relay\nOK 1\nPEER a\n", [b"OK 1", b"PEER a"]),
        ]:
            protocol, transport = self.make(
                listing=listing, transport=StringTransportWithDisconnection()
            )
            protocol.dataReceived(data)
            self.assertEqual(self.successResultOf(protocol.result), expected)
            self.assertFalse(transport.connected)

    def test_synchronous_disconnection_error(self) -> None:
        """Same for an error: the RemoteError is the result."""
        protocol, transport = self.make(transport=StringTransportWithDisconnection())
        protocol.dataReceived(b"P2P/1 relay\nERR 403 no\n")
        self.failureResultOf(protocol.result, wire.RemoteError)


class RequestLinesTests(SynchronousTestCase):
    """L{request_lines}: the whole exchange through an endpoint, bounded."""

    def setUp(self) -> None:
        self.clock = Clock()

    def test_success(self) -> None:
        """The reply lines come back; the timeout timer is cancelled."""
        endpoint = FakeEndpoint()
        d = request_lines(endpoint, "relay", b"PEERS", self.clock, listing=True)
        [protocol] = endpoint.protocols
        [transport] = endpoint.transports
        protocol.dataReceived(b"P2P/1 relay\n")
        self.assertEqual(transport.value(), b"PEERS\n")
        protocol.dataReceived(b"OK 1\nPEER x\n")
        self.assertEqual(self.successResultOf(d), [b"OK 1", b"PEER x"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refused(self) -> None:
        """A refused connection fails the request; no timer remains."""
        d = request_lines(FakeEndpoint("refuse"), "relay", b"PEERS", self.clock)
        self.failureResultOf(d, TCPRefused)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_remote_error(self) -> None:
        """An ERR reply fails the request with RemoteError."""
        endpoint = FakeEndpoint()
        d = request_lines(endpoint, "relay", b"REGISTER 1", self.clock)
        endpoint.protocols[0].dataReceived(b"P2P/1 relay\nERR 429 slow down\n")
        self.assertEqual(self.failureResultOf(d, wire.RemoteError).value.code, 429)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retry_after(self) -> None:
        """
        ``ERR 429 ...; retry-after=S``: asked again after S seconds, on a new
        connection, up to three times; then the error stands.
        """
        endpoint = FakeEndpoint()
        d = request_lines(endpoint, "relay", b"PEERS", self.clock, listing=True)
        refusal = b"P2P/1 relay\nERR 429 too many requests; retry-after=0.5\n"
        for attempt in range(3):
            endpoint.protocols[attempt].dataReceived(refusal)
            self.assertNoResult(d)
            self.assertEqual(len(endpoint.protocols), attempt + 1)
            self.clock.advance(0.5)
        endpoint.protocols[3].dataReceived(refusal)
        self.assertEqual(self.failureResultOf(d, wire.RemoteError).value.code, 429)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retry_after_then_success(self) -> None:
        endpoint = FakeEndpoint()
        d = request_lines(endpoint, "relay", b"PEERS", self.clock, listing=True)
        endpoint.protocols[0].dataReceived(
            b"P2P/1 relay\nERR 429 too many requests; retry-after=0.2\n"
        )
        self.clock.advance(0.2)
        endpoint.protocols[1].dataReceived(b"P2P/1 relay\nOK 0\n")
        self.assertEqual(self.successResultOf(d), [b"OK 0"])

    def test_long_retry_after_is_reported(self) -> None:
        """A wait longer than five seconds is not waited for."""
        endpoint = FakeEndpoint()
        d = request_lines(endpoint, "relay", b"PEERS", self.clock, listing=True)
        endpoint.protocols[0].dataReceived(
            b"P2P/1 relay\nERR 429 too many wrong tokens; retry-after=30\n"
        )
        self.failureResultOf(d, wire.RemoteError)
        self.assertEqual(len(endpoint.protocols), 1)

    def test_connect_timeout(self) -> None:
        """A connection that never completes times out after C{timeout}."""
        endpoint = FakeEndpoint("hang")
        d = request_lines(endpoint, "relay", b"PEERS", self.clock, timeout=3)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reply_timeout(self) -> None:
        """
        A server that accepts but never answers times out after C{timeout},
        which covers the whole exchange; the connection is aborted.
        """
        endpoint = FakeEndpoint()
        d = request_lines(endpoint, "relay", b"PEERS", self.clock)
        self.clock.advance(DEFAULT_REQUEST_TIMEOUT_SECONDS - 1)
        endpoint.protocols[0].dataReceived(b"P2P/1 relay\n")  # no reset
        self.clock.advance(0.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, TimeoutError)
        self.assertTrue(endpoint.transports[0].disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # The connection's eventual loss changes nothing.
        endpoint.protocols[0].connectionLost(Failure(ConnectionDone()))

    def test_interim_lines_renew(self) -> None:
        """
        An interim line (a peer's INDEXING progress) before the reply is
        not the reply; one that renews gives the exchange its time afresh,
        one that does not leaves the deadline where it was.
        """
        seen: list[bytes] = []

        def interim(line: bytes) -> bool | None:
            if not line.startswith(b"WAIT"):
                return None
            seen.append(line)
            return line == b"WAIT more"

        endpoint = FakeEndpoint()
        d = request_lines(
            endpoint, "peer", b"X", self.clock, timeout=3, interim=interim
        )
        protocol = endpoint.protocols[0]
        protocol.dataReceived(b"P2P/2 peer\n")
        for _ in range(5):
            self.clock.advance(2)
            protocol.dataReceived(b"WAIT more\n")
        self.clock.advance(2)
        protocol.dataReceived(b"WAIT same\n")
        self.clock.advance(0.9)
        self.assertNoResult(d)
        protocol.dataReceived(b"OK 0\n")
        self.assertEqual(self.successResultOf(d), [b"OK 0"])
        self.assertEqual(len(seen), 6)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_interim_line_without_renewal_times_out(self) -> None:
        endpoint = FakeEndpoint()
        d = request_lines(
            endpoint, "peer", b"X", self.clock, timeout=3, interim=lambda line: False
        )
        endpoint.protocols[0].dataReceived(b"P2P/2 peer\nWAIT\n")
        self.clock.advance(3.1)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_interim_failure_fails_the_request(self) -> None:
        """What the interim hook raises is the request's failure; the
        connection is closed."""

        class GiveUp(Exception):
            pass

        def interim(line: bytes) -> bool | None:
            raise GiveUp("too slow")

        endpoint = FakeEndpoint()
        d = request_lines(endpoint, "peer", b"X", self.clock, interim=interim)
        endpoint.protocols[0].dataReceived(b"P2P/2 peer\nWAIT\n")
        self.failureResultOf(d, GiveUp)
        self.assertTrue(endpoint.transports[0].disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_incomplete(self) -> None:
        """A connection closing early fails the request with IncompleteReply."""
        endpoint = FakeEndpoint()
        d = request_lines(endpoint, "peer", b"LIST", self.clock, listing=True)
        protocol = endpoint.protocols[0]
        line = wire.FileEntry(1, "0" * 64, "a").to_line()
        protocol.dataReceived(b"P2P/2 peer\nOK 5\n" + line + b"\n")
        self.assertEqual(endpoint.transports[0].value(), b"LIST\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, IncompleteReply)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """Cancelling the request aborts the connection and its timer."""
        endpoint = FakeEndpoint()
        d = request_lines(endpoint, "relay", b"PEERS", self.clock)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(endpoint.transports[0].disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RealEndpointTests(SynchronousTestCase):
    """
    L{request_lines} through Twisted's own TCP endpoint on a
    L{MemoryReactorClock}, whose connection attempts complete only when the
    test says so.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoint = TCP4ClientEndpoint(self.reactor, "192.0.2.1", 4001)

    def test_connect_timeout(self) -> None:
        """
        A connection attempt still pending at the timeout is stopped and the
        request fails with TimeoutError, as documented (cancelling a TCP
        attempt yields ConnectingCancelledError, which must not leak out).
        """
        d = request_lines(self.endpoint, "relay", b"PEERS", self.reactor, timeout=3)
        self.reactor.advance(3)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_exchange(self) -> None:
        """A completed connection carries the exchange to its end."""
        d = request_lines(self.endpoint, "relay", b"PEERS", self.reactor)
        factory = self.reactor.tcpClients[0][2]
        protocol = factory.buildProtocol(SERVER)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"P2P/1 relay\n")
        self.assertEqual(transport.value(), b"PEERS\n")
        protocol.dataReceived(b"OK\n")
        self.assertEqual(self.successResultOf(d), [b"OK"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
