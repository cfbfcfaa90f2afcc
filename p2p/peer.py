"""The peer's file server (protocol P2P/2, see docs/protocol.rst).

``GET``, ``RANGE`` and ``BLOB`` stream a file or a byte range of it,
``PIECES`` sends a content's piece digests and ``LIST`` pages through the
share, all answered from the share's index.  A file goes out as one header
line (count, root, offset, size, piece size) and then exactly ``count`` raw
bytes, pulled from disk chunk by chunk as the socket drains, so memory stays
flat whatever the file size.  While a file is being sent the connection
reads no further requests.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPullProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import wire
from p2p.index import CHANGING_RETRY_SECONDS, FileChanging, IndexEntry, ShareIndex
from p2p.limits import (
    UNKNOWN_HOST,
    ConnectionLimits,
    ConnectionPolicy,
    IdleTimeouts,
    LimitedServerFactory,
    RefusalLog,
    RefusingProtocol,
    ServerLineProtocol,
)
from p2p.pulls import TLS_RECORD_BYTES, BufferedPulls
from p2p.ratelimit import RequestBudget
from p2p.share import OpenedFile, ShareFolder
from p2p.text import shown
from p2p.throttle import TokenBucket, Waiter
from p2p.transports import (
    limit_unsent,
    limit_unsent_in_kernel,
    no_delay,
    unbuffered_write,
    unsent_bytes,
    zero_copy_socket,
)
from p2p.wire import Code, WireError

DEFAULT_IDLE_TIMEOUT_SECONDS = 30
# Transfers of at least this many bytes are logged when they start, as
# well as when they end.
LOG_START_BYTES = 1024 * 1024
# Large enough that per-chunk overhead is small, small enough to keep the
# process's memory flat (one chunk in flight per connection).
CHUNK_BYTES = 256 * 1024
# Most bytes one sendfile burst moves before yielding to other connections.
ZERO_COPY_BURST_BYTES = 8 * 1024 * 1024
# A piece list longer than this goes out as the client reads
# (BufferProducer), not into the transport's buffer with its header: about
# what the socket of a client that reads nothing still takes.  (At 64 KiB,
# 3,000 connections that sent GET for a 2 GiB file, a 64 KiB list, and read
# nothing grew the peer by 152 MiB, against 12.6 MiB for as many asking for
# a header alone: bench/attack.py step 8 at that size; 20.1 MiB now.)
INLINE_ANSWER_BYTES = 4 * 1024
# What such an answer's producer writes per pull where it cannot write
# into the socket itself (TLS; see p2p.pulls).
ANSWER_CHUNK_BYTES = 64 * 1024
# A LIST page ends once its lines reach this size, whatever its limit (the
# client follows next= as for any page): about what the kernel holds for a
# client that reads nothing (KERNEL_UNSENT_BYTES), so that such a client
# holds none of it in the peer's memory.  A full page of 1,000 files with
# 60-byte names is 141 KB: 3,000 connections that sent LIST and read
# nothing took 230 MiB of the peer's RSS once the kernel took no more.
LIST_PAGE_BYTES = 64 * 1024
# What the kernel may hold unsent for a connection (TCP_NOTSENT_LOWAT):
# bytes in flight are not counted, so a reading client loses no speed (1 GiB
# on loopback went faster with it, with less CPU on both ends: baseline
# (a*) of bench/transfer.py); a client that reads nothing holds about this
# much of the kernel's memory, not the 550 KB Linux's autotuning gave it on
# loopback.  Each wakeup refills this much, so a sender limited by its
# congestion window makes a turn of the reactor per 64 KiB acknowledged.
KERNEL_UNSENT_BYTES = 64 * 1024
# How often a client waiting for a file being indexed hears how far it got:
# well within the client's idle timeout (10 s by default).
PROGRESS_INTERVAL_SECONDS = 1.0
# Transfer events (sent, described, client left) logged one by one per
# minute; the rest are counted, as the relay's table changes are.
TRANSFER_EVENTS_LOGGED_PER_MINUTE = 600
# Names of one content tried per BLOB request, and the retry-after given
# when all of them turned out stale (changed on disk, being re-indexed).
HOLDERS_TRIED = 8
STALE_RETRY_SECONDS = 1
# Descriptors one connection may hold at once: its socket, and the file it
# is serving (PeerProtocol._opened; one at a time).  The daemon sizes its
# descriptor limit by this (p2p.daemon.fit_descriptors): budgeting only the
# socket let stalled GETs, within --max-connections, exhaust the limit.
DESCRIPTORS_PER_CONNECTION = 2


class FileShrank(Exception):
    """The file ended before the promised byte count was sent."""


@implementer(IPullProducer)
class FileRangeProducer:
    """
    Pull producer writing C{count} bytes of C{fd} from C{offset}.

    Reads use C{os.pread}, so the descriptor's offset is never shared state.
    C{done} fires when every byte was written, or fails if the consumer went
    away (L{ConnectionLost}) or the file shrank (L{FileShrank}).

    With C{socket_fd} (a plain TCP connection's socket, see
    L{zero_copy_socket}) the bytes go from the file to the socket with
    ``os.sendfile``, never entering Python.  That is safe only while the
    transport's own buffer is empty, which is exactly when a TCP transport
    calls a pull producer back; at the first call, made by
    C{registerProducer}, it is empty once the header went out
    (L{p2p.transports.unsent_bytes}).  Without a socket, or when the
    transport cannot say, chunks are read and written through it, sized by
    C{pulls} when given (the transport holds what the client does not
    read: see L{p2p.pulls}).
    """

    def __init__(
        self,
        fd: int,
        offset: int,
        count: int,
        consumer: IConsumer,
        on_progress: Callable[[], object] = lambda: None,
        chunk_bytes: int = CHUNK_BYTES,
        socket_fd: int | None = None,
        throttle: TokenBucket | None = None,
        pulls: BufferedPulls | None = None,
    ) -> None:
        self.fd = fd
        self.position = offset
        self.count = count
        self.remaining = count
        self.consumer = consumer
        self.on_progress = on_progress
        self.chunk_bytes = chunk_bytes
        self.socket_fd = socket_fd
        self.throttle = throttle
        # Sizes our pulls when the transport buffers what it is given.
        self.pulls = pulls
        self._write = unbuffered_write(consumer)
        self._drained = False
        # Our place in the upload budget's queue, and what it granted.
        self._wait: Waiter | None = None
        self._credit = 0
        self.done: Deferred[None] = Deferred()

    @property
    def sent(self) -> int:
        """Bytes handed to the consumer so far."""
        return self.count - self.remaining

    def start(self) -> Deferred[None]:
        if self.remaining == 0:
            self.done.callback(None)
            return self.done
        pulls = self.pulls
        if pulls is not None and self.socket_fd is None:
            pulls.opened()

            def closed(result: object) -> object:
                pulls.closed()
                return result

            self.done.addBoth(closed)
        self.consumer.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        if self.done.called or self._wait is not None:
            return
        if self.socket_fd is not None:
            if self._drained:
                self._send_zero_copy(self.socket_fd)
                return
            unsent = unsent_bytes(self.consumer)
            if unsent is not None:
                # The first call, from registerProducer.  With the header
                # out, sendfile can write behind it now; with the header
                # still in the transport, write nothing: the transport
                # calls again once it is out.  (A first chunk written
                # through the transport was 256 KB of the peer's memory per
                # client that does not read; see BufferProducer.)  Every
                # later call comes from a transport just emptied.
                self._drained = True
                if not unsent:
                    self._send_zero_copy(self.socket_fd)
                return
        # No socket, or a transport that cannot say what it holds: write
        # through it.
        self._drained = True
        chunk_bytes = self.chunk_bytes
        if self.pulls is not None:
            chunk_bytes = self.pulls.size(chunk_bytes)
        size = self._allowed(min(chunk_bytes, self.remaining))
        if not size:
            return
        chunk = self._read(size)
        if not chunk:
            self._finish(Failure(FileShrank()))
            return
        self.position += len(chunk)
        self.remaining -= len(chunk)
        self._write(chunk)
        self.on_progress()
        if self.remaining == 0:
            self._finish(None)

    def _read(self, size: int) -> bytes:
        """Up to C{size} bytes from the current position (b"": the end)."""
        return os.pread(self.fd, size, self.position)

    def _send_direct(self, socket_fd: int, size: int) -> int:
        """Send up to C{size} bytes from the current position straight to
        the socket; how many it took (0: the end)."""
        return os.sendfile(socket_fd, self.fd, self.position, size)

    def _allowed(self, wanted: int) -> int:
        """
        How many of C{wanted} bytes the upload budget lets out now; with
        none, queue for it (L{_budget_refilled} is called in our turn).
        """
        throttle = self.throttle
        if throttle is None or not wanted:
            return wanted
        if self._credit:
            # What our turn granted: use it, return what is not wanted.
            granted = min(self._credit, wanted)
            unused, self._credit = self._credit - granted, 0
            if unused:
                throttle.give_back(unused)
            return granted
        granted = throttle.take(wanted)
        if not granted:
            self._wait = throttle.wait(wanted, self._budget_refilled)
            # Waiting for our own budget is not the client's idleness.
            self.on_progress()
        return granted

    def _budget_refilled(self, granted: int) -> None:
        self._wait = None
        self._credit = granted
        self.on_progress()
        if self.socket_fd is not None and self._drained:
            # Be called back through the transport once it can take bytes.
            self.consumer.startWriting()
        else:
            self.resumeProducing()

    def _send_zero_copy(self, socket_fd: int) -> None:
        budget = self._allowed(min(self.remaining, ZERO_COPY_BURST_BYTES))
        if not budget:
            return
        sent = 0
        while self.remaining and sent < budget:
            try:
                count = self._send_direct(socket_fd, min(self.remaining, budget - sent))
            except BlockingIOError:
                break  # the socket buffer is full: wait until it drains
            except OSError as e:
                self._finish(Failure(ConnectionLost(f"sendfile: {e.strerror}")))
                return
            if count == 0:
                self._finish(Failure(FileShrank()))
                return
            sent += count
            self.position += count
            self.remaining -= count
        if self.throttle is not None and sent < budget:
            self.throttle.give_back(budget - sent)
        if sent:
            self.on_progress()
        if self.remaining == 0:
            self._finish(None)
        else:
            # Be called back (through doWrite, buffer empty) when writable.
            self.consumer.startWriting()

    def stopProducing(self) -> None:
        if self._wait is not None:
            assert self.throttle is not None
            self.throttle.cancel(self._wait)
        self._wait = None
        if self._credit:
            assert self.throttle is not None
            self.throttle.give_back(self._credit)
            self._credit = 0
        if not self.done.called:
            self.done.errback(ConnectionLost("the consumer stopped the transfer"))

    def _finish(self, result: Failure | None) -> None:
        self.consumer.unregisterProducer()
        if result is None:
            self.done.callback(None)
        else:
            self.done.errback(result)


class BufferProducer(FileRangeProducer):
    """
    Writes a large answer held in memory (a piece list: 640 KB for a
    20 GiB file, 32 MB for a 1 TiB one) as the client reads, paid from the
    upload budget as content is.  Handed to the transport whole, it was
    copied into the buffer of every connection that asked for it and did
    not read, and the peer admits 10,000 connections: 3,000 that sent
    ``GET`` for a 20 GiB file and read nothing took 1,876 MiB of the
    peer's memory (76 MiB now, with the first-call change in
    L{FileRangeProducer.resumeProducing}).  Here the list is the index's
    cached copy, shared by every connection; on a plain TCP connection
    (C{socket_fd}) it goes from there to the socket as the socket takes
    it, so a connection holds no copy of it; elsewhere, at most a chunk.
    """

    def __init__(
        self,
        data: bytes | memoryview,
        consumer: IConsumer,
        on_progress: Callable[[], object] = lambda: None,
        socket_fd: int | None = None,
        throttle: TokenBucket | None = None,
        pulls: BufferedPulls | None = None,
    ) -> None:
        super().__init__(
            -1, 0, len(data), consumer, on_progress, ANSWER_CHUNK_BYTES,
            socket_fd, throttle, pulls,
        )  # fmt: skip
        # Held as given: the index knows a piece list (a memoryview) only
        # while somebody holds that very object, and hands it to every
        # other connection meanwhile instead of reading a copy.
        self._data = data
        self._view = memoryview(data)

    def _read(self, size: int) -> bytes:
        return self._view[self.position : self.position + size].tobytes()

    def _send_direct(self, socket_fd: int, size: int) -> int:
        return os.write(socket_fd, self._view[self.position : self.position + size])


class Transfers:
    """
    A peer's transfers since it started, for its metrics: how many ended
    each way (C{outcomes}) and the bytes they sent, those in progress
    included (L{sent_bytes}, worked out when read, so sending costs
    nothing more).
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        # Each transfer's lines ("sent", "described", "client left"), one
        # event each up to a share per minute, the rest counted by kind in
        # one line: a client pipelining header requests wrote 612 KB of
        # log a second, one line per answer.  Without a clock (tests that
        # build a protocol alone), every line is logged.
        self.events = (
            RefusalLog(
                clock,
                TRANSFER_EVENTS_LOGGED_PER_MINUTE,
                60.0,
                "transfer events",
                LogLevel.info,
                PeerProtocol.log,
            )
            if clock is not None
            else None
        )
        self.outcomes = {"sent": 0, "client-left": 0, "failed": 0}
        self._ended_bytes = 0
        self._active: set[FileRangeProducer] = set()

    @property
    def sent_bytes(self) -> int:
        """Bytes of file content handed to connections so far."""
        return self._ended_bytes + sum(p.sent for p in self._active)

    def started(self, producer: FileRangeProducer) -> None:
        self._active.add(producer)

    def log(self, format: str, kind: str, **fields: object) -> None:
        """Log a transfer's event (C{kind}: what a summary counts it as)."""
        if self.events is not None:
            self.events.refused(format, kind, **fields)
        else:
            PeerProtocol.log.info(format, **fields)

    def ended(self, producer: FileRangeProducer | None, outcome: str) -> None:
        """A transfer ended (C{producer}: C{None} if none started)."""
        self.outcomes[outcome] += 1
        if producer is not None:
            self._active.discard(producer)
            self._ended_bytes += producer.sent


