"""
Tests for L{p2p.transports}: the plain-TCP shortcuts and their fallbacks.

A real L{tcp.Connection} over a socket pair (on a MemoryReactor, so nothing
runs by itself) shows what Twisted's own transport does: a write is queued
until C{doWrite}, which the test calls by hand.
"""

from __future__ import annotations

import io
import re
import select
import socket
from collections.abc import Callable

from twisted.internet import main, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, DefaultOpenSSLContextFactory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.client import FileFetchProtocol
from p2p.request import LineRequestProtocol
from p2p.sink import PieceSink, StreamOutput
from p2p.transports import (
    LARGE_READ_BYTES,
    cap_send_buffer,
    limit_unsent,
    limit_unsent_in_kernel,
    plain_socket,
    read_in_large_chunks,
    read_into_buffers,
    set_receive_low_water,
    unbuffered_write,
    unsent_output,
    write_now,
)
from tests._certs import Authority


class Queued(StringTransport):
    """A StringTransport that records its writes (the fallback path)."""


def connection_pair(test: SynchronousTestCase) -> tuple[tcp.Connection, socket.socket]:
    """A connected tcp.Connection and the socket at its other end."""
    ours, theirs = socket.socketpair()
    test.addCleanup(ours.close)
    test.addCleanup(theirs.close)
    theirs.setblocking(False)
    connection = tcp.Connection(ours, None, MemoryReactorClock())
    connection.connected = True  # as makeConnection would have it
    return connection, theirs


def tcp_connection_pair(
    test: SynchronousTestCase,
) -> tuple[tcp.Connection, socket.socket]:
    """As L{connection_pair}, over real TCP on loopback (a connection that
    accepts TCP options, as a client's does)."""
    listener = socket.create_server(("127.0.0.1", 0))
    theirs = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    test.addCleanup(ours.close)
    test.addCleanup(theirs.close)
    ours.setblocking(False)
    theirs.setblocking(False)
    connection = tcp.Connection(ours, None, MemoryReactorClock())
    connection.connected = True
    return connection, theirs


def drain(sock: socket.socket) -> bytes:
    """Everything readable from C{sock} now."""
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


class UnsentOutputTests(SynchronousTestCase):
    def test_real_socket_transport(self) -> None:
        """
        The attributes unsent_output reads are those of Twisted's own
        FileDescriptor (should they go, the servers fall back to the slower
        safe paths, and this test says so).
        """
        descriptor = FileDescriptor(MemoryReactor())
        descriptor.connected = True
        self.assertFalse(unsent_output(descriptor))
        descriptor.write(b"OK 0\n")
        self.assertTrue(unsent_output(descriptor))

    def test_unknown_transports(self) -> None:
        """Transports that cannot tell may always hold unsent bytes."""
        self.assertTrue(unsent_output(object()))
        self.assertTrue(unsent_output(StringTransport()))


class SendBufferTests(SynchronousTestCase):
    def test_tcp_socket_capped(self) -> None:
        """The socket under a plain TCP transport gets the capped buffer
        (Linux reports twice what was set)."""
        connection, _ = connection_pair(self)
        self.assertTrue(cap_send_buffer(connection, 64 * 1024))
        size = connection.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.assertLessEqual(size, 2 * 64 * 1024)

    def test_other_transports_untouched(self) -> None:
        self.assertFalse(cap_send_buffer(StringTransport(), 64 * 1024))


class LargeReadsTests(SynchronousTestCase):
    def test_tcp_connection_reads_its_buffer_size(self) -> None:
        """
        A real tcp.Connection reads C{bufferSize} bytes per doRead: with
        read_in_large_chunks, one call takes what 64 KiB reads would take
        in several (should Twisted stop reading C{bufferSize}, this fails).
        """
        connection, theirs = connection_pair(self)
        received = []
        connection.protocol = type(
            "Sink", (), {"dataReceived": lambda self, data: received.append(data)}
        )()
        self.assertTrue(read_in_large_chunks(connection))
        self.assertEqual(connection.bufferSize, LARGE_READ_BYTES)
        # More than 64 KiB, less than the socket pair's buffer.
        sent = theirs.send(b"x" * (150 * 1024))
        self.assertGreater(sent, 64 * 1024)
        connection.doRead()
        self.assertEqual(len(received[0]), sent)

    def test_other_transports_untouched(self) -> None:
        transport = StringTransport()
        self.assertFalse(read_in_large_chunks(transport))
        self.assertFalse(hasattr(transport, "bufferSize"))


