"""Tests for L{p2p.peer}: the file server protocol (P2P/2), on a StringTransport.

The peer answers from its share's index (L{tests._indexed}): the index's
pool work runs inline, so a peer serves its files at once, or, where a test
looks at a request while its file is being indexed, in a L{StepPool} that
the test runs by hand.  The index has a clock of its own (its rescan timer),
so C{self.clock.getDelayedCalls()} shows the peer's timers and nothing else.

The pull producer is driven by hand, the way a socket would drain: the test
calls C{transport.producer.resumeProducing()} until the producer unregisters.
Time only moves when the test advances a L{Clock}.  Roots and piece digests
are computed by the tests from BLAKE3 directly (L{tests.test_share.root_hex}),
not with L{p2p.pieces}' hashing.
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass

from blake3 import blake3
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from p2p import peer, pieces, wire
from p2p.index import IndexEntry, ShareIndex
from p2p.limits import (
    MAX_ERRORS_PER_CONNECTION,
    ConnectionLimits,
    ConnectionPolicy,
    ReadGate,
    RefusingProtocol,
)
from p2p.peer import (
    CHUNK_BYTES,
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    HOLDERS_TRIED,
    LOG_START_BYTES,
    PROGRESS_INTERVAL_SECONDS,
    STALE_RETRY_SECONDS,
    TRANSFER_EVENTS_LOGGED_PER_MINUTE,
    BufferProducer,
    FileRangeProducer,
    FileShrank,
    PeerFactory,
    PeerProtocol,
)
from p2p.pieces import PIECE_SIZE, Content, PieceList, root_of
from p2p.pulls import BufferedPulls
from p2p.share import OpenedFile, ShareFolder
from p2p.throttle import TokenBucket
from tests._indexed import StepPool, indexed
from tests.test_share import (
    A_CONTENT,
    build_tree,
    digests_of,
    open_descriptor_count,
    root_hex,
    write,
)

IDLE = 30.0
BIG_SIZE = 3 * CHUNK_BYTES + 17  # four chunks, the last one short; one piece
CLIENT_ADDRESS = IPv4Address("TCP", "198.51.100.7", 40000)
RESCAN_SECONDS = 60.0
UNKNOWN_ROOT = "0" * 64


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


def file_header(
    data: bytes, offset: int = 0, count: int | None = None, hashes: int = 0
) -> wire.FileHeader:
    """The header a peer must send for C{count} bytes of C{data} from
    C{offset} (the rest of it when C{count} is not given)."""
    if count is None:
        count = len(data) - offset
    return wire.FileHeader(count, root_hex(data), offset, len(data), PIECE_SIZE, hashes)


class RecordingShare(ShareFolder):
    """A ShareFolder that remembers the descriptors it handed out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.descriptors: list[int] = []

    def open(self, name: str) -> OpenedFile:
        opened = super().open(name)
        self.descriptors.append(opened.fd)
        return opened


class NoDelayTransport(StringTransport):
    """A StringTransport with TCP's C{setTcpNoDelay}, which it records."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.no_delay: list[bool] = []

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay.append(enabled)


class GoneSocketTransport(StringTransport):
    """A transport whose socket is already gone when options are set."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")


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


def take_progress(data: bytes) -> tuple[list[wire.Indexing], bytes]:
    """The ``INDEXING`` lines at the front of C{data}, and what follows."""
    progress = []
    while data.startswith(b"INDEXING "):
        line, data = parse_reply(data)
        indexing = wire.Indexing.from_line(line)
        assert indexing is not None
        progress.append(indexing)
    return progress, data


@dataclass
class FileReply:
    """One file answer: progress lines, header, piece digests, bytes."""

    progress: list[wire.Indexing]
    header: wire.FileHeader
    digests: bytes
    data: bytes


def read_file_reply(stream: bytes) -> tuple[FileReply, bytes]:
    """Parse one file answer off the front of C{stream}; return it and the
    bytes after it.  Fails if the stream ends before the header's bytes."""
    progress, stream = take_progress(stream)
    line, rest = parse_reply(stream)
    header = wire.FileHeader.from_line(line)
    digests, rest = rest[: header.hashes], rest[header.hashes :]
    data, rest = rest[: header.count], rest[header.count :]
    assert len(digests) == header.hashes, "the stream ended in the digests"
    assert len(data) == header.count, "the stream ended in the file's bytes"
    return FileReply(progress, header, digests, data), rest


def read_listing(stream: bytes) -> tuple[list[wire.FileEntry], str | None, bytes]:
    """Parse one LIST answer off the front of C{stream}: its entries, its
    ``next=`` cursor (or C{None}) and the bytes after it."""
    line, rest = parse_reply(stream)
    count, next_cursor = wire.parse_listing_header(line, wire.MAX_FILES_PER_PAGE)
    entries = []
    for _ in range(count):
        line, rest = parse_reply(rest)
        entries.append(wire.FileEntry.from_line(line))
    return entries, next_cursor, rest


class PeerTestMixin:
    """A peer protocol over a StringTransport, on a fresh, indexed share tree.

    The index reads the folder through a ShareFolder of its own, so that
    C{self.share.descriptors} holds the descriptors the peer opened to
    serve, and nothing else; the process-wide descriptor count catches a
    leak in either (see L{assertClean}).
    """

    idle_timeout: float | None = IDLE
    transport_class = StringTransport
    # Whether the index is built (inline) before the test starts.
    index_now = True

    def setUp(self) -> None:
        self.base, self.root = build_tree(self)
        self.big = os.urandom(BIG_SIZE)
        write(os.path.join(self.root, "big.bin"), self.big)
        write(os.path.join(self.root, "sub", "two.txt"), b"second file\n")
        self.fds_before = open_descriptor_count()
        self.clock = Clock()
        self.index_clock = Clock()
        self.share = RecordingShare(self.root)
        self.index = self.make_index()
        self.connect()

    def make_index(self) -> ShareIndex:
        return indexed(
            self,
            ShareFolder(self.root),
            self.index_clock,
            self.index_now,
            rescan_interval=RESCAN_SECONDS,
        )

    def connect(self, share: ShareFolder | None = None, index=None) -> None:
        self.factory = PeerFactory(
            self.share if share is None else share,
            self.index if index is None else index,
            self.clock,
            self.idle_timeout,
            # The idle tests time a connection from its start.
            policy=ConnectionPolicy(self.clock, first_request_timeout=None),
        )
        self.protocol = self.factory.buildProtocol(CLIENT_ADDRESS)
        self.transport = self.transport_class()
        self.protocol.makeConnection(self.transport)
        self.assertEqual(self.transport.value(), b"P2P/2 peer\n")
        self.transport.clear()

    def path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def file_producer(self):
        """
        The producer registered with the transport, unless it is the
        connection's read gate: a StringTransport cannot say whether it
        sent an answer, so the gate is registered after every answer.
        """
        producer = self.transport.producer
        return None if isinstance(producer, ReadGate) else producer

    def drain(self) -> int:
        """Pull every chunk, as a draining socket would; return the count."""
        chunks = 0
        while self.file_producer() is not None:
            self.assertFalse(self.transport.streaming)
            self.file_producer().resumeProducing()
            chunks += 1
            self.assertLess(chunks, 1000, "the producer never finished")
        return chunks

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def get(self, request: bytes) -> FileReply:
        """Send one GET/RANGE/BLOB line, drain it, return the one answer."""
        self.send(request)
        self.drain()
        reply, rest = read_file_reply(self.take())
        self.assertEqual(rest, b"")
        return reply

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
        """The factory hands its share, index, clock and timeout to each
        protocol."""
        self.assertIsInstance(self.protocol, PeerProtocol)
        self.assertIs(self.protocol.factory, self.factory)
        self.assertIs(self.protocol.share, self.share)
        self.assertIs(self.protocol.index, self.index)
        self.assertIs(self.protocol.clock, self.clock)
        self.assertEqual(
            PeerFactory(self.share, self.index, self.clock).idle_timeout,
            DEFAULT_IDLE_TIMEOUT_SECONDS,
        )

    def test_no_timeout(self) -> None:
        """An idle timeout of None schedules nothing."""
        self.lose()
        self.idle_timeout = None
        self.connect()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.lose()

    def test_no_delay(self) -> None:
        """
        A TCP connection gets TCP_NODELAY before its banner: a header and a
        small file's bytes leave in two writes, and with Nagle's algorithm
        the second would wait for the client's delayed ACK.
        """
        self.lose()
        self.transport_class = NoDelayTransport
        self.connect()
        self.assertEqual(self.transport.no_delay, [True])
        reply = self.get(b"GET a.txt\n")
        self.assertEqual(reply.data, A_CONTENT)
        self.assertEqual(self.transport.no_delay, [True], "set once, not per file")

    def test_no_delay_on_a_gone_socket(self) -> None:
        """A socket already gone when the option is set is no error: the
        connection is greeted, and its loss is reported as usual."""
        self.lose()
        self.transport_class = GoneSocketTransport
        self.connect()
        self.lose()
        self.assertClean()


