"""Tests for L{p2p.client}: one fetch from one peer, and the fallback chain.

L{FileFetchProtocol} is fed by hand on a StringTransport.  L{Fetcher} runs
against scripted peers: real L{PeerProtocol} servers wired in memory (see
L{tests.test_peer.connect_in_memory}) over an index of their share, peers
that refuse, blackhole, stay silent, describe other bytes than they send,
send a bad piece, are still indexing, or hang up.  Time moves only with the
Clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections import Counter
from collections.abc import Callable

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import (
    MemoryReactorClock,
    StringTransport,
    StringTransportWithDisconnection,
)
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2p import pieces, wire
from p2p.batching import BATCH_BYTES, CHECK_SECONDS, FAST_READ_BYTES
from p2p.client import (
    FileFetchProtocol,
    ListingBudget,
    ListingTooLong,
    PeerFailed,
    list_files,
    list_peers,
    listed_bytes,
    peer_endpoint,
)
from p2p.errors import FailureKind
from p2p.fetch import Attempt, Fetcher, NotFoundAnywhere
from p2p.index import IndexEntry, ShareIndex
from p2p.pace import DEFAULT_PACE, UNBOUNDED, Pace
from p2p.peer import PeerFactory
from p2p.pieces import Content, PieceList
from p2p.share import ShareFolder
from p2p.sink import (
    HIGH_WATER_BYTES,
    PARTIAL_SUFFIX,
    FileOutput,
    PieceSink,
    StreamOutput,
)
from tests._indexed import StepPool, indexed, run_inline
from tests._support import descriptors
from tests.test_peer import connect_in_memory
from tests.test_share import temp_dir, write
from tests.test_sink import QueuedWorker

IDLE = 10.0
CONNECT = 5.0
PEER_IDLE = 30.0
CONTENT = b"the file everybody wants\n" * 1000
NAME = "wanted.txt"
MIB = 1024 * 1024
BIG = os.urandom(3 * MIB + 1792)  # four pieces


def describe(data: bytes) -> tuple[Content, bytes]:
    """The content of C{data} and its piece digests."""
    digests = b"".join(
        pieces.hash_piece(data[i : i + MIB]) for i in range(0, len(data), MIB)
    )
    return Content(pieces.root_of(len(data), MIB, digests), len(data)), digests


def reply_for(
    data: bytes,
    offset: int = 0,
    count: int | None = None,
    digests: bytes | None = None,
    body: bytes | None = None,
) -> bytes:
    """What a peer sends for C{data}: the header, the piece digests (a
    whole file of several pieces), then the bytes from C{offset}."""
    content, real_digests = describe(data)
    count = len(data) - offset if count is None else count
    if digests is None:
        digests = real_digests if offset == 0 and content.pieces > 1 else b""
    header = wire.FileHeader(
        count, content.root_hex, offset, len(data), MIB, len(digests)
    )
    if body is None:
        body = data[offset : offset + count]
    return header.to_line() + b"\n" + digests + body


def blob_for(data: bytes, offset: int = 0) -> wire.Blob:
    content, _ = describe(data)
    return wire.Blob(content.root_hex, offset, len(data) - offset)


class _CountingTransport(StringTransport):
    """Counts the times its reading was paused."""

    pauses = 0

    def pauseProducing(self) -> None:
        self.pauses += 1
        super().pauseProducing()


class _OneFetch(SynchronousTestCase):
    """One fetch, on a StringTransport, fed by hand."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.out = io.BytesIO()
        self.sink = PieceSink(StreamOutput(self.out))
        self.progress: list[wire.Indexing] = []

    def connect(self, transport=None, request=None, idle=IDLE, pace=DEFAULT_PACE):
        self.protocol = FileFetchProtocol(
            request or wire.Get(NAME),
            self.sink,
            self.clock,
            idle,
            on_indexing=self.progress.append,
            pace=pace,
        )
        self.transport = transport or StringTransport()
        if isinstance(self.transport, StringTransportWithDisconnection):
            self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        return self.protocol

    def greet(self) -> None:
        self.protocol.dataReceived(b"P2P/2 peer\n")

    def content(self) -> bytes:
        return self.out.getvalue()

    def assertFailed(self, fragment: str, kind: str | None = None) -> PeerFailed:
        failure = self.failureResultOf(self.protocol.result, PeerFailed)
        self.assertIn(fragment, failure.value.reason)
        if kind is not None:
            self.assertEqual(failure.value.kind, kind)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        return failure.value