class ReceiveLowWaterTests(SynchronousTestCase):
    def test_tcp_socket_wakes_at_the_mark(self) -> None:
        """
        The kernel tells a poller that a socket is readable only once it
        holds the mark's bytes, and at once again when the mark is 1:
        what L{p2p.batching} relies on (should Linux stop honouring
        SO_RCVLOWAT for poll, this fails).
        """
        connection, theirs = tcp_connection_pair(self)
        sock = connection.getHandle()
        readable = [(sock.fileno(), select.POLLIN)]
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        theirs.sendall(b"x" * 1000)
        self.assertEqual(poller.poll(10_000), readable)  # arrived, mark 1
        self.assertTrue(set_receive_low_water(connection, 4096))
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT), 4096)
        self.assertEqual(poller.poll(0), [])  # 1000 bytes wait, unsignalled
        self.assertTrue(set_receive_low_water(connection, 1))
        self.assertEqual(poller.poll(0), readable)

    def test_end_of_input_wakes_below_the_mark(self) -> None:
        """A peer that closes with fewer bytes than the mark is noticed."""
        connection, theirs = tcp_connection_pair(self)
        set_receive_low_water(connection, 1 << 20)
        sock = connection.getHandle()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        theirs.sendall(b"x" * 1000)
        theirs.close()
        self.assertEqual(poller.poll(10_000), [(sock.fileno(), select.POLLIN)])

    def test_lending_wrapper(self) -> None:
        """A wrapper's own method is used (p2p.pool's lent connections)."""
        asked: list[int] = []

        class Lent(StringTransport):
            def set_receive_low_water(self, size: int) -> bool:
                asked.append(size)
                return True

        self.assertTrue(set_receive_low_water(Lent(), 4096))
        self.assertEqual(asked, [4096])

    def test_other_transports_untouched(self) -> None:
        self.assertFalse(set_receive_low_water(StringTransport(), 4096))

    def test_closed_connection(self) -> None:
        connection, _ = tcp_connection_pair(self)
        connection.connected = False
        self.assertFalse(set_receive_low_water(connection, 4096))


class _Offering:
    """A receiver that offers C{size} bytes of its buffer per read (none
    while C{size} is 0) and records what reaches it either way."""

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(1 << 20)
        self.size = size
        self.filled = 0
        self.counts: list[int] = []
        self.chunks: list[bytes] = []

    def receive_buffer(self) -> memoryview | None:
        if not self.size:
            return None
        return memoryview(self.buffer)[self.filled : self.filled + self.size]

    def received_into(self, count: int) -> None:
        self.filled += count
        self.counts.append(count)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)


