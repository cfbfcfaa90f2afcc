"""Tests for L{p2p.peer}: the file server protocol, on a StringTransport.

The pull producer is driven by hand, the way a socket would drain: the test
calls C{transport.producer.resumeProducing()} until the producer unregisters.
Time only moves when the test advances the L{Clock}.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import os

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from p2p import wire
from p2p.limits import MAX_ERRORS_PER_CONNECTION
from p2p.peer import (
    CHUNK_BYTES,
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    FileRangeProducer,
    FileShrank,
    PeerFactory,
    PeerProtocol,
)
from p2p.share import OpenedFile, ShareFolder
from tests.test_share import (
    A_CONTENT,
    DeferredRunner,
    build_tree,
    open_descriptor_count,
    write,
)

IDLE = 30.0
BIG_SIZE = 3 * CHUNK_BYTES + 17  # four chunks, the last one short
CLIENT_ADDRESS = IPv4Address("TCP", "198.51.100.7", 40000)


def connect_in_memory(server, client, clock: Clock) -> iosim.IOPump:
    """
    Connect two real protocols without sockets; C{flush()} the returned pump
    to move bytes.  The one place that touches C{twisted.test.iosim}
    (semi-public), so it is easy to replace.
    """
    return iosim.connect(
        server,
        iosim.makeFakeServer(server),
        client,
        iosim.makeFakeClient(client),
        greet=False,
        clock=clock,
    )


class RecordingShare(ShareFolder):
    """A ShareFolder that remembers the descriptors it handed out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.descriptors: list[int] = []

    def open(self, name: str) -> OpenedFile:
        opened = super().open(name)
        self.descriptors.append(opened.fd)
        return opened