class _MarkedTransport(StringTransport):
    """Takes receive low-water marks, as a plain TCP connection does, and
    records them (L{p2p.transports.set_receive_low_water})."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[int] = []

    def set_receive_low_water(self, size: int) -> bool:
        self.marks.append(size)
        return True


class ReceiveBatchingInFetchTests(_OneFetch):
    """The fetch raises its socket's low-water mark while content comes
    fast, and lowers it before bytes could wait unread (L{p2p.batching})."""

    def start(self) -> tuple[_MarkedTransport, bytes, int]:
        """Connected on a marked transport: the transport, the peer's whole
        stream for L{BIG}, and where its content starts."""
        transport = _MarkedTransport()
        self.connect(transport)
        stream = b"P2P/2 peer\n" + reply_for(BIG)
        return transport, stream, len(stream) - len(BIG)

    def test_raised_then_lowered_before_the_last_bytes(self) -> None:
        transport, stream, body = self.start()
        self.protocol.dataReceived(stream[:body])
        self.assertEqual(transport.marks, [])
        segment = FAST_READ_BYTES
        for start in range(body, len(stream), segment):
            self.protocol.dataReceived(stream[start : start + segment])
            if transport.marks[-1:] == [BATCH_BYTES]:
                # Never more wanted than is still to come.
                self.assertGreaterEqual(self.protocol.remaining, BATCH_BYTES)
        self.assertEqual(transport.marks, [BATCH_BYTES, 1])
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.content(), BIG)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_silent_peer_still_times_out(self) -> None:
        """A peer that stops sending has the mark lowered within a check,
        then fails on the idle timeout as before."""
        transport, stream, body = self.start()
        self.protocol.dataReceived(stream[: body + FAST_READ_BYTES])
        self.assertEqual(transport.marks, [BATCH_BYTES])
        self.clock.advance(CHECK_SECONDS)
        self.assertEqual(transport.marks, [BATCH_BYTES, 1])
        self.clock.advance(IDLE)
        # Silent after its header: it holds the file and stalled.
        self.assertFailed("timed out: silent for 10s", "stalled")

    def test_failure_lowers_the_mark(self) -> None:
        """A fetch cancelled mid-content leaves no mark and no timer."""
        transport, stream, body = self.start()
        self.protocol.dataReceived(stream[: body + FAST_READ_BYTES])
        self.protocol.result.cancel()
        self.failureResultOf(self.protocol.result)
        self.assertEqual(transport.marks, [BATCH_BYTES, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FileFetchProtocolTests(_OneFetch):
    """One fetch, on a StringTransport, fed by hand."""

    def test_request_at_once(self) -> None:
        """The GET line goes out as soon as connected, without waiting for
        the banner (a round trip sooner); nothing more once it arrives."""
        self.connect()
        self.assertEqual(self.transport.value(), b"GET wanted.txt\n")
        self.greet()
        self.assertEqual(self.transport.value(), b"GET wanted.txt\n")

    def test_first_version_peer(self) -> None:
        """A P2P/1 peer is skipped with a version error on its banner; what
        follows the banner is never read as a reply."""
        self.connect()
        self.protocol.dataReceived(b"P2P/1 peer\n" + reply_for(CONTENT))
        self.assertFailed("unsupported protocol version 'P2P/1'", "protocol")
        self.assertEqual(self.transport.value(), b"GET wanted.txt\n")

    def test_success_one_segment(self) -> None:
        """
        Banner, header and every byte in one segment: the result is the
        header, the output holds the verified content, the timer is gone.
        """
        self.connect()
        self.protocol.dataReceived(b"P2P/2 peer\n" + reply_for(CONTENT))
        header = self.successResultOf(self.protocol.result)
        self.assertEqual(header.root, describe(CONTENT)[0].root_hex)
        self.assertEqual(header.count, len(CONTENT))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.sink.received, len(CONTENT))
        self.assertEqual(self.content(), CONTENT)

    def test_small_content_never_pauses(self) -> None:
        """A content the sink takes at once (stored on the reactor thread)
        is read without pausing the transport: no pause and resume to pay
        per small file."""
        transport = _CountingTransport()
        self.connect(transport)
        self.protocol.dataReceived(b"P2P/2 peer\n" + reply_for(CONTENT))
        self.successResultOf(self.protocol.result)
        self.assertEqual(transport.pauses, 0)
        self.assertEqual(self.content(), CONTENT)

    def test_several_pieces(self) -> None:
        """The piece list comes first; every piece is checked against it."""
        self.connect()
        self.protocol.dataReceived(b"P2P/2 peer\n" + reply_for(BIG))
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.content(), BIG)

    def test_success_in_small_segments(self) -> None:
        """The same stream in 1000-byte segments gives the same result."""
        self.connect()
        stream = b"P2P/2 peer\n" + reply_for(BIG)
        for start in range(0, len(stream), 1000):
            self.protocol.dataReceived(stream[start : start + 1000])
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.content(), BIG)

    def test_byte_by_byte(self) -> None:
        self.connect()
        for byte in b"P2P/2 peer\n" + reply_for(CONTENT[:300]):
            self.protocol.dataReceived(bytes([byte]))
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.content(), CONTENT[:300])

    def test_empty_file(self) -> None:
        """A count of 0 completes on the header alone."""
        self.connect()
        self.protocol.dataReceived(b"P2P/2 peer\n" + reply_for(b""))
        self.assertEqual(self.successResultOf(self.protocol.result).size, 0)
        self.assertEqual(self.content(), b"")

    def test_empty_content_under_another_root(self) -> None:
        """
        A peer calling a content empty under its real root is corrupted:
        an empty content has no piece to check, so its root must be the
        root of no bytes.  Nothing is completed or written.
        """
        content, _ = describe(BIG)
        lie = wire.FileHeader(0, content.root_hex, 0, 0, content.piece_size, 0)
        self.connect()
        self.protocol.dataReceived(b"P2P/2 peer\n" + lie.to_line() + b"\n")
        self.assertFailed("is not that of empty content", "corrupted")
        self.assertIsNone(self.sink.content)
        self.assertEqual(self.content(), b"")

    def test_empty_piece_list_under_another_root(self) -> None:
        """The same lie as an answer to PIECES: refused as corrupted."""
        content, _ = describe(BIG)
        self.connect(request=wire.Pieces(content.root_hex))
        lie = wire.PiecesHeader(0, content.root_hex, 0, content.piece_size)
        self.protocol.dataReceived(b"P2P/2 peer\n" + lie.to_line() + b"\n")
        self.assertFailed("is not that of empty content", "corrupted")
        self.assertIsNone(self.sink.content)

    def test_indexing_lines(self) -> None:
        """Progress lines before the header are reported and keep the
        connection alive past the idle timeout."""
        self.connect()
        self.greet()
        for done in range(0, 100 * MIB, 10 * MIB):
            self.clock.advance(IDLE - 1)
            self.protocol.dataReceived(wire.Indexing(done, 100 * MIB).to_line() + b"\n")
        self.assertEqual(
            [p.done for p in self.progress], list(range(0, 100 * MIB, 10 * MIB))
        )
        self.protocol.dataReceived(reply_for(CONTENT))
        self.successResultOf(self.protocol.result)

    def test_corrupted_piece(self) -> None:
        """A piece that does not match its digest fails the peer at once;
        nothing of it reaches the output."""
        self.connect()
        self.greet()
        body = bytearray(BIG)
        body[MIB + 10] ^= 1
        self.protocol.dataReceived(reply_for(BIG, body=bytes(body)))
        self.assertFailed("piece 1 does not match", "corrupted")
        self.assertEqual(self.content(), BIG[:MIB])
        self.assertTrue(self.transport.disconnected)  # aborted

    def test_corrupted_single_piece(self) -> None:
        """A one-piece file is checked against the root itself."""
        self.connect()
        self.greet()
        self.protocol.dataReceived(reply_for(b"abc", body=b"abd"))
        self.assertFailed("corrupted")
        self.assertEqual(self.content(), b"")

    def test_piece_list_mismatch(self) -> None:
        """A piece list that does not hash to the root is refused before
        any content is taken."""
        _, digests = describe(BIG)
        lie = bytes([digests[0] ^ 1]) + digests[1:]
        self.connect()
        self.greet()
        self.protocol.dataReceived(reply_for(BIG, digests=lie))
        self.assertFailed("piece list does not match the root", "corrupted")
        self.assertEqual(self.content(), b"")

    def test_err_reply(self) -> None:
        """An ERR reply is a PeerFailed naming it; the close is a clean one."""
        self.connect()
        self.greet()
        self.protocol.dataReceived(b"ERR 404 no such file\n")
        self.assertEqual(
            self.assertFailed("refused").reason, "refused: ERR 404 no such file"
        )
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)

    def test_more_bytes_than_announced(self) -> None:
        """A peer sending past the announced count is cut off: PeerFailed."""
        self.connect()
        self.greet()
        self.protocol.dataReceived(reply_for(b"abc", body=b"abcd"))
        self.assertFailed("more bytes than announced")
        self.assertTrue(self.transport.disconnected)

    def test_more_bytes_in_a_later_segment(self) -> None:
        """Extra bytes after a complete file do not change the result."""
        self.connect()
        self.greet()
        self.protocol.dataReceived(reply_for(b"abc"))
        self.successResultOf(self.protocol.result)
        self.protocol.dataReceived(b"junk")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.content(), b"abc")

    def test_closed_mid_transfer(self) -> None:
        """A connection lost mid-file says how far the transfer got; the
        pieces that verified are kept."""
        self.connect()
        self.greet()
        self.protocol.dataReceived(reply_for(BIG)[: -(len(BIG) - MIB - 3)])
        self.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(
            self.assertFailed("broken", "broken").reason,
            f"broken transfer after {MIB + 3} of {len(BIG)} bytes",
        )
        self.assertEqual(self.sink.done, {0})

    def test_closed_before_reply(self) -> None:
        """A connection lost before any header is a PeerFailed."""
        self.connect()
        self.greet()
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFailed("connection closed before a reply")

    def test_wrong_banner(self) -> None:
        """A relay (or anything else) answering is a protocol error."""
        self.connect()
        self.protocol.dataReceived(b"P2P/1 relay\n")
        self.assertFailed("protocol error")
        self.assertEqual(self.transport.value(), b"GET wanted.txt\n")

    def test_malformed_header(self) -> None:
        """A header that does not parse or does not answer the request is a
        protocol error."""
        root = describe(b"abc")[0].root_hex
        for line in (
            b"OK 3\n",
            b"OK 3 sha256=%s offset=0 size=3\n" % (b"a" * 64),
            f"OK 3 root={root} offset=0 size=4 piece={MIB} hashes=0\n".encode(),
            f"OK 3 root={root} offset=0 size=3 piece=1000 hashes=0\n".encode(),
            f"OK 3 root={root} offset=0 size=3 piece={MIB} hashes=32\n".encode(),
            f"OK 2 root={root} offset=1 size=3 piece={MIB} hashes=0\n".encode(),
            b"HELLO\n",
        ):
            self.connect()
            self.greet()
            self.protocol.dataReceived(line)
            self.assertFailed("protocol error", "protocol")

    def test_too_many_pieces(self) -> None:
        """A header claiming more pieces than a client holds a list for
        (16 KiB pieces of an enormous file) is refused before any digest."""
        header = wire.FileHeader(2**60, "ab" * 32, 0, 2**60, 16 * 1024, 0)
        self.connect()
        self.greet()
        self.protocol.dataReceived(header.to_line() + b"\n")
        self.assertFailed("pieces is too many", "protocol")

    def test_missing_piece_list(self) -> None:
        """A whole file of several pieces must come with its piece list."""
        content, _ = describe(BIG)
        header = wire.FileHeader(len(BIG), content.root_hex, 0, len(BIG), MIB, 0)
        self.connect()
        self.greet()
        self.protocol.dataReceived(header.to_line() + b"\n")
        self.assertFailed("protocol error", "protocol")

    def test_blob_continues_the_content(self) -> None:
        """Once the content is known, the rest is asked by root and taken
        only for that root and range."""
        content, digests = describe(BIG)
        self.successResultOf(
            self.sink.begin(content, PieceList.check(content, digests))
        )
        self.sink.write(0, BIG[:MIB])
        self.connect(request=blob_for(BIG, MIB))
        self.greet()
        self.assertEqual(
            self.transport.value(),
            f"BLOB {content.root_hex} {MIB} {len(BIG) - MIB}\n".encode(),
        )
        self.protocol.dataReceived(reply_for(BIG, offset=MIB))
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.content(), BIG)

    def test_blob_for_other_content(self) -> None:
        self.connect(request=blob_for(BIG, MIB))
        self.greet()
        self.protocol.dataReceived(reply_for(CONTENT))
        self.assertFailed("protocol error", "protocol")

    def test_other_content_under_the_name(self) -> None:
        """A GET answered with other content than the sink's is skipped."""
        content, digests = describe(BIG)
        self.successResultOf(
            self.sink.begin(content, PieceList.check(content, digests))
        )
        self.connect()
        self.greet()
        self.protocol.dataReceived(reply_for(CONTENT))
        self.assertFailed("has other content", "other-content")

    def test_resume_asks_for_the_rest(self) -> None:
        """A sink already holding pieces (an earlier run) turns a whole GET
        into a request for the rest: the peer is failed as 'resume'."""
        content, digests = describe(BIG)
        self.successResultOf(
            self.sink.begin(content, PieceList.check(content, digests))
        )
        self.sink.write(0, BIG[:MIB])
        self.sink.reset()
        self.sink.done.add(0)
        self.sink.content = content
        self.connect()
        self.greet()
        self.protocol.dataReceived(reply_for(BIG)[:2000])
        self.assertFailed(f"resuming at byte {MIB}", "resume")

    def test_line_too_long(self) -> None:
        """An endless header line is a protocol error."""
        self.connect()
        self.greet()
        self.protocol.dataReceived(b"O" * (wire.MAX_LINE_LENGTH + 2))
        self.assertFailed("too long")

    def test_idle_timeout(self) -> None:
        """
        A peer that stays silent for C{idle_timeout} is dropped with a
        PeerFailed, and no timer is left.
        """
        self.connect()
        self.greet()
        self.clock.advance(IDLE - 0.1)
        self.assertNoResult(self.protocol.result)
        self.clock.advance(0.2)
        self.assertFailed("timed out: silent for 10s")
        self.assertTrue(self.transport.disconnected)
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def test_idle_timeout_before_banner(self) -> None:
        """Silence from the very start times out the same way."""
        self.connect()
        self.clock.advance(IDLE)
        self.assertFailed("timed out")

    def test_progress_resets_timeout(self) -> None:
        """A slow transfer that keeps delivering bytes is not timed out (by
        the idle timer: the minimum rate is off here, see PaceTests)."""
        self.connect(pace=UNBOUNDED)
        self.greet()
        reply = reply_for(CONTENT)
        for start in range(0, len(reply), 5000):
            self.clock.advance(IDLE - 1)
            self.protocol.dataReceived(reply[start : start + 5000])
        self.assertGreater(self.clock.seconds(), IDLE * 3)
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stalled_transfer_times_out(self) -> None:
        """A transfer that stops mid-file times out."""
        self.connect()
        self.greet()
        self.protocol.dataReceived(reply_for(CONTENT)[:300])
        self.clock.advance(IDLE)
        self.assertFailed("timed out")

    def test_no_timeout(self) -> None:
        """An idle timeout of None (and no pace) schedules nothing."""
        self.connect(idle=None, pace=UNBOUNDED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """Cancelling aborts the connection and the timer."""
        self.connect()
        self.greet()
        self.protocol.result.cancel()
        self.failureResultOf(self.protocol.result, CancelledError)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def test_synchronous_disconnection(self) -> None:
        """
        On a transport that reports connectionLost from inside
        loseConnection/abortConnection, the outcome is still the real one:
        success stays success, and a corrupted file is reported as such.
        """
        self.connect(StringTransportWithDisconnection())
        self.protocol.dataReceived(b"P2P/2 peer\n" + reply_for(b"abc"))
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.clock.getDelayedCalls(), [])

        self.out = io.BytesIO()
        self.sink = PieceSink(StreamOutput(self.out))
        self.connect(StringTransportWithDisconnection())
        self.protocol.dataReceived(b"P2P/2 peer\n" + reply_for(b"abc", body=b"abd"))
        self.assertFailed("corrupted")


class ReceivedInPlaceTests(_OneFetch):
    """
    Content received in place (L{FileFetchProtocol.receive_buffer}, as a
    plain TCP transport does through L{p2p.transports.read_into_buffers}):
    the same pieces, checked the same way, in buffers the sink lends.
    """

    def start(self, data: bytes = BIG, first: int = 1000, request=None) -> bytes:
        """Greet, and send the reply up to C{first} content bytes as one
        read (as the read carrying the header would); return the rest."""
        self.connect(request=request)
        self.assertIsNone(self.protocol.receive_buffer(), "no content yet")
        offset = request.offset if request is not None else 0
        reply = reply_for(data, offset)
        body = len(reply) - (len(data) - offset)
        self.protocol.dataReceived(b"P2P/2 peer\n" + reply[: body + first])
        return reply[body + first :]

    def feed_in_place(self, rest: bytes, step: int = 300 * 1024) -> list[int]:
        """Put C{rest} into the offered buffers, C{step} bytes at most per
        read; return the lengths offered."""
        offered = []
        while rest and not self.protocol.result.called:
            view = self.protocol.receive_buffer()
            self.assertIsNotNone(view)
            offered.append(len(view))
            count = min(len(view), step, len(rest))
            view[:count] = rest[:count]
            self.protocol.received_into(count)
            rest = rest[count:]
        return offered

    def test_whole_transfer_in_place(self) -> None:
        """Every piece arrives in place (the first piece's first bytes
        came with the header): verified, in order, complete."""
        self.feed_in_place(self.start())
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.content(), BIG)
        self.assertIsNone(self.protocol.receive_buffer(), "nothing more to take")

    def test_offers_never_cross_a_piece_or_the_announced_count(self) -> None:
        offered = self.feed_in_place(self.start(), step=MIB)
        self.assertEqual(offered, [MIB - 1000, MIB, MIB, 1792])
        self.successResultOf(self.protocol.result)

    def test_range_ending_inside_a_piece(self) -> None:
        """A BLOB of the last piece: the buffer offered is that piece's
        length, the announced count."""
        content, digests = describe(BIG)
        self.successResultOf(
            self.sink.begin(content, PieceList.check(content, digests))
        )
        rest = self.start(first=0, request=blob_for(BIG, 3 * MIB))
        self.assertEqual(self.feed_in_place(rest), [1792])
        self.successResultOf(self.protocol.result)

    def test_no_buffer_while_the_piece_list_comes(self) -> None:
        self.connect()
        reply = reply_for(BIG)
        self.protocol.dataReceived(b"P2P/2 peer\n" + reply[: reply.index(b"\n") + 40])
        self.assertIsNone(self.protocol.receive_buffer())

    def test_corrupted_piece_in_place(self) -> None:
        """A piece that fails its digest fails the peer; only the pieces
        before it reach the output."""
        rest = bytearray(self.start())
        rest[MIB + 5] ^= 1
        self.feed_in_place(bytes(rest))
        self.assertFailed("piece 1 does not match", "corrupted")
        self.assertEqual(self.content(), BIG[:MIB])

    def test_buffer_taken_back_when_the_connection_ends(self) -> None:
        """A piece cut short by the connection's end gives its buffer back
        to the sink, to be lent again."""
        rest = self.start()
        view = self.protocol.receive_buffer()
        view[:500] = rest[:500]
        self.protocol.received_into(500)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFailed("broken transfer", "broken")
        self.assertIs(self.sink.lend(0), view.obj)

    def test_back_to_chunks_mid_piece(self) -> None:
        """Bytes that come as chunks after some came in place (a transport
        that stopped offering) still make the same pieces."""
        rest = self.start()
        view = self.protocol.receive_buffer()
        view[:5000] = rest[:5000]
        self.protocol.received_into(5000)
        self.protocol.dataReceived(rest[5000:])
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.content(), BIG)