class GetTests(PeerTestMixin, SynchronousTestCase):
    """GET streams a header line, the piece digests, then exactly the bytes."""

    def test_get(self) -> None:
        """
        GET answers ``OK <count> root=.. offset=0 size=.. piece=..
        hashes=0`` and the whole file (one piece: no digests follow); the
        file was indexed, so no INDEXING line comes first.
        """
        reply = self.get(b"GET a.txt\n")
        self.assertEqual(reply.header, file_header(A_CONTENT))
        self.assertEqual(reply.progress, [])
        self.assertEqual(reply.digests, b"")
        self.assertEqual(reply.data, A_CONTENT)
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
        self.assertIsInstance(self.file_producer(), FileRangeProducer)
        chunks = self.drain()
        self.assertEqual(chunks, 4)
        reply, rest = read_file_reply(self.take())
        self.assertEqual(reply.header, file_header(self.big))
        self.assertEqual((reply.header.count, reply.header.size), (BIG_SIZE, BIG_SIZE))
        self.assertEqual(reply.data, self.big)
        self.assertEqual(rest, b"")

    def test_one_chunk_per_pull(self) -> None:
        """Nothing but the header is written until the consumer pulls."""
        self.send(b"GET big.bin\n")
        line, rest = parse_reply(self.take())
        self.assertEqual(rest, b"")
        self.file_producer().resumeProducing()
        self.assertEqual(len(self.take()), CHUNK_BYTES)

    def test_multi_piece_file_sends_its_digests_first(self) -> None:
        """
        A file of several pieces: the header says ``hashes=32*pieces``, and
        the piece digests follow it, before any of the file's bytes, so a
        client can check each piece as it arrives.  They belong to the
        root, and every piece matches its digest.
        """
        data = os.urandom(2 * PIECE_SIZE + 1000)  # three pieces
        write(self.path("three.bin"), data)
        self.send(b"GET three.bin\n")
        # The digests went out with the header, before the first pull.
        progress, before_pull = take_progress(self.take())
        line, digests = parse_reply(before_pull)
        header = wire.FileHeader.from_line(line)
        self.assertEqual(header, file_header(data, hashes=3 * pieces.DIGEST_BYTES))
        self.assertEqual(digests, digests_of(data))
        self.drain()
        received = self.take()
        self.assertEqual(received, data)
        content = Content(bytes.fromhex(header.root), header.size, header.piece)
        piece_list = PieceList.check(content, digests)
        for index in range(content.pieces):
            offset, length = content.span(index)
            self.assertTrue(
                piece_list.verify(index, received[offset : offset + length])
            )

    def test_empty_file(self) -> None:
        """An empty file is a header with count 0 and nothing else."""
        write(self.path("empty"), b"")
        reply = self.get(b"GET empty\n")
        self.assertEqual(reply.header, file_header(b""))
        self.assertEqual(reply.header.root, root_of(0, PIECE_SIZE, b"").hex())
        self.assertEqual(reply.data, b"")
        self.assertIsNone(self.file_producer())

    def test_missing(self) -> None:
        """A missing file is ERR 404 and the connection stays usable."""
        self.send(b"GET nothing.txt\n")
        self.assertEqual(self.take(), b"ERR 404 no such file\n")
        reply = self.get(b"GET a.txt\n")
        self.assertEqual(reply.data, A_CONTENT)

    def test_crlf(self) -> None:
        """A request ended by CRLF (telnet, nc -C) works."""
        self.assertEqual(self.get(b"GET a.txt\r\n").data, A_CONTENT)

    def test_lowercase_verb(self) -> None:
        """Verbs are case-insensitive."""
        self.assertEqual(self.get(b"get a.txt\n").data, A_CONTENT)

    def test_second_request_after_transfer(self) -> None:
        """After a transfer the same connection serves another request."""
        self.get(b"GET big.bin\n")
        reply = self.get(b"GET sub/two.txt\n")
        self.assertEqual(reply.data, b"second file\n")
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
        reply, rest = read_file_reply(stream)
        self.assertEqual(reply.data, self.big)
        reply, rest = read_file_reply(rest)
        self.assertEqual(reply.header, file_header(b"second file\n"))
        self.assertEqual(reply.data, b"second file\n")
        entries, next_cursor, rest = read_listing(rest)
        self.assertEqual(len(entries), len(self.index))
        self.assertEqual(rest, b"")
        self.lose()
        self.assertClean()

    def test_traversal_codes(self) -> None:
        """Traversal is 403, a missing name 404, a FIFO 403 (without hanging)."""
        for request, code in [
            (b"GET ../secret.txt\n", b"403"),
            (b"GET out\n", b"403"),
            (b"GET /etc/passwd\n", b"403"),
            (b"RANGE 0 10 ../outside/secret.txt\n", b"403"),
            (b"GET %2e%2e/secret.txt\n", b"404"),
            (b"GET pipe\n", b"403"),
            (b"GET sub\n", b"403"),
            (b"GET .secret\n", b"403"),
            (b"GET a.txt\x00\n", b"400"),
        ]:
            self.send(request)
            self.assertTrue(self.take().startswith(b"ERR " + code + b" "), request)


class RangeTests(PeerTestMixin, SynchronousTestCase):
    """RANGE sends part of a named file; its header describes the whole."""

    def test_range(self) -> None:
        """Bytes C{offset} to C{offset + length}: the header gives the
        offset and count, and the whole file's root, size and piece size."""
        reply = self.get(b"RANGE 3 4 a.txt\n")
        self.assertEqual(reply.header, file_header(A_CONTENT, 3, 4))
        self.assertEqual(reply.digests, b"")
        self.assertEqual(reply.data, A_CONTENT[3:7])

    def test_cut_short_at_the_end(self) -> None:
        """A length past the end is cut to what the file holds."""
        reply = self.get(b"RANGE 5 1000 a.txt\n")
        self.assertEqual(reply.header, file_header(A_CONTENT, 5))
        self.assertEqual(reply.header.count, len(A_CONTENT) - 5)
        self.assertEqual(reply.data, A_CONTENT[5:])

    def test_range_big(self) -> None:
        """A range within a large file starts at the exact byte."""
        offset = CHUNK_BYTES + 3
        reply = self.get(b"RANGE %d %d big.bin\n" % (offset, BIG_SIZE))
        self.assertEqual(reply.header.count, BIG_SIZE - offset)
        self.assertEqual(reply.data, self.big[offset:])

    def test_multi_piece_file_without_digests(self) -> None:
        """Only GET carries the piece list: a RANGE of a file of several
        pieces, even one from byte 0, has ``hashes=0``."""
        data = os.urandom(2 * PIECE_SIZE + 1000)
        write(self.path("three.bin"), data)
        reply = self.get(b"RANGE 0 %d three.bin\n" % PIECE_SIZE)
        self.assertEqual(reply.header, file_header(data, 0, PIECE_SIZE))
        self.assertEqual(reply.data, data[:PIECE_SIZE])
        reply = self.get(b"RANGE %d %d three.bin\n" % (PIECE_SIZE, len(data)))
        self.assertEqual(reply.header, file_header(data, PIECE_SIZE))
        self.assertEqual(reply.data, data[PIECE_SIZE:])

    def test_header_only_is_described_not_sent(self) -> None:
        """A question (``RANGE 0 0``, a client choosing among holders) is
        logged as a description, not as a transfer of 0 bytes; a transfer
        is logged as sent."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for line, expected in (
            (b"RANGE 0 0 a.txt\n", "described a.txt (header only)"),
            (b"RANGE 0 4 a.txt\n", "sent a.txt (4 bytes)"),
        ):
            self.get(line)
            texts = [formatEvent(e) for e in events if "shown_name" in e]
            self.assertEqual(texts[-1], expected)

    def test_transfer_lines_are_bounded(self) -> None:
        """
        A client pipelining header requests wrote one log line per answer
        (612 KB a second).  Past TRANSFER_EVENTS_LOGGED_PER_MINUTE, lines
        are counted by kind, and one line a minute says how many.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        answers = TRANSFER_EVENTS_LOGGED_PER_MINUTE + 50
        for _ in range(answers):
            self.get(b"RANGE 0 0 a.txt\n")
        self.get(b"RANGE 0 4 a.txt\n")
        described = [e for e in events if "shown_name" in e]
        self.assertEqual(len(described), TRANSFER_EVENTS_LOGGED_PER_MINUTE)
        self.clock.advance(60)
        self.assertEqual(
            formatEvent(events[-1]),
            "51 more transfer events not logged one by one: 50 x described, 1 x sent",
        )

    def test_at_end(self) -> None:
        """A range at the file's size is a header with count 0, no bytes."""
        reply = self.get(b"RANGE %d 10 a.txt\n" % len(A_CONTENT))
        self.assertEqual(reply.header, file_header(A_CONTENT, len(A_CONTENT)))
        self.assertEqual(reply.data, b"")
        self.assertIsNone(self.file_producer())
        self.assertFalse(is_open(self.share.descriptors[0]))

    def test_length_zero(self) -> None:
        """A range of length 0 is a header with count 0; the file is closed
        and the connection serves the next request."""
        reply = self.get(b"RANGE 2 0 a.txt\n")
        self.assertEqual(reply.header, file_header(A_CONTENT, 2, 0))
        self.assertEqual(reply.data, b"")
        self.assertFalse(is_open(self.share.descriptors[0]))
        self.assertEqual(self.get(b"GET a.txt\n").data, A_CONTENT)

    def test_beyond_end(self) -> None:
        """An offset beyond the size is ERR 416; the file is closed again."""
        self.send(b"RANGE %d 1 a.txt\n" % (len(A_CONTENT) + 1))
        self.assertEqual(
            self.take(), b"ERR 416 offset beyond the end (%d bytes)\n" % len(A_CONTENT)
        )
        self.assertIsNone(self.file_producer())
        self.assertFalse(is_open(self.share.descriptors[0]))
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.get(b"GET a.txt\n").data, A_CONTENT)

    def test_name_with_spaces(self) -> None:
        """The name is the rest of the line, spaces included."""
        write(self.path("with two spaces.txt"), b"spaced\n")
        reply = self.get(b"RANGE 1 3 with two spaces.txt\n")
        self.assertEqual(reply.data, b"pac")

    def test_resume_is_gone(self) -> None:
        """P2P/1's RESUME is an unknown command now; the connection goes on."""
        self.send(b"RESUME 5 a.txt\n")
        self.assertEqual(self.take(), b"ERR 501 unknown command\n")
        self.assertEqual(self.get(b"GET a.txt\n").data, A_CONTENT)