def is_open(fd: int) -> bool:
    """Whether C{fd} is an open descriptor."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def parse_reply(data: bytes) -> tuple[bytes, bytes]:
    """Split one reply into its first line and whatever follows."""
    line, delimiter, rest = data.partition(b"\n")
    assert delimiter, f"no complete line in {data[:80]!r}"
    return line, rest


class PeerTestMixin:
    """A peer protocol over a StringTransport, on a fresh share tree."""

    idle_timeout: float | None = IDLE

    def setUp(self) -> None:
        self.base, self.root = build_tree(self)
        self.big = os.urandom(BIG_SIZE)
        write(os.path.join(self.root, "big.bin"), self.big)
        write(os.path.join(self.root, "sub", "two.txt"), b"second file\n")
        self.fds_before = open_descriptor_count()
        self.clock = Clock()
        self.share = RecordingShare(self.root)
        self.connect()

    def connect(self, share: ShareFolder | None = None) -> None:
        self.factory = PeerFactory(share or self.share, self.clock, self.idle_timeout)
        self.protocol = self.factory.buildProtocol(CLIENT_ADDRESS)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.assertEqual(self.transport.value(), b"P2P/1 peer\n")
        self.transport.clear()

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def drain(self) -> int:
        """Pull every chunk, as a draining socket would; return the count."""
        chunks = 0
        while self.transport.producer is not None:
            self.assertFalse(self.transport.streaming)
            self.transport.producer.resumeProducing()
            chunks += 1
            self.assertLess(chunks, 1000, "the producer never finished")
        return chunks

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def get(self, request: bytes) -> tuple[wire.FileHeader, bytes]:
        """Send one GET/RESUME line, drain it, return header and bytes."""
        self.send(request)
        self.drain()
        line, rest = parse_reply(self.take())
        return wire.FileHeader.from_line(line), rest

    def lose(self, reason: Exception | None = None) -> None:
        """Deliver connectionLost, as the reactor would."""
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    def assertClean(self) -> None:
        """No timer, no descriptor left behind."""
        self.assertEqual(self.clock.getDelayedCalls(), [])
        for fd in self.share.descriptors:
            self.assertFalse(is_open(fd), f"descriptor {fd} leaked")
        self.assertEqual(open_descriptor_count(), self.fds_before)


class GreetingTests(PeerTestMixin, SynchronousTestCase):
    """Connection set-up and tear-down."""

    def test_banner_and_timer(self) -> None:
        """A connection is greeted and gets exactly one idle timer."""
        calls = self.clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].getTime(), IDLE)

    def test_close_cancels_timer(self) -> None:
        """Losing an idle connection leaves no delayed call."""
        self.lose()
        self.assertClean()

    def test_factory(self) -> None:
        """The factory hands its share, clock and timeout to each protocol."""
        self.assertIsInstance(self.protocol, PeerProtocol)
        self.assertIs(self.protocol.factory, self.factory)
        self.assertIs(self.protocol.share, self.share)
        self.assertEqual(
            PeerFactory(self.share, self.clock).idle_timeout,
            DEFAULT_IDLE_TIMEOUT_SECONDS,
        )

    def test_no_timeout(self) -> None:
        """An idle timeout of None schedules nothing."""
        self.lose()
        self.idle_timeout = None
        self.connect()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.lose()


class GetTests(PeerTestMixin, SynchronousTestCase):
    """GET and RESUME stream a header line, then exactly the bytes."""

    def test_get(self) -> None:
        """
        GET answers ``OK <count> sha256=.. offset=0 size=..`` and the whole
        file; the descriptor is closed once the producer is done.
        """
        header, data = self.get(b"GET a.txt\n")
        self.assertEqual(
            header,
            wire.FileHeader(
                len(A_CONTENT),
                hashlib.sha256(A_CONTENT).hexdigest(),
                0,
                len(A_CONTENT),
            ),
        )
        self.assertEqual(data, A_CONTENT)
        self.assertFalse(self.transport.disconnecting)
        self.lose()
        self.assertClean()

    def test_descriptor_closed_after_transfer(self) -> None:
        """The file is closed as soon as its last byte is written."""
        self.get(b"GET a.txt\n")
        [fd] = self.share.descriptors
        self.assertFalse(is_open(fd))

    def test_multi_chunk(self) -> None:
        """A file larger than a chunk goes out chunk by chunk, exactly."""
        self.send(b"GET big.bin\n")
        self.assertIsInstance(self.transport.producer, FileRangeProducer)
        chunks = self.drain()
        self.assertEqual(chunks, 4)
        line, data = parse_reply(self.take())
        header = wire.FileHeader.from_line(line)
        self.assertEqual((header.count, header.size), (BIG_SIZE, BIG_SIZE))
        self.assertEqual(header.sha256, hashlib.sha256(self.big).hexdigest())
        self.assertEqual(data, self.big)

    def test_one_chunk_per_pull(self) -> None:
        """Nothing but the header is written until the consumer pulls."""
        self.send(b"GET big.bin\n")
        line, rest = parse_reply(self.take())
        self.assertEqual(rest, b"")
        self.transport.producer.resumeProducing()
        self.assertEqual(len(self.take()), CHUNK_BYTES)

    def test_resume(self) -> None:
        """RESUME sends the rest of the file; the header keeps the whole digest."""
        header, data = self.get(b"RESUME 5 a.txt\n")
        self.assertEqual(header.offset, 5)
        self.assertEqual(header.count, len(A_CONTENT) - 5)
        self.assertEqual(header.size, len(A_CONTENT))
        self.assertEqual(header.sha256, hashlib.sha256(A_CONTENT).hexdigest())
        self.assertEqual(data, A_CONTENT[5:])

    def test_resume_big(self) -> None:
        """RESUME within a large file starts at the exact byte."""
        offset = CHUNK_BYTES + 3
        header, data = self.get(b"RESUME %d big.bin\n" % offset)
        self.assertEqual(header.count, BIG_SIZE - offset)
        self.assertEqual(data, self.big[offset:])

    def test_resume_at_end(self) -> None:
        """RESUME at the file's size sends a header with count 0 and no bytes."""
        header, data = self.get(b"RESUME %d a.txt\n" % len(A_CONTENT))
        self.assertEqual(header.count, 0)
        self.assertEqual(data, b"")
        self.assertIsNone(self.transport.producer)
        self.assertFalse(is_open(self.share.descriptors[0]))

    def test_empty_file(self) -> None:
        """An empty file is a header with count 0 and nothing else."""
        write(os.path.join(self.root, "empty"), b"")
        header, data = self.get(b"GET empty\n")
        self.assertEqual((header.count, header.size), (0, 0))
        self.assertEqual(header.sha256, hashlib.sha256(b"").hexdigest())
        self.assertEqual(data, b"")

    def test_resume_beyond_end(self) -> None:
        """An offset beyond the size is ERR 416; the file is closed again."""
        self.send(b"RESUME %d a.txt\n" % (len(A_CONTENT) + 1))
        self.assertTrue(self.take().startswith(b"ERR 416 "))
        self.assertIsNone(self.transport.producer)
        self.assertFalse(is_open(self.share.descriptors[0]))
        self.assertFalse(self.transport.disconnecting)

    def test_missing(self) -> None:
        """A missing file is ERR 404 and the connection stays usable."""
        self.send(b"GET nothing.txt\n")
        self.assertTrue(self.take().startswith(b"ERR 404 "))
        header, data = self.get(b"GET a.txt\n")
        self.assertEqual(data, A_CONTENT)

    def test_crlf(self) -> None:
        """A request ended by CRLF (telnet, nc -C) works."""
        header, data = self.get(b"GET a.txt\r\n")
        self.assertEqual(data, A_CONTENT)

    def test_lowercase_verb(self) -> None:
        """Verbs are case-insensitive."""
        header, data = self.get(b"get a.txt\n")
        self.assertEqual(data, A_CONTENT)

    def test_second_request_after_transfer(self) -> None:
        """After a transfer the same connection serves another request."""
        self.get(b"GET big.bin\n")
        header, data = self.get(b"GET sub/two.txt\n")
        self.assertEqual(data, b"second file\n")
        self.send(b"LIST\n")
        self.assertTrue(self.take().startswith(b"OK "))
        self.lose()
        self.assertClean()

    def test_pipelined_requests_wait(self) -> None:
        """
        Requests sent together are answered one after the other: the second
        header only appears once the first file is completely out.
        """
        self.send(b"GET big.bin\nGET sub/two.txt\nLIST\n")
        first = self.take()
        self.assertEqual(first.count(b"\n"), 1)  # just the first header
        self.drain()
        stream = first + self.take()
        line, rest = parse_reply(stream)
        header = wire.FileHeader.from_line(line)
        self.assertEqual(rest[: header.count], self.big)
        line, rest = parse_reply(rest[header.count :])
        self.assertEqual(wire.FileHeader.from_line(line).count, 12)
        self.assertTrue(rest.startswith(b"second file\nOK "))
        self.lose()
        self.assertClean()

    def test_traversal_codes(self) -> None:
        """Traversal is 403, a missing name 404, a FIFO 403 (without hanging)."""
        for request, code in [
            (b"GET ../secret.txt\n", b"403"),
            (b"GET out\n", b"403"),
            (b"GET /etc/passwd\n", b"403"),
            (b"RESUME 0 ../outside/secret.txt\n", b"403"),
            (b"GET %2e%2e/secret.txt\n", b"404"),
            (b"GET pipe\n", b"403"),
            (b"GET sub\n", b"403"),
            (b"GET .secret\n", b"403"),
            (b"GET a.txt\x00\n", b"400"),
        ]:
            self.send(request)
            self.assertTrue(self.take().startswith(b"ERR " + code + b" "), request)


