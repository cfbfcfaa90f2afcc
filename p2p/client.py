"""The client's protocols: the relay's peer list, one peer's file or listing.

``FileFetchProtocol`` fetches one file from one peer into a sink, checking
every piece against its digest; ``p2p.fetch`` drives it across the peers
(phase 3).  What can go wrong is sorted in L{p2p.errors}.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from p2p import hints, wire
from p2p.batching import ReceiveBatching

# Their earlier home: p2p.client.PeerFailed and the rest still work (the
# "as" marks them as re-exported).
from p2p.endpoints import EndpointFor as EndpointFor
from p2p.endpoints import peer_endpoint as peer_endpoint
from p2p.errors import SKIPPABLE as SKIPPABLE
from p2p.errors import FailureKind, OutputFailed, PeerFailed
from p2p.errors import describe as describe
from p2p.pace import DEFAULT_PACE, IndexingWatch, Pace, RateWatch
from p2p.pieces import (
    DIGEST_BYTES,
    MAX_PIECES,
    Content,
    PieceList,
    PieceListMismatch,
    valid_piece_size,
)
from p2p.pool import release
from p2p.request import request_lines
from p2p.sink import ContentMismatch, PieceSink
from p2p.transports import (
    no_delay,
    read_in_large_chunks,
    read_into_buffers,
    set_receive_low_water,
    write_now,
)
from p2p.wire import WireError

DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_IDLE_TIMEOUT_SECONDS = 10.0
RECEIVE_CHUNK_BYTES = 1024 * 1024


class FileFetchProtocol(LineReceiver, TimeoutMixin):
    """
    Fetch one content, or what is still missing of it, from one peer into
    a L{PieceSink}, checking every piece before it is stored.

    C{request} is a ``GET <name>`` (the whole file, its piece digests
    first); or, once the content is known, a ``BLOB <root> <offset>
    <length>`` for the missing part; or a ``PIECES <root>`` (a fetch by
    content: the piece list first, then a ``BLOB`` on the same connection
    for what is missing).  While the peer is still indexing the
    file it sends ``INDEXING`` lines: each restarts the idle timer and goes
    to C{on_indexing}.

    C{result} fires with the L{wire.FileHeader} once every byte arrived and
    every piece verified; it fails with L{PeerFailed} for a refusal, a
    broken transfer, a piece or piece list that does not verify
    (``corrupted``), other content than the sink's (``other-content``), a
    protocol violation, a silence longer than C{idle_timeout}, a header
    late or a transfer too slow for C{pace} (L{p2p.pace}); or with
    L{OutputFailed} when storing fails.  Cancelling it aborts the
    connection.

    Nothing past what a header announced is ever buffered or stored: the
    piece list is read up to its announced length, and a byte beyond the
    announced count fails the peer before any of its chunk is used.
    """

    delimiter = wire.DELIMITER
    MAX_LENGTH = wire.MAX_RECEIVE_LENGTH

    def __init__(
        self,
        request: wire.Get | wire.Blob | wire.Pieces,
        sink: PieceSink,
        clock: IReactorTime,
        idle_timeout: float | None,
        accept_header: Callable[[wire.FileHeader], None] = lambda header: None,
        on_indexing: Callable[[wire.Indexing], None] = lambda progress: None,
        on_content: Callable[[Content], bool] = lambda content: False,
        pace: Pace = DEFAULT_PACE,
        on_stored: Callable[[int], object] | None = None,
    ) -> None:
        self.request = request
        self.sink = sink
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.pace = pace
        self._rate: RateWatch | None = None
        if pace.min_rate > 0:
            self._rate = RateWatch(
                clock, pace.min_rate, pace.min_rate_time, self._too_slow
            )
        # The header deadline (pace.header_timeout), while it runs.
        self._deadline: IDelayedCall | None = None
        # How the peer's INDEXING lines, if any, keep up.
        self._indexing_watch = IndexingWatch(clock, pace)
        # Called with a well-formed header before any byte is stored; raising
        # PeerFailed turns the peer down (e.g. another peer already won).
        self.accept_header = accept_header
        self.on_indexing = on_indexing
        # Called once the content is known (piece list checked) on a first
        # request (GET, PIECES): True hands the fetch over to several
        # sources (p2p.swarm), ending this one as "handover".
        self.on_content = on_content
        # Called with the size of each piece this peer sent that verified and
        # was the first copy stored (its share of a download from several).
        self.on_stored = on_stored
        self.header: wire.FileHeader | None = None
        self.content: Content | None = None
        self.remaining = 0
        self._greeted = False
        self._digests: bytearray | None = None
        self._digests_in = 0  # bytes of it received
        self._held = bytearray()
        self._accepted = False
        self._piece: list[memoryview] = []
        self._piece_bytes = 0
        self._index = 0
        # Fewer, larger reads while the content comes in fast.
        self._batching = ReceiveBatching(
            lambda size: set_receive_low_water(self.transport, size), clock
        )
        self.result: Deferred[wire.FileHeader] = Deferred(self._cancel)

    def callLater(self, period, func):  # TimeoutMixin hook: use our clock
        return self.clock.callLater(period, func)

    def _cancel(self, _: Deferred) -> None:
        self._stop_timers()
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        no_delay(self.transport)
        read_in_large_chunks(self.transport)
        read_into_buffers(self.transport, self)
        self.setTimeout(self.idle_timeout)
        self._arm_deadline()
        # Asked at once, not after the banner: a round trip sooner on a new
        # connection.  The banner is still checked before any reply is read.
        self._send_request()

    def _send_request(self) -> None:
        # Sent at once, not queued for the reactor's next turn (see
        # p2p.transports.write_now): two epoll_ctl calls and a turn fewer
        # per file on a kept connection.
        write_now(self.transport, self.request.to_line() + self.delimiter)

    # -- time: idle, the header's deadline, the minimum rate -------------------

    def _arm_deadline(self) -> None:
        """(Re)start the time the peer has for its header and piece list."""
        self._disarm_deadline()
        if self.pace.header_timeout is not None:
            self._deadline = self.clock.callLater(
                self.pace.header_timeout, self._header_late
            )

    def _disarm_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _header_late(self) -> None:
        self._deadline = None
        self._fail(
            f"timed out: no header within {self.pace.header_timeout:g}s",
            FailureKind.TIMEOUT,
        )

    def _too_slow(self, reason: str) -> None:
        self._fail(reason, FailureKind.SLOW)

    def _stop_timers(self) -> None:
        self.setTimeout(None)
        self._disarm_deadline()
        if self._rate is not None:
            self._rate.stop()
        self._batching.stop()

    def _pause(self) -> None:
        """
        Stop reading for our own sake (the sink is busy): the time this
        takes is not the peer's, so neither its idle timer nor its rate
        stretch runs meanwhile.
        """
        self.transport.pauseProducing()
        self.setTimeout(None)
        if self._rate is not None:
            self._rate.stop()

    def _resume(self, content: bool = True) -> None:
        """Read again; with C{content}, the rate is watched from now."""
        self.setTimeout(self.idle_timeout)
        if content and self._rate is not None:
            self._rate.start()
        self.transport.resumeProducing()

    def _indexing(self, progress: wire.Indexing) -> None:
        """
        The peer is still indexing the file.  A line that shows progress
        gives it its header deadline afresh, within the bounds of
        L{IndexingWatch} (a peer faking progress on a huge size would
        otherwise be waited for as long as that size at the minimum rate:
        years).  A size beyond what the client would take fails it at once.
        """
        if self._indexing_watch.judge(progress, self._size_refusal):
            self._arm_deadline()
        self.on_indexing(progress)

    def _size_refusal(self, size: int) -> str | None:
        """Why a content of C{size} bytes would not be taken, before one is
        being assembled (after, its size is known)."""
        return self.sink.refusal(size) if self.sink.content is None else None

    # -- lines: banner, progress, header ------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self.result.called:
            return
        self.resetTimeout()
        try:
            if not self._greeted:
                wire.check_banner(line, "peer")
                self._greeted = True
                return
            progress = wire.Indexing.from_line(line)
            if progress is not None:
                self._indexing(progress)
                return
            if isinstance(self.request, wire.Pieces):
                listing = wire.PiecesHeader.from_line(line)
                content = self._check_listing(listing)
                header = wire.FileHeader(
                    0, listing.root, 0, listing.size, listing.piece, listing.count
                )
            else:
                header = wire.FileHeader.from_line(line)
                content = self._check_header(header)
        except wire.RemoteError as e:
            # Asked by root, "no such content" only says the peer does not
            # hold that content, not that it holds another under the name:
            # a refusal like any other, never a second pass's candidate.
            self._fail(
                f"refused: ERR {e.code} {e.message}",
                FailureKind.REFUSED,
                abort=False,
                keep=e.code == wire.Code.NOT_FOUND,
            )
            return
        except WireError as e:
            self._fail(f"protocol error: {e.message}", FailureKind.PROTOCOL)
            return
        except PeerFailed as e:
            self._fail(e.reason, e.kind)
            return
        if not self.sink.continues(header.root):
            self._fail(
                f"has other content (root {header.root[:12]}...)",
                FailureKind.OTHER_CONTENT,
            )
            return
        refusal = self.sink.refusal(header.size) if self.sink.content is None else None
        if refusal is not None:
            self._fail(f"too large: {refusal}", FailureKind.TOO_LARGE)
            return
        if not self._accepted:
            try:
                self.accept_header(header)
            except PeerFailed as e:
                self._fail(e.reason, e.kind)
                return
            self._accepted = True
        self.header = header
        self.content = content
        self.remaining = header.count
        self._index = header.offset // content.piece_size
        # Twisted reads 64 KiB per call by default; larger reads cut the
        # per-chunk Python work of a bulk transfer several times over.
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = RECEIVE_CHUNK_BYTES
        # Raw from here: the digests and the content follow the header at
        # once, maybe in the same read.
        self.setRawMode()
        if header.hashes:
            # Its exact size at once (its pages are taken as they are
            # filled): grown read by read, it held half as much again.
            self._digests = bytearray(header.hashes)
            self._digests_in = 0
        else:
            self._begin(None)

    def _check_listing(self, listing: wire.PiecesHeader) -> Content:
        """The content a ``PIECES`` reply describes, if it is the one asked."""
        assert isinstance(self.request, wire.Pieces)
        if listing.root != self.request.root:
            raise WireError(wire.Code.BAD_REQUEST, "the reply is for other content")
        content = described(listing.root, listing.size, listing.piece)
        if listing.count != DIGEST_BYTES * content.pieces:
            raise WireError(wire.Code.BAD_REQUEST, "wrong length of piece digests")
        return content

    def _check_header(self, header: wire.FileHeader) -> Content:
        """The content a header describes, if it answers our request."""
        content = described(header.root, header.size, header.piece)
        request = self.request
        if isinstance(request, wire.Get):
            expected = (0, header.size)
            digests = DIGEST_BYTES * content.pieces if content.pieces > 1 else 0
        else:
            if header.root != request.root:
                raise WireError(wire.Code.BAD_REQUEST, "the reply is for other content")
            count = max(0, min(request.length, header.size - request.offset))
            expected = (request.offset, count)
            digests = 0
        if (header.offset, header.count) != expected:
            raise WireError(wire.Code.BAD_REQUEST, "the reply is for another range")
        if header.hashes != digests:
            raise WireError(wire.Code.BAD_REQUEST, "wrong length of piece digests")
        if header.offset % header.piece:
            raise WireError(wire.Code.BAD_REQUEST, "range not on a piece boundary")
        return content

    def _begin(self, pieces: PieceList | None) -> None:
        """The content is known (and its piece list checked): store it."""
        assert self.content is not None
        if pieces is None and self.content.pieces > 1 and self.sink.pieces is None:
            self._fail(
                "protocol error: no piece list for a file of pieces",
                FailureKind.PROTOCOL,
            )
            return
        try:
            d = self.sink.begin(self.content, pieces)
        except ContentMismatch:
            self._fail("has other content", FailureKind.OTHER_CONTENT)
            return
        # Header and piece list are in: the deadline has been kept.
        self._disarm_deadline()
        # Preparing the output may take long (hashing a partial file again):
        # reading stops meanwhile, unless it is done already (a small
        # file's, on the reactor thread: no pause and resume to pay).
        self._preparing = not d.called
        if self._preparing:
            self._pause()
        d.addCallbacks(self._ready, self._store_failed)

    # Whether reading is paused while the sink prepares the output.
    _preparing = False

    def _prepared(self, content: bool = True) -> None:
        """The output is ready: read again (if paused), and with C{content}
        watch the rate from now."""
        if self._preparing:
            self._preparing = False
            self._resume(content)
        elif content and self._rate is not None:
            self._rate.start()

    def _ready(self, _: None) -> None:
        if self.result.called:
            return
        assert self.header is not None and self.content is not None
        first_contact = not isinstance(self.request, wire.Blob)
        if first_contact and not self.sink.complete and self.on_content(self.content):
            self._fail("handed over to several sources", FailureKind.HANDOVER)
            return
        if isinstance(self.request, wire.Pieces):
            self._ask_content()
            return
        resumable = isinstance(self.request, wire.Get) and not self.sink.complete
        if resumable and self.sink.done:
            # An earlier run left verified pieces: ask for the rest instead.
            offset = self.content.span(self.sink.first_missing())[0]
            self._fail(f"resuming at byte {offset}", FailureKind.RESUME)
            return
        self._accepting = True
        held, self._held = bytes(self._held), bytearray()
        self._prepared()
        if held:
            self._content_received(held)
        elif self.remaining == 0 or self.sink.complete:
            self._complete()

    def _ask_content(self) -> None:
        """The piece list is in (a fetch by root): ask for what is missing."""
        assert self.content is not None
        if self._held:
            self._fail(
                "protocol error: bytes after the piece list", FailureKind.PROTOCOL
            )
            return
        self._prepared(content=False)
        if self.sink.complete:
            self._complete()
            return
        offset = self.content.span(self.sink.first_missing())[0]
        self.request = wire.Blob(
            self.content.root_hex, offset, self.content.size - offset
        )
        self.header = None
        self._arm_deadline()  # for the BLOB's header
        self.setLineMode()
        self._send_request()

    # -- raw bytes: piece digests, then the content --------------------------

    # Whether the sink is ready for content; until then it waits in _held.
    _accepting = False

    def rawDataReceived(self, data: bytes) -> None:
        if self.result.called or self._all_in:
            return
        self.resetTimeout()
        if self._digests is not None:
            data = self._receive_digests(data)
        if not data:
            return
        if len(self._held) + len(data) > self.remaining:
            # Not a byte of it is used: nothing past the announced count is
            # ever held or stored.
            self._fail(
                "protocol error: more bytes than announced", FailureKind.PROTOCOL
            )
            return
        if not self._accepting:
            self._held += data
            return
        self._content_received(data)

    def _content_received(self, data: bytes) -> None:
        self._counted(len(data))
        if self._into is not None:
            self._unlend()
        try:
            keep_going = self._receive_content(data)
        except OSError as e:
            self._output_failed(e)
            return
        self._go_on(keep_going)

    def _counted(self, count: int) -> None:
        self.remaining -= count
        if self._rate is not None:
            self._rate.count(count)
        self._batching.received(count, self.remaining)

    def _go_on(self, keep_going: bool) -> None:
        """After content bytes: complete, or pause while the sink is behind."""
        if self.result.called:
            return
        if self.remaining == 0:
            self._complete()
        elif not keep_going:
            # The sink's worker is behind: stop reading until it catches up.
            self._pause()
            self.sink.when_drained().addCallback(self._drained)

    # -- content received in place (p2p.transports.read_into_buffers) ---------

    # The piece being received into a buffer the sink lent, and how many of
    # its bytes are in.
    _into: bytearray | None = None
    _into_bytes = 0

    def receive_buffer(self) -> memoryview | None:
        """
        Where the transport may put the next content bytes: the rest of
        the current piece's lent buffer (never past the announced count).
        C{None} outside the content (lines, the piece digests), where
        bytes come to L{dataReceived}.
        """
        if (
            not self._accepting
            or self.line_mode
            or self._digests is not None
            or self.remaining <= 0
            or self._all_in
            or self.result.called
        ):
            return None
        into = self._into
        if into is None:
            into = self._into = self.sink.lend(self._index)
            # The piece's first bytes may have come in a read of their own
            # (with the header, say): copied in once.
            filled = 0
            for part in self._piece:
                into[filled : filled + len(part)] = part
                filled += len(part)
            self._into_bytes = filled
            self._piece, self._piece_bytes = [], 0
        start = self._into_bytes
        return memoryview(into)[start : start + min(len(into) - start, self.remaining)]

    def received_into(self, count: int) -> None:
        """C{count} bytes arrived in the buffer L{receive_buffer} gave."""
        if self.result.called:
            return
        self.resetTimeout()
        self._counted(count)
        into = self._into
        assert into is not None
        self._into_bytes += count
        keep_going = True
        if self._into_bytes == len(into):
            index = self._index
            self._index += 1
            self._into = None
            if index in self.sink.done:
                self.sink.take_back(into)
            else:
                try:
                    keep_going = self.sink.write(
                        index, into, self._bad_piece, self.on_stored
                    )
                except OSError as e:
                    self._output_failed(e)
                    return
        self._go_on(keep_going)

    def _unlend(self) -> None:
        """Back to pieces kept as received chunks: the part of the current
        piece already in a lent buffer becomes such a chunk."""
        into, self._into = self._into, None
        assert into is not None
        if self._into_bytes:
            self._piece = [memoryview(bytes(memoryview(into)[: self._into_bytes]))]
            self._piece_bytes = self._into_bytes
        self.sink.take_back(into)

    def _receive_digests(self, data: bytes) -> bytes:
        """Collect the piece digests; return what follows them."""
        assert self._digests is not None and self.header is not None
        start = self._digests_in
        need = self.header.hashes - start
        taken = min(need, len(data))
        self._digests[start : start + taken] = memoryview(data)[:taken]
        self._digests_in += taken
        if taken < need:
            return b""
        # Kept as received, not copied to bytes: a piece list may be 128 MiB
        # (MAX_PIECES), and each copy of it was that much more memory.
        digests, self._digests = self._digests, None
        assert self.content is not None
        try:
            pieces = PieceList.check(self.content, digests)
        except PieceListMismatch as e:
            self._fail(f"corrupted: {e}", FailureKind.CORRUPTED)
            return b""
        self._begin(pieces)
        return data[need:]

    def _receive_content(self, data: bytes) -> bool:
        """Cut C{data} into pieces for the sink; False: pause input."""
        content = self.content
        assert content is not None
        keep_going = True
        view = memoryview(data)
        while view:
            # The piece is kept as the received chunks' views, never copied
            # together here: the sink's threads hash and write the parts.
            length = content.span(self._index)[1]
            part = view[: length - self._piece_bytes]
            self._piece.append(part)
            self._piece_bytes += len(part)
            view = view[len(part) :]
            if self._piece_bytes == length:
                index, piece = self._index, self._piece
                self._piece, self._piece_bytes = [], 0
                self._index += 1
                if index not in self.sink.done:
                    keep_going = (
                        self.sink.write(index, piece, self._bad_piece, self.on_stored)
                        and keep_going
                    )
        return keep_going

    def _bad_piece(self, index: int) -> None:
        self._fail(
            f"corrupted: piece {index} does not match its digest", FailureKind.CORRUPTED
        )

    # Set when the connection is gone (ITransport offers no such flag).
    _gone = False

    def _drained(self, _: None) -> None:
        if not self.result.called and not self._gone and not self._all_in:
            self._resume()

    # Set once every announced byte is in: nothing more is read.
    _all_in = False

    def _complete(self) -> None:
        # Every byte is in; the sink may still be verifying and storing.
        # Whatever the peer sends after them is left unread (and not
        # counted against it): the pieces decide.
        self._all_in = True
        self._stop_timers()
        d = self.sink.settled()
        if not d.called:
            self.transport.pauseProducing()  # settled at once: nothing to stop
        d.addCallbacks(self._verified, self._store_failed)

    def _verified(self, failed: list[int]) -> None:
        assert self.header is not None
        if self.result.called:
            return  # cancelled, or a bad piece failed us already
        if failed:
            self._bad_piece(failed[0])
            return
        # Every byte read: the connection is kept for the next fetch, and
        # handed back before this one's result fires, so that a fetch the
        # result starts can take it.  (Its connectionLost, from inside, is
        # harmless now: every announced byte arrived.)
        release(self.transport)
        self.result.callback(self.header)

    def _store_failed(self, failure: Failure) -> None:
        failure.trap(OSError)
        self._output_failed(failure.value)

    def _output_failed(self, error: OSError) -> None:
        self._stop_timers()
        if not self.result.called:
            self.result.errback(OutputFailed(error))
        self.transport.abortConnection()

    def _fail(
        self,
        reason: str,
        kind: FailureKind = FailureKind.REFUSED,
        abort: bool = True,
        keep: bool = False,
    ) -> None:
        self._stop_timers()
        if keep:
            # A whole ERR 404 reply: the connection is kept (p2p.pool counts
            # such replies against the peer's error budget), handed back
            # before the result fires, as in _verified.
            self._kept = True
            release(self.transport, error=True)
        # As in _verified: the real reason first, then the close.
        if not self.result.called:
            self.result.errback(PeerFailed(reason, kind))
        if keep:
            return
        if abort:
            self.transport.abortConnection()
        else:
            # Kept only after an ERR 404: a peer closes a connection after
            # an error it may not answer again (429, 503, ...).
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        # After a header the peer holds the file and stalled; before it, it
        # may not hold it at all.
        kind = FailureKind.STALLED if self.header is not None else FailureKind.TIMEOUT
        self._fail(f"timed out: silent for {self.idle_timeout:g}s", kind)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail("protocol error: reply line too long", FailureKind.PROTOCOL)

    # Set when an ERR 404's connection was handed back to the pool.
    _kept = False

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._gone = True
        self._stop_timers()
        if self._into is not None:
            into, self._into = self._into, None
            self.sink.take_back(into)
        if self.result.called or self._kept:
            return
        if self.header is None:
            self.result.errback(
                PeerFailed("connection closed before a reply", FailureKind.BROKEN)
            )
        elif self.remaining == 0:
            return  # every byte arrived; the sink decides
        else:
            got = self.header.count - self.remaining
            self.result.errback(
                PeerFailed(
                    f"broken transfer after {got} of {self.header.count} bytes",
                    FailureKind.BROKEN,
                )
            )


def described(root: str, size: int, piece_size: int) -> Content:
    """
    The content a peer's reply describes, if a client can take it: a piece
    size it accepts (a power of two, 16 KiB-16 MiB) and a piece list it
    can hold (at most L{MAX_PIECES} pieces).

    An empty content has no piece to verify, so its root is checked here:
    otherwise a peer could pass any content off as empty, under its root.

    :raise PeerFailed: (corrupted) an empty content under another root.
    """
    if not valid_piece_size(piece_size):
        raise WireError(wire.Code.BAD_REQUEST, f"piece size {piece_size}")
    content = Content(bytes.fromhex(root), size, piece_size)
    if content.pieces > MAX_PIECES:
        raise WireError(wire.Code.BAD_REQUEST, f"{content.pieces} pieces is too many")
    if content.pieces == 0:
        try:
            PieceList.check(content, b"")
        except PieceListMismatch:
            raise PeerFailed(
                f"corrupted: root {root[:12]}... is not that of empty content",
                FailureKind.CORRUPTED,
            ) from None
    return content


def list_peers(
    relay: IStreamClientEndpoint,
    clock: IReactorTime,
    timeout: float,
    token: str | None = None,
    maximum: int = 10_000,
    files: bool = False,
) -> Deferred[list[wire.PeerEntry]]:
    """
    Phase 2: the relay's list of active peers, in its order (verified
    first, wide networks taking turns);
    with C{files}, each with its name filter (``PEERS files=1``, which a
    relay from before filters answers with ``ERR 400``).

    The first request is the plain ``PEERS`` every relay answers (at most
    1000 peers, no cursor).  Only when that page is full are there maybe
    more: the list is then read again in pages of ``limit=1000``, following
    each reply's ``next=`` cursor (one connection per page, each bounded by
    C{timeout}) until the relay says it ended or C{maximum} peers are in
    (default 10,000: far more than a fetch will ever try).  A relay from
    before paging answers ``limit=`` with ``ERR 400``: its first 1000 peers
    are the list.  So small tables cost one request, and a big one one
    request more than its pages.
    """
    page_size = wire.MAX_PEERS_PER_PAGE
    result: Deferred[list[wire.PeerEntry]] = Deferred()
    first: list[wire.PeerEntry] = []
    peers: list[wire.PeerEntry] = []

    def ask(request: wire.Peers, callback, *args) -> None:
        d = request_lines(relay, "relay", request.to_line(), clock, True, timeout)
        d.addCallback(callback, *args)
        d.addErrback(result.errback)

    def read(lines: list[bytes]) -> tuple[list[wire.PeerEntry], str | None]:
        _, next_cursor = wire.parse_listing_header(lines[0], page_size)
        return [wire.PeerEntry.from_line(line) for line in lines[1:]], next_cursor

    def got_first(lines: list[bytes]) -> None:
        first.extend(read(lines)[0])
        if len(first) < page_size or len(first) >= maximum:
            result.callback(first[:maximum])
        else:
            ask_page(None)

    def ask_page(cursor: str | None) -> None:
        limit = min(page_size, maximum - len(peers))
        request = wire.Peers(token=token, limit=limit, cursor=cursor, files=files)
        d = request_lines(relay, "relay", request.to_line(), clock, True, timeout)
        d.addCallbacks(got_page, failed_page, errbackArgs=(cursor,))
        d.addErrback(result.errback)

    def got_page(lines: list[bytes]) -> None:
        page, next_cursor = read(lines)
        peers.extend(page[: maximum - len(peers)])
        # An empty page with a cursor would loop forever: treat it as the end.
        if next_cursor is None or not page or len(peers) >= maximum:
            result.callback(peers)
        else:
            ask_page(next_cursor)

    def failed_page(failure: Failure, cursor: str | None) -> None:
        error = failure.value
        if cursor is None and isinstance(error, wire.RemoteError) and error.code == 400:
            result.callback(first)  # a relay from before paging
        else:
            result.errback(failure)

    ask(wire.Peers(token=token, files=files), got_first)
    return result


def likely_holders(
    relay: IStreamClientEndpoint,
    clock: IReactorTime,
    timeout: float,
    name: str,
    token: str | None = None,
) -> Deferred[list[wire.PeerEntry]]:
    """
    The peers the relay suggests for C{name} (``PEERS hint=``), in its
    listing's order: those whose announced name filter may hold it.

    Only a hint: a suggested peer may not hold the file (a false positive
    or a stale filter) and a holder may be missing (it announced no filter,
    or came after the relay's scan bound).  The relay learns the name's
    hint, never the name.  A relay from before hints answers ``ERR 400``:
    that means no suggestion, an empty list.  Any other refusal (``ERR
    429`` from a busy relay, not waited for) fails, and the caller goes on
    without one.
    """
    request = wire.Peers(token=token, hint=hints.name_hint(name))
    # Never asked again after an ERR 429: a suggestion is not worth a wait
    # (the fetch can go on over the full list), nor more load on a relay
    # that says it is busy.
    d = request_lines(
        relay, "relay", request.to_line(), clock, True, timeout, retries=0
    )

    def read(lines: list[bytes]) -> list[wire.PeerEntry]:
        wire.parse_listing_header(lines[0], wire.MAX_PEERS_PER_PAGE)
        return [wire.PeerEntry.from_line(line) for line in lines[1:]]

    def older_relay(failure: Failure) -> list[wire.PeerEntry]:
        failure.trap(wire.RemoteError)
        if failure.value.code != 400:
            return failure  # type: ignore[return-value]
        return []

    d.addCallbacks(read, older_relay)
    return d


def index_status(
    endpoint: IStreamClientEndpoint, clock: IReactorTime, timeout: float
) -> Deferred[wire.IndexStatus | None]:
    """
    How far a peer's index got (``STATUS``): whether its ``LIST`` lists
    every file it will serve, or it is still indexing.  C{None} from a peer
    that predates ``STATUS`` (``ERR 501``): it cannot say.
    """
    d = request_lines(endpoint, "peer", wire.Status().to_line(), clock, False, timeout)

    def parsed(lines: list[bytes]) -> wire.IndexStatus:
        return wire.IndexStatus.from_line(lines[0])

    def older_peer(failure: Failure) -> Failure | None:
        failure.trap(wire.RemoteError)
        if failure.value.code != wire.Code.UNKNOWN_COMMAND:
            return failure
        return None

    return d.addCallbacks(parsed, older_peer)


# The most files taken from one peer's listing: a hostile peer could page
# for ever.  Past it the listing stops with ListingTooLong, never silently.
MAX_LISTED_FILES = 100_000
# And from all peers together (``p2p ls``), shared among them: 8 hostile
# peers at 100,000 files of 880-byte names each drove the client to 3.26 GB
# (it held every row, then the whole text).  These hold the rows to about
# 250 MB however many peers list (500,000 files of short names; the 70,000
# files of 880-byte names 64 MiB of lines holds take about 100 MB).
MAX_LISTED_FILES_IN_ALL = 500_000
MAX_LISTED_BYTES_IN_ALL = 64 * 1024 * 1024


class ListingTooLong(Exception):
    """
    A peer lists more than the client takes (L{MAX_LISTED_FILES}, or the
    L{ListingBudget} it was given); C{files} holds the first, C{by_bytes}
    says which bound cut it.
    """

    def __init__(self, files: list[wire.FileEntry], by_bytes: bool = False) -> None:
        super().__init__(f"lists more than {len(files)} files")
        self.files = files
        self.by_bytes = by_bytes


def listed_bytes(entry: wire.FileEntry) -> int:
    """What a listed file counts against a byte budget: its ``FILE`` line."""
    return len(entry.to_line())


class ListingBudget:
    """
    The files, and bytes of their ``FILE`` lines (L{listed_bytes}), that
    listings may still take.  L{list_files} spends from it entry by entry,
    so a caller sharing one budget among peers reads back what each walk
    cost instead of formatting every line a second time (up to
    L{MAX_LISTED_FILES_IN_ALL} of them).
    """

    def __init__(self, files: int, line_bytes: int) -> None:
        self.files_left = files
        self.bytes_left = line_bytes
        self.files_spent = 0
        self.bytes_spent = 0

    def share(self, among: int) -> ListingBudget:
        """One of C{among} equal shares of what is left, spent on its own:
        L{charge} passes on what it spent, once its files are kept."""
        return ListingBudget(self.files_left // among, self.bytes_left // among)

    def spend(self, entry: wire.FileEntry) -> bool:
        """Take C{entry} if it fits; if it does not, False, nothing spent."""
        cost = listed_bytes(entry)
        if self.files_left < 1 or cost > self.bytes_left:
            return False
        self._pay(1, cost)
        return True

    def charge(self, share: ListingBudget) -> None:
        """Spend here what C{share} spent."""
        self._pay(share.files_spent, share.bytes_spent)

    def _pay(self, files: int, line_bytes: int) -> None:
        self.files_left -= files
        self.bytes_left -= line_bytes
        self.files_spent += files
        self.bytes_spent += line_bytes


def list_files(
    endpoint: IStreamClientEndpoint,
    clock: IReactorTime,
    timeout: float,
    maximum: int = MAX_LISTED_FILES,
    budget: ListingBudget | None = None,
) -> Deferred[list[wire.FileEntry]]:
    """
    The files one peer shares: every page of its ``LIST``, following each
    reply's ``next=`` cursor (one connection per page, each bounded by
    C{timeout}) to the end, so nothing is cut off silently.  A cursor that
    does not move forward is a protocol error and an empty page the end, so
    a hostile peer cannot keep the client paging for ever; past C{maximum}
    files, or what C{budget} has left (spent as each file is taken), the
    result fails with L{ListingTooLong}, which holds the first.
    """
    result: Deferred[list[wire.FileEntry]] = Deferred()
    files: list[wire.FileEntry] = []
    if budget is not None:
        # Its files bound the walk as maximum does, so that running out of
        # the budget inside the walk means its bytes ran out (by_bytes).
        maximum = min(maximum, budget.files_left)

    def ask(cursor: str | None) -> None:
        request = wire.ListFiles(limit=wire.MAX_FILES_PER_PAGE, cursor=cursor)
        d = request_lines(endpoint, "peer", request.to_line(), clock, True, timeout)
        d.addCallback(got_page, cursor)
        d.addErrback(result.errback)

    def take(page: list[wire.FileEntry]) -> bool:
        """Keep what the bounds allow of C{page}; False: some was left."""
        for entry in page:
            if len(files) >= maximum:
                return False
            if budget is not None and not budget.spend(entry):
                return False
            files.append(entry)
        return True

    def got_page(lines: list[bytes], cursor: str | None) -> None:
        _, next_cursor = wire.parse_listing_header(lines[0], wire.MAX_FILES_PER_PAGE)
        page = [wire.FileEntry.from_line(line) for line in lines[1:]]
        whole = take(page)
        if not whole:
            result.errback(ListingTooLong(files, by_bytes=len(files) < maximum))
            return
        if next_cursor is None or not page:
            result.callback(files)
            return
        if len(files) >= maximum:
            result.errback(ListingTooLong(files))
            return
        if cursor is not None and wire.parse_cursor(next_cursor) <= wire.parse_cursor(
            cursor
        ):
            raise WireError(wire.Code.BAD_REQUEST, "LIST cursor did not advance")
        ask(next_cursor)

    ask(None)
    return result