class BlobTests(PeerTestMixin, SynchronousTestCase):
    """BLOB sends a byte range of a content named by its root."""

    def blob(self, root: str, offset: int, length: int) -> bytes:
        return b"BLOB %s %d %d\n" % (root.encode(), offset, length)

    def test_by_root(self) -> None:
        """No name is needed: the root finds the content, and the header
        carries that root."""
        content = b"second file\n"
        reply = self.get(self.blob(root_hex(content), 0, len(content)))
        self.assertEqual(reply.header, file_header(content))
        self.assertEqual(reply.data, content)

    def test_range(self) -> None:
        """Any range of the content: inside, cut at the end, or empty at the
        end; no piece digests."""
        data = os.urandom(2 * PIECE_SIZE + 1000)
        write(self.path("three.bin"), data)
        self.get(b"GET three.bin\n")  # indexes it
        root = root_hex(data)
        reply = self.get(self.blob(root, PIECE_SIZE, PIECE_SIZE))
        self.assertEqual(reply.header, file_header(data, PIECE_SIZE, PIECE_SIZE))
        self.assertEqual(reply.data, data[PIECE_SIZE : 2 * PIECE_SIZE])
        reply = self.get(self.blob(root, 2 * PIECE_SIZE, PIECE_SIZE))
        self.assertEqual(reply.header, file_header(data, 2 * PIECE_SIZE))
        self.assertEqual(reply.data, data[2 * PIECE_SIZE :])
        reply = self.get(self.blob(root, len(data), 5))
        self.assertEqual((reply.header.count, reply.data), (0, b""))

    def test_beyond_end(self) -> None:
        """An offset past the content's end is ERR 416."""
        self.send(self.blob(root_hex(A_CONTENT), len(A_CONTENT) + 1, 1))
        self.assertTrue(self.take().startswith(b"ERR 416 "))
        [fd] = self.share.descriptors
        self.assertFalse(is_open(fd))

    def test_any_name_holding_the_content(self) -> None:
        """
        A content held under several names is served from one of them,
        whichever: the bytes are the content's.  (``a.txt`` and its
        symlink ``inlink``, and a copy, hold the same bytes.)
        """
        write(self.path("copy.txt"), A_CONTENT)
        self.get(b"GET copy.txt\n")
        reply = self.get(self.blob(root_hex(A_CONTENT), 0, 100))
        self.assertEqual(reply.header, file_header(A_CONTENT))
        self.assertEqual(reply.data, A_CONTENT)

    def test_unknown_root(self) -> None:
        """A root the peer holds no content for is ERR 404; the connection
        goes on."""
        self.send(self.blob(UNKNOWN_ROOT, 0, 10))
        self.assertEqual(self.take(), b"ERR 404 no such content\n")
        self.assertEqual(self.share.descriptors, [])
        self.assertFalse(self.transport.disconnecting)

    def test_malformed_root(self) -> None:
        """A root is 64 lowercase hex digits, or the request is ERR 400."""
        for root in ("xyz", root_hex(A_CONTENT).upper(), UNKNOWN_ROOT + "0"):
            self.send(self.blob(root, 0, 1))
            self.assertTrue(self.take().startswith(b"ERR 400 "), root)

    def test_changed_on_disk(self) -> None:
        """
        Never new bytes under an old root: a file changed since it was
        indexed is ERR 404 by its old root.  That has it indexed again, so
        its new root serves the new bytes, and the old one stays unknown.
        """
        old, new = b"second file\n", b"second file, longer now\n"
        write(self.path("sub/two.txt"), new)
        self.send(self.blob(root_hex(old), 0, 100))
        self.assertEqual(self.take(), b"ERR 404 no such content\n")
        self.assertFalse(is_open(self.share.descriptors[-1]))
        self.assertEqual(
            self.index.lookup("sub/two.txt").content.root_hex, root_hex(new)
        )
        self.send(self.blob(root_hex(old), 0, 100))
        self.assertEqual(self.take(), b"ERR 404 no such content\n")
        reply = self.get(self.blob(root_hex(new), 0, 100))
        self.assertEqual(reply.header, file_header(new))
        self.assertEqual(reply.data, new)

    def test_names_tried_are_bounded(self) -> None:
        """
        A content held under many names (every empty file has one root)
        costs a request HOLDERS_TRIED opens at most.  When every name
        tried is stale, the client is told to retry, and those names go
        last (indexed again): the next request finds one that holds it.
        """
        data = b"many copies\n"
        names = [f"copy{number:02}.txt" for number in range(HOLDERS_TRIED + 2)]
        for name in names:
            write(self.path(name), data)
            self.get(b"GET %s\n" % name.encode())  # indexes it
        for name in names[:-1]:
            write(self.path(name), b"changed since it was indexed\n")
        opened = len(self.share.descriptors)
        self.send(self.blob(root_hex(data), 0, 100))
        self.assertEqual(
            self.take(),
            b"ERR 503 the content's files changed; retry-after=%d\n"
            % STALE_RETRY_SECONDS,
        )
        self.assertEqual(len(self.share.descriptors) - opened, HOLDERS_TRIED)
        reply = self.get(self.blob(root_hex(data), 0, 100))
        self.assertEqual(reply.data, data)

    def test_another_name_still_holds_it(self) -> None:
        """
        One name holding a content is gone: another that still holds it
        serves it (and the index is told of the one gone).
        """
        write(self.path("copy.txt"), b"second file\n")
        self.get(b"GET copy.txt\n")
        os.remove(self.path("sub/two.txt"))
        root = root_hex(b"second file\n")
        for _ in range(2):  # whichever name the index names first
            reply = self.get(self.blob(root, 0, 100))
            self.assertEqual(reply.data, b"second file\n")
        self.assertIsNone(self.index.lookup("sub/two.txt"))

    def test_removed(self) -> None:
        """The only file holding a content is gone: ERR 404."""
        os.remove(self.path("sub/two.txt"))
        self.send(self.blob(root_hex(b"second file\n"), 0, 100))
        self.assertEqual(self.take(), b"ERR 404 no such content\n")
        self.assertFalse(self.transport.disconnecting)


class PiecesTests(PeerTestMixin, SynchronousTestCase):
    """PIECES sends a content's piece digests."""

    def pieces_reply(self, root: str) -> tuple[wire.PiecesHeader, bytes]:
        self.send(b"PIECES %s\n" % root.encode())
        line, rest = parse_reply(self.take())
        header = wire.PiecesHeader.from_line(line)
        self.assertEqual(len(rest), header.count)
        return header, rest

    def test_several_pieces(self) -> None:
        """The header (count, root, size, piece size), then the digests,
        which check against the root."""
        data = os.urandom(3 * PIECE_SIZE + 5)  # four pieces
        write(self.path("four.bin"), data)
        self.get(b"GET four.bin\n")
        header, digests = self.pieces_reply(root_hex(data))
        self.assertEqual(
            header, wire.PiecesHeader(4 * 32, root_hex(data), len(data), PIECE_SIZE)
        )
        self.assertEqual(digests, digests_of(data))
        content = Content(bytes.fromhex(header.root), header.size, header.piece)
        self.assertEqual(PieceList.check(content, digests).digests, digests)

    def test_one_piece(self) -> None:
        """A one-piece content's list is its one digest."""
        header, digests = self.pieces_reply(root_hex(A_CONTENT))
        self.assertEqual(
            header,
            wire.PiecesHeader(32, root_hex(A_CONTENT), len(A_CONTENT), PIECE_SIZE),
        )
        self.assertEqual(digests, blake3(A_CONTENT).digest())

    def test_empty(self) -> None:
        """An empty content has no piece: count 0."""
        write(self.path("empty"), b"")
        self.get(b"GET empty\n")
        header, digests = self.pieces_reply(root_hex(b""))
        self.assertEqual(header, wire.PiecesHeader(0, root_hex(b""), 0, PIECE_SIZE))
        self.assertEqual(digests, b"")

    def test_unknown_root(self) -> None:
        """An unknown root is ERR 404, a malformed one ERR 400."""
        self.send(b"PIECES %s\n" % UNKNOWN_ROOT.encode())
        self.assertEqual(self.take(), b"ERR 404 no such content\n")
        for request in (b"PIECES\n", b"PIECES xyz\n", b"PIECES a b\n"):
            self.send(request)
            self.assertTrue(self.take().startswith(b"ERR 400 "), request)
        self.assertFalse(self.transport.disconnecting)

    def test_pipelined(self) -> None:
        """Requests behind a PIECES are answered after it, in order."""
        root = root_hex(A_CONTENT).encode()
        self.send(b"PIECES %s\nGET a.txt\n" % root)
        line, rest = parse_reply(self.take())
        header = wire.PiecesHeader.from_line(line)
        digests, rest = rest[: header.count], rest[header.count :]
        self.assertEqual(digests, blake3(A_CONTENT).digest())
        self.drain()
        reply, rest = read_file_reply(rest + self.take())
        self.assertEqual((reply.data, rest), (A_CONTENT, b""))