class PaceTests(_OneFetch):
    """
    What a peer must keep up to (L{p2p.pace}): the minimum rate of a
    transfer, the deadline of its header and piece list, its indexing
    progress; and never a byte past what its header announced.  Time moves
    in steps of at most a second, as a running reactor's would.
    """

    PACE = Pace(min_rate=4096, min_rate_time=10.0, header_timeout=30.0)

    def tick(self, seconds: float, step: float = 1.0) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def test_trickle_is_too_slow(self) -> None:
        """
        A valid header, then one byte every two seconds: never silent for
        the idle timeout, but below the minimum rate, so the peer fails at
        the end of the first stretch ("slow": what verified is kept), and
        not a byte of the unfinished piece reached the output.
        """
        self.connect(pace=self.PACE)
        self.greet()
        reply = reply_for(CONTENT)
        body = len(reply) - len(CONTENT)
        self.protocol.dataReceived(reply[:body])
        for position in range(body, body + 4):
            self.tick(2)
            self.protocol.dataReceived(reply[position : position + 1])
        self.tick(1.9, 0.1)
        self.assertNoResult(self.protocol.result)
        self.tick(0.2, 0.1)
        failure = self.assertFailed("too slow: 4 B in 10 s", "slow")
        self.assertIn("--min-rate 4.0 KiB/s", failure.reason)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.content(), b"")

    def test_steady_transfer_passes(self) -> None:
        """Twice the minimum rate for three stretches: it completes."""
        data = os.urandom(240 * 1024)
        self.connect(pace=self.PACE)
        self.greet()
        reply = reply_for(data)
        for start in range(0, len(reply), 8192):
            self.protocol.dataReceived(reply[start : start + 8192])
            self.tick(1)
        self.assertGreater(self.clock.seconds(), 25)
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.content(), data)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rate_off(self) -> None:
        """--min-rate 0: a trickle is judged by the idle timer only."""
        self.connect(pace=Pace(0, 10.0, 30.0))
        self.greet()
        reply = reply_for(CONTENT[:50])
        self.protocol.dataReceived(reply[:-50])
        for position in range(len(reply) - 50, len(reply)):
            self.tick(5)
            self.protocol.dataReceived(reply[position : position + 1])
        self.successResultOf(self.protocol.result)

    def test_piece_list_trickle_misses_the_header_deadline(self) -> None:
        """
        The header line at once, then its piece list a byte every five
        seconds (each byte restarting the idle timer): the header deadline
        still ends it, 30 s after the connection.
        """
        self.connect(pace=self.PACE)
        self.greet()
        reply = reply_for(BIG)
        line = reply.index(b"\n") + 1
        self.protocol.dataReceived(reply[:line])
        for position in range(line, line + 5):
            self.tick(5)
            self.protocol.dataReceived(reply[position : position + 1])
        self.tick(4.9, 0.1)
        self.assertNoResult(self.protocol.result)
        self.tick(0.2, 0.1)
        self.assertFailed("timed out: no header within 30s", "timeout")
        self.assertEqual(self.content(), b"")

    def test_header_line_trickle_is_silence(self) -> None:
        """A header line trickled without its end is silence: the idle
        timer ends it (an unfinished line is not activity)."""
        self.connect(pace=self.PACE)
        self.greet()
        for byte in reply_for(CONTENT)[:5]:
            self.tick(2)
            self.protocol.dataReceived(bytes([byte]))
        self.tick(IDLE - 2)
        self.assertFailed("timed out: silent for 10s", "timeout")

    def test_indexing_without_progress(self) -> None:
        """
        INDEXING lines that never show progress keep the idle timer going
        but not the header deadline: 30 s after the last progress, the
        peer is skipped.
        """
        self.connect(pace=self.PACE)
        self.greet()
        line = wire.Indexing(MIB, 100 * MIB).to_line() + b"\n"
        for _ in range(5):
            self.protocol.dataReceived(line)
            self.tick(5)
        self.protocol.dataReceived(line)
        self.tick(4)
        self.assertNoResult(self.protocol.result)
        self.protocol.dataReceived(line)
        self.tick(1)
        self.assertFailed("timed out: no header within 30s", "timeout")

    def test_indexing_progress_renews_the_deadline(self) -> None:
        """A long indexing that keeps progressing is waited for, far past
        the header deadline, and the file then comes."""
        self.connect(pace=self.PACE)
        self.greet()
        total = 100 * MIB
        for second in range(100):
            done = second * total // 100
            self.protocol.dataReceived(wire.Indexing(done, total).to_line() + b"\n")
            self.tick(1)
        self.protocol.dataReceived(reply_for(CONTENT))
        self.successResultOf(self.protocol.result)

    def indexing(self, done: int, total: int) -> None:
        self.protocol.dataReceived(wire.Indexing(done, total).to_line() + b"\n")

    def test_indexing_too_slow(self) -> None:
        """
        A peer faking slow progress (1 KiB a second of a huge file) is
        skipped as soon as the header deadline's length is over: at that
        rate its indexing would not end within the patience.
        """
        self.connect(pace=self.PACE)
        self.greet()
        total = 10**15
        for second in range(31):
            self.indexing(second * 1024, total)
            self.tick(1)
        self.assertNoResult(self.protocol.result)
        self.indexing(31 * 1024, total)
        self.assertFailed(
            "too slow: indexing 931322.6 GiB at 1.0 KiB/s would take 30945.4 "
            "years, more than 600 s (20 x --header-timeout)",
            "slow",
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fake_indexing_above_the_minimum_rate(self) -> None:
        """
        The attack: a line a second, ``done`` rising 41,000 a second (ten
        times the minimum rate) of a 4 TiB size.  The minimum rate alone
        bounded this by size / rate, 3.4 years; the peer is now skipped
        once the header deadline's length is over, 31 s in.
        """
        self.connect(pace=self.PACE)
        self.greet()
        total = 4398046511103
        for second in range(31):
            self.indexing(second * 41_000, total)
            self.tick(1)
        self.assertNoResult(self.protocol.result)
        self.indexing(31 * 41_000, total)
        failure = self.assertFailed("too slow: indexing 4096.0 GiB at 40.0 KiB/s")
        self.assertEqual(failure.kind, "slow")
        self.assertIn("3.4 years, more than 600 s", failure.reason)

    def test_fast_fake_indexing_is_bounded_by_the_patience(self) -> None:
        """
        A peer whose progress always predicts an end in time, then creeps
        by a byte a second short of the end (its rate overall still says it
        is nearly done), is waited for no longer than the patience: 20
        header timeouts from its first line.
        """
        self.connect(pace=self.PACE)
        self.greet()
        total = 500 * MIB
        for second in range(500):
            self.indexing(second * MIB, total)
            self.tick(1)
        for byte in range(100):
            self.indexing(total - 1000 + byte, total)
            self.tick(1)
        self.assertNoResult(self.protocol.result)
        self.tick(0.5, 0.5)
        self.indexing(total - 900, total)
        self.assertFailed(
            "too slow: still indexing after 600.5 s, more than 600 s "
            "(20 x --header-timeout)",
            "slow",
        )

    def test_honest_indexing_after_a_busy_start(self) -> None:
        """
        A 20 GiB file a peer starts hashing only 25 s after its first line
        (busy with another file), then at 100 MB/s, is waited for: its
        latest rate, not its rate overall, predicts the end.
        """
        self.connect(pace=self.PACE)
        self.greet()
        total = 20 * 1024 * MIB
        done = 0
        while done < total:
            self.indexing(done, total)
            self.tick(1)
            if self.clock.seconds() >= 25:
                done = min(total, done + 100_000_000)
        self.assertGreater(self.clock.seconds(), 200)
        self.assertNoResult(self.protocol.result)
        self.protocol.dataReceived(reply_for(CONTENT))
        self.successResultOf(self.protocol.result)

    def test_indexing_size_refused_at_once(self) -> None:
        """The size in an INDEXING line already counts against --max-size."""
        self.sink = PieceSink(StreamOutput(self.out), max_size=MIB)
        self.connect(pace=self.PACE)
        self.greet()
        self.protocol.dataReceived(wire.Indexing(0, 2 * MIB).to_line() + b"\n")
        self.assertFailed(
            "too large: 2097152 bytes is more than --max-size", "too-large"
        )
        self.assertEqual(self.progress, [])

    def test_endless_stream_is_cut_at_the_announced_count(self) -> None:
        """
        A header for N bytes, then N bytes and more in one chunk: the
        chunk is refused whole, before any of it is stored.
        """
        self.connect(pace=self.PACE)
        self.greet()
        self.protocol.dataReceived(reply_for(CONTENT) + b"x" * 100_000)
        self.assertFailed("more bytes than announced", "protocol")
        self.assertEqual(self.content(), b"")
        self.assertEqual(self.sink.received, 0)


class SlowWorkerTests(SynchronousTestCase):
    """
    L{FileFetchProtocol} with a sink whose worker thread lags behind the
    network (a L{QueuedWorker} that runs only when the test says so): the
    connection is paused while too many bytes wait, and nothing is decided
    before the worker caught up.
    """

    def setUp(self) -> None:
        # More pieces than HIGH_WATER_BYTES holds, so the backlog fills up.
        self.data = os.urandom(HIGH_WATER_BYTES + 3 * MIB + 100)
        self.worker = QueuedWorker()
        self.out = io.BytesIO()
        self.sink = PieceSink(StreamOutput(self.out), self.worker)
        self.clock = Clock()
        self.protocol = FileFetchProtocol(wire.Get(NAME), self.sink, self.clock, IDLE)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.reply = reply_for(self.data)
        self.body = len(self.reply) - len(self.data)  # header and digests

    def start(self) -> None:
        """The header and piece list arrive; the output is prepared."""
        self.protocol.dataReceived(b"P2P/2 peer\n" + self.reply[: self.body])
        # Preparing the output is the worker's job too: no byte is taken
        # (the connection is paused) until it is done.
        self.assertEqual(self.transport.producerState, "paused")
        self.worker.run_all()
        self.assertEqual(self.transport.producerState, "producing")

    def test_pauses_until_drained(self) -> None:
        """
        Once HIGH_WATER_BYTES of pieces wait for the worker, the connection
        is paused; it resumes when L{PieceSink.when_drained} fires, after
        the worker caught up, and the transfer then completes.
        """
        self.start()
        waiting = HIGH_WATER_BYTES // MIB
        self.protocol.dataReceived(self.data[: (waiting - 1) * MIB])
        self.assertEqual(self.transport.producerState, "producing")
        self.protocol.dataReceived(self.data[(waiting - 1) * MIB : waiting * MIB])
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(self.out.getvalue(), b"", "nothing verified yet")
        self.worker.run_all()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.out.getvalue(), self.data[: waiting * MIB])
        self.protocol.dataReceived(self.data[waiting * MIB :])
        self.assertNoResult(self.protocol.result)
        self.worker.run_all()
        self.assertEqual(
            self.successResultOf(self.protocol.result).size, len(self.data)
        )
        self.assertEqual(self.out.getvalue(), self.data)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bytes_after_the_last_are_not_read(self) -> None:
        """
        Once every announced byte is in, the connection is no longer read:
        bytes a peer sends after them (an endless stream) are neither held
        nor held against it while the last pieces are being verified, and
        the fetch succeeds.
        """
        self.start()
        self.protocol.dataReceived(self.data)
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.dataReceived(b"x" * 100_000)
        self.assertNoResult(self.protocol.result)
        self.worker.run_all()
        self.assertEqual(
            self.successResultOf(self.protocol.result).size, len(self.data)
        )
        self.assertEqual(self.out.getvalue(), self.data)

    def test_paused_time_is_not_the_peers(self) -> None:
        """
        While the connection is paused for the worker (a slow disk, a slow
        reader of stdout), neither the idle timer nor the minimum rate runs:
        a long wait is ours, not the peer's, and the transfer then goes on.
        """
        self.start()
        self.protocol.dataReceived(self.data[:HIGH_WATER_BYTES])
        self.assertEqual(self.transport.producerState, "paused")
        for _ in range(120):
            self.clock.advance(1)
        self.assertNoResult(self.protocol.result)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.worker.run_all()
        self.assertEqual(self.transport.producerState, "producing")
        self.protocol.dataReceived(self.data[HIGH_WATER_BYTES:])
        self.worker.run_all()
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.out.getvalue(), self.data)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bytes_held_while_preparing_are_bounded(self) -> None:
        """
        Bytes that arrive while the output is being prepared wait in
        memory, but never more than the header announced.
        """
        self.protocol.dataReceived(b"P2P/2 peer\n" + self.reply[: self.body])
        self.protocol.dataReceived(self.data[:MIB])
        self.assertNoResult(self.protocol.result)
        self.protocol.dataReceived(self.data[MIB:] + b"more")
        failure = self.failureResultOf(self.protocol.result, PeerFailed)
        self.assertIn("more bytes than announced", failure.value.reason)
        self.worker.run_all()
        self.assertEqual(self.out.getvalue(), b"")

    def test_verifies_after_the_worker_caught_up(self) -> None:
        """
        The last byte arriving (and even the peer hanging up) does not
        decide: the result comes once the worker verified every piece.
        """
        self.start()
        self.protocol.dataReceived(self.data)
        self.assertNoResult(self.protocol.result)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(self.protocol.result)
        self.worker.run_all()
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.out.getvalue(), self.data)

    def test_bad_piece_found_after_the_last_byte(self) -> None:
        """A piece that fails once the worker gets to it still fails the
        peer, and none of its bytes reach the output."""
        self.start()
        body = bytearray(self.data)
        body[-1] ^= 1
        self.protocol.dataReceived(bytes(body))
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.worker.run_all()
        failure = self.failureResultOf(self.protocol.result, PeerFailed)
        self.assertEqual(failure.value.kind, "corrupted")
        last = len(self.data) // MIB
        self.assertEqual(self.out.getvalue(), self.data[: last * MIB])