class ReadIntoBuffersTests(SynchronousTestCase):
    """
    L{read_into_buffers} on a real tcp.Connection: it takes over Twisted's
    C{doRead}, so these fail loudly if Twisted's transport stops keeping
    its socket in C{socket}, or its C{doRead} changes what it returns.
    """

    def setUp(self) -> None:
        self.connection, self.theirs = connection_pair(self)
        self.receiver = _Offering(4096)
        self.connection.protocol = self.receiver
        self.assertTrue(read_into_buffers(self.connection, self.receiver))

    def test_received_into_the_offered_buffer(self) -> None:
        """Bytes go into the buffer offered, never past it, and only its
        count is reported: C{dataReceived} sees nothing."""
        self.theirs.send(b"a" * 5000)
        self.assertIsNone(self.connection.doRead())
        self.assertEqual(self.receiver.counts, [4096])
        self.assertIsNone(self.connection.doRead())
        self.assertEqual(self.receiver.counts, [4096, 904])
        self.assertEqual(bytes(self.receiver.buffer[:5000]), b"a" * 5000)
        self.assertEqual(self.receiver.chunks, [])

    def test_no_buffer_offered(self) -> None:
        """Without a buffer on offer, Twisted's own read runs."""
        self.receiver.size = 0
        self.theirs.send(b"line\n")
        self.assertIsNone(self.connection.doRead())
        self.assertEqual(self.receiver.chunks, [b"line\n"])
        self.assertEqual(self.receiver.counts, [])

    def test_nothing_to_read(self) -> None:
        """A spurious wake-up (EWOULDBLOCK) is nothing, as in Twisted."""
        self.assertIsNone(self.connection.doRead())
        self.assertEqual(self.receiver.counts, [])

    def test_end_of_input_as_twisted_says_it(self) -> None:
        """The other end closing is the same to the reactor as with
        Twisted's own C{doRead}, which is checked on a second pair."""
        self.theirs.close()
        ours = self.connection.doRead()
        plain, theirs = connection_pair(self)
        plain.protocol = _Offering(0)
        theirs.close()
        self.assertIs(ours, main.CONNECTION_DONE)
        self.assertIs(tcp.Connection.doRead(plain), main.CONNECTION_DONE)

    def test_reset_is_connection_lost(self) -> None:
        """A broken connection (here: a closed socket) is lost, as Twisted
        reports a failed recv."""
        self.connection.socket.close()
        self.assertIs(self.connection.doRead(), main.CONNECTION_LOST)

    def test_other_transports_untouched(self) -> None:
        transport = StringTransport()
        self.assertFalse(read_into_buffers(transport, self.receiver))
        self.assertFalse(hasattr(transport, "doRead"))


class RequestsSentAtOnceTests(SynchronousTestCase):
    """
    The client's requests leave in the call that writes them on a real TCP
    connection, not at the reactor's next turn (L{write_now}): a turn and
    two epoll_ctl calls fewer per file.  Nothing here calls C{doWrite}.
    """

    def test_file_request(self) -> None:
        connection, theirs = tcp_connection_pair(self)
        sink = PieceSink(StreamOutput(io.BytesIO()))
        protocol = FileFetchProtocol(wire.Get("a.txt"), sink, Clock(), 10)
        connection.protocol = protocol
        protocol.makeConnection(connection)
        self.assertEqual(drain(theirs), b"GET a.txt\n")

    def test_line_request(self) -> None:
        connection, theirs = tcp_connection_pair(self)
        protocol = LineRequestProtocol("relay", b"PEERS", listing=True)
        connection.protocol = protocol
        protocol.makeConnection(connection)
        self.assertEqual(drain(theirs), b"PEERS\n")