class LongAnswerTests(PeerTestMixin, SynchronousTestCase):
    """
    A long piece list goes out a chunk at a time as the client reads, never
    into the transport's buffer whole: a client that does not read holds
    at most one chunk of the peer's memory (3,000 such connections held
    1,876 MiB for a 20 GiB file's list).  What goes with the header, and
    the chunk, are cut to one digest here, so that a file of a few pieces
    has a "long" list.
    """

    def setUp(self) -> None:
        self.patch(peer, "INLINE_ANSWER_BYTES", pieces.DIGEST_BYTES)
        self.patch(peer, "ANSWER_CHUNK_BYTES", pieces.DIGEST_BYTES)
        super().setUp()
        self.data = os.urandom(2 * PIECE_SIZE + 1000)  # three pieces
        write(self.path("three.bin"), self.data)
        self.send(b"RANGE 0 0 three.bin\n")  # indexed: a header alone
        take_progress(self.take())

    def pull(self) -> bytes:
        """One call from a drained transport; what it wrote."""
        producer = self.file_producer()
        self.assertIsInstance(producer, peer.BufferProducer)
        self.assertFalse(self.transport.streaming)
        producer.resumeProducing()
        return self.take()

    def test_get(self) -> None:
        """The header alone, then a digest per pull, then the file."""
        self.send(b"GET three.bin\n")
        line, rest = parse_reply(self.take())
        self.assertEqual(rest, b"")
        header = wire.FileHeader.from_line(line)
        self.assertEqual(header.hashes, 3 * pieces.DIGEST_BYTES)
        digests = b"".join(self.pull() for _ in range(3))
        self.assertEqual(digests, digests_of(self.data))
        self.assertIsInstance(self.file_producer(), peer.FileRangeProducer)
        self.assertNotIsInstance(self.file_producer(), peer.BufferProducer)
        self.drain()
        self.assertEqual(self.take(), self.data)
        self.assertIsNone(self.file_producer())
        self.lose()
        self.assertClean()

    def test_list_longer_than_inline_in_chunks_of_its_own(self) -> None:
        """A list too long to go with its header is streamed, in chunks of
        ANSWER_CHUNK_BYTES: here, all of it in one pull."""
        self.patch(peer, "ANSWER_CHUNK_BYTES", 64 * 1024)
        self.send(b"GET three.bin\n")
        line, rest = parse_reply(self.take())
        self.assertEqual(rest, b"")
        self.assertEqual(self.pull(), digests_of(self.data))
        self.drain()
        self.assertEqual(self.take(), self.data)
        self.lose()
        self.assertClean()

    def test_pieces_then_the_next_request(self) -> None:
        """A request behind a long PIECES is read once the list is out."""
        root = root_hex(self.data).encode()
        self.send(b"PIECES %s\nGET a.txt\n" % root)
        line, rest = parse_reply(self.take())
        self.assertEqual(rest, b"")
        self.assertEqual(wire.PiecesHeader.from_line(line).count, 96)
        self.assertEqual(self.pull(), digests_of(self.data)[:32])
        self.assertEqual(self.pull(), digests_of(self.data)[32:64], "no GET yet")
        # The last digest; the GET behind the list is read and answered.
        last = self.pull()
        self.assertEqual(last[:32], digests_of(self.data)[64:])
        self.drain()
        reply, rest = read_file_reply(last[32:] + self.take())
        self.assertEqual((reply.data, rest), (A_CONTENT, b""))
        self.lose()
        self.assertClean()

    def test_idle_client_is_cut_off_mid_list(self) -> None:
        """A client that stops reading mid-list: at the idle timeout the
        connection is aborted, with no ERR line inside the list."""
        self.send(b"GET three.bin\n")
        self.take()
        self.pull()
        self.clock.advance(IDLE + 1)
        self.assertEqual(self.take(), b"")
        self.assertTrue(self.transport.disconnecting)
        self.lose(ConnectionAborted())
        self.assertClean()

    def test_client_leaves_mid_list(self) -> None:
        """The transport stops the producer when the connection is lost:
        counted as a client that left, the file closed, nothing logged."""
        self.send(b"GET three.bin\n")
        self.take()
        producer = self.file_producer()
        self.pull()
        producer.stopProducing()
        self.lose(ConnectionLost())
        self.assertEqual(self.factory.transfers.outcomes["client-left"], 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertClean()

    def test_paid_from_the_upload_budget(self) -> None:
        """Under --max-upload-rate each chunk of the list is paid like
        content: with the budget spent, none goes out until it accrued."""
        bucket = TokenBucket(self.clock, 64 * 1024)
        self.protocol.throttle = bucket
        self.send(b"GET three.bin\n")
        self.take()
        bucket.charge(bucket.tokens)
        self.file_producer().resumeProducing()
        self.assertEqual(self.take(), b"", "waiting for the budget")
        self.assertEqual(bucket.waiting, 1)
        self.clock.advance(1)
        self.assertEqual(self.take(), digests_of(self.data)[:32])
        self.lose(ConnectionLost())
        self.assertEqual(bucket.waiting, 0)


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
        """Bad arguments are ERR 400 (a connection each: more than ten
        errors would use up one connection's error budget)."""
        for request in [
            b"GET\n",
            b"GET \n",
            b"RANGE x 1 a.txt\n",
            b"RANGE -1 1 a.txt\n",
            b"RANGE 0 -1 a.txt\n",
            b"RANGE 5 a.txt\n",
            b"RANGE 5 1\n",
            b"BLOB %s 0\n" % UNKNOWN_ROOT.encode(),
            b"LIST extra\n",
            b"LIST limit=0\n",
            b"GET \xff\xfe\n",
            b"GET a\x1bb\n",
        ]:
            self.lose()
            self.connect()
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


def failing_hash_pieces(fd: int, size: int, *args, **kwargs):
    """L{p2p.pieces.hash_pieces} on a disk with a bad block."""
    raise OSError(errno.EIO, "Input/output error")


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
        self.assertEqual(self.get(b"GET a.txt\n").data, A_CONTENT)
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
        self.assertIsNone(self.file_producer())
        self.assertEqual(self.share.descriptors, [])

    def test_read_errors_count(self) -> None:
        """
        An ERR 500 (a file that cannot be read while it is indexed) is an
        error reply too; the INDEXING lines before it are not.
        """
        self.lose()
        self.index = indexed(self, ShareFolder(self.root), Clock(), index_now=False)
        self.connect()
        self.patch(pieces, "hash_pieces", failing_hash_pieces)
        for attempt in range(MAX_ERRORS_PER_CONNECTION):
            self.send(b"GET big.bin\n")
            progress, reply = take_progress(self.take())
            self.assertTrue(progress, attempt)
            self.assertTrue(reply.startswith(b"ERR 500 "), (attempt, reply))
        self.assertEqual(
            reply, b"ERR 500 cannot read the file\nERR 429 too many errors\n"
        )
        self.assertTrue(self.transport.disconnecting)
        self.lose()
        self.assertClean()
        # An expected I/O error: logged as one error line, not a traceback.
        self.assertEqual(self.flushLoggedErrors(), [])
        # No other failure was left in a Deferred (reading on after the close).
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


class ListTests(PeerTestMixin, SynchronousTestCase):
    """LIST pages through the index: ``OK <n> [next=<cursor>]`` and n
    ``FILE <size> <root> <name>`` lines."""

    def listing(self, request: bytes = b"LIST\n"):
        """The entries and cursor of one LIST answer (nothing may follow)."""
        self.send(request)
        entries, next_cursor, rest = read_listing(self.take())
        self.assertEqual(rest, b"")
        return entries, next_cursor

    def list_all(self, limit: int) -> list[list[wire.FileEntry]]:
        """Every page, following ``next=`` cursors from the start."""
        pages = []
        request = b"LIST limit=%d\n" % limit
        for _ in range(100):
            entries, next_cursor = self.listing(request)
            pages.append(entries)
            if next_cursor is None:
                return pages
            request = b"LIST limit=%d cursor=%s\n" % (limit, next_cursor.encode())
        raise AssertionError("the cursors never ended")

    def test_list(self) -> None:
        """One page holds the whole index, by the order files were first
        indexed, each with its size and root; no ``next=``."""
        entries, next_cursor = self.listing()
        self.assertIsNone(next_cursor)
        expected = [
            wire.FileEntry(entry.content.size, entry.content.root_hex, entry.name)
            for entry in self.index.page(wire.MAX_FILES_PER_PAGE)[0]
        ]
        self.assertEqual(entries, expected)
        self.assertIn(
            wire.FileEntry(len(A_CONTENT), root_hex(A_CONTENT), "a.txt"), entries
        )
        self.assertIn(wire.FileEntry(BIG_SIZE, root_hex(self.big), "big.bin"), entries)
        self.assertEqual(
            {entry.name for entry in entries},
            {
                "a.txt",
                "big.bin",
                "inlink",
                "sub/b.txt",
                "sub/two.txt",
                "sub/deeper/c.txt",
            },
        )

    def test_status(self) -> None:
        """STATUS of a peer whose share is indexed: every file, none
        pending, the walk done."""
        self.send(b"STATUS\n")
        self.assertEqual(
            self.take(),
            wire.IndexStatus(len(self.index), 0, False).to_line() + b"\n",
        )
        self.assertFalse(self.transport.disconnecting)

    def test_empty_list(self) -> None:
        """An empty share lists ``OK 0``."""
        self.lose()
        empty = os.path.join(self.base, "empty-share")
        os.mkdir(empty)
        share = ShareFolder(empty)
        self.connect(share, indexed(self, share, Clock()))
        self.send(b"LIST\n")
        self.assertEqual(self.take(), b"OK 0\n")

    def test_paging(self) -> None:
        """
        ``limit=`` bounds a page; ``next=`` names where the next page starts
        until the last; the pages together are the whole listing, in order,
        each file once.
        """
        everything, _ = self.listing()
        pages = self.list_all(limit=4)
        self.assertEqual([len(page) for page in pages], [4, 2])
        self.assertEqual([entry for page in pages for entry in page], everything)
        pages = self.list_all(limit=1)
        self.assertEqual(len(pages), len(everything))
        self.assertEqual([entry for page in pages for entry in page], everything)

    def test_page_ends_at_its_byte_size(self) -> None:
        """
        A page also ends once its lines reach LIST_PAGE_BYTES (here, two
        lines' worth), whatever its limit, with ``next=`` to the rest: the
        pages together are still the whole listing, each file once.
        """
        everything, _ = self.listing()
        line = len(
            b"FILE %d %s a.txt\n" % (len(A_CONTENT), root_hex(A_CONTENT).encode())
        )
        self.patch(peer, "LIST_PAGE_BYTES", 2 * line)
        pages = self.list_all(limit=1000)
        self.assertEqual([len(page) for page in pages], [2, 2, 2])
        self.assertEqual([entry for page in pages for entry in page], everything)

    def test_page_holds_a_file_larger_than_its_byte_size(self) -> None:
        """A page holds at least one file, so paging always moves on."""
        everything, _ = self.listing()
        self.patch(peer, "LIST_PAGE_BYTES", 1)
        pages = self.list_all(limit=1000)
        self.assertEqual([len(page) for page in pages], [1] * len(everything))
        self.assertEqual([entry for page in pages for entry in page], everything)

    def test_cursor_past_the_end(self) -> None:
        """A cursor beyond the last file is an empty last page."""
        self.assertEqual(self.listing(b"LIST cursor=ffff\n"), ([], None))

    def test_bad_limit_or_cursor(self) -> None:
        """limit= is 1-1000 and a cursor 1-16 lowercase hex digits; anything
        else (or another option) is ERR 400, and the connection goes on."""
        for request in (
            b"LIST limit=0\n",
            b"LIST limit=1001\n",
            b"LIST limit=x\n",
            b"LIST cursor=xyz\n",
            b"LIST cursor=" + b"1" * 17 + b"\n",
            b"LIST cursor=\n",
            b"LIST sort=name\n",
        ):
            self.send(request)
            self.assertTrue(self.take().startswith(b"ERR 400 "), request)
        self.assertFalse(self.transport.disconnecting)

    def test_files_added_later_appear_on_later_pages(self) -> None:
        """
        A file indexed while a client pages (a rescan found it) appears on
        a later page, after the files already listed; no file listed
        before shows up again.
        """
        first, cursor = self.listing(b"LIST limit=3\n")
        self.assertIsNotNone(cursor)
        write(self.path("0-late.txt"), b"late\n")
        self.index_clock.advance(RESCAN_SECONDS)
        rest = []
        while cursor is not None:
            entries, cursor = self.listing(
                b"LIST limit=3 cursor=%s\n" % cursor.encode()
            )
            rest += entries
        self.assertEqual(rest[-1], wire.FileEntry(5, root_hex(b"late\n"), "0-late.txt"))
        names = [entry.name for entry in first + rest]
        self.assertEqual(len(names), len(set(names)))
        self.assertEqual(len(names), len(self.index))

    def test_changed_file_keeps_its_place(self) -> None:
        """A file that changes is listed where it was, with its new root:
        a client's cursor never skips it nor sees it twice."""
        before, _ = self.listing()
        write(self.path("a.txt"), b"alpha, rewritten\n")
        self.get(b"GET a.txt\n")  # has it indexed again
        after, _ = self.listing()
        self.assertEqual([e.name for e in after], [e.name for e in before])
        self.assertIn(
            wire.FileEntry(17, root_hex(b"alpha, rewritten\n"), "a.txt"), after
        )
        self.assertNotIn(
            wire.FileEntry(len(A_CONTENT), root_hex(A_CONTENT), "a.txt"), after
        )

    def test_names_the_wire_cannot_carry_are_skipped(self) -> None:
        """
        An entry whose ``FILE`` line a client could not parse back (a line
        break, a control character, a name too long) is left out of its
        page: one such line would spoil the whole page.  The count matches
        the lines sent, and the cursor still moves past the entry.
        """
        good = [self.index.lookup(name) for name in ("a.txt", "sub/two.txt")]
        bad_names = ["new\nline", "escape\x1bname", "x" * (wire.MAX_NAME_LENGTH + 1)]
        bad = [
            IndexEntry(name, good[0].content, good[0].identity, 1000 + n)
            for n, name in enumerate(bad_names)
        ]
        page = [good[0], bad[0], good[1], bad[1], bad[2]]
        self.lose()
        self.connect(index=FixedPage(page, more=True))
        entries, cursor = self.listing(b"LIST limit=5\n")
        self.assertEqual([entry.name for entry in entries], ["a.txt", "sub/two.txt"])
        self.assertEqual(cursor, wire.format_cursor(bad[2].seq))


class FixedPage:
    """An index stand-in whose every page is C{entries} (LIST only)."""

    def __init__(self, entries: list[IndexEntry], more: bool) -> None:
        self.entries = entries
        self.more = more

    def page(self, limit: int, after: int = 0) -> tuple[list[IndexEntry], bool]:
        return self.entries[:limit], self.more


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
        while self.file_producer() is not None:
            self.clock.advance(IDLE - 1)
            self.assertFalse(self.transport.disconnecting)
            self.file_producer().resumeProducing()
            chunks += 1
        self.assertEqual(chunks, 4)
        self.assertGreater(self.clock.seconds(), IDLE)
        reply, _ = read_file_reply(self.take())
        self.assertEqual(reply.data, self.big)
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
        self.file_producer().resumeProducing()
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
        self.file_producer().stopProducing()
        self.lose(ConnectionAborted())
        self.assertClean()


class UploadBudgetTests(PeerTestMixin, SynchronousTestCase):
    """
    ``--max-upload-rate`` pays for answers too: headers, piece lists and
    listings wait for their bytes of the budget, in turns shared with
    every other connection (unpaid, looped LISTs and piece lists went out
    at 140 times the cap), and a connection reads its next request once
    its answer is out.
    """

    RATE = 64 * 1024

    def connect(self, share: ShareFolder | None = None, index=None) -> None:
        super().connect(share, index)
        self.bucket = TokenBucket(self.clock, self.RATE)
        self.protocol.throttle = self.bucket

    def test_listings_paced(self) -> None:
        """Pipelined LISTs with the budget spent: each page goes out once
        its bytes accrued, then the next request is read."""
        self.bucket.charge(self.bucket.tokens)  # spent: exactly zero left
        self.send(b"LIST\n")
        self.assertEqual(self.take(), b"", "waiting for its bytes")
        self.clock.advance(1)
        page = self.take()
        entries, _, rest = read_listing(page)
        self.assertTrue(entries)
        self.assertEqual(rest, b"")
        self.bucket.charge(self.bucket.tokens)
        self.send(b"LIST\nLIST\n")
        self.clock.advance(len(page) / self.RATE - 0.001)
        self.assertEqual(self.take(), b"")
        self.clock.advance(0.002)
        self.assertEqual(self.take(), page, "one page, the next one waits")
        self.clock.advance(len(page) / self.RATE + 0.001)
        self.assertEqual(self.take(), page)
        self.assertEqual(self.bucket.waiting, 0)
        self.lose()
        self.assertClean()

    def test_half_closed_connection_gets_its_waiting_answer(self) -> None:
        """``printf 'LIST\\n' | nc -N``: the client's end of input comes while
        the page waits for the budget; the page still goes out, then the
        connection closes."""
        self.bucket.charge(self.bucket.tokens)
        self.send(b"LIST\n")
        half_close = IHalfCloseableProtocol(self.protocol, None)
        self.assertIs(half_close, self.protocol)
        half_close.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        entries, _, rest = read_listing(self.take())
        self.assertTrue(entries)
        self.assertTrue(self.transport.disconnecting)
        self.lose()

    def test_small_answer_not_held_up_by_a_large_one(self) -> None:
        """
        A connection's answer waits its turn with the others: a header
        behind another connection's 1 MiB answer goes out after one turn
        (the rate shared by the two waiting), not after the whole 1 MiB
        (16 s at this rate).  A new connection waits like the others: one
        connection per request is no way around the cap.
        """
        self.bucket.charge(self.bucket.tokens)
        self.bucket.wait(1024 * 1024, lambda granted: None)  # a flood's answer
        self.send(b"RANGE 0 0 big.bin\n")
        self.assertEqual(self.take(), b"")
        self.clock.advance(1.0)
        self.assertTrue(self.take().startswith(b"OK 0 "))
        self.lose(ConnectionLost())

    def test_first_request_deadline_met_by_a_waiting_request(self) -> None:
        """A first request that waits for the budget came in time: the
        first-request deadline (2 s here) does not cut it while it waits."""
        self.factory = PeerFactory(
            self.share,
            self.index,
            self.clock,
            self.idle_timeout,
            policy=ConnectionPolicy(self.clock, first_request_timeout=2),
        )
        self.protocol = self.factory.buildProtocol(CLIENT_ADDRESS)
        self.protocol.throttle = self.bucket
        self.transport = self.transport_class()
        self.protocol.makeConnection(self.transport)
        self.transport.clear()
        self.bucket.charge(self.bucket.tokens + 4 * self.RATE)  # 4 s of debt
        self.send(b"LIST\n")
        self.clock.advance(3.9)
        self.assertEqual(self.take(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.take().startswith(b"OK "))
        self.lose()

    def test_header_charged_before_the_content(self) -> None:
        """A GET's header and piece list are paid from the budget: the
        content waits for them."""
        self.send(b"GET big.bin\n")
        header = self.take()
        self.assertTrue(header.startswith(b"OK "))
        charged = self.bucket.burst - self.bucket.tokens
        self.assertEqual(charged, len(header))
        self.lose(ConnectionLost())
        self.assertEqual(self.bucket.waiting, 0)

    def test_error_lines_wait_their_turn(self) -> None:
        """
        Error lines are paid like any answer: pipelined bad requests get
        their replies at the cap's pace, one per turn, and leave the
        bucket out of debt (sent at once and charged after, a flood of
        them went out at 3.4 times the cap and its debt held every
        transfer for 33 s).
        """
        self.bucket.charge(self.bucket.tokens)
        error = b"ERR 404 no such file\n"
        count = MAX_ERRORS_PER_CONNECTION - 1
        self.send(b"GET missing.txt\n" * count)
        self.assertEqual(self.take(), b"", "waiting for its bytes")
        received = b""
        for step in range(1, 100):
            self.clock.advance(0.001)
            received += self.take()
            self.assertLessEqual(len(received), self.RATE * step * 0.001)
        self.assertEqual(received, error * count)
        self.assertGreaterEqual(self.bucket.tokens, 0)
        self.assertFalse(self.transport.disconnecting)
        self.lose()
        self.assertClean()

    def test_closing_error_waits_for_its_turn_then_closes(self) -> None:
        """
        The tenth error reply and its ``ERR 429`` wait for the budget like
        the rest; the close comes once they are out, and nothing sent
        meanwhile is read.
        """
        self.bucket.charge(self.bucket.tokens)
        self.send(b"PUT x\n" * MAX_ERRORS_PER_CONNECTION + b"GET a.txt\n")
        received = b""
        for _ in range(100):
            if self.transport.disconnecting:
                break
            self.clock.advance(0.01)
            received += self.take()
            self.assertIsNone(self.file_producer())
        lines = received.split(b"\n")[:-1]
        self.assertEqual(len(lines), MAX_ERRORS_PER_CONNECTION + 1)
        self.assertEqual(lines[-1], b"ERR 429 too many errors")
        self.assertTrue(self.transport.disconnecting)
        self.assertGreaterEqual(self.bucket.tokens, 0)
        self.lose()
        self.assertClean()

    def test_line_too_long_while_an_answer_waits(self) -> None:
        """An over-long line behind a waiting answer: the answer, then the
        413, then the close; no request after it is read."""
        self.bucket.charge(self.bucket.tokens)
        self.send(b"LIST\n" + b"x" * (wire.MAX_RECEIVE_LENGTH + 10))
        self.send(b"\nLIST\n")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        entries, _, rest = read_listing(self.take())
        self.assertTrue(entries)
        self.assertTrue(rest.startswith(b"ERR 413 "), rest)
        self.assertEqual(rest.count(b"\n"), 1)
        self.assertTrue(self.transport.disconnecting)
        self.lose()
        self.assertClean()

    def test_banner_and_refusals_are_charged(self) -> None:
        """The banner, and a refused connection's banner and ``ERR 503``,
        go out at once (a refused client must not wait in the queue) and
        count all the same."""
        self.lose()
        factory = PeerFactory(
            self.share,
            self.index,
            self.clock,
            self.idle_timeout,
            limits=ConnectionLimits(max_per_host=1),
            throttle=self.bucket,
        )
        full = self.bucket.tokens
        admitted = factory.buildProtocol(CLIENT_ADDRESS)
        transport = StringTransport()
        admitted.makeConnection(transport)
        self.assertEqual(full - self.bucket.tokens, len(transport.value()))
        refused = factory.buildProtocol(CLIENT_ADDRESS)
        self.assertIsInstance(refused, RefusingProtocol)
        refused_transport = StringTransport()
        refused.makeConnection(refused_transport)
        self.assertIn(b"ERR 503 ", refused_transport.value())
        self.assertEqual(
            full - self.bucket.tokens,
            len(transport.value()) + len(refused_transport.value()),
        )
        admitted.connectionLost(Failure(ConnectionDone()))
        refused.connectionLost(Failure(ConnectionDone()))
        self.assertClean()

    def test_waiting_connection_leaves_the_queue(self) -> None:
        """A connection lost while its next request waits for the budget
        leaves the queue and its timer."""
        self.bucket.charge(self.bucket.tokens + 1)
        self.send(b"LIST\nLIST\n")
        self.take()
        self.assertEqual(self.bucket.waiting, 1)
        self.lose()
        self.assertEqual(self.bucket.waiting, 0)
        self.assertClean()


class IndexingTests(PeerTestMixin, SynchronousTestCase):
    """
    A file not indexed yet is indexed at once while the client waits,
    hearing how far it got: ``INDEXING <done> <size>`` at once and then
    every PROGRESS_INTERVAL_SECONDS, then the header.  The index hashes
    one piece per pool call, and the pool runs only when the test says.
    """

    index_now = False

    def setUp(self) -> None:
        self.pool = StepPool()
        self.data = os.urandom(3 * PIECE_SIZE + 5)  # four pieces: four steps
        super().setUp()
        write(self.path("four.bin"), self.data)
        # Before the index stops (cleanups run last first): a stopping index
        # fails the requests still waiting for it, which is not under test.
        self.addCleanup(lambda: self.lose())

    def make_index(self) -> ShareIndex:
        index = indexed(
            self,
            ShareFolder(self.root),
            self.index_clock,
            index_now=False,
            run_in_pool=self.pool,
            step_bytes=PIECE_SIZE,
        )
        self.pool.run_all()  # opens the database; nothing is indexed
        self.assertEqual(len(index), 0)
        return index

    def test_status_while_indexing(self) -> None:
        """STATUS says how far the index got, so that a client can tell a
        listing of a peer still indexing from all it serves: a file being
        hashed is pending, then indexed."""
        self.send(b"STATUS\n")
        before = wire.IndexStatus.from_line(self.take().rstrip(b"\n"))
        self.send(b"GET four.bin\n")
        take_progress(self.take())
        self.send(b"STATUS\n")  # behind the GET: answered after it
        self.pool.run_next()
        self.assertEqual(self.take(), b"")
        self.pool.run_all()
        self.drain()
        reply, rest = read_file_reply(self.take())
        self.assertEqual(reply.data, self.data)
        after = wire.IndexStatus.from_line(rest.rstrip(b"\n"))
        self.assertEqual(after.indexed, before.indexed + 1)
        self.assertEqual(after.pending, 0)

    def test_status_counts_a_file_being_hashed(self) -> None:
        self.send(b"GET four.bin\n")
        take_progress(self.take())
        other = PeerFactory(
            self.share, self.index, self.clock, self.idle_timeout
        ).buildProtocol(CLIENT_ADDRESS)
        transport = StringTransport()
        other.makeConnection(transport)
        other.dataReceived(b"STATUS\n")
        banner, line = transport.value().splitlines()
        self.assertEqual(wire.IndexStatus.from_line(line).pending, 1)
        other.connectionLost(Failure(ConnectionDone()))

    def tick(self) -> list[wire.Indexing]:
        """Let one progress interval pass; the INDEXING lines it brought."""
        self.clock.advance(PROGRESS_INTERVAL_SECONDS)
        progress, rest = take_progress(self.take())
        self.assertEqual(rest, b"")
        return progress

    def test_progress_then_header(self) -> None:
        """
        One INDEXING line at once, one per interval (none in between), the
        bytes hashed growing with each step; the header (with its piece
        list) as soon as the last step is done, then the file.  No progress
        timer is left, and the file was hashed once.
        """
        size = len(self.data)
        self.patch(pieces, "hash_pieces", counting(self, pieces.hash_pieces))
        self.send(b"GET four.bin\n")
        progress, rest = take_progress(self.take())
        self.assertEqual(rest, b"")
        [first] = progress
        self.assertEqual(first.done, 0)
        self.clock.advance(PROGRESS_INTERVAL_SECONDS / 2)
        self.assertEqual(self.take(), b"")
        self.clock.advance(PROGRESS_INTERVAL_SECONDS / 2)
        self.assertEqual(len(take_progress(self.take())[0]), 1)  # no step yet
        for step in (1, 2, 3):
            self.pool.run_next()
            self.assertEqual(self.take(), b"", "progress is told on the tick")
            self.assertEqual(self.tick(), [wire.Indexing(step * PIECE_SIZE, size)])
        self.pool.run_next()  # the last step: the header follows at once
        self.assertEqual(self.pool.pending, [])
        self.drain()
        reply, rest = read_file_reply(self.take())
        self.assertEqual(reply.progress, [])
        self.assertEqual(reply.header, file_header(self.data, hashes=4 * 32))
        self.assertEqual(reply.digests, digests_of(self.data))
        self.assertEqual((reply.data, rest), (self.data, b""))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "the idle timer")
        self.assertEqual(self.tick(), [])
        self.assertEqual(len(self.hashed), 4)  # one call per step, no more
        self.lose()
        self.assertClean()

    def test_first_progress_line_names_the_size(self) -> None:
        """
        The first INDEXING line, sent at once, already gives the file's
        size (protocol.rst: ``INDEXING 0 21474836480``), so that a client
        can show how much is left from the start.
        """
        self.send(b"GET four.bin\n")
        self.assertEqual(self.take(), b"INDEXING 0 %d\n" % len(self.data))

    def test_index_stopping_while_waiting(self) -> None:
        """A peer shutting down answers a waiting client ERR 503, quietly."""
        self.send(b"GET four.bin\n")
        self.take()
        self.successResultOf(self.index.stop()) if not self.pool.pending else None
        d = self.index.stop()
        self.pool.run_all()
        self.successResultOf(d)
        self.assertEqual(self.take(), b"ERR 503 the peer is stopping\n")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_waiting_is_not_idleness(self) -> None:
        """
        A client waiting for its file is not idle, however long the
        hashing takes: the connection stays open through three idle
        periods of INDEXING lines; afterwards the idle timer runs from the
        last byte of the file.
        """
        self.send(b"GET four.bin\n")
        self.take()
        for second in range(3 * int(IDLE)):
            self.assertEqual(len(self.tick()), 1, second)
            self.assertFalse(self.transport.disconnecting)
        self.pool.run_all()
        self.drain()
        reply, _ = read_file_reply(self.take())
        self.assertEqual(reply.data, self.data)
        self.clock.advance(IDLE - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertEqual(self.take(), b"ERR 408 idle timeout\n")
        self.lose()
        self.assertClean()

    def test_client_leaves_while_waiting(self) -> None:
        """
        A client that leaves while its file is being indexed leaves no
        timer (no progress loop) at once; the hashing ends anyway, with the
        right root, and nothing is sent or left open.
        """
        self.send(b"GET four.bin\n")
        self.assertEqual(len(self.tick()), 2)
        self.lose(ConnectionLost())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.pool.run_all()
        self.clock.advance(10 * PROGRESS_INTERVAL_SECONDS)
        self.assertEqual(self.take(), b"")
        self.assertIsNone(self.file_producer())
        self.assertEqual(
            self.index.lookup("four.bin").content.root_hex, root_hex(self.data)
        )
        self.assertClean()

    def test_name_through_a_symlinked_folder_refused_at_once(self) -> None:
        """
        A name through a symlink to a folder of the share opens, but the
        index never holds it: ``ERR 404`` at once, with no INDEXING line and
        nothing hashed, however often it is asked; the connection serves
        the next request.
        """
        os.symlink(".", self.path("here"))
        self.patch(pieces, "hash_pieces", counting(self, pieces.hash_pieces))
        self.send(b"GET here/four.bin\nRANGE 0 0 here/here/four.bin\n")
        self.assertEqual(self.take(), b"ERR 404 no such file\n" * 2)
        self.assertEqual((self.hashed, self.pool.pending), ([], []))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "the idle timer only")
        self.lose()
        self.assertClean()

    def test_file_that_keeps_changing(self) -> None:
        """
        A file that kept changing while it was hashed gets ``ERR 503`` with
        a retry-after (a log being written: the client may come back),
        and so does a request for it soon after, at once.
        """
        self.send(b"GET four.bin\n")
        self.take()
        for mtime in range(1, 10):
            if not self.pool.pending:
                break
            self.pool.run_next()
            os.utime(self.path("four.bin"), ns=(mtime * 10**9, mtime * 10**9))
        message = b"the file keeps changing while it is indexed; retry-after=30"
        progress, rest = take_progress(self.take())
        self.assertEqual(rest, b"ERR 503 " + message + b"\n")
        self.send(b"GET four.bin\n")
        self.assertEqual(self.take(), b"ERR 503 " + message + b"\n")
        self.assertEqual(self.pool.pending, [])
        self.lose()
        self.assertClean()

    def test_requests_behind_wait_their_turn(self) -> None:
        """
        Requests pipelined behind a GET that waits for indexing are
        answered after it, in order (the second file waits for its own
        indexing in turn).
        """
        self.send(b"GET four.bin\nGET a.txt\nLIST\n")
        self.assertEqual(len(self.tick()), 2, "nothing but progress yet")
        self.pool.run_all()  # four.bin is indexed and on its way
        self.drain()
        self.pool.run_all()  # then a.txt
        self.drain()
        reply, rest = read_file_reply(self.take())
        self.assertEqual(reply.data, self.data)
        reply, rest = read_file_reply(rest)
        self.assertEqual(reply.header, file_header(A_CONTENT))
        self.assertEqual(reply.data, A_CONTENT)
        entries, next_cursor, rest = read_listing(rest)
        self.assertEqual([e.name for e in entries], ["four.bin", "a.txt"])
        self.assertEqual(rest, b"")
        self.lose()
        self.assertClean()

    def test_range_waits_too(self) -> None:
        """A RANGE of a file not indexed yet waits the same way."""
        self.send(b"RANGE 10 20 four.bin\n")
        self.assertEqual(len(take_progress(self.take())[0]), 1)
        self.pool.run_all()
        self.drain()
        reply, _ = read_file_reply(self.take())
        self.assertEqual(reply.header, file_header(self.data, 10, 20))
        self.assertEqual(reply.data, self.data[10:30])

    def test_file_removed_while_waiting(self) -> None:
        """A file gone before it could be indexed is ERR 404; the
        connection serves on."""
        self.send(b"GET four.bin\n")
        self.take()
        os.remove(self.path("four.bin"))
        self.pool.run_all()
        self.assertEqual(self.take(), b"ERR 404 no such file\n")
        self.assertEqual(self.tick(), [], "no progress loop is left")
        self.send(b"GET sub/two.txt\n")
        self.pool.run_all()
        self.drain()
        reply, _ = read_file_reply(self.take())
        self.assertEqual(reply.data, b"second file\n")

    def test_read_error_while_indexing(self) -> None:
        """
        A read error while the file is indexed (before any header) is
        ERR 500 and the connection serves on; the failure is not kept:
        once the disk reads again, the same file is indexed and served.
        """
        real = pieces.hash_pieces
        self.patch(pieces, "hash_pieces", failing_hash_pieces)
        self.send(b"GET four.bin\n")
        self.take()
        self.pool.run_all()
        self.assertEqual(self.take(), b"ERR 500 cannot read the file\n")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.flushLoggedErrors(), [])  # an error line only
        self.patch(pieces, "hash_pieces", real)
        self.send(b"GET four.bin\n")
        self.pool.run_all()
        self.drain()
        reply, _ = read_file_reply(self.take())
        self.assertEqual(reply.data, self.data)
        self.lose()
        self.assertClean()