# -- scripted peers ----------------------------------------------------------

# Another file that may be found under NAME (one piece).
OTHER = b"another version\n" * 2000


class ScriptedServer(LineReceiver):
    """
    A peer that greets, then answers each request line with scripted bytes
    (hand-built, so they may lie): C{reply} is those bytes, or a function
    of the request line returning them.
    """

    delimiter = b"\n"

    def __init__(
        self,
        reply: bytes | Callable[[bytes], bytes] = b"",
        close: bool = False,
    ) -> None:
        self.reply = reply
        self.close = close

    def connectionMade(self) -> None:
        self.transport.write(b"P2P/2 peer\n")

    def lineReceived(self, line: bytes) -> None:
        reply = self.reply(line) if callable(self.reply) else self.reply
        if reply:
            self.transport.write(reply)
        if self.close:
            self.transport.loseConnection()


class Trickler(LineReceiver):
    """
    A peer that answers a ``GET`` with a valid reply for C{data}, sent at
    once up to C{start} bytes (default: the header and piece list), then
    one byte every C{every} seconds of C{clock}: never silent for long.
    """

    delimiter = b"\n"

    def __init__(
        self, clock: Clock, data: bytes, every: float = 2.0, start: int | None = None
    ) -> None:
        self.clock = clock
        self.reply = reply_for(data)
        self.every = every
        self.position = len(self.reply) - len(data) if start is None else start
        self.timer = None

    def connectionMade(self) -> None:
        self.transport.write(b"P2P/2 peer\n")

    def lineReceived(self, line: bytes) -> None:
        self.transport.write(self.reply[: self.position])
        self.timer = self.clock.callLater(self.every, self.drip)

    def drip(self) -> None:
        self.transport.write(self.reply[self.position : self.position + 1])
        self.position += 1
        self.timer = self.clock.callLater(self.every, self.drip)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


def answer(data: bytes, line: bytes, cut: int | None = None) -> bytes:
    """
    What an honest peer holding C{data} sends for the request C{line} (a
    GET or a BLOB), cut after C{cut} bytes of content if given.
    """
    request = wire.parse_peer_request(line)
    offset, count = 0, None
    if isinstance(request, wire.Blob):
        offset = request.offset
        count = min(request.length, len(data) - offset)
    reply = reply_for(data, offset, count)
    if cut is None:
        return reply
    sent = len(data) - offset if count is None else count
    return reply[: len(reply) - sent + cut]


def breaks_after(count: int, data: bytes):
    """A peer holding C{data} that answers any request properly, but hangs
    up after C{count} bytes of content."""
    return lambda: ScriptedServer(lambda line: answer(data, line, count), close=True)


def flipped(data: bytes, position: int) -> bytes:
    """C{data} with the byte at C{position} flipped: a bad disk block."""
    return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]