class WriteNowTests(SynchronousTestCase):
    def test_sent_at_once(self) -> None:
        """Nothing queued: the bytes go straight to the socket."""
        connection, other_end = connection_pair(self)
        write_now(connection, b"P2P/1 relay\n")
        self.assertFalse(unsent_output(connection))
        self.assertEqual(drain(other_end), b"P2P/1 relay\n")

    def test_full_socket_queues_the_rest_in_order(self) -> None:
        """
        What the socket does not take is queued in the transport, and a
        later write_now queues behind it: the peer receives every byte in
        order.
        """
        connection, other_end = connection_pair(self)
        big = bytes(range(256)) * 40_000  # more than a socket buffer holds
        write_now(connection, big)
        self.assertTrue(unsent_output(connection))
        write_now(connection, b"after\n")
        received = bytearray()
        while unsent_output(connection):
            received += drain(other_end)
            connection.doWrite()
        received += drain(other_end)
        self.assertEqual(bytes(received), big + b"after\n")

    def test_producer_registered_before_queueing_is_paused(self) -> None:
        """
        A producer C{before_queue} registers is paused when the bytes the
        socket did not take fill the transport's buffer: Twisted checks at
        C{write}, not at C{registerProducer}, so one registered after the
        write (as the servers' read gate was) is never paused.
        """
        connection, _ = connection_pair(self)
        big = bytes(range(256)) * 40_000  # more than a socket buffer holds
        pauses: list[bool] = []

        class Producer:
            def pauseProducing(self) -> None:
                pauses.append(True)

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        write_now(
            connection, big, lambda: connection.registerProducer(Producer(), True)
        )
        self.assertEqual(pauses, [True])
        connection.unregisterProducer()
        other, _ = connection_pair(self)
        write_now(other, big)
        other.registerProducer(Producer(), True)
        self.assertEqual(pauses, [True])  # registered after: never paused
        other.unregisterProducer()

    def test_queued_behind_earlier_writes(self) -> None:
        """Bytes already queued by transport.write go first."""
        connection, other_end = connection_pair(self)
        connection.write(b"first\n")
        write_now(connection, b"second\n")
        self.assertEqual(drain(other_end), b"")
        connection.doWrite()
        self.assertEqual(drain(other_end), b"first\nsecond\n")

    def test_broken_connection_left_to_the_transport(self) -> None:
        """A send that fails (peer gone) queues the bytes; no exception."""
        connection, other_end = connection_pair(self)
        other_end.close()
        write_now(connection, b"OK 0\n")
        self.assertTrue(unsent_output(connection))

    def test_other_transports_use_write(self) -> None:
        """A test transport (or TLS) gets an ordinary write."""
        transport = StringTransport()
        write_now(transport, b"OK 0\n")
        self.assertEqual(transport.value(), b"OK 0\n")

    def test_closing_connection_uses_write(self) -> None:
        """No shortcut once a close was asked for, or before connecting."""
        connection, _ = connection_pair(self)
        self.assertIsNotNone(plain_socket(connection))
        connection.disconnecting = True
        self.assertIsNone(plain_socket(connection))
        connection.disconnecting = False
        connection.connected = False
        self.assertIsNone(plain_socket(connection))