class RequestErrorTests(PeerTestMixin, SynchronousTestCase):
    """Malformed requests get an ERR line; only an over-long line closes."""

    def assertReply(self, request: bytes, prefix: bytes) -> None:
        self.send(request)
        reply = self.take()
        self.assertTrue(reply.startswith(prefix), (request, reply))
        self.assertTrue(reply.endswith(b"\n"))
        self.assertEqual(reply.count(b"\n"), 1)

    def test_unknown_command(self) -> None:
        """An unknown verb is ERR 501; the connection stays open."""
        self.assertReply(b"PUT a.txt\n", b"ERR 501 ")
        self.assertFalse(self.transport.disconnecting)

    def test_malformed(self) -> None:
        """Bad arguments are ERR 400."""
        for request in [
            b"GET\n",
            b"GET \n",
            b"RESUME x a.txt\n",
            b"RESUME -1 a.txt\n",
            b"RESUME 5\n",
            b"LIST extra\n",
            b"GET \xff\xfe\n",
            b"GET a\x1bb\n",
        ]:
            self.assertReply(request, b"ERR 400 ")
        self.assertFalse(self.transport.disconnecting)

    def test_blank_lines_ignored(self) -> None:
        """Blank lines get no reply."""
        self.send(b"\n  \n\r\n")
        self.assertEqual(self.take(), b"")

    def test_line_too_long(self) -> None:
        """A line over the limit is ERR 413, then the connection closes."""
        self.send(b"GET " + b"x" * wire.MAX_LINE_LENGTH + b"\nLIST\n")
        self.assertEqual(self.take(), b"ERR 413 line too long\n")
        self.assertTrue(self.transport.disconnecting)
        self.lose()
        self.assertClean()

    def test_one_byte_too_long(self) -> None:
        """
        MAX_LINE_LENGTH + 1 bytes, with LF or with CRLF, is a 413 and a
        close; the request after it is not served.
        """
        for ending in (b"\n", b"\r\n"):
            self.lose()
            self.connect()
            line = b"LIST" + b" " * (wire.MAX_LINE_LENGTH + 1 - len(b"LIST"))
            self.send(line + ending + b"LIST\n")
            self.assertEqual(self.take(), b"ERR 413 line too long\n", ending)
            self.assertTrue(self.transport.disconnecting)

    def test_line_too_long_without_delimiter(self) -> None:
        """Endless bytes without a newline are cut off the same way."""
        self.send(b"G" * 600)
        self.assertEqual(self.take(), b"")
        self.send(b"G" * 600)
        self.assertEqual(self.take(), b"ERR 413 line too long\n")
        self.assertTrue(self.transport.disconnecting)

    def test_longest_legal_line(self) -> None:
        """A line of exactly MAX_LINE_LENGTH bytes is still parsed."""
        name = "n" * (wire.MAX_LINE_LENGTH - len("GET "))
        self.assertReply(b"GET " + name.encode() + b"\n", b"ERR 400 ")
        self.assertFalse(self.transport.disconnecting)

    def test_longest_legal_line_crlf(self) -> None:
        """
        Exactly MAX_LINE_LENGTH bytes plus CRLF is served: LIST padded with
        spaces to the limit gets its listing.
        """
        line = b"LIST" + b" " * (wire.MAX_LINE_LENGTH - len(b"LIST"))
        self.send(line + b"\r\n")
        self.assertTrue(self.take().startswith(b"OK "))
        self.assertFalse(self.transport.disconnecting)