class LyingIndex(ShareIndex):
    """
    An index that describes some files as other bytes of the same size: a
    root and a piece list that agree with each other, not with the file.
    That is what a buggy or hostile peer can announce; only the pieces
    themselves give it away.
    """

    def __init__(self, *args, lies: dict[str, bytes], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lies = {name: describe(other) for name, other in lies.items()}

    def current(self, name: str, identity) -> IndexEntry | None:
        entry = super().current(name, identity)
        if entry is None or name not in self.lies:
            return entry
        return dataclasses.replace(entry, content=self.lies[name][0])

    def holders(self, root: bytes, limit: int) -> list[IndexEntry]:
        """Asked by root (BLOB), the names it lies about hold their lie."""
        found = [e for e in super().holders(root, limit) if e.name not in self.lies]
        for name, (content, _) in self.lies.items():
            entry = self.lookup(name)
            if entry is not None and content.root == root:
                found.append(dataclasses.replace(entry, content=content))
        return found

    def piece_digests(self, entry: IndexEntry) -> Deferred[bytes]:
        lie = self.lies.get(entry.name)
        if lie is not None and entry.content == lie[0]:
            return succeed(lie[1])
        return super().piece_digests(entry)


class Network:
    """
    The scripted peers a L{Fetcher} talks to, by peer address.

    Behaviours: a L{ShareFolder} (a real peer serving it, in memory, its
    index built when it is added), a L{PeerFactory} (a real peer built by
    the test), ``"refuse"``, ``"refuse-builtin"``, ``"blackhole"`` (a
    connection that never completes), ``"silent"`` (accepts, never says a
    word), or a L{Protocol} factory for a scripted server.  What every
    server received is kept by port (L{requests}).
    """

    def __init__(self, case: SynchronousTestCase, clock: Clock) -> None:
        self.case = case
        self.clock = clock
        self.behaviours: dict[int, object] = {}
        self.pumps: list[iosim.IOPump] = []
        self.contacted: list[int] = []
        self.peers: list[wire.PeerEntry] = []
        self.received: dict[int, list[bytes]] = {}
        # The connections of "silent" peers, to count those still open.
        self.silent: list[StringTransport] = []
        self._served: dict[str, PeerFactory] = {}

    def add(self, behaviour: object) -> wire.PeerEntry:
        port = 7000 + len(self.peers)
        count = len(self.peers)
        host = f"10.0.{count // 250}.{count % 250 + 1}"
        peer = wire.PeerEntry(wire.peer_id_for(host, port), host, port)
        if isinstance(behaviour, ShareFolder):
            behaviour = self.serving(behaviour)
        self.behaviours[port] = behaviour
        self.peers.append(peer)
        return peer

    def rotten(self, share: ShareFolder, lies: dict[str, bytes]) -> PeerFactory:
        """
        A real peer serving C{share} whose index describes each file named
        in C{lies} as those bytes: files that went bad on disk behind the
        index's back (bit rot changes no size, modification or change
        time, so the peer serves the bad bytes under the right root).
        """
        index = LyingIndex(
            share, ":memory:", Clock(), run_inline, watch=False, lies=lies
        )
        index.start()
        self.case.addCleanup(index.stop)
        return PeerFactory(share, index, self.clock, PEER_IDLE)

    def serving(self, share: ShareFolder) -> PeerFactory:
        """
        A real peer serving C{share} (one per share), its connections timed
        by our clock.  Its index is built at once (L{tests._indexed}) on a
        clock of its own: the index's periodic rescan timer is none of these
        tests' business, while every timer on our clock must be gone after
        a fetch.
        """
        factory = self._served.get(share.root)
        if factory is None:
            index = indexed(self.case, share, Clock())
            factory = PeerFactory(share, index, self.clock, PEER_IDLE)
            self._served[share.root] = factory
        return factory

    def requests(self, peer: wire.PeerEntry) -> list[bytes]:
        """Every request line C{peer} received, over all its connections."""
        lines: list[bytes] = []
        for data in self.received.get(peer.port, []):
            lines.extend(line for line in data.split(b"\n") if line)
        return lines

    def endpoint_for(self, peer: wire.PeerEntry) -> _ScriptedEndpoint:
        return _ScriptedEndpoint(self, peer)

    def flush(self) -> None:
        """Move bytes on every connection until nothing moves."""
        moved = True
        while moved:
            moved = False
            for pump in list(self.pumps):
                moved = pump.flush() or moved

    def run(self, d: Deferred, limit: int = 50) -> None:
        """
        Let the network and time run until C{d} fires: flush, and when
        nothing moves, jump the clock to the next timer.
        """
        fired: list[bool] = []

        def mark(result):
            fired.append(True)
            return result

        d.addBoth(mark)  # d.called is already true while d waits on a peer
        for _ in range(limit):
            self.flush()
            if fired:
                self.flush()  # let the closes reach the servers
                return
            calls = self.clock.getDelayedCalls()
            self.case.assertTrue(calls, "stuck: nothing to flush and no timer")
            self.clock.advance(min(c.getTime() for c in calls) - self.clock.seconds())
        self.case.fail("the fetch never finished")


class _ScriptedEndpoint:
    """The endpoint L{Network.endpoint_for} gives for one peer."""

    def __init__(self, network: Network, peer: wire.PeerEntry) -> None:
        self.network = network
        self.peer = peer

    def connect(self, factory):
        network = self.network
        network.contacted.append(self.peer.port)
        behaviour = network.behaviours[self.peer.port]
        if behaviour == "refuse":
            return fail(error.ConnectionRefusedError())
        if behaviour == "refuse-builtin":
            return fail(ConnectionRefusedError())
        if behaviour == "blackhole":
            return Deferred()
        client = factory.buildProtocol(
            IPv4Address("TCP", self.peer.host, self.peer.port)
        )
        if behaviour == "silent":
            transport = StringTransport()
            network.silent.append(transport)
            client.makeConnection(transport)
            return succeed(client)
        if isinstance(behaviour, PeerFactory):
            server = behaviour.buildProtocol(IPv4Address("TCP", "10.9.9.9", 5555))
        else:
            server = behaviour()
        self._record(server)
        network.pumps.append(connect_in_memory(server, client, network.clock))
        return succeed(client)

    def _record(self, server: Protocol) -> None:
        received = self.network.received.setdefault(self.peer.port, [])
        receive = server.dataReceived

        def recording(data: bytes) -> None:
            received.append(data)
            receive(data)

        server.dataReceived = recording  # type: ignore[method-assign]


def scripted_fetcher(
    clock: Clock,
    network: Network,
    reports: list[Attempt],
    stagger: float,
    max_parallel: int = 16,
    on_indexing=lambda peer, progress: None,
) -> Fetcher:
    """A L{Fetcher} on C{clock} whose peers are C{network}'s scripted ones."""
    return Fetcher(
        clock,
        connect_timeout=CONNECT,
        idle_timeout=IDLE,
        endpoint_for=network.endpoint_for,
        report=reports.append,
        now=clock.seconds,
        stagger=stagger,
        max_parallel=max_parallel,
        on_indexing=on_indexing,
    )


def open_files() -> set[tuple[int, str]]:
    """
    This process's descriptors of files (Linux /proc), as (fd, path).

    Files only: a peer's first INDEXING timer (a LoopingCall) may install
    the global reactor, whose epoll and waker descriptors are not ours to
    check; nor are the share folders' own (L{descriptors}).
    """
    return {
        (fd, target)
        for fd, target in descriptors().items()
        if target.startswith("/") and not target.startswith("/dev/")
    }


def blob_line(data: bytes, offset: int) -> bytes:
    """The request for the rest of C{data} from C{offset}, by root."""
    return blob_for(data, offset).to_line()


class FetcherTests(SynchronousTestCase):
    """L{Fetcher.fetch}: peers in order until one delivers the file intact."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.network = Network(self, self.clock)
        self.reports: list[Attempt] = []
        self.progress: list[tuple[wire.PeerEntry, wire.Indexing]] = []
        # These tests pin the seed's strict one-at-a-time order; staggered
        # attempts have tests of their own.
        self.fetcher = scripted_fetcher(
            self.clock,
            self.network,
            self.reports,
            0,
            on_indexing=lambda peer, progress: self.progress.append((peer, progress)),
        )
        self.folder = temp_dir(self)
        self.target = os.path.join(self.folder, "saved.bin")
        self.sink = PieceSink(FileOutput(self.target))
        self.has_it = self.make_share("has-it", {NAME: CONTENT, "other": b"x"})
        self.has_big = self.make_share("has-big", {NAME: BIG})
        self.lacks_it = self.make_share("lacks-it", {"other": b"x"})
        self.files_before = open_files()

    def make_share(self, label: str, files: dict[str, bytes]) -> ShareFolder:
        root = os.path.join(temp_dir(self), label)
        os.mkdir(root)
        for name, data in files.items():
            write(os.path.join(root, name), data)
        return ShareFolder(root)

    def fetch(self, name: str = NAME) -> Deferred:
        d = self.fetcher.fetch(name, self.network.peers, self.sink)
        self.network.run(d)
        return d

    def assertReasons(
        self,
        attempts: list[Attempt],
        expected: list[str],
        order: list[int] | None = None,
    ) -> None:
        """Attempts happened in peer order (or C{order}, as indexes into the
        peer list) with these reasons (prefixes)."""
        indexes = order if order is not None else list(range(len(expected)))
        self.assertEqual(
            [a.peer for a in attempts], [self.network.peers[i] for i in indexes]
        )
        for attempt, reason in zip(attempts, expected, strict=True):
            self.assertTrue(attempt.reason.startswith(reason), (attempt.reason, reason))
            self.assertEqual(attempt.ok, reason == "found")
        self.assertEqual(self.reports, attempts)

    def assertDelivered(self, result, data: bytes = CONTENT, name: str = NAME) -> None:
        """
        The sink holds exactly C{data}, every piece verified, in the partial
        file only; finishing it puts it at the target and leaves nothing
        else behind.
        """
        self.assertEqual(result.name, name)
        self.assertEqual(result.content, describe(data)[0])
        self.assertTrue(self.sink.complete)
        self.assertEqual(self.sink.received, len(data))
        self.assertFalse(os.path.exists(self.target))
        self.successResultOf(self.sink.finish())
        with open(self.target, "rb") as stream:
            self.assertEqual(stream.read(), data)
        self.assertEqual(os.listdir(self.folder), ["saved.bin"])

    def assertQuiet(self) -> None:
        """
        No timer survives the fetch, on the client or on any server, and
        every file opened meanwhile (served files, the partial file) is
        closed.
        """
        self.network.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.successResultOf(self.sink.abandon())
        self.assertEqual(open_files() - self.files_before, set())

    def test_first_peer(self) -> None:
        """The first peer has it: one attempt, and the content is right."""
        self.network.add(self.has_it)
        self.network.add("refuse")
        result = self.successResultOf(self.fetch())
        self.assertEqual(result.peer, self.network.peers[0])
        self.assertEqual(result.name, NAME)
        self.assertReasons(result.attempts, ["found"])
        self.assertEqual(self.network.contacted, [7000])
        self.assertEqual(
            self.network.requests(self.network.peers[0]), [b"GET " + NAME.encode()]
        )
        self.assertDelivered(result)
        self.assertQuiet()

    def test_found_on_third(self) -> None:
        """Two peers answer 404, the third delivers."""
        for share in (self.lacks_it, self.lacks_it, self.has_it, self.has_it):
            self.network.add(share)
        result = self.successResultOf(self.fetch())
        self.assertEqual(result.peer, self.network.peers[2])
        self.assertReasons(
            result.attempts,
            ["refused: ERR 404 no such file", "refused: ERR 404", "found"],
        )
        self.assertEqual(self.network.contacted, [7000, 7001, 7002])
        self.assertDelivered(result)
        self.assertQuiet()

    def test_not_found_anywhere(self) -> None:
        """
        Nobody has it: NotFoundAnywhere lists every attempt in order, and no
        partial file is left.
        """
        self.network.add(self.lacks_it)
        self.network.add("refuse")
        self.network.add(self.lacks_it)
        failure = self.failureResultOf(self.fetch(), NotFoundAnywhere)
        self.assertEqual(failure.value.name, NAME)
        self.assertEqual(failure.value.peers, 3)
        self.assertReasons(
            failure.value.attempts,
            ["refused: ERR 404", "cannot connect", "refused: ERR 404"],
        )
        self.assertIsNone(self.sink.content)
        self.assertQuiet()
        self.assertEqual(os.listdir(self.folder), [])

    def test_no_peers(self) -> None:
        """An empty peer list fails at once with no attempts."""
        failure = self.failureResultOf(
            self.fetcher.fetch(NAME, [], self.sink), NotFoundAnywhere
        )
        self.assertEqual(failure.value.attempts, [])

    def test_refused(self) -> None:
        """A refused connection moves on to the next peer."""
        self.network.add("refuse")
        self.network.add(self.has_it)
        result = self.successResultOf(self.fetch())
        self.assertReasons(
            result.attempts, ["cannot connect: ConnectionRefusedError", "found"]
        )
        self.assertEqual(result.attempts[0].seconds, 0)
        self.assertDelivered(result)
        self.assertQuiet()

    def test_refused_builtin_error(self) -> None:
        """
        An endpoint failing with Python's own ConnectionRefusedError (not
        Twisted's) is skipped the same way.
        """
        self.network.add("refuse-builtin")
        self.network.add(self.has_it)
        result = self.successResultOf(self.fetch())
        self.assertReasons(result.attempts, ["cannot connect", "found"])
        self.assertDelivered(result)
        self.assertQuiet()

    def test_connect_timeout(self) -> None:
        """
        A connection that never completes is given up after exactly
        C{connect_timeout}, then the next peer is tried.
        """
        self.network.add("blackhole")
        self.network.add(self.has_it)
        d = self.fetcher.fetch(NAME, self.network.peers, self.sink)
        self.clock.advance(CONNECT - 0.1)
        self.assertEqual(self.network.contacted, [7000])
        self.clock.advance(0.1)
        self.assertEqual(self.network.contacted, [7000, 7001])
        self.network.run(d)
        result = self.successResultOf(d)
        self.assertReasons(result.attempts, ["timed out", "found"])
        self.assertEqual(result.attempts[0].seconds, CONNECT)
        self.assertDelivered(result)
        self.assertQuiet()

    def test_silent_peer(self) -> None:
        """
        A peer that accepts but never says a word is dropped after
        C{idle_timeout}; the next peer delivers.
        """
        self.network.add("silent")
        self.network.add(self.has_it)
        result = self.successResultOf(self.fetch())
        self.assertReasons(result.attempts, ["timed out: silent for 10s", "found"])
        self.assertEqual(result.attempts[0].seconds, IDLE)
        self.assertDelivered(result)
        self.assertQuiet()

    def test_peer_never_answers_request(self) -> None:
        """A peer that greets but never answers the GET is dropped too."""
        self.network.add(ScriptedServer)
        self.network.add(self.has_it)
        result = self.successResultOf(self.fetch())
        self.assertReasons(result.attempts, ["timed out", "found"])
        self.assertDelivered(result)
        self.assertQuiet()

    def test_waits_for_a_peer_still_indexing(self) -> None:
        """
        A peer still indexing the file sends INDEXING lines instead of a
        header: each one reaches C{on_indexing} and counts as life, so the
        attempt outlasts the idle timeout many times over, no other peer is
        asked, and the file comes once the peer's header does.
        """
        pool = StepPool()
        share = self.make_share("indexing", {NAME: BIG})
        # One piece per pool call: the file takes four calls to index.
        index = ShareIndex(
            share, ":memory:", Clock(), pool, watch=False, step_bytes=MIB
        )
        index.start()
        pool.run_next()  # the database is loaded; the first scan waits

        def stop() -> None:
            index.stop()
            pool.run_all()

        self.addCleanup(stop)
        self.network.add(PeerFactory(share, index, self.clock, PEER_IDLE))
        self.network.add(self.has_big)
        d = self.fetcher.fetch(NAME, self.network.peers, self.sink)
        self.network.flush()
        seconds = 3 * int(IDLE)
        for second in range(1, seconds + 1):
            self.clock.advance(1)
            self.network.flush()
            if second % 7 == 0:
                pool.run_next()  # the scan first, then one piece at a time
            self.assertNoResult(d)
        self.assertEqual(self.network.contacted, [7000])
        pool.run_all()
        self.network.run(d)
        result = self.successResultOf(d)
        self.assertReasons(result.attempts, ["found"])
        self.assertGreaterEqual(result.attempts[0].seconds, seconds)
        self.assertEqual(self.network.contacted, [7000])
        # A line at once, then one a second, all from that peer.
        self.assertGreaterEqual(len(self.progress), seconds + 1)
        self.assertEqual({peer for peer, _ in self.progress}, {self.network.peers[0]})
        done = [progress.done for _, progress in self.progress]
        self.assertEqual(done, sorted(done))
        self.assertEqual(done[-1], 3 * MIB)
        hashed = [progress for _, progress in self.progress if progress.done]
        self.assertEqual({progress.total for progress in hashed}, {len(BIG)})
        self.assertDelivered(result, BIG)
        self.assertQuiet()

    def test_digest_mismatch(self) -> None:
        """
        A peer whose index describes other bytes than the file holds (a
        root and piece list that agree with each other, not with the file)
        is dropped as corrupted; the next holder delivers the real file.
        """
        share = self.make_share("liar", {NAME: BIG})
        index = LyingIndex(
            share, ":memory:", Clock(), run_inline, watch=False, lies={NAME: BIG[::-1]}
        )
        index.start()
        self.addCleanup(index.stop)
        self.network.add(PeerFactory(share, index, self.clock, PEER_IDLE))
        self.network.add(self.has_big)
        result = self.successResultOf(self.fetch())
        self.assertEqual(result.peer, self.network.peers[1])
        self.assertTrue(
            result.attempts[0].reason.startswith("corrupted: piece 0"),
            result.attempts[0].reason,
        )
        self.assertEqual(result.attempts[-1].reason, "found")
        self.assertDelivered(result, BIG)
        self.assertQuiet()

    def test_corrupted_content(self) -> None:
        """
        A peer serving other bytes under the right root is dropped as
        corrupted, and nothing of them is used: the next peer is asked for
        the whole file, by name (the liar's root binds nothing).
        """
        wrong = CONTENT[:-1] + b"!"
        self.network.add(lambda: ScriptedServer(reply_for(CONTENT, body=wrong)))
        self.network.add(self.has_it)
        result = self.successResultOf(self.fetch())
        self.assertReasons(result.attempts, ["corrupted", "found"])
        self.assertEqual(
            self.network.requests(self.network.peers[1]), [b"GET wanted.txt"]
        )
        self.assertDelivered(result)
        self.assertQuiet()

    def test_corrupted_piece_from_a_real_peer(self) -> None:
        """
        A real peer whose file went bad on disk behind its index's back
        sends the old root with a bad piece: it is dropped at that piece,
        the pieces before it are kept, and the next holder is asked by root
        for the rest only.  The result is byte for byte the content.
        """
        rotten = self.make_share("rotten", {NAME: flipped(BIG, 2 * MIB + 7)})
        self.network.add(self.network.rotten(rotten, {NAME: BIG}))
        self.network.add(self.has_big)
        result = self.successResultOf(self.fetch())
        self.assertReasons(
            result.attempts,
            ["corrupted: piece 2 does not match its digest", "found"],
        )
        self.assertEqual([a.offset for a in result.attempts], [0, 2 * MIB])
        self.assertEqual(
            self.network.requests(self.network.peers[1]), [blob_line(BIG, 2 * MIB)]
        )
        self.assertDelivered(result, BIG)
        self.assertQuiet()

    def test_trickling_peer_is_skipped(self) -> None:
        """
        A peer that trickles its content a byte every two seconds is
        skipped at the end of the minimum rate's first stretch (10 s), and
        the next peer delivers the file, whole.
        """
        self.network.add(lambda: Trickler(self.clock, CONTENT))
        self.network.add(self.has_it)
        result = self.successResultOf(self.fetch())
        self.assertReasons(
            result.attempts, ["too slow: 4 B in 10 s, less than --min-rate", "found"]
        )
        self.assertEqual(self.clock.seconds(), 10)
        self.assertDelivered(result)
        self.assertQuiet()

    def test_trickled_piece_list_misses_the_header_deadline(self) -> None:
        """A peer that sends its header line, then trickles the piece list,
        is skipped at the header deadline (30 s after it connected)."""
        line = reply_for(BIG).index(b"\n") + 1
        self.network.add(lambda: Trickler(self.clock, BIG, start=line))
        self.network.add(self.has_big)
        result = self.successResultOf(self.fetch())
        self.assertReasons(
            result.attempts, ["timed out: no header within 30s", "found"]
        )
        self.assertDelivered(result, BIG)
        self.assertQuiet()

    def test_broken_transfer(self) -> None:
        """
        A peer hanging up mid-piece is skipped; the bytes of the unfinished
        piece are never used.  Nothing of the content it described was
        verified, so the next holder is asked by name, free to describe its
        own.
        """
        self.network.add(breaks_after(999, CONTENT))
        self.network.add(self.has_it)
        result = self.successResultOf(self.fetch())
        self.assertReasons(
            result.attempts,
            [f"broken transfer after 999 of {len(CONTENT)} bytes", "found"],
        )
        self.assertEqual(
            self.network.requests(self.network.peers[1]), [b"GET wanted.txt"]
        )
        self.assertDelivered(result)
        self.assertQuiet()

    def test_too_many_bytes(self) -> None:
        """A peer sending more than it announced is skipped."""
        self.network.add(
            lambda: ScriptedServer(reply_for(CONTENT, body=CONTENT + b"+"))
        )
        self.network.add(self.has_it)
        result = self.successResultOf(self.fetch())
        self.assertReasons(result.attempts, ["protocol error: more bytes", "found"])
        self.assertDelivered(result)
        self.assertQuiet()

    def test_hang_up_at_once(self) -> None:
        """A peer that closes right after greeting is skipped."""
        self.network.add(lambda: ScriptedServer(close=True))
        self.network.add(self.has_it)
        result = self.successResultOf(self.fetch())
        self.assertReasons(
            result.attempts, ["connection closed before a reply", "found"]
        )
        self.assertDelivered(result)
        self.assertQuiet()

    def test_every_kind_of_failure(self) -> None:
        """
        The whole gauntlet in one list, for a file of four pieces: refused,
        blackholed, silent, mute after greeting, a piece gone bad on disk
        (the piece before it is kept), hanging up after one byte of the
        rest, missing the content, a good peer, then a refusing one.  Once
        the first piece is in, every peer is asked by root for the rest
        only.  Each attempt is recorded in order with its reason, offset
        and duration; the good peer completes the content; no timer,
        descriptor or stray file remains.
        """
        rotten = self.make_share("rotten", {NAME: flipped(BIG, MIB)})
        self.network.add("refuse")
        self.network.add("blackhole")
        self.network.add("silent")
        self.network.add(ScriptedServer)
        self.network.add(self.network.rotten(rotten, {NAME: BIG}))
        self.network.add(breaks_after(1, BIG))
        self.network.add(self.lacks_it)
        self.network.add(self.has_big)
        self.network.add("refuse")
        result = self.successResultOf(self.fetch())
        self.assertEqual(result.peer, self.network.peers[7])
        rest = len(BIG) - MIB
        self.assertReasons(
            result.attempts,
            [
                "cannot connect",
                "timed out",
                "timed out: silent for 10s",
                "timed out: silent for 10s",
                "corrupted: piece 1 does not match its digest",
                f"broken transfer after 1 of {rest} bytes",
                "refused: ERR 404 no such content",
                "found",
            ],
        )
        self.assertEqual([a.offset for a in result.attempts], [0] * 5 + [MIB] * 3)
        self.assertEqual(
            [a.seconds for a in result.attempts[:4]], [0, CONNECT, IDLE, IDLE]
        )
        self.assertEqual(self.network.contacted, list(range(7000, 7008)))
        for peer in self.network.peers[5:8]:
            self.assertEqual(self.network.requests(peer), [blob_line(BIG, MIB)])
        self.assertDelivered(result, BIG)
        self.assertQuiet()

    def test_unexpected_error_propagates(self) -> None:
        """
        A failure that is not a peer's fault (a bug) is not skipped: it
        fails the fetch and no further peer is contacted.
        """
        self.network.add("refuse")
        self.network.add(self.has_it)  # its endpoint is replaced below
        self.network.add(self.has_it)

        def buggy(peer):
            if peer.port == 7001:
                return _Failing(RuntimeError("bug"))
            return self.network.endpoint_for(peer)

        self.fetcher.endpoint_for = buggy
        d = self.fetcher.fetch(NAME, self.network.peers, self.sink)
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.network.contacted, [7000])
        self.assertEqual(len(self.reports), 1)

    def test_many_peers_failing_synchronously(self) -> None:
        """
        A thousand peers (the relay's reply limit) whose endpoints all fail
        at once end in NotFoundAnywhere, not in a RecursionError.
        """
        for _ in range(1000):
            self.network.add("refuse")
        failure = self.failureResultOf(
            self.fetcher.fetch(NAME, self.network.peers, self.sink),
            NotFoundAnywhere,
        )
        self.assertEqual(len(failure.value.attempts), 1000)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sink_reused_after_partial_transfer(self) -> None:
        """
        A peer that sends a good piece, then bad bytes, and hangs up cannot
        poison the file: the good piece is kept, the bad bytes never reach
        it, and the next peer completes the content from the first piece
        missing.
        """
        reply = reply_for(BIG)
        head = len(reply) - len(BIG)
        self.network.add(
            lambda: ScriptedServer(reply[: head + MIB] + b"GARBAGE" * 1000, close=True)
        )
        self.network.add(self.has_big)
        result = self.successResultOf(self.fetch())
        self.assertReasons(
            result.attempts,
            [f"broken transfer after {MIB + 7000} of {len(BIG)}", "found"],
        )
        self.assertEqual(
            self.network.requests(self.network.peers[1]), [blob_line(BIG, MIB)]
        )
        self.assertDelivered(result, BIG)
        self.assertQuiet()

    def test_resumes_an_earlier_run(self) -> None:
        """
        A run that ends without the whole file keeps its verified pieces;
        the next run for the same file hashes them again, and asks the
        peer that answered its GET for the rest only (by root), without
        counting that as a failed attempt.
        """
        self.network.add(breaks_after(2 * MIB + 10, BIG))
        failure = self.failureResultOf(self.fetch(), NotFoundAnywhere)
        self.assertTrue(failure.value.attempts[0].reason.startswith("broken"))
        kept = self.successResultOf(self.sink.abandon(keep=True))
        self.assertEqual(kept, self.target + ".p2p-part")

        self.sink = PieceSink(FileOutput(self.target))
        self.reports.clear()
        peer = self.network.add(self.has_big)
        d = self.fetcher.fetch(NAME, [peer], self.sink)
        self.network.run(d)
        result = self.successResultOf(d)
        self.assertReasons(result.attempts, ["found"], order=[1])
        self.assertEqual(result.attempts[0].offset, 2 * MIB)
        self.assertEqual(
            self.network.requests(peer),
            [b"GET " + NAME.encode(), blob_line(BIG, 2 * MIB)],
        )
        self.assertDelivered(result, BIG)
        self.assertQuiet()

    def test_fetch_by_root(self) -> None:
        """
        Asked for a content by its root, any peer holding it, under any
        name, may serve it: its piece list comes first (PIECES), then what
        is missing (BLOB) on the same connection.  A peer without that
        content is skipped.
        """
        root = describe(BIG)[0].root_hex
        self.sink = PieceSink(FileOutput(self.target), expected_root=root)
        self.network.add(self.has_it)
        self.network.add(self.make_share("renamed", {"copy.bin": BIG}))
        d = self.fetcher.fetch(root, self.network.peers, self.sink, by_root=True)
        self.network.run(d)
        result = self.successResultOf(d)
        self.assertReasons(
            result.attempts, ["refused: ERR 404 no such content", "found"]
        )
        self.assertEqual(
            self.network.requests(self.network.peers[1]),
            [f"PIECES {root}".encode(), blob_line(BIG, 0)],
        )
        self.assertDelivered(result, BIG, name=root)
        self.assertQuiet()


class RealEndpointTests(SynchronousTestCase):
    """
    L{Fetcher} with its default endpoints (L{peer_endpoint}: Twisted's TCP
    endpoints) on a L{MemoryReactorClock}, which records connection
    attempts and completes them only when the test says so.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        root = os.path.join(temp_dir(self), "share")
        write(os.path.join(root, NAME), CONTENT)
        share = ShareFolder(root)
        # The index's rescan timer goes on a clock of its own (see
        # Network.serving); the peer's connections use the reactor.
        self.peer = PeerFactory(
            share, indexed(self, share, Clock()), self.reactor, PEER_IDLE
        )
        self.out = io.BytesIO()
        self.sink = PieceSink(StreamOutput(self.out))
        self.peers = [
            wire.PeerEntry("0000000000000001", "10.0.0.1", 7000),
            wire.PeerEntry("0000000000000002", "2001:db8::2", 7001),
        ]
        self.fetcher = Fetcher(
            self.reactor, connect_timeout=CONNECT, idle_timeout=IDLE, stagger=0
        )

    def complete(self, index: int) -> iosim.IOPump:
        """Let connection attempt C{index} succeed, to a real peer."""
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        client = factory.buildProtocol(IPv4Address("TCP", host, port))
        server = self.peer.buildProtocol(IPv4Address("TCP", "10.9.9.9", 5555))
        pump = connect_in_memory(server, client, self.reactor)
        pump.flush()
        return pump

    def test_endpoint_kinds(self) -> None:
        """IPv4 peers get a TCP4 endpoint, IPv6 peers a TCP6 one, both
        bounded by the connect timeout."""
        self.assertIsInstance(
            peer_endpoint(self.reactor, self.peers[0], 3), TCP4ClientEndpoint
        )
        self.assertIsInstance(
            peer_endpoint(self.reactor, self.peers[1], 3), TCP6ClientEndpoint
        )

    def test_success(self) -> None:
        """A peer accepting at once delivers the file; no timer remains."""
        d = self.fetcher.fetch(NAME, self.peers, self.sink)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.1", 7000))
        pump = self.complete(0)
        result = self.successResultOf(d)
        self.assertEqual(result.peer, self.peers[0])
        self.assertEqual(self.out.getvalue(), CONTENT)
        pump.flush()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connect_timeout_skips_peer(self) -> None:
        """
        A TCP connection attempt that never completes is abandoned after
        C{connect_timeout} (the connector is stopped) and the next peer is
        tried.  Cancelling a real TCP attempt fails with
        ConnectingCancelledError, which must count as a timeout too.
        """
        d = self.fetcher.fetch(NAME, self.peers, self.sink)
        self.reactor.advance(CONNECT - 0.1)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.1)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.reactor.tcpClients[1][:2], ("2001:db8::2", 7001))
        pump = self.complete(1)
        result = self.successResultOf(d)
        self.assertEqual(result.peer, self.peers[1])
        self.assertEqual([a.reason for a in result.attempts], ["timed out", "found"])
        self.assertEqual(self.out.getvalue(), CONTENT)
        pump.flush()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connection_failed_skips_peer(self) -> None:
        """A refused TCP connection moves on to the next peer."""
        d = self.fetcher.fetch(NAME, self.peers, self.sink)
        connector = self.reactor.connectors[0]
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(
            connector, Failure(error.ConnectionRefusedError())
        )
        self.complete(1).flush()
        result = self.successResultOf(d)
        self.assertTrue(result.attempts[0].reason.startswith("cannot connect"))
        self.assertEqual(self.out.getvalue(), CONTENT)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class _Failing:
    """An endpoint whose connect fails with a given exception."""

    def __init__(self, exception: Exception) -> None:
        self.exception = exception

    def connect(self, factory):
        return fail(self.exception)


def file_line(size: int, name: str, seed: bytes = b"") -> bytes:
    """A ``FILE`` line for a made-up content."""
    root = hashlib.sha256(seed + name.encode()).hexdigest()
    return wire.FileEntry(size, root, name).to_line()


class ListingTests(SynchronousTestCase):
    """L{list_peers} and L{list_files}."""

    def setUp(self) -> None:
        self.clock = Clock()

    def test_list_files(self) -> None:
        """
        A peer's LIST comes back as FileEntry objects (size, root, name), in
        the order the peer indexed its files.
        """
        root = temp_dir(self)
        write(os.path.join(root, "b.txt"), b"bb")
        write(os.path.join(root, "a", "c.txt"), b"c")
        network = Network(self, self.clock)
        peer = network.add(ShareFolder(root))
        d = list_files(network.endpoint_for(peer), self.clock, 3)
        network.run(d)
        self.assertEqual(
            self.successResultOf(d),
            [
                wire.FileEntry(2, describe(b"bb")[0].root_hex, "b.txt"),
                wire.FileEntry(1, describe(b"c")[0].root_hex, "a/c.txt"),
            ],
        )
        self.assertEqual(network.requests(peer), [b"LIST limit=1000"])
        network.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_list_files_follows_every_page(self) -> None:
        """
        A listing longer than a page comes in pages, each on its own
        connection: every ``next=`` cursor is followed until a page has
        none, and the files of every page are collected, in order.
        """
        pages = {
            b"LIST limit=1000": b"OK 2 next=2\n"
            + file_line(1, "a")
            + b"\n"
            + file_line(2, "b")
            + b"\n",
            b"LIST limit=1000 cursor=2": b"OK 1 next=1f\n" + file_line(3, "c") + b"\n",
            b"LIST limit=1000 cursor=1f": b"OK 1\n" + file_line(4, "d") + b"\n",
        }
        peer = _Server(b"P2P/2 peer\n", pages.__getitem__)
        d = list_files(peer, self.clock, 3)
        self.assertEqual(
            [(f.size, f.name) for f in self.successResultOf(d)],
            [(1, "a"), (2, "b"), (3, "c"), (4, "d")],
        )
        self.assertEqual(peer.requests, [line + b"\n" for line in pages])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_list_files_cursor_must_advance(self) -> None:
        """
        A peer whose ``next=`` cursor does not move forward (the same one
        again, or one behind) would keep the client paging for ever: the
        listing fails with a WireError instead, and no further page is
        asked for.
        """
        for stuck in (b"5", b"4"):
            pages = {
                b"LIST limit=1000": b"OK 1 next=5\n" + file_line(1, "a") + b"\n",
                b"LIST limit=1000 cursor=5": b"OK 1 next="
                + stuck
                + b"\n"
                + file_line(2, "b")
                + b"\n",
            }
            peer = _Server(b"P2P/2 peer\n", pages.__getitem__)
            d = list_files(peer, self.clock, 3)
            error = self.failureResultOf(d, wire.WireError).value
            self.assertIn("cursor did not advance", error.message)
            self.assertEqual(len(peer.requests), 2, stuck)
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_list_files_empty_page_ends(self) -> None:
        """An empty page ends the listing, whatever cursor it offers: a peer
        cannot keep the client paging through nothing."""
        pages = {
            b"LIST limit=1000": b"OK 1 next=5\n" + file_line(1, "a") + b"\n",
            b"LIST limit=1000 cursor=5": b"OK 0 next=6\n",
        }
        peer = _Server(b"P2P/2 peer\n", pages.__getitem__)
        d = list_files(peer, self.clock, 3)
        self.assertEqual([f.name for f in self.successResultOf(d)], ["a"])
        self.assertEqual(len(peer.requests), 2)

    def test_list_files_too_long(self) -> None:
        """
        Past the most files taken from one peer, the listing stops loudly
        (ListingTooLong, holding the first ones), never silently.
        """

        def page(line: bytes) -> bytes:
            cursor = int(line.rsplit(b"=", 1)[1], 16) if b"cursor" in line else 0
            names = [file_line(1, f"f{cursor + i}") for i in range(2)]
            return b"OK 2 next=%x\n" % (cursor + 2) + b"\n".join(names) + b"\n"

        peer = _Server(b"P2P/2 peer\n", page)
        d = list_files(peer, self.clock, 3, maximum=5)
        error = self.failureResultOf(d, ListingTooLong).value
        self.assertEqual([f.name for f in error.files], ["f0", "f1", "f2", "f3", "f4"])
        self.assertEqual(len(peer.requests), 3)

    def test_list_files_byte_bound(self) -> None:
        """
        Past the bytes of FILE lines its budget has left the listing stops
        loudly too, even
        within its last page: long names cannot make a few files cost what
        many would.
        """
        lines = [file_line(1, name) for name in ("a" * 100, "b", "c")]
        reply = b"OK 3\n" + b"\n".join(lines) + b"\n"
        peer = _Server(b"P2P/2 peer\n", lambda line: reply)
        budget = len(lines[0]) + len(lines[1])
        d = list_files(peer, self.clock, 3, budget=ListingBudget(10, budget))
        error = self.failureResultOf(d, ListingTooLong).value
        self.assertEqual([f.name for f in error.files], ["a" * 100, "b"])
        self.assertTrue(error.by_bytes)
        self.assertEqual(sum(listed_bytes(f) for f in error.files), budget)
        d = list_files(
            peer, self.clock, 3, budget=ListingBudget(10, budget + len(lines[2]))
        )
        self.assertEqual(len(self.successResultOf(d)), 3)

    def test_list_files_last_page_over_the_bound(self) -> None:
        """A last page (no ``next=``) beyond C{maximum} is not cut silently."""
        reply = b"OK 3\n" + b"".join(file_line(1, n) + b"\n" for n in "abc")
        peer = _Server(b"P2P/2 peer\n", lambda line: reply)
        error = self.failureResultOf(
            list_files(peer, self.clock, 3, maximum=2), ListingTooLong
        ).value
        self.assertEqual([f.name for f in error.files], ["a", "b"])
        self.assertFalse(error.by_bytes)

    def test_list_files_from_an_older_peer(self) -> None:
        """A P2P/1 peer is refused by its banner; its reply is not read."""
        peer = _Server(b"P2P/1 peer\n", lambda line: b"OK 1\nf.txt 3\n")
        failure = self.failureResultOf(list_files(peer, self.clock, 3), wire.WireError)
        self.assertIn("unsupported protocol version 'P2P/1'", failure.value.message)
        self.assertEqual(len(peer.requests), 1)

    def test_list_peers(self) -> None:
        """The relay's PEERS reply comes back as PeerEntry objects."""
        entries = [
            wire.PeerEntry("0123456789abcdef", "10.0.0.1", 7000, 5, "alice"),
            wire.PeerEntry("fedcba9876543210", "2001:db8::1", 7001, 0),
        ]
        reply = b"".join(
            line + b"\n"
            for line in [wire.format_count(2)] + [e.to_line() for e in entries]
        )
        relay = _Relay(b"P2P/1 relay\n", reply)
        d = list_peers(relay, self.clock, 3)
        self.assertEqual(relay.requests, [b"PEERS\n"])
        self.assertEqual(self.successResultOf(d), entries)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_list_peers_with_token(self) -> None:
        """A token (for relays that guard queries) goes with PEERS."""
        relay = _Relay(b"P2P/1 relay\n", b"OK 0\n")
        d = list_peers(relay, self.clock, 3, token="s3cret")
        self.assertEqual(relay.requests, [b"PEERS token=s3cret\n"])
        self.assertEqual(self.successResultOf(d), [])

    def test_list_peers_malformed(self) -> None:
        """A malformed PEER line fails the whole listing with WireError."""
        relay = _Relay(b"P2P/1 relay\n", b"OK 1\nPEER nonsense\n")
        self.failureResultOf(list_peers(relay, self.clock, 3), wire.WireError)

    def test_list_peers_timeout(self) -> None:
        """A relay that never answers times out."""
        relay = _Relay(b"P2P/1 relay\n", b"")
        d = list_peers(relay, self.clock, 3)
        self.clock.advance(3)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Server:
    """
    An endpoint whose every connection greets with C{banner}, records the
    request and answers with C{reply(request line)}.
    """

    def __init__(self, banner: bytes, reply: Callable[[bytes], bytes]) -> None:
        self.banner = banner
        self.reply = reply
        self.requests: list[bytes] = []

    def connect(self, factory):
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4001))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(self.banner)
        request = transport.value()
        self.requests.append(request)
        if request:
            answer = self.reply(request.rstrip(b"\n"))
            if answer:
                protocol.dataReceived(answer)
        return succeed(protocol)