def counting(case: SynchronousTestCase, hash_pieces):
    """C{hash_pieces}, recording each call in C{case.hashed}."""
    case.hashed = []

    def count(*args, **kwargs):
        case.hashed.append(args)
        return hash_pieces(*args, **kwargs)

    return count


class FreshContentTests(PeerTestMixin, SynchronousTestCase):
    """
    The peer serves from the index without hashing on the request path, and
    never sends a root for other bytes than the file's: a file changed on
    disk since it was indexed is indexed again first (inline here, so
    within the request), with INDEXING lines, then served with its new
    root.
    """

    def setUp(self) -> None:
        super().setUp()
        self.patch(pieces, "hash_pieces", counting(self, pieces.hash_pieces))

    def assertReindexed(self, name: str, new: bytes, old: bytes) -> None:
        """GET C{name}: progress, then C{new}'s header and bytes; C{old}'s
        root appears nowhere in the answer."""
        self.send(b"GET %s\n" % name.encode())
        self.drain()
        stream = self.take()
        self.assertNotIn(root_hex(old).encode(), stream)
        reply, rest = read_file_reply(stream)
        self.assertEqual(rest, b"")
        self.assertTrue(reply.progress)
        self.assertEqual(reply.progress[-1], wire.Indexing(len(new), len(new)))
        self.assertEqual(reply.header, file_header(new))
        self.assertEqual(reply.data, new)
        self.assertEqual(self.index.lookup(name).content.root_hex, root_hex(new))

    def test_served_without_hashing(self) -> None:
        """An unchanged file is never hashed again, whatever asks for it:
        GET twice, a symlink to it, RANGE, BLOB and PIECES."""
        for request in (
            b"GET a.txt\n",
            b"GET a.txt\n",
            b"GET inlink\n",
            b"RANGE 1 2 a.txt\n",
            b"BLOB %s 0 5\n" % root_hex(A_CONTENT).encode(),
        ):
            self.assertEqual(self.get(request).header.root, root_hex(A_CONTENT))
        self.send(b"PIECES %s\n" % root_hex(A_CONTENT).encode())
        self.assertTrue(self.take().startswith(b"OK 32 "))
        self.assertEqual(self.hashed, [])

    def test_appended_file(self) -> None:
        """A file that grew is indexed again before it is served."""
        with open(self.path("a.txt"), "ab") as stream:
            stream.write(b"more")
        self.assertReindexed("a.txt", A_CONTENT + b"more", A_CONTENT)
        self.assertEqual(len(self.hashed), 1)
        self.assertEqual(self.get(b"GET a.txt\n").progress, [], "indexed once")
        self.assertEqual(len(self.hashed), 1)

    def test_same_size_rewrite(self) -> None:
        """
        A same-size rewrite is indexed again.  The test moves the mtime on
        by a second explicitly: two writes in one kernel clock tick can
        share an mtime, which the index cannot tell apart.
        """
        path = self.path("a.txt")
        before = os.stat(path).st_mtime_ns
        replacement = b"ALPHA FILE\n"
        self.assertEqual(len(replacement), len(A_CONTENT))
        write(path, replacement)
        os.utime(path, ns=(before + 10**9, before + 10**9))
        self.assertReindexed("a.txt", replacement, A_CONTENT)

    def test_replaced_file(self) -> None:
        """A file replaced by rename (a new inode) is indexed again."""
        write(self.path("new.tmp"), b"other")
        os.replace(self.path("new.tmp"), self.path("a.txt"))
        self.assertReindexed("a.txt", b"other", A_CONTENT)

    def test_range_of_a_changed_file(self) -> None:
        """A RANGE of a changed file is indexed again first, too."""
        write(self.path("sub/two.txt"), b"second file, now longer\n")
        self.send(b"RANGE 7 4 sub/two.txt\n")
        self.drain()
        reply, _ = read_file_reply(self.take())
        self.assertTrue(reply.progress)
        self.assertEqual(reply.header, file_header(b"second file, now longer\n", 7, 4))
        self.assertEqual(reply.data, b"file")