class ErrorBudgetTests(PeerTestMixin, SynchronousTestCase):
    """After MAX_ERRORS_PER_CONNECTION error replies, ERR 429 and a close."""

    def test_budget(self) -> None:
        """
        Nine refusals leave the connection usable (a file is still served);
        the tenth error is followed by ``ERR 429 too many errors`` and a close.
        """
        for _ in range(MAX_ERRORS_PER_CONNECTION - 1):
            self.send(b"GET ../secret.txt\n")
            self.assertTrue(self.take().startswith(b"ERR 403 "))
        header, data = self.get(b"GET a.txt\n")
        self.assertEqual(data, A_CONTENT)
        self.send(b"GET missing.txt\n")
        self.assertEqual(
            self.take(), b"ERR 404 no such file\nERR 429 too many errors\n"
        )
        self.assertTrue(self.transport.disconnecting)
        self.lose()
        self.assertClean()

    def test_pipelined_errors_stop(self) -> None:
        """
        Bad requests pipelined in one segment get ten error replies and the
        429; the GET behind them is not served.
        """
        self.send(b"PUT x\n" * 100 + b"GET a.txt\n")
        lines = self.take().split(b"\n")[:-1]
        self.assertEqual(len(lines), MAX_ERRORS_PER_CONNECTION + 1)
        self.assertEqual(lines[-1], b"ERR 429 too many errors")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)
        self.assertEqual(self.share.descriptors, [])

    def test_read_errors_count(self) -> None:
        """An ERR 500 (a file that cannot be read) is an error reply too."""
        runner = DeferredRunner()
        self.lose()
        self.share = RecordingShare(self.root, run_blocking=runner)
        self.connect()
        path = os.path.join(self.root, "big.bin")
        for index in range(MAX_ERRORS_PER_CONNECTION):
            write(path, self.big)
            self.send(b"GET big.bin\n")
            os.truncate(path, 10)
            runner.run_all()
            reply = self.take()
            self.assertTrue(reply.startswith(b"ERR 500 "), (index, reply))
        self.assertTrue(reply.endswith(b"ERR 429 too many errors\n"))
        self.assertTrue(self.transport.disconnecting)
        self.lose()
        self.assertClean()
        # No failure was left in a Deferred (reading on after the close).
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