class PeerProtocol(ServerLineProtocol):
    """One client connection to a peer.

    Every answer comes from the share's index (L{ShareIndex}), so its cost
    does not grow with the size of a file or of the share: a header goes
    out as soon as the file is opened and its index entry found current.
    A file not indexed yet (the peer just started, or it changed) is
    indexed at once, ahead of the background queue, while the client gets
    an ``INDEXING`` progress line every second; its header follows.

    Framing, idle timeout, line length and error budget come from
    L{ServerLineProtocol}.
    """

    role = "peer"
    log = Logger()

    def __init__(
        self,
        share: ShareFolder,
        index: ShareIndex,
        clock: IReactorTime,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_SECONDS,
        on_lost: Callable[[], None] | None = None,
        idle_timeouts: IdleTimeouts | None = None,
        throttle: TokenBucket | None = None,
        budget: RequestBudget | None = None,
        source: str = UNKNOWN_HOST,
        transfers: Transfers | None = None,
        pulls: BufferedPulls | None = None,
    ) -> None:
        super().__init__(clock, idle_timeout, on_lost, idle_timeouts)
        self.transfers = transfers if transfers is not None else Transfers()
        # Shared by the peer's connections: sizes what producers hand a
        # TLS connection (see p2p.pulls).
        self.pulls = pulls if pulls is not None else BufferedPulls()
        self._producer: FileRangeProducer | None = None
        self.budget = budget
        self.source = source
        self.share = share
        self.index = index
        self.throttle = throttle
        self._opened: OpenedFile | None = None
        self._header_sent = False
        self._lost = False
        self._progress: LoopingCall | None = None
        # Answers waiting for the upload budget, in order, and how much of
        # the first is paid (see send_answer).
        self._unpaid: deque[bytes] = deque()
        self._paid = 0
        self._paying: Waiter | None = None
        self._after_paid: list[Callable[[], object]] = []
        # A close waits for the answers before it (close_after_answers).
        self._closing = False
        # A long answer going out as the client reads (_stream).
        self._streaming: BufferProducer | None = None

    def connectionMade(self) -> None:
        # A header and a small file's bytes leave in separate writes: with
        # Nagle's algorithm the second waits for the client's delayed ACK
        # (about 40 ms on Linux).
        no_delay(self.transport)
        # What the client does not read waits in the kernel, then, over
        # TLS, in the peer's memory: bound both.
        limit_unsent_in_kernel(self.transport, KERNEL_UNSENT_BYTES)
        limit_unsent(self.transport, TLS_RECORD_BYTES)
        super().connectionMade()
        if self.throttle is not None:
            # The banner went out at once (see ServerLineProtocol); its
            # bytes count all the same.
            self.throttle.charge(len(self.greeting))

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        self._stop_progress()
        self._close_file()
        if self._paying is not None:
            assert self.throttle is not None
            self.throttle.cancel(self._paying)
            self._paying = None
        self._unpaid.clear()
        self._after_paid.clear()
        super().connectionLost(reason)

    # -- the upload budget, for answers ------------------------------------

    def send_answer(self, data: bytes) -> None:
        """
        Send (part of) an answer, paid from the upload budget first when
        there is one: headers, piece lists and listings are bytes sent too.
        An answer waits its turns among everything else waiting for the
        budget (L{TokenBucket.wait}: first come, first served, a turn of
        the rate divided by the number waiting), so a small answer goes out
        within about a second however many connections flood the peer with
        large ones.  Reading waits while an answer does.  Error lines wait
        like any answer (sent at once and charged after, a flood of them
        went out at 3.4 times the cap, and its debt then held every
        transfer for 33 s); a close waits for them (L{close_after_answers}).
        """
        if self.throttle is None:
            super().send_answer(data)
        else:
            self._unpaid.append(data)
            self._pay()

    def close_after_answers(self) -> None:
        """Close once the answers before the close went out: until then
        nothing more is read, and the close waits its turn for the budget."""
        if not self._unpaid:
            super().close_after_answers()
            return
        if not self._closing:
            self._closing = True
            self.pauseProducing()
            self._after_paid.append(self.hang_up)

    def _pay(self, granted: int = 0) -> None:
        """
        Send the answers' bytes as the budget grants them (C{granted}: what
        our turn in the queue brought for the first), in order; queue for
        the rest of the first that is short.  Each granted part goes out at
        once: a client that reset or closed its connection is found at the
        next write, and leaves the queue, instead of holding its place (and
        its share) until a long answer was paid in full.
        """
        throttle = self.throttle
        assert throttle is not None
        while self._unpaid and self._paying is None and not self._lost:
            data = self._unpaid[0]
            sent = self._paid
            self._paid += granted
            granted = 0
            if self._paid < len(data):
                self._paid += throttle.take(len(data) - self._paid)
            if self._paid > sent:
                super().send_answer(data[sent : self._paid])
            if self._paid < len(data):
                if self._lost:
                    return
                self.resetTimeout()  # waiting for our budget is not idleness
                self._paying = throttle.wait(len(data) - self._paid, self._granted)
                return
            self._unpaid.popleft()
            self._paid = 0
        if not self._unpaid and self._paying is None:
            waiting, self._after_paid = self._after_paid, []
            for callback in waiting:
                callback()
            self.close_if_done()

    def _granted(self, granted: int) -> None:
        self._paying = None
        if not self._lost:
            self._pay(granted)

    def _when_paid(self) -> Deferred[None]:
        """Fires once every answer so far has gone out."""
        d: Deferred[None] = Deferred()
        if self._unpaid:
            self._after_paid.append(lambda: d.callback(None))
        else:
            d.callback(None)
        return d

    def lineReceived(self, line: bytes) -> None:
        """A request behind an answer that waits for the budget waits too:
        a connection gets one answer per turn, however fast it asks."""
        if self._closing:
            return
        if not self._unpaid or not line.strip():
            super().lineReceived(line)
            return
        self.pauseProducing()
        self._after_paid.append(lambda: self._answer_held(line))

    def _answer_held(self, line: bytes) -> None:
        if self._lost or self.transport.disconnecting:
            return
        # Unpaused for this line alone: LineReceiver's resumeProducing would
        # first hand over the lines buffered behind it.  An answer that
        # takes time pauses reading again; one given at once resumes it.
        self.paused = False
        super().lineReceived(line)
        if not self.paused:
            self._read_next()

    def close_if_done(self) -> None:
        """A half-closed connection closes once its answers are out."""
        if not self._unpaid:
            super().close_if_done()

    def __conform__(self, interface: object) -> object:
        if interface is IHalfCloseableProtocol and self._unpaid:
            return self  # an answer still waits to be sent
        return super().__conform__(interface)

    def request_received(self, line: bytes) -> None:
        request = wire.parse_peer_request(line)
        budget = self.budget
        if budget is not None and isinstance(request, (wire.ListFiles, wire.Pieces)):
            wait = budget.charge(self.source, 1.0)
            if wait:
                raise wire.retry_later("too many requests", wait)
        if isinstance(request, wire.Status):
            index = self.index
            status = wire.IndexStatus(len(index), index.pending, index.scanning)
            self.sendLine(status.to_line())
        elif isinstance(request, wire.ListFiles):
            self._send_listing(request)
        elif isinstance(request, wire.Pieces):
            self._send_pieces(request)
        elif isinstance(request, wire.Blob):
            self._serve_content(request)
        else:
            self._serve_name(request, may_wait=True)

    # -- LIST and PIECES ---------------------------------------------------

    def _send_listing(self, request: wire.ListFiles) -> None:
        after = wire.parse_cursor(request.cursor) if request.cursor else 0
        entries, more = self.index.page(request.limit or wire.MAX_FILES_PER_PAGE, after)
        lines = []
        size = 0
        for examined, entry in enumerate(entries, start=1):
            line = _listing_line(entry)
            if line is not None:
                lines.append(line)
                size += len(line) + 1
            if size >= LIST_PAGE_BYTES and examined < len(entries):
                # The rest of this page is the next page's.
                entries, more = entries[:examined], True
                break
        next_cursor = wire.format_cursor(entries[-1].seq) if more and entries else None
        self.send_lines([wire.format_count(len(lines), next_cursor), *lines])

    def _send_pieces(self, request: wire.Pieces) -> None:
        entry = self.index.by_root(bytes.fromhex(request.root))
        if entry is None:
            raise WireError(Code.NOT_FOUND, "no such content")
        self.pauseProducing()
        d = self.index.piece_digests(entry)

        def send(digests: memoryview) -> Deferred[None] | None:
            content = entry.content
            header = wire.PiecesHeader(
                len(digests), content.root_hex, content.size, content.piece_size
            )
            if self._lost:
                return None
            sent = self._send_long(header.to_line() + self.delimiter, digests)
            # Once the header is out, a failure can only end the connection.
            return sent.addErrback(self._abort_answer)

        def failed(failure: Failure) -> None:
            if failure.check(KeyError):
                self.send_error(Code.NOT_FOUND, "no such content")
            else:
                self.log.failure("cannot read piece digests", failure)
                self.send_error(Code.INTERNAL, "cannot read the piece list")

        d.addCallbacks(send, failed)
        d.addBoth(lambda _: self._read_next())

    def _abort_answer(self, failure: Failure) -> None:
        """An answer broke off after its header: the client left (nothing
        to do), or the rest cannot follow (end the connection)."""
        if not failure.check(ConnectionLost):
            self.log.failure("sending an answer failed", failure)
        if not self._lost:
            self.transport.abortConnection()

    # -- GET, RANGE and BLOB -----------------------------------------------

    def _serve_name(self, request: wire.Get | wire.Range, may_wait: bool) -> None:
        opened = self.share.open(request.name)
        entry = self.index.current(request.name, opened.identity)
        if entry is None:
            opened.close()
            if not may_wait:
                raise WireError(
                    Code.UNAVAILABLE, "the file changed while it was indexed; retry"
                )
            refusal = self.index.refusal(request.name)
            if refusal is not None:
                raise refusal  # before any progress line, or any hashing
            self._wait_for_index(request, opened.size)
            return
        if isinstance(request, wire.Get):
            self._serve(opened, entry, 0, entry.content.size, with_digests=True)
        else:
            offset, count = _span(entry, request.offset, request.length, opened)
            self._serve(opened, entry, offset, count, with_digests=False)

    def _serve_content(self, request: wire.Blob) -> None:
        """
        Serve a range of a content from a name that still holds it.  At
        most L{HOLDERS_TRIED} names are tried per request (a content may be
        held under 80,000 names: every empty file has one root); one found
        stale goes last, to be indexed again, and the client is told to
        retry if every name tried was stale and more names were left.
        """
        stale = []
        holders = self.index.holders(bytes.fromhex(request.root), HOLDERS_TRIED)
        for entry in holders:
            try:
                opened = self.share.open(entry.name)
            except WireError:
                opened = None  # gone, or no longer servable
            if (
                opened is None
                or self.index.current(entry.name, opened.identity) is None
            ):
                # Gone, or changed on disk since it was indexed: never serve
                # new bytes under the old root.  Have the index look again.
                if opened is not None:
                    opened.close()
                stale.append(entry)
                continue
            self._look_again(stale)
            offset, count = _span(entry, request.offset, request.length, opened)
            self._serve(opened, entry, offset, count, with_digests=False)
            return
        self._look_again(stale)
        if len(holders) == HOLDERS_TRIED:
            # Others may hold it: they come first next time.
            raise WireError(
                Code.UNAVAILABLE,
                f"the content's files changed; retry-after={STALE_RETRY_SECONDS}",
            )
        raise WireError(Code.NOT_FOUND, "no such content")

    def _look_again(self, stale: list[IndexEntry]) -> None:
        for entry in stale:
            self.index.set_back(entry)
            self.index.ensure(entry.name)[0].addErrback(lambda _: None)

    def _wait_for_index(self, request: wire.Get | wire.Range, size: int) -> None:
        """Index the file now; tell the client how far it got each second
        (C{size}: the file's size when opened, until the job knows it)."""
        self.pauseProducing()
        d, progress = self.index.ensure(request.name, size)

        def report() -> None:
            self.resetTimeout()  # waiting on us is not the client's idleness
            total = progress.total or size
            line = wire.Indexing(min(progress.done, total), total).to_line()
            self.send_answer(line + self.delimiter)

        def indexed(_: object) -> None:
            self._stop_progress()
            if self._lost:
                return
            try:
                self._serve_name(request, may_wait=False)
            except WireError as e:
                self.refuse(e)
                self._read_next()

        def failed(failure: Failure) -> None:
            self._stop_progress()
            if self._lost:
                return
            if failure.check(WireError):
                self.refuse(failure.value)
            elif failure.check(FileChanging):
                self.send_error(
                    Code.UNAVAILABLE,
                    "the file keeps changing while it is indexed; "
                    f"retry-after={CHANGING_RETRY_SECONDS:g}",
                )
            elif failure.check(CancelledError):
                # The index stopped (the peer is shutting down).
                self.send_error(Code.UNAVAILABLE, "the peer is stopping")
            elif failure.check(OSError):
                self.log.error(
                    "cannot index {shown_name}: {error}",
                    name=request.name,
                    shown_name=shown(request.name),
                    error=failure.value,
                )
                self.send_error(Code.INTERNAL, "cannot read the file")
            else:
                self.log.failure(
                    "cannot index {shown_name}",
                    failure,
                    name=request.name,
                    shown_name=shown(request.name),
                )
                self.send_error(Code.INTERNAL, "cannot read the file")
            self._read_next()

        self._progress = LoopingCall(report)
        self._progress.clock = self.clock
        self._progress.start(PROGRESS_INTERVAL_SECONDS, now=True)
        d.addCallbacks(indexed, failed)

    def _stop_progress(self) -> None:
        if self._progress is not None and self._progress.running:
            self._progress.stop()
        self._progress = None

    def _serve(
        self,
        opened: OpenedFile,
        entry: IndexEntry,
        offset: int,
        count: int,
        with_digests: bool,
    ) -> None:
        self._opened = opened
        # Read no further requests until this file is out.
        self.pauseProducing()
        if with_digests and entry.content.pieces > 1:
            d = self.index.piece_digests(entry)
        else:
            d = succeed(b"")
        d.addCallback(self._send_file, opened, entry, offset, count)
        d.addCallbacks(self._sent, self._send_failed, (opened, count), None, (opened,))

    def _send_file(
        self,
        digests: memoryview,
        opened: OpenedFile,
        entry: IndexEntry,
        offset: int,
        count: int,
    ) -> Deferred[None]:
        if self._lost:
            raise ConnectionLost("client left before the transfer started")
        content = entry.content
        header = wire.FileHeader(
            count,
            content.root_hex,
            offset,
            content.size,
            content.piece_size,
            len(digests),
        )
        # From here on an error line would land where the client expects
        # the piece list or the file's bytes.
        self._header_sent = True
        d = self._send_long(header.to_line() + self.delimiter, digests)
        d.addCallback(lambda _: self._start_transfer(opened, offset, count))
        return d

    def _send_long(self, head: bytes, body: bytes | memoryview) -> Deferred[None]:
        """
        Send C{head} then C{body}, which may be long (a piece list); fires
        once both are handed to the transport.  A short body goes out with
        its head in one write; a long one through a L{BufferProducer}, so
        a client that does not read holds a chunk of it, not all of it.
        """
        if len(body) <= INLINE_ANSWER_BYTES:
            self.send_answer(head + body)
            return self._when_paid()
        self.send_answer(head)
        return self._when_paid().addCallback(lambda _: self._stream(body))

    def _stream(self, body: bytes | memoryview) -> Deferred[None]:
        if self._lost:
            raise ConnectionLost("client left before the answer was sent")
        # The producer takes the transport over (reading stays paused).
        self.release_transport()
        producer = BufferProducer(
            body,
            self.transport,
            self.resetTimeout,
            zero_copy_socket(self.transport),
            self.throttle,
            self.pulls,
        )
        self._streaming = producer

        def ended(result: object) -> object:
            self._streaming = None
            return result

        return producer.start().addBoth(ended)

    def _start_transfer(
        self, opened: OpenedFile, offset: int, count: int
    ) -> Deferred[None]:
        """The header is out: stream the file."""
        if count >= LOG_START_BYTES:
            # A transfer long enough to watch: its start too, not only its
            # end (a log line was a third of a small file's cost).
            self.transfers.log(
                "sending {shown_name} ({count} bytes from byte {offset})",
                "sending",
                name=opened.name,
                shown_name=shown(opened.name),
                count=count,
                offset=offset,
            )
        # The file producer takes the transport over (reading stays paused).
        self.release_transport()
        producer = FileRangeProducer(
            opened.fd,
            offset,
            count,
            self.transport,
            self.resetTimeout,
            socket_fd=zero_copy_socket(self.transport),
            throttle=self.throttle,
            pulls=self.pulls,
        )
        self._producer = producer
        self.transfers.started(producer)
        return producer.start()

    def _ended(self, outcome: str) -> None:
        producer, self._producer = self._producer, None
        self.transfers.ended(producer, outcome)

    def _sent(self, _: None, opened: OpenedFile, count: int) -> None:
        self._ended("sent")
        # A header alone (``RANGE 0 0``: a client asking which content the
        # name holds, before choosing among holders) is not a transfer.
        self.transfers.log(
            "sent {shown_name} ({count} bytes)"
            if count
            else "described {shown_name} (header only)",
            "sent" if count else "described",
            name=opened.name,
            shown_name=shown(opened.name),
            count=count,
        )
        self._close_file()
        self._read_next()

    def _send_failed(self, failure: Failure, opened: OpenedFile) -> None:
        # Read this before _close_file resets it: after the header, an error
        # line would land where the client expects file bytes.
        header_sent = self._header_sent
        self._close_file()
        self._ended("client-left" if failure.check(ConnectionLost) else "failed")
        if failure.check(ConnectionLost):
            self.transfers.log(
                "client left during {shown_name}",
                "client left",
                name=opened.name,
                shown_name=shown(opened.name),
            )
        elif failure.check(FileShrank):
            self.log.warn(
                "{shown_name} shrank while being sent",
                name=opened.name,
                shown_name=shown(opened.name),
            )
        elif not header_sent and failure.check(OSError, KeyError):
            self.log.error(
                "cannot read {shown_name}: {error}",
                name=opened.name,
                shown_name=shown(opened.name),
                error=failure.value,
            )
            self.send_error(Code.INTERNAL, "cannot read the file")
            self._read_next()
            return
        else:
            self.log.failure(
                "sending {shown_name} failed",
                failure,
                name=opened.name,
                shown_name=shown(opened.name),
            )
        # The byte stream can no longer match its header: end the connection.
        if not self._lost:
            self.transport.abortConnection()

    def _read_next(self) -> None:
        """Read requests again after an answer, unless the connection is
        closing (the error budget may just have run out).  A half-closed
        connection closes here once nothing is left to answer (see
        resumeProducing)."""
        if not self._lost and not self.transport.disconnecting:
            self.resumeProducing()

    def _close_file(self) -> None:
        self._header_sent = False
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def timeoutConnection(self) -> None:
        if self._opened is None and self._streaming is None:
            super().timeoutConnection()
        else:
            # Mid-transfer an error line would corrupt the byte stream.
            self.transport.abortConnection()