class ConnectionLostTests(PeerTestMixin, SynchronousTestCase):
    """A client leaving at any point releases the file and the timer."""

    def start_big_transfer(self) -> None:
        self.send(b"GET big.bin\n")
        self.file_producer().resumeProducing()
        self.assertTrue(is_open(self.share.descriptors[-1]))

    def test_lost_mid_transfer(self) -> None:
        """
        The reactor's order: the transport stops its producer, then reports
        connectionLost.  The file is closed and no timer remains.
        """
        self.start_big_transfer()
        producer = self.file_producer()
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
        producer = self.file_producer()
        self.lose(ConnectionLost())
        producer.stopProducing()
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
        self.file_producer().resumeProducing()
        os.truncate(self.path("big.bin"), CHUNK_BYTES)
        self.take()
        self.file_producer().resumeProducing()
        self.assertIsNone(self.file_producer())
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.take(), b"")
        self.lose(ConnectionAborted())
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

    transport_class = EagerPullTransport

    def test_small_file_in_one_pull(self) -> None:
        """A one-chunk file is done inside registerProducer; the next request
        is served."""
        self.send(b"GET a.txt\nGET sub/two.txt\n")
        self.assertIsNone(self.file_producer())
        reply, rest = read_file_reply(self.take())
        self.assertEqual(reply.data, A_CONTENT)
        reply, rest = read_file_reply(rest)
        self.assertEqual((reply.data, rest), (b"second file\n", b""))
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