class ListTests(PeerTestMixin, SynchronousTestCase):
    """LIST answers ``OK <n>`` and n ``FILE <size> <name>`` lines."""

    def test_list(self) -> None:
        """The listing matches the share folder's, line for line."""
        self.send(b"LIST\n")
        lines = self.take().split(b"\n")
        self.assertEqual(lines[-1], b"")
        expected = self.share.list()
        self.assertEqual(lines[0], b"OK %d" % len(expected))
        self.assertEqual(
            [wire.FileEntry.from_line(line) for line in lines[1:-1]], expected
        )
        self.assertIn(b"FILE 11 a.txt", lines)
        self.assertIn(b"FILE %d big.bin" % BIG_SIZE, lines)

    def test_empty_list(self) -> None:
        """An empty share lists ``OK 0``."""
        self.lose()
        empty = os.path.join(self.base, "empty-share")
        os.mkdir(empty)
        self.connect(ShareFolder(empty))
        self.send(b"LIST\n")
        self.assertEqual(self.take(), b"OK 0\n")


class TimeoutTests(PeerTestMixin, SynchronousTestCase):
    """The idle timeout, on the injected clock."""

    def test_idle_timeout(self) -> None:
        """Silence for the idle timeout gets ERR 408, then a close."""
        self.clock.advance(IDLE - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertEqual(self.take(), b"ERR 408 idle timeout\n")
        self.assertTrue(self.transport.disconnecting)
        self.lose()
        self.assertClean()

    def test_request_resets_timeout(self) -> None:
        """Each request line restarts the idle timer."""
        self.clock.advance(IDLE - 1)
        self.send(b"LIST\n")
        self.take()
        self.clock.advance(IDLE - 1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1.1)
        self.assertTrue(self.transport.disconnecting)

    def assertTimedOut(self, started: float) -> None:
        """
        Still open at ``started + IDLE - 0.1``; then ERR 408 and a close;
        once lost, no timer and no descriptor is left.
        """
        self.clock.advance(started + IDLE - 0.1 - self.clock.seconds())
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.take(), b"")
        self.clock.advance(0.2)
        self.assertEqual(self.take(), b"ERR 408 idle timeout\n")
        self.assertTrue(self.transport.disconnecting)
        self.lose()
        self.assertClean()

    def test_slowloris(self) -> None:
        """One byte a second without a line end is cut off after IDLE."""
        for _ in range(int(IDLE) - 1):
            self.clock.advance(1)
            self.send(b"G")
        self.assertTimedOut(0)

    def test_trickled_request(self) -> None:
        """
        A request trickled byte by byte counts only once complete: it is
        served, and the idle period starts again from its last byte.
        """
        for byte in b"LIST\n":
            self.clock.advance(IDLE / 6)
            self.send(bytes([byte]))
        self.assertTrue(self.take().startswith(b"OK "))
        self.assertTimedOut(self.clock.seconds())

    def test_bare_newlines_do_not_reset(self) -> None:
        """Blank lines every second are not requests: no reply, no reprieve."""
        for index in range(int(IDLE) - 1):
            self.clock.advance(1)
            self.send([b"\n", b"\r\n", b"  \n"][index % 3])
        self.assertTimedOut(0)

    def test_slow_transfer_keeps_going(self) -> None:
        """
        A transfer whose consumer drains slowly but steadily is not cut off,
        though it lasts longer than the idle timeout; afterwards the idle
        timer runs again from the last chunk.
        """
        self.send(b"GET big.bin\n")
        chunks = 0
        while self.transport.producer is not None:
            self.clock.advance(IDLE - 1)
            self.assertFalse(self.transport.disconnecting)
            self.transport.producer.resumeProducing()
            chunks += 1
        self.assertEqual(chunks, 4)
        self.assertGreater(self.clock.seconds(), IDLE)
        line, data = parse_reply(self.take())
        self.assertEqual(data, self.big)
        self.clock.advance(IDLE - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertEqual(self.take(), b"ERR 408 idle timeout\n")

    def test_stalled_transfer_aborts(self) -> None:
        """
        A consumer that stops pulling mid-file is aborted after the idle
        timeout, with no ERR line to corrupt the byte stream; the connection
        loss that follows (producer stopped first, as TCP does) closes the
        file and leaves no timer.
        """
        self.send(b"GET big.bin\n")
        self.transport.producer.resumeProducing()
        sent = self.take()
        self.clock.advance(IDLE - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.transport.disconnected)  # aborted, not closed
        self.assertEqual(self.take(), b"")
        # The stream holds the header and file bytes only: no ERR line.
        header, _, body = sent.partition(b"\n")
        self.assertTrue(header.startswith(b"OK "))
        self.assertEqual(body, self.big[: len(body)])
        self.transport.producer.stopProducing()
        self.lose(ConnectionAborted())
        self.assertClean()

    def test_timeout_while_hashing(self) -> None:
        """
        A digest that takes longer than the idle timeout (hashing on a
        thread) aborts the connection; the late digest sends nothing and
        every descriptor is closed.
        """
        runner = DeferredRunner()
        self.lose()
        self.share = RecordingShare(self.root, run_blocking=runner)
        self.connect()
        self.send(b"GET a.txt\n")
        self.clock.advance(IDLE + 1)
        self.assertTrue(self.transport.disconnected)
        self.lose(ConnectionAborted())
        runner.run_all()
        self.assertEqual(self.take(), b"")
        self.assertClean()


class ConnectionLostTests(PeerTestMixin, SynchronousTestCase):
    """A client leaving at any point releases the file and the timer."""

    def start_big_transfer(self) -> None:
        self.send(b"GET big.bin\n")
        self.transport.producer.resumeProducing()
        self.assertTrue(is_open(self.share.descriptors[-1]))

    def test_lost_mid_transfer(self) -> None:
        """
        The reactor's order: the transport stops its producer, then reports
        connectionLost.  The file is closed and no timer remains.
        """
        self.start_big_transfer()
        producer = self.transport.producer
        producer.stopProducing()
        self.lose(ConnectionLost())
        self.assertClean()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_lost_without_stop_producing(self) -> None:
        """
        Even if only connectionLost arrives (a transport that never stops its
        producer), the file is closed and no timer remains.
        """
        self.start_big_transfer()
        self.lose(ConnectionLost())
        self.assertClean()

    def test_stop_producing_after_loss(self) -> None:
        """A late stopProducing after connectionLost is harmless."""
        self.start_big_transfer()
        producer = self.transport.producer
        self.lose(ConnectionLost())
        producer.stopProducing()
        self.assertClean()

    def test_lost_while_hashing(self) -> None:
        """
        A client that leaves while its file is being hashed gets nothing
        sent, and both the file and the hasher's descriptor are closed.
        """
        runner = DeferredRunner()
        self.lose()
        self.share = RecordingShare(self.root, run_blocking=runner)
        self.connect()
        self.send(b"GET a.txt\n")
        self.lose(ConnectionLost())
        runner.run_all()
        self.assertEqual(self.take(), b"")
        self.assertIsNone(self.transport.producer)
        self.assertClean()

    def test_many_transfers_no_leak(self) -> None:
        """A hundred aborted transfers leave no descriptor behind."""
        for _ in range(100):
            self.lose()
            self.connect()
            self.start_big_transfer()
            self.lose(ConnectionLost())
        self.assertClean()


class FailureTests(PeerTestMixin, SynchronousTestCase):
    """Files that misbehave while being served."""

    def test_file_shrank_mid_transfer(self) -> None:
        """
        A file truncated mid-transfer cannot match its header: the
        connection is aborted (no ERR line in the stream) and the file closed.
        """
        self.send(b"GET big.bin\n")
        self.transport.producer.resumeProducing()
        os.truncate(os.path.join(self.root, "big.bin"), CHUNK_BYTES)
        self.take()
        self.transport.producer.resumeProducing()
        self.assertIsNone(self.transport.producer)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.take(), b"")
        self.lose(ConnectionAborted())
        self.assertClean()

    def test_hash_failure_before_header(self) -> None:
        """
        A read error while hashing (before any header) is ERR 500, and the
        connection keeps serving.
        """
        runner = DeferredRunner()
        self.lose()
        self.share = RecordingShare(self.root, run_blocking=runner)
        self.connect()
        self.send(b"GET big.bin\n")
        os.truncate(os.path.join(self.root, "big.bin"), 10)
        runner.run_all()
        self.assertEqual(self.take(), b"ERR 500 cannot read the file\n")
        self.assertFalse(self.transport.disconnecting)
        self.send(b"GET a.txt\n")
        runner.run_all()
        self.drain()
        line, data = parse_reply(self.take())
        self.assertEqual(data, A_CONTENT)
        self.lose()
        self.assertClean()