class _Relay(_Server):
    """A relay endpoint that greets, records the request and replies."""

    def __init__(self, banner: bytes, reply: bytes) -> None:
        super().__init__(banner, lambda line: reply)


class StaggerAndResumeTests(SynchronousTestCase):
    """
    L{Fetcher} with staggered attempts (RFC 8305 style) and resume from the
    next holder of the same content, all on a L{Clock}, to stdout.
    """

    STAGGER = 0.25

    def setUp(self) -> None:
        self.clock = Clock()
        self.network = Network(self, self.clock)
        self.reports: list[Attempt] = []
        self.fetcher = scripted_fetcher(
            self.clock, self.network, self.reports, self.STAGGER, max_parallel=3
        )
        self.out = io.BytesIO()
        self.sink = PieceSink(StreamOutput(self.out))

    def share(self, files: dict[str, bytes]) -> ShareFolder:
        root = temp_dir(self)
        for name, data in files.items():
            write(os.path.join(root, name), data)
        return ShareFolder(root)

    def fetch(self) -> Deferred:
        d = self.fetcher.fetch(NAME, self.network.peers, self.sink)
        self.network.run(d)
        return d

    def assertContent(self, content: bytes = CONTENT) -> None:
        """The output holds exactly C{content}; no timer is left."""
        self.assertEqual(self.out.getvalue(), content)
        self.assertTrue(self.sink.complete)
        self.assertEqual(self.sink.content, describe(content)[0])
        self.network.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_blackholed_peer_costs_the_stagger_delay(self) -> None:
        """
        A first peer that never accepts costs one stagger delay, not the
        connect timeout: the second attempt starts after 0.25 s and wins;
        the loser is cancelled with its timers.
        """
        self.network.add("blackhole")
        self.network.add(self.share({NAME: CONTENT}))
        result = self.successResultOf(self.fetch())
        self.assertEqual(result.peer, self.network.peers[1])
        self.assertEqual(self.clock.seconds(), self.STAGGER)
        self.assertEqual([a.reason for a in result.attempts], ["found"])
        self.assertContent()

    def test_fast_failures_stay_one_at_a_time(self) -> None:
        """
        Peers that refuse or lack the file answer at once, so they are asked
        strictly in turn, without waiting for the stagger timer.
        """
        self.network.add("refuse")
        self.network.add(self.share({"other": b"x"}))
        self.network.add(self.share({NAME: CONTENT}))
        result = self.successResultOf(self.fetch())
        self.assertEqual(self.clock.seconds(), 0)
        self.assertEqual(self.network.contacted, [7000, 7001, 7002])
        self.assertEqual(len(result.attempts), 3)
        self.assertContent()

    def test_parallel_attempts_are_capped(self) -> None:
        """At most max_parallel attempts are in flight at once."""
        for _ in range(5):
            self.network.add("blackhole")
        self.network.add(self.share({NAME: CONTENT}))
        d = self.fetcher.fetch(NAME, self.network.peers, self.sink)
        self.clock.advance(self.STAGGER)
        self.clock.advance(self.STAGGER)
        self.assertEqual(len(self.network.contacted), 3)
        self.clock.advance(CONNECT)  # the first three time out by now
        self.assertTrue(len(self.network.contacted) > 3)
        self.network.run(d)
        result = self.successResultOf(d)
        self.assertEqual(result.peer, self.network.peers[5])
        self.assertContent()

    def behind_silent_peers(self, count: int) -> tuple[Deferred, list[int], list[int]]:
        """
        Fetch from C{count} silent peers and a holder after them, one
        stagger at a time until the fetch ends: its Deferred, the peers
        contacted and the silent peers' connections open after each step.
        """
        fetcher = scripted_fetcher(
            self.clock, self.network, self.reports, self.STAGGER, max_parallel=64
        )
        for _ in range(count):
            self.network.add("silent")
        self.network.add(self.share({NAME: CONTENT}))
        d = fetcher.fetch(NAME, self.network.peers, self.sink)
        started: list[int] = []
        in_flight: list[int] = []
        while True:
            started.append(len(self.network.contacted))
            in_flight.append(sum(not t.disconnecting for t in self.network.silent))
            if d.called:
                return d, started, in_flight
            self.clock.advance(self.STAGGER)
            self.network.flush()

    def test_silent_peers_double_the_fan_out(self) -> None:
        """
        Peers that accept and say nothing are joined one stagger apart
        until four are silent, then their number doubles at each stagger
        (up to max_parallel): the holder behind 40 of them is reached
        within 8 staggers, not 40.
        """
        d, started, _ = self.behind_silent_peers(40)
        self.assertEqual(started, [1, 2, 3, 4, 8, 16, 32, 41])
        self.assertEqual(self.successResultOf(d).peer, self.network.peers[40])
        self.assertContent()

    def test_silent_peers_give_way_to_peers_never_tried(self) -> None:
        """
        With max_parallel silent attempts in flight, each stagger lets the
        oldest silent for 2 s give way to peers never tried: the holder
        behind 100 silent peers is asked 3.75 s in, with never more than
        max_parallel attempts at once.
        """
        d, started, in_flight = self.behind_silent_peers(100)
        # Doubling to 64; then as many as started 2 s earlier give way.
        self.assertEqual(
            started, [1, 2, 3, 4, 8, 16, 32, 64, 65, 66, 67, 68, 72, 80, 96, 101]
        )
        self.assertEqual(max(in_flight), 64)
        self.assertEqual(self.clock.seconds(), 15 * self.STAGGER)
        self.assertEqual(self.successResultOf(d).peer, self.network.peers[100])
        self.assertContent()

    def test_peers_that_gave_way_get_a_full_second_try(self) -> None:
        """
        When nobody has the file, a peer whose first attempt gave way is
        asked once more, after every other, and that attempt runs to the
        idle timeout: each peer is reported once, as timed out.
        """
        fetcher = scripted_fetcher(
            self.clock, self.network, self.reports, self.STAGGER, max_parallel=64
        )
        for _ in range(70):
            self.network.add("silent")
        d = fetcher.fetch(NAME, self.network.peers, self.sink)
        self.network.run(d, limit=200)
        failure = self.failureResultOf(d, NotFoundAnywhere)
        reported = [attempt.peer.port for attempt in failure.value.attempts]
        self.assertEqual(sorted(reported), [peer.port for peer in self.network.peers])
        self.assertEqual(
            {attempt.kind for attempt in failure.value.attempts}, {FailureKind.TIMEOUT}
        )
        # The first six gave way (2.0-2.75 s), and were asked again last.
        contacts = Counter(self.network.contacted)
        self.assertEqual(
            sorted(port for port, count in contacts.items() if count == 2),
            [peer.port for peer in self.network.peers[:6]],
        )
        self.assertEqual(set(contacts.values()), {1, 2})
        self.assertLess(self.clock.seconds(), 2 * IDLE + 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_peers_heard_from_do_not_grow_the_fan_out(self) -> None:
        """
        A peer that says it is still indexing the file is slow, not silent:
        however many of them are asked, the others are joined one stagger
        apart, as before.
        """

        class StillIndexing(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(wire.banner("peer") + b"\n")

            def dataReceived(self, data: bytes) -> None:
                line = wire.Indexing(0, 100 * MIB).to_line()
                self.transport.write(line + b"\n")

        fetcher = scripted_fetcher(
            self.clock, self.network, self.reports, self.STAGGER, max_parallel=64
        )
        for _ in range(8):
            self.network.add(StillIndexing)
        fetcher.fetch(NAME, self.network.peers, self.sink)
        started = [len(self.network.contacted)]
        for _ in range(7):
            self.network.flush()
            self.clock.advance(self.STAGGER)
            started.append(len(self.network.contacted))
        self.assertEqual(started, [1, 2, 3, 4, 5, 6, 7, 8])

    def test_resume_from_next_holder(self) -> None:
        """
        A peer that hangs up mid-transfer leaves its verified pieces in the
        sink (and on stdout); the next holder is asked for the rest by root,
        from the first piece missing, and the output is the content byte
        for byte.
        """
        self.network.add(breaks_after(MIB + 1000, BIG))
        self.network.add(self.share({NAME: BIG}))
        result = self.successResultOf(self.fetch())
        self.assertEqual([a.offset for a in result.attempts], [0, MIB])
        self.assertEqual(
            [a.reason for a in result.attempts],
            [f"broken transfer after {MIB + 1000} of {len(BIG)} bytes", "found"],
        )
        self.assertEqual(result.peer, self.network.peers[1])
        self.assertEqual(
            self.network.requests(self.network.peers[1]), [blob_line(BIG, MIB)]
        )
        self.assertEqual(self.sink.received, len(BIG))
        self.assertContent(BIG)

    def test_resume_skips_other_content(self) -> None:
        """
        Only a peer holding the same content may continue it: a peer with
        another version under the name is asked by root, has no such
        content and is skipped; the next holder continues.
        """
        self.network.add(breaks_after(MIB + 1000, BIG))
        self.network.add(self.share({NAME: OTHER}))
        self.network.add(self.share({NAME: BIG}))
        result = self.successResultOf(self.fetch())
        self.assertEqual(
            [a.reason for a in result.attempts][1:],
            ["refused: ERR 404 no such content", "found"],
        )
        self.assertEqual([a.offset for a in result.attempts], [0, MIB, MIB])
        for peer in self.network.peers[1:]:
            self.assertEqual(self.network.requests(peer), [blob_line(BIG, MIB)])
        self.assertEqual(result.peer, self.network.peers[2])
        self.assertContent(BIG)

    def test_other_version_when_nobody_can_resume(self) -> None:
        """
        When no peer can continue the content begun and nothing of it was
        written yet, the output may start over: a second pass fetches the
        file whole, by name, from a peer that had another version.
        """
        self.network.add(breaks_after(100, BIG))
        self.network.add(self.share({NAME: OTHER}))
        result = self.successResultOf(self.fetch())
        self.assertEqual(result.peer, self.network.peers[1])
        self.assertEqual(result.content, describe(OTHER)[0])
        self.assertEqual(
            self.network.requests(self.network.peers[1])[-1], b"GET " + NAME.encode()
        )
        self.assertContent(OTHER)

    def test_no_second_pass_over_a_resumable_file(self) -> None:
        """
        A peer asked by root that answers ``ERR 404 no such content`` does
        not hold it (whatever it holds under the name): a refusal, not a
        second pass's candidate.  The fetch fails and the partial file keeps
        its verified pieces for the next run.
        """
        folder = temp_dir(self)
        target = os.path.join(folder, "saved.bin")
        self.sink = PieceSink(FileOutput(target))
        self.network.add(breaks_after(MIB + 1000, BIG))
        self.network.add(self.share({NAME: OTHER}))
        failure = self.failureResultOf(self.fetch(), NotFoundAnywhere)
        self.assertEqual(
            [a.kind for a in failure.value.attempts],
            [FailureKind.BROKEN, FailureKind.REFUSED],
        )
        self.assertEqual(
            self.network.requests(self.network.peers[1]), [blob_line(BIG, MIB)]
        )
        self.assertEqual(self.sink.content, describe(BIG)[0])
        self.assertEqual(
            self.successResultOf(self.sink.abandon(keep=True)), target + PARTIAL_SUFFIX
        )

    def test_no_second_pass_once_output_began(self) -> None:
        """
        Once a verified piece went to stdout the output cannot start over:
        a peer with another version does not help, the fetch fails listing
        every attempt, and stdout holds only verified pieces of the first
        content.
        """
        self.network.add(breaks_after(MIB + 1000, BIG))
        self.network.add(self.share({NAME: OTHER}))
        failure = self.failureResultOf(self.fetch(), NotFoundAnywhere)
        self.assertEqual([a.peer for a in failure.value.attempts], self.network.peers)
        self.assertEqual(self.network.contacted, [7000, 7001])
        self.assertEqual(self.out.getvalue(), BIG[:MIB])
        self.network.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_winner_failure_brings_back_abandoned_peers(self) -> None:
        """
        A slow peer abandoned because a faster one answered goes back in the
        queue: when the faster one breaks, the transfer resumes elsewhere
        and nothing is left running.
        """
        self.network.add("silent")
        self.network.add(breaks_after(MIB + 1000, BIG))
        self.network.add(self.share({NAME: BIG}))
        result = self.successResultOf(self.fetch())
        self.assertEqual(result.peer, self.network.peers[2])
        self.assertEqual(result.attempts[-1].offset, MIB)
        self.assertEqual(self.network.contacted[:2], [7000, 7001])
        self.assertIn(7000, self.network.contacted[2:])
        self.assertContent(BIG)

    def test_cancel_stops_everything(self) -> None:
        """Cancelling a fetch cancels every attempt and timer."""
        self.network.add("blackhole")
        self.network.add("blackhole")
        d = self.fetcher.fetch(NAME, self.network.peers, self.sink)
        self.clock.advance(self.STAGGER)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