class BufferedPullsProducerTests(SynchronousTestCase):
    """FileRangeProducer and BufferProducer writing through a transport
    that buffers (TLS in practice; a StringTransport here): their pulls are
    sized by, and counted in, a shared L{BufferedPulls}."""

    def setUp(self) -> None:
        self.base, self.root = build_tree(self)
        self.data = os.urandom(100 * 1024)
        self.fd = os.open(write(os.path.join(self.root, "f"), self.data), os.O_RDONLY)
        self.addCleanup(os.close, self.fd)
        self.consumer = StringTransport()

    def pull_sizes(self, producer: FileRangeProducer) -> list[int]:
        sizes = []
        while self.consumer.producer is not None:
            before = len(self.consumer.value())
            producer.resumeProducing()
            sizes.append(len(self.consumer.value()) - before)
        return sizes

    def test_crowded_pulls_are_one_record(self) -> None:
        """Past the roomy streams, each pull hands over 16 KiB; the stream
        counts while it produces, and no longer once done."""
        pulls = BufferedPulls(roomy_streams=0)
        producer = FileRangeProducer(
            self.fd, 0, len(self.data), self.consumer, pulls=pulls
        )
        d = producer.start()
        self.assertEqual(pulls.streams, 1)
        self.assertEqual(self.pull_sizes(producer), [16384] * 6 + [4096])
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.consumer.value(), self.data)
        self.assertEqual(pulls.streams, 0)

    def test_roomy_pulls_are_full_chunks(self) -> None:
        pulls = BufferedPulls(roomy_streams=1)
        producer = FileRangeProducer(
            self.fd, 0, len(self.data), self.consumer, chunk_bytes=60 * 1024,
            pulls=pulls,
        )  # fmt: skip
        producer.start()
        self.assertEqual(self.pull_sizes(producer), [60 * 1024, 40 * 1024])
        self.assertEqual(pulls.streams, 0)

    def test_uncounted_when_stopped_or_failed(self) -> None:
        """A stream that was stopped (the client left) or failed (the file
        shrank) no longer counts."""
        pulls = BufferedPulls()
        stopped = FileRangeProducer(self.fd, 0, 10, self.consumer, pulls=pulls)
        d = stopped.start()
        stopped.stopProducing()
        self.failureResultOf(d, ConnectionLost)
        self.assertEqual(pulls.streams, 0)
        shrank = FileRangeProducer(
            self.fd, len(self.data) - 5, 10, StringTransport(), pulls=pulls
        )
        d = shrank.start()
        shrank.resumeProducing()
        self.assertEqual(pulls.streams, 1)
        shrank.resumeProducing()
        self.failureResultOf(d, FileShrank)
        self.assertEqual(pulls.streams, 0)

    def test_empty_range_never_counts(self) -> None:
        pulls = BufferedPulls()
        FileRangeProducer(self.fd, 0, 0, self.consumer, pulls=pulls).start()
        self.assertEqual(pulls.streams, 0)

    def test_zero_copy_streams_are_not_counted(self) -> None:
        """A producer that sends into the socket itself holds nothing in a
        transport's buffer: it does not count, nor shrink others' pulls."""
        import socket

        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        pulls = BufferedPulls(roomy_streams=0)
        producer = FileRangeProducer(
            self.fd, 0, 10, _SocketConsumer(ours), socket_fd=ours.fileno(),
            pulls=pulls,
        )  # fmt: skip
        d = producer.start()
        self.assertEqual(pulls.streams, 0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(theirs.recv(100), self.data[:10])

    def test_piece_list_pulls(self) -> None:
        """A long answer (BufferProducer) is sized the same way, from its own
        64 KiB chunks."""
        pulls = BufferedPulls(roomy_streams=0)
        body = os.urandom(70 * 1024)
        producer = BufferProducer(body, self.consumer, pulls=pulls)
        d = producer.start()
        self.assertEqual(pulls.streams, 1)
        self.assertEqual(self.pull_sizes(producer), [16384] * 4 + [6 * 1024])
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.consumer.value(), body)
        self.assertEqual(pulls.streams, 0)

    def test_holds_the_view_it_was_given(self) -> None:
        """
        A piece list is shared (not read again) only while somebody holds
        the index's view of it: a producer streaming it holds that very
        object, not merely a view of the same bytes.
        """
        view = memoryview(os.urandom(70 * 1024))
        alive = weakref.ref(view)
        producer = BufferProducer(view, self.consumer)
        del view
        self.assertIsNotNone(alive())
        del producer
        self.assertIsNone(alive())