class EagerPullTransport(StringTransport):
    """
    Like a TCP transport, pull once as soon as a pull producer registers
    (C{abstract.FileDescriptor.registerProducer} does exactly that).
    """

    def registerProducer(self, producer, streaming):
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()


class EagerPullTests(PeerTestMixin, SynchronousTestCase):
    """The first chunk is read inside registerProducer, as on real TCP."""

    def connect(self, share: ShareFolder | None = None) -> None:
        self.factory = PeerFactory(share or self.share, self.clock, self.idle_timeout)
        self.protocol = self.factory.buildProtocol(CLIENT_ADDRESS)
        self.transport = EagerPullTransport()
        self.protocol.makeConnection(self.transport)
        self.transport.clear()

    def test_small_file_in_one_pull(self) -> None:
        """A one-chunk file is done inside registerProducer; the next request
        is served."""
        self.send(b"GET a.txt\nGET sub/two.txt\n")
        self.assertIsNone(self.transport.producer)
        line, rest = parse_reply(self.take())
        self.assertEqual(rest[: len(A_CONTENT)], A_CONTENT)
        line, rest = parse_reply(rest[len(A_CONTENT) :])
        self.assertEqual(rest, b"second file\n")
        self.lose()
        self.assertClean()

    def test_read_error_after_header(self) -> None:
        """
        A read error on the first chunk, after the header went out, cannot be
        reported in-band: the stream is aborted (no ERR line where file bytes
        belong, no further requests read) and the file is closed.
        """
        real_pread = os.pread

        def failing_pread(fd: int, size: int, offset: int) -> bytes:
            if fd in self.share.descriptors:
                raise OSError(errno.EIO, "Input/output error")
            return real_pread(fd, size, offset)

        self.patch(os, "pread", failing_pread)
        self.send(b"GET big.bin\nLIST\n")
        line, rest = parse_reply(self.take())
        wire.FileHeader.from_line(line)
        self.assertEqual(rest, b"")
        self.assertTrue(self.transport.disconnected)
        self.lose(ConnectionAborted())
        self.assertClean()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class FileRangeProducerTests(SynchronousTestCase):
    """The pull producer on its own."""

    def setUp(self) -> None:
        self.base, self.root = build_tree(self)
        self.data = bytes(range(256)) * 10
        self.fd = os.open(write(os.path.join(self.root, "f"), self.data), os.O_RDONLY)
        self.addCleanup(os.close, self.fd)
        self.consumer = StringTransport()

    def test_interface(self) -> None:
        """It is an IPullProducer."""
        from twisted.internet.interfaces import IPullProducer

        verifyObject(IPullProducer, FileRangeProducer(self.fd, 0, 1, self.consumer))

    def test_range(self) -> None:
        """It writes exactly C{count} bytes from C{offset}, chunk by chunk."""
        progress = []
        producer = FileRangeProducer(
            self.fd, 100, 1000, self.consumer, lambda: progress.append(1), 300
        )
        d = producer.start()
        self.assertIs(self.consumer.producer, producer)
        while self.consumer.producer is not None:
            producer.resumeProducing()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.consumer.value(), self.data[100:1100])
        self.assertEqual(len(progress), 4)

    def test_zero(self) -> None:
        """Zero bytes: done at once, never registered."""
        d = FileRangeProducer(self.fd, 5, 0, self.consumer).start()
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.consumer.producer)

    def test_stop(self) -> None:
        """stopProducing fails C{done} with ConnectionLost, once."""
        producer = FileRangeProducer(self.fd, 0, 10, self.consumer)
        d = producer.start()
        producer.stopProducing()
        producer.stopProducing()
        producer.resumeProducing()  # ignored once done
        self.failureResultOf(d, ConnectionLost)
        self.assertEqual(self.consumer.value(), b"")

    def test_short_file(self) -> None:
        """Asking for more than the file holds fails with FileShrank."""
        producer = FileRangeProducer(self.fd, len(self.data) - 5, 10, self.consumer)
        d = producer.start()
        producer.resumeProducing()
        producer.resumeProducing()
        self.failureResultOf(d, FileShrank)
        self.assertEqual(self.consumer.value(), self.data[-5:])
        self.assertIsNone(self.consumer.producer)