class NonReadingClientTests(SynchronousTestCase):
    """
    A client that sends requests and never reads the answers: the relay
    stops reading its requests once answers pile up, and goes on when the
    client reads (a real tcp.Connection over a socket pair).
    """

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from p2p.registry import MemoryRegistry
        from p2p.relay import Relay, RelayProtocol

        self.clock = Clock()
        registry = MemoryRegistry(600)
        for port in range(1, 1001):
            registry.register("10.0.0.1", port, "a-peer-name", 0.0)
        relay = Relay(registry, self.clock, ttl=600)
        self.lost: list[bool] = []
        self.protocol = RelayProtocol(
            relay, 30, lambda: self.lost.append(True), source="10.0.0.9"
        )
        self.connection, self.client = connection_pair(self)
        self.connection.protocol = self.protocol
        self.protocol.makeConnection(self.connection)
        self.received = bytearray(drain(self.client))

    def test_answers_wait_for_the_client(self) -> None:
        requests = 200  # 200 full pages: about 20 MB of answers
        self.protocol.dataReceived(b"PEERS\n" * requests)
        self.assertTrue(self.protocol.paused)
        queued = len(self.connection.dataBuffer) + self.connection._tempDataLen
        # At most a page or two waits in the transport (not 200 of them),
        # and the rest of the requests wait, unread.
        self.assertLess(queued, 3 * 110_000)
        self.assertGreater(len(self.protocol._buffer), 0)
        # The client reads: everything is answered, in order.
        for _ in range(10_000):
            self.received += drain(self.client)
            if not unsent_output(self.connection) and not self.protocol._buffer:
                break
            self.connection.doWrite()
        self.received += drain(self.client)
        self.assertFalse(self.protocol.paused)
        headers = [
            line
            for line in bytes(self.received).split(b"\n")
            if line.startswith(b"OK ")
        ]
        self.assertEqual(headers, [b"OK 1000"] * requests)

    def test_client_that_stopped_reading_is_cut_off(self) -> None:
        """
        At the idle timeout a client with unread answers gets one more
        period; if it read nothing in it, the connection is aborted (a
        polite close would wait for it for ever).
        """
        self.protocol.dataReceived(b"PEERS\n" * 50)
        self.assertTrue(unsent_output(self.connection))
        self.clock.advance(30)
        self.connection.reactor.advance(0)
        self.assertEqual(self.lost, [])
        self.clock.advance(30)
        self.assertEqual(self.lost, [])
        # abortConnection closes on the reactor's next turn.
        self.connection.reactor.advance(0)
        self.assertEqual(self.lost, [True])

    def test_slow_reader_is_not_cut_off(self) -> None:
        """A client that keeps reading, however slowly, keeps its answers."""
        self.protocol.dataReceived(b"PEERS\n" * 50)
        received = bytearray(self.received)
        for _ in range(5):
            self.clock.advance(30)
            try:
                received += self.client.recv(200_000)
            except BlockingIOError:
                pass
            self.connection.doWrite()
        self.connection.reactor.advance(0)
        self.assertEqual(self.lost, [])
        self.assertTrue(self.protocol.transport.connected)

    def test_idle_without_unread_answers_gets_408(self) -> None:
        """The ordinary case is unchanged: ERR 408, then a polite close."""
        self.clock.advance(30)
        self.assertEqual(drain(self.client), b"ERR 408 idle timeout\n")
        self.assertTrue(self.connection.disconnecting)

    def test_peer_listing_flood_then_a_file(self) -> None:
        """
        A peer held up by unread LIST answers hands the transport to the
        file producer for a GET that follows, and everything arrives in
        order once the client reads.
        """
        import os
        import shutil
        import tempfile

        from twisted.internet.task import Clock

        from p2p.peer import PeerProtocol
        from p2p.share import ShareFolder

        from ._indexed import indexed

        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        content = os.urandom(300_000)
        with open(os.path.join(root, "a.bin"), "wb") as stream:
            stream.write(content)
        for index in range(300):
            open(os.path.join(root, f"{'n' * 200}-{index}.txt"), "wb").close()
        connection, client = connection_pair(self)
        # The pair is a UNIX socket pair: TCP_NODELAY, which the peer sets on
        # a new connection, fails there (and Twisted logs it as an error).
        connection.setTcpNoDelay = lambda enabled: None
        share = ShareFolder(root)
        peer = PeerProtocol(share, indexed(self, share, Clock()), self.clock, 30)
        connection.protocol = peer
        peer.makeConnection(connection)
        peer.dataReceived(b"LIST\n" * 100 + b"GET a.bin\n")
        self.assertTrue(peer.paused)
        received = bytearray()
        for _ in range(100_000):
            received += drain(client)
            if (
                peer._opened is None
                and not peer._buffer
                and not unsent_output(connection)
            ):
                break
            connection.doWrite()
        received += drain(client)
        self.assertTrue(received.endswith(content), len(received))
        # Each LIST answered with one page: 64 KiB of its 301 files, then
        # next= (see LIST_PAGE_BYTES).
        self.assertEqual(len(re.findall(rb"\nOK \d+ next=[0-9a-f]+\n", received)), 100)