def _span(
    entry: IndexEntry, offset: int, length: int, opened: OpenedFile
) -> tuple[int, int]:
    """The C{(offset, count)} actually sent for a range request."""
    size = entry.content.size
    if offset > size:
        opened.close()
        raise WireError(Code.BAD_OFFSET, f"offset beyond the end ({size} bytes)")
    return offset, min(length, size - offset)


# Entries are immutable values: a page of LIST reuses the lines built for
# earlier pages (checked once, not once per request: the check was most of
# a 1000-file page's cost, about 8 ms on the reactor).
@functools.lru_cache(maxsize=65536)
def _listing_line(entry: IndexEntry) -> bytes | None:
    """The ``FILE`` line of C{entry}, or C{None} for a name the protocol
    cannot carry (one unparseable line would spoil the whole page)."""
    line = wire.FileEntry(entry.content.size, entry.content.root_hex, entry.name)
    try:
        encoded = line.to_line()
        if wire.FileEntry.from_line(encoded) != line:
            return None
    except (ValueError, UnicodeEncodeError, WireError):
        return None
    return encoded


class PeerFactory(LimitedServerFactory):
    """
    Builds a L{PeerProtocol} per client, all serving one share folder
    through its index.

    :param limits: open-connection limits; past them a connection gets a
        L{RefusingProtocol} (``ERR 503``).  Default: L{ConnectionLimits}'s.
    :param policy: each connection's first-request deadline, lifetime and
        request count, and the refusal log (L{ConnectionPolicy}).
    :param throttle: the upload budget all transfers share
        (``--max-upload-rate``), or C{None} for none.
    :param budget: what ``LIST`` and ``PIECES`` may cost per source and
        network (L{RequestBudget}), or C{None} for no limit.  Transfers are
        not charged: the connection limits and the upload rate bound them.
    """

    role = "peer"

    def __init__(
        self,
        share: ShareFolder,
        index: ShareIndex,
        clock: IReactorTime,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_SECONDS,
        limits: ConnectionLimits | None = None,
        throttle: TokenBucket | None = None,
        policy: ConnectionPolicy | None = None,
        budget: RequestBudget | None = None,
    ) -> None:
        super().__init__(clock, idle_timeout, limits, policy)
        self.budget = budget
        self.share = share
        self.index = index
        self.throttle = throttle
        self.transfers = Transfers(clock)
        self.pulls = BufferedPulls()

    def doStop(self) -> None:
        if self.transfers.events is not None:
            self.transfers.events.stop()
        super().doStop()

    def buildProtocol(self, addr: object) -> Protocol:
        protocol = super().buildProtocol(addr)
        if self.throttle is not None and isinstance(protocol, RefusingProtocol):
            # Sent at once, without waiting its turn: a refused client
            # must not hold a place; its bytes count all the same.
            self.throttle.charge(len(protocol.greeting))
        return protocol

    def build(self, host: str, on_lost: Callable[[], None]) -> PeerProtocol:
        return PeerProtocol(
            self.share,
            self.index,
            self.clock,
            self.idle_timeout,
            on_lost,
            self.idle_timeouts,
            self.throttle,
            self.budget,
            host,
            self.transfers,
            self.pulls,
        )
