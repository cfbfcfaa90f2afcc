"""The client's protocols: the relay's peer list, one peer's file or listing.

``FileFetchProtocol`` fetches one file from one peer into a sink and checks
its SHA-256; ``p2p.fetch`` drives it across the peers (phase 3).
``SKIPPABLE`` names the failures that mean "this peer cannot help"; anything
else is a bug and propagates.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.error import TimeoutError as ConnectingTimeout
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from p2p import hints, wire
from p2p.request import IncompleteReply, request_lines
from p2p.sink import SpoolSink
from p2p.wire import WireError

DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_IDLE_TIMEOUT_SECONDS = 10.0
RECEIVE_CHUNK_BYTES = 1024 * 1024


class PeerFailed(Exception):
    """
    This peer could not deliver the file; the message says why.

    C{kind} sorts the reasons for the fallback driver: ``refused`` (an ERR
    reply), ``broken`` (closed or stalled mid-transfer, the bytes so far are
    good to resume from), ``corrupted`` (SHA-256 mismatch: the bytes are
    not), ``other-content`` (the peer's file differs from the partial one),
    ``protocol`` (a malformed reply) or ``timeout``.
    """

    def __init__(self, reason: str, kind: str = "refused") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class OutputFailed(Exception):
    """The received bytes could not be stored locally (disk full, folder gone).

    Not a fault of the peer: the fetch stops instead of trying the next one.
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


# The failures that mean "move on to the next peer".  Python's own
# ConnectionError (refused, reset, aborted) covers endpoints that report a
# socket error without wrapping it in Twisted's ConnectError.
SKIPPABLE = (
    PeerFailed,
    ConnectError,
    ConnectionError,
    ConnectionClosed,
    TimeoutError,
    CancelledError,
    IncompleteReply,
    WireError,
    wire.RemoteError,
)


class FileFetchProtocol(LineReceiver, TimeoutMixin):
    """
    Fetch one file from one peer into C{sink}.

    C{result} fires with the L{wire.FileHeader} once every byte arrived and
    matched the announced SHA-256; it fails with L{PeerFailed} for a refusal,
    a broken or corrupted transfer, a protocol violation or a silence longer
    than C{idle_timeout}.  Cancelling it aborts the connection.
    """

    delimiter = wire.DELIMITER
    MAX_LENGTH = wire.MAX_RECEIVE_LENGTH

    def __init__(
        self,
        request: wire.Get,
        sink: SpoolSink,
        clock: IReactorTime,
        idle_timeout: float | None,
        accept_header: Callable[[wire.FileHeader], None] = lambda header: None,
    ) -> None:
        self.request = request
        self.sink = sink
        self.clock = clock
        self.idle_timeout = idle_timeout
        # Called with a well-formed header before any byte is stored; raising
        # PeerFailed turns the peer down (e.g. another peer already won).
        self.accept_header = accept_header
        self.header: wire.FileHeader | None = None
        self.remaining = 0
        self._greeted = False
        self.result: Deferred[wire.FileHeader] = Deferred(self._cancel)

    def callLater(self, period, func):  # TimeoutMixin hook: use our clock
        return self.clock.callLater(period, func)

    def _cancel(self, _: Deferred) -> None:
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        self.setTimeout(self.idle_timeout)

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        try:
            if not self._greeted:
                wire.check_banner(line, "peer")
                self._greeted = True
                self.sendLine(self.request.to_line())
                return
            header = wire.FileHeader.from_line(line)
        except wire.RemoteError as e:
            # A peer whose copy is too short for our offset has other content.
            kind = "other-content" if e.code == wire.Code.BAD_OFFSET else "refused"
            self._fail(f"refused: ERR {e.code} {e.message}", kind, abort=False)
            return
        except WireError as e:
            self._fail(f"protocol error: {e.message}", "protocol")
            return
        if header.offset != self.request.offset:
            self._fail("protocol error: the reply is for another offset", "protocol")
            return
        if header.offset and not self.sink.continues(header):
            self._fail(
                f"has other content (sha256 {header.sha256[:12]}...)", "other-content"
            )
            return
        try:
            self.accept_header(header)
        except PeerFailed as e:
            self._fail(e.reason, e.kind)
            return
        self.header = header
        self.remaining = header.count
        if not self._store(self.sink.begin, header):
            return
        # Twisted reads 64 KiB per call by default; larger reads cut the
        # per-chunk Python work of a bulk transfer several times over.
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = RECEIVE_CHUNK_BYTES
        self.setRawMode()
        if self.remaining == 0:
            self._complete()

    def rawDataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self.resetTimeout()
        if len(data) > self.remaining:
            self._fail("protocol error: more bytes than announced", "protocol")
            return
        try:
            keep_going = self.sink.write(data)
        except OSError as e:
            self._output_failed(e)
            return
        self.remaining -= len(data)
        if self.remaining == 0:
            self._complete()
        elif not keep_going:
            # The sink's threads are behind: stop reading until they catch up.
            self.transport.pauseProducing()
            self.sink.when_drained().addCallback(self._drained)

    def _store(self, operation, argument) -> bool:
        try:
            operation(argument)
        except OSError as e:
            self._output_failed(e)
            return False
        return True

    def _output_failed(self, error: OSError) -> None:
        self.setTimeout(None)
        if not self.result.called:
            self.result.errback(OutputFailed(error))
        self.transport.abortConnection()

    def _drained(self, _: None) -> None:
        if not self.result.called and self.transport.connected:
            self.transport.resumeProducing()

    def _complete(self) -> None:
        # Every byte is in; the sink may still be hashing and writing.
        self.setTimeout(None)
        d = self.sink.flushed()
        d.addCallbacks(self._verify, self._flush_failed)

    def _flush_failed(self, failure: Failure) -> None:
        failure.trap(OSError)
        self._output_failed(failure.value)

    def _verify(self, _: None) -> None:
        assert self.header is not None
        if self.result.called:
            return  # cancelled while the sink was catching up
        if self.sink.hexdigest() != self.header.sha256:
            self._fail("corrupted: SHA-256 does not match the header", "corrupted")
            return
        self.setTimeout(None)
        # Fire before closing: a transport may report connectionLost from
        # inside loseConnection, which would fire a "broken transfer" first.
        self.result.callback(self.header)
        self.transport.loseConnection()

    def _fail(self, reason: str, kind: str = "refused", abort: bool = True) -> None:
        self.setTimeout(None)
        # As in _complete: the real reason first, then the close.
        if not self.result.called:
            self.result.errback(PeerFailed(reason, kind))
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        kind = "broken" if self.header is not None else "timeout"
        self._fail(f"timed out: silent for {self.idle_timeout:g}s", kind)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail("protocol error: reply line too long", "protocol")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        if self.header is not None and self.remaining == 0:
            return  # every byte arrived; _verify decides
        if not self.result.called:
            if self.header is None:
                self.result.errback(
                    PeerFailed("connection closed before a reply", "broken")
                )
            else:
                got = self.header.count - self.remaining
                self.result.errback(
                    PeerFailed(
                        f"broken transfer after {got} of {self.header.count} bytes",
                        "broken",
                    )
                )


def peer_endpoint(
    reactor: IReactorTCP, peer: wire.PeerEntry, timeout: float
) -> IStreamClientEndpoint:
    """A plain TCP endpoint for a peer from the relay's list."""
    if ":" in peer.host:
        return TCP6ClientEndpoint(reactor, peer.host, peer.port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, peer.host, peer.port, timeout=timeout)


EndpointFor = Callable[[wire.PeerEntry], IStreamClientEndpoint]


def describe(failure: Failure) -> str:
    """One human line for an expected failure of a relay or a peer."""
    value = failure.value
    if isinstance(value, PeerFailed):
        return value.reason
    if isinstance(value, ConnectingTimeout):
        # Twisted's own connect timeout (the endpoint's) fired first.
        return "timed out"
    if isinstance(value, ConnectError):
        # osError is an errno for refusals, a message or None otherwise.
        reason = value.osError
        if isinstance(reason, int):
            reason = os.strerror(reason)
        return f"cannot connect: {reason or type(value).__name__}"
    if isinstance(value, (ConnectionRefusedError, ConnectionResetError)):
        return f"cannot connect: {value.strerror or type(value).__name__}"
    if isinstance(value, (TimeoutError, CancelledError)):
        return "timed out"
    if isinstance(value, wire.RemoteError):
        return f"refused: ERR {value.code} {value.message}"
    if isinstance(value, WireError):
        return f"protocol error: {value.message}"
    return str(value) or type(value).__name__


def list_peers(
    relay: IStreamClientEndpoint,
    clock: IReactorTime,
    timeout: float,
    token: str | None = None,
    maximum: int = 10_000,
) -> Deferred[list[wire.PeerEntry]]:
    """
    Phase 2: the relay's list of active peers, oldest registration first.

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
        request = wire.Peers(token=token, limit=limit, cursor=cursor)
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

    ask(wire.Peers(token=token), got_first)
    return result


def likely_holders(
    relay: IStreamClientEndpoint,
    clock: IReactorTime,
    timeout: float,
    name: str,
    token: str | None = None,
) -> Deferred[list[wire.PeerEntry]]:
    """
    The peers the relay suggests for C{name} (``PEERS hint=``), oldest
    registration first: those whose announced name filter may hold it.

    Only a hint: a suggested peer may not hold the file (a false positive
    or a stale filter) and a holder may be missing (it announced no filter,
    or registered after the relay's scan bound).  The relay learns the
    name's hint, never the name.  A relay from before hints answers
    ``ERR 400``: that means no suggestion, an empty list.
    """
    request = wire.Peers(token=token, hint=hints.name_hint(name))
    d = request_lines(relay, "relay", request.to_line(), clock, True, timeout)

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


def list_files(
    endpoint: IStreamClientEndpoint, clock: IReactorTime, timeout: float
) -> Deferred[list[wire.FileEntry]]:
    """The files one peer shares."""
    d = request_lines(
        endpoint, "peer", wire.ListFiles().to_line(), clock, True, timeout
    )
    d.addCallback(lambda lines: [wire.FileEntry.from_line(line) for line in lines[1:]])
    return d