class _Received(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def tls_over(connection: object):
    """A TLS client transport on C{connection}, a TCP connection or a
    test transport (no handshake made)."""
    factory = TLSMemoryBIOFactory(
        CertificateOptions(), True, Factory.forProtocol(_Received), Clock()
    )
    tls = factory.buildProtocol(None)
    tls.makeConnection(connection)
    return tls


def exchange(
    server: Protocol,
    server_wire: StringTransport,
    client: Protocol,
    client_wire: StringTransport,
    turn: Callable[[], object] = lambda: None,
) -> None:
    """Move what is on the two wires to the other side until both are
    quiet, calling C{turn} after each round (a clock's turn: Twisted's TLS
    gathers small writes until then)."""
    while server_wire.value() or client_wire.value():
        to_client, to_server = server_wire.value(), client_wire.value()
        server_wire.clear()
        client_wire.clear()
        if to_server:
            server.dataReceived(to_server)
        if to_client:
            client.dataReceived(to_client)
        turn()


def tls_pair(test: SynchronousTestCase):
    """
    A TLS server and client in memory, handshake done: the server's TLS
    transport (what a peer's protocol writes to), the StringTransport under
    it, the client's protocol, a function moving what is on the wire, and
    the server side's clock.
    """
    pki = Authority(test.mktemp())
    credentials = pki.issue("peer", ips=["127.0.0.1"])
    # What an ssl: endpoint string builds.
    server_options = DefaultOpenSSLContextFactory(
        credentials.key, credentials.certificate
    )
    clock = Clock()
    server_factory = TLSMemoryBIOFactory(
        server_options, False, Factory.forProtocol(_Received), clock
    )
    server = server_factory.buildProtocol(None)
    server_wire, client_wire = StringTransport(), StringTransport()
    server.makeConnection(server_wire)
    client = tls_over(client_wire)

    def pump() -> None:
        exchange(server, server_wire, client, client_wire)

    pump()
    test.assertIsNotNone(client.getPeerCertificate())
    return server, server_wire, client.wrappedProtocol, pump, clock


class UnbufferedWriteTests(SynchronousTestCase):
    def test_tls_writes_gathered_by_twisted(self) -> None:
        """
        Twisted's TLS transport holds a small write until the reactor's
        next turn.  Should it stop doing so (this fails), unbuffered_write
        has no more reason to exist.
        """
        server, server_wire, received, pump, clock = tls_pair(self)
        server.write(b"x" * 16384)
        self.assertEqual(server_wire.value(), b"")
        clock.advance(0)
        pump()
        self.assertEqual(received.data, b"x" * 16384)

    def test_tls_write_goes_out_at_once_in_order(self) -> None:
        """What Twisted gathered goes first, then the bytes, with no turn of
        the reactor."""
        server, server_wire, received, pump, clock = tls_pair(self)
        server.write(b"header\n")
        unbuffered_write(server)(b"y" * 16384)
        pump()
        self.assertEqual(received.data, b"header\n" + b"y" * 16384)
        self.assertEqual(clock.getDelayedCalls()[0].active(), True)
        clock.advance(0)  # the gathering's own flush finds nothing left
        pump()
        self.assertEqual(received.data, b"header\n" + b"y" * 16384)

    def test_other_transports_use_write(self) -> None:
        transport = StringTransport()
        self.assertEqual(unbuffered_write(transport), transport.write)


class LimitUnsentTests(SynchronousTestCase):
    def test_tcp_connection_under_tls(self) -> None:
        """The TCP connection under a TLS transport pauses its producer
        past the new threshold (Twisted's C{bufferSize})."""
        connection, _ = connection_pair(self)
        tls = tls_over(connection)
        self.assertTrue(limit_unsent(tls, 16384))
        self.assertEqual(connection.bufferSize, 16384)

    def test_other_transports_untouched(self) -> None:
        connection, _ = connection_pair(self)
        self.assertFalse(limit_unsent(connection, 16384))
        self.assertEqual(connection.bufferSize, FileDescriptor.bufferSize)
        self.assertFalse(limit_unsent(StringTransport(), 16384))


class KernelUnsentTests(SynchronousTestCase):
    def test_tcp_socket(self) -> None:
        """The kernel's own threshold (TCP_NOTSENT_LOWAT) is set on a TCP
        connection's socket."""
        connection, _ = tcp_connection_pair(self)
        self.assertTrue(limit_unsent_in_kernel(connection, 65536))
        handle = connection.getHandle()
        self.assertEqual(
            handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT), 65536
        )

    def test_tcp_socket_under_tls(self) -> None:
        connection, _ = tcp_connection_pair(self)
        tls = tls_over(connection)
        self.assertTrue(limit_unsent_in_kernel(tls, 16384))
        handle = connection.getHandle()
        self.assertEqual(
            handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT), 16384
        )

    def test_other_transports_untouched(self) -> None:
        self.assertFalse(limit_unsent_in_kernel(StringTransport(), 65536))

    def test_closed_socket(self) -> None:
        connection, _ = tcp_connection_pair(self)
        connection.getHandle().close()
        self.assertFalse(limit_unsent_in_kernel(connection, 65536))