class _SocketConsumer:
    """A consumer in front of a real socket, as a TCP transport would be:
    write() buffers (flushed by the test), startWriting() is recorded."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.buffered = b""
        self.producer = None
        self.wants_writing = 0

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer
        producer.resumeProducing()  # as FileDescriptor does for pull producers

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.buffered += data

    def startWriting(self) -> None:
        self.wants_writing += 1

    def flush(self) -> None:
        self.sock.sendall(self.buffered)
        self.buffered = b""


class ZeroCopyTests(SynchronousTestCase):
    """FileRangeProducer's sendfile path on a real (local) socket pair."""

    def test_sendfile_after_the_first_chunk(self) -> None:
        """The first chunk goes through the transport (behind the header in
        its buffer); every later one is sent with sendfile, bytes exact."""
        import socket

        base, root = build_tree(self)
        data = os.urandom(3 * 1024 * 1024 + 5)
        fd = os.open(write(os.path.join(root, "f"), data), os.O_RDONLY)
        self.addCleanup(os.close, fd)
        sender, receiver = socket.socketpair()
        self.addCleanup(sender.close)
        self.addCleanup(receiver.close)
        sender.setblocking(False)
        consumer = _SocketConsumer(sender)
        producer = FileRangeProducer(
            fd, 0, len(data), consumer, chunk_bytes=4096, socket_fd=sender.fileno()
        )
        done = producer.start()
        self.assertEqual(len(consumer.buffered), 4096)  # the first call
        consumer.flush()
        received = bytearray()
        receiver.setblocking(False)
        while consumer.producer is not None:
            producer.resumeProducing()  # the transport's buffer is empty
            try:
                while True:
                    chunk = receiver.recv(1 << 20)
                    if not chunk:
                        break
                    received += chunk
            except BlockingIOError:
                pass
        self.successResultOf(done)
        receiver.setblocking(True)
        sender.shutdown(socket.SHUT_WR)
        while chunk := receiver.recv(1 << 20):
            received += chunk
        self.assertEqual(bytes(received), data)
        self.assertEqual(consumer.buffered, b"")

    def test_plain_tcp_only(self) -> None:
        """Only a plain TCP connection gets the zero-copy path."""
        from p2p.transports import zero_copy_socket

        self.assertIsNone(zero_copy_socket(StringTransport()))