class _SocketConsumer:
    """A consumer in front of a real socket, as a TCP transport would be:
    write() buffers (flushed by the test), startWriting() is recorded."""

    def __init__(self, sock, exposes_buffer: bool = True) -> None:
        self.sock = sock
        self.buffered = b""
        self.producer = None
        self.wants_writing = 0
        if exposes_buffer:
            # What p2p.transports.unsent_bytes reads of a Twisted transport.
            self.offset = 0
            self._tempDataLen = 0

    @property
    def dataBuffer(self) -> bytes:
        return self.buffered

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

    def transfer(self, header: bytes, exposes_buffer: bool = True):
        """A producer of a 3 MiB file on a socket pair, C{header} still in
        the consumer's buffer; the file's bytes, the consumer, the first
        call's writes, the producer, its Deferred and the receiving end."""
        import socket

        base, root = build_tree(self)
        data = os.urandom(3 * 1024 * 1024 + 5)
        fd = os.open(write(os.path.join(root, "f"), data), os.O_RDONLY)
        self.addCleanup(os.close, fd)
        sender, receiver = socket.socketpair()
        self.addCleanup(sender.close)
        self.addCleanup(receiver.close)
        sender.setblocking(False)
        consumer = _SocketConsumer(sender, exposes_buffer)
        consumer.buffered = header
        producer = FileRangeProducer(
            fd, 0, len(data), consumer, chunk_bytes=4096, socket_fd=sender.fileno()
        )
        done = producer.start()
        first = consumer.buffered[len(header) :]
        return data, consumer, first, producer, done, receiver

    def test_first_call_behind_a_waiting_header(self) -> None:
        """The header still waits in the transport: the first call writes
        nothing (no chunk held in memory for a client that does not read);
        the call after the transport emptied starts sendfile."""
        data, consumer, first, producer, done, receiver = self.transfer(b"OK 1\n")
        self.assertEqual(first, b"")
        self.assertEqual(consumer.wants_writing, 0, "the header's write calls back")
        consumer.flush()
        self.assertEqual(
            self.receive(consumer, producer, done, receiver), b"OK 1\n" + data
        )

    def test_first_call_with_the_header_out(self) -> None:
        """The header went out at once: the first call sends with sendfile
        straight away, and asks to be called back when it can send more."""
        data, consumer, first, producer, done, receiver = self.transfer(b"")
        self.assertEqual(first, b"")
        self.assertEqual(consumer.wants_writing, 1)
        self.assertEqual(self.receive(consumer, producer, done, receiver), data)

    def test_sendfile_after_the_first_chunk(self) -> None:
        """A transport that cannot say what it holds: the first chunk goes
        through it (behind the header in its buffer); every later one is
        sent with sendfile, bytes exact."""
        data, consumer, first, producer, done, receiver = self.transfer(
            b"", exposes_buffer=False
        )
        self.assertEqual(len(first), 4096)  # the first call
        consumer.flush()
        self.assertEqual(self.receive(consumer, producer, done, receiver), data)

    def receive(self, consumer, producer, done, receiver) -> bytes:
        """Call the producer as a drained transport would until it is
        done; every byte the receiving end got."""
        import socket

        self.assertEqual(consumer.buffered, b"")
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
        consumer.sock.shutdown(socket.SHUT_WR)
        while chunk := receiver.recv(1 << 20):
            received += chunk
        self.assertEqual(consumer.buffered, b"")
        return bytes(received)

    def test_plain_tcp_only(self) -> None:
        """Only a plain TCP connection gets the zero-copy path."""
        from p2p.transports import zero_copy_socket

        self.assertIsNone(zero_copy_socket(StringTransport()))


class LoggedNamesTests(SynchronousTestCase):
    """Names in the peer's log lines are escaped for the terminal that shows
    them; the event keeps the exact name in its C{name} field."""

    def test_sending_line(self) -> None:
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        name = "invoice\u202efdp.exe"
        with open(os.path.join(root, name), "wb") as stream:
            # Big enough for a "sending" line (a smaller file's transfer is
            # logged once, when it was sent).
            stream.write(b"x" * LOG_START_BYTES)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        share = ShareFolder(root)
        factory = PeerFactory(share, indexed(self, share, Clock()), Clock(), 30)
        protocol = factory.buildProtocol(CLIENT_ADDRESS)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(f"GET {name}\n".encode())
        [event] = [
            e for e in events if "shown_name" in e and "sending" in e["log_format"]
        ]
        self.assertEqual(event["name"], name)
        self.assertIn("invoice\\u202efdp.exe", formatEvent(event))
        self.assertNotIn("\u202e", formatEvent(event))
