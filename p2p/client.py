"""The client: ask the relay for peers, then try them one at a time.

``FileFetchProtocol`` fetches one file from one peer into a sink and checks
its SHA-256.  ``Fetcher.fetch`` is phase 3: one attempt after the other, where
the failures that mean "this peer cannot help" start the next attempt and
anything else (a bug) propagates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    inlineCallbacks,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from p2p import wire
from p2p.request import IncompleteReply, cancelled_to_timeout, request_lines
from p2p.sink import SpoolSink
from p2p.wire import WireError

DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_IDLE_TIMEOUT_SECONDS = 10.0


class PeerFailed(Exception):
    """This peer could not deliver the file; the message says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OutputFailed(Exception):
    """The received bytes could not be stored locally (disk full, folder gone).

    Not a fault of the peer: the fetch stops instead of trying the next one.
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


class NotFoundAnywhere(Exception):
    """No active peer delivered the file."""

    def __init__(self, name: str, attempts: list[Attempt]) -> None:
        super().__init__(f"{name}: not found on any of {len(attempts)} peer(s)")
        self.name = name
        self.attempts = attempts


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


@dataclass
class Attempt:
    """What happened when one peer was asked for a file."""

    peer: wire.PeerEntry
    ok: bool
    reason: str
    seconds: float


@dataclass
class FetchResult:
    name: str
    peer: wire.PeerEntry
    header: wire.FileHeader
    attempts: list[Attempt] = field(default_factory=list)


class FileFetchProtocol(LineReceiver, TimeoutMixin):
    """
    Fetch one file from one peer into C{sink}.

    C{result} fires with the L{wire.FileHeader} once every byte arrived and
    matched the announced SHA-256; it fails with L{PeerFailed} for a refusal,
    a broken or corrupted transfer, a protocol violation or a silence longer
    than C{idle_timeout}.  Cancelling it aborts the connection.
    """

    delimiter = wire.DELIMITER
    MAX_LENGTH = wire.MAX_LINE_LENGTH

    def __init__(
        self,
        request: wire.Get,
        sink: SpoolSink,
        clock: IReactorTime,
        idle_timeout: float | None,
    ) -> None:
        self.request = request
        self.sink = sink
        self.clock = clock
        self.idle_timeout = idle_timeout
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
            self._fail(f"refused: ERR {e.code} {e.message}", abort=False)
            return
        except WireError as e:
            self._fail(f"protocol error: {e.message}")
            return
        if header.offset != self.request.offset:
            self._fail("protocol error: the peer answered for another offset")
            return
        self.header = header
        self.remaining = header.count
        if not self._store(self.sink.begin, header):
            return
        self.setRawMode()
        if self.remaining == 0:
            self._complete()

    def rawDataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self.resetTimeout()
        if len(data) > self.remaining:
            self._fail("protocol error: more bytes than announced")
            return
        if not self._store(self.sink.write, data):
            return
        self.remaining -= len(data)
        if self.remaining == 0:
            self._complete()

    def _store(self, operation, argument) -> bool:
        try:
            operation(argument)
        except OSError as e:
            self.setTimeout(None)
            self.result.errback(OutputFailed(e))
            self.transport.abortConnection()
            return False
        return True

    def _complete(self) -> None:
        assert self.header is not None
        if self.sink.hexdigest() != self.header.sha256:
            self._fail("corrupted: SHA-256 does not match the header")
            return
        self.setTimeout(None)
        # Fire before closing: a transport may report connectionLost from
        # inside loseConnection, which would fire a "broken transfer" first.
        self.result.callback(self.header)
        self.transport.loseConnection()

    def _fail(self, reason: str, abort: bool = True) -> None:
        self.setTimeout(None)
        # As in _complete: the real reason first, then the close.
        if not self.result.called:
            self.result.errback(PeerFailed(reason))
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self._fail(f"timed out: silent for {self.idle_timeout:g}s")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail("protocol error: reply line too long")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        if not self.result.called:
            if self.header is None:
                self.result.errback(PeerFailed("connection closed before a reply"))
            else:
                got = self.header.count - self.remaining
                self.result.errback(
                    PeerFailed(
                        f"broken transfer after {got} of {self.header.count} bytes"
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
    if isinstance(value, ConnectError):
        # osError is an errno for refusals, a message or None otherwise.
        reason = value.osError
        if isinstance(reason, int):
            reason = os.strerror(reason)
        return f"cannot connect: {reason or type(value).__name__}"
    if isinstance(value, ConnectionError):
        return f"cannot connect: {value.strerror or type(value).__name__}"
    if isinstance(value, (TimeoutError, CancelledError)):
        return "timed out"
    if isinstance(value, wire.RemoteError):
        return f"refused: ERR {value.code} {value.message}"
    if isinstance(value, WireError):
        return f"protocol error: {value.message}"
    return str(value) or type(value).__name__


class Fetcher:
    """
    Phase 3: fetch a file from the first peer, in list order, that has it.

    :param reactor: provides time (and TCP, for the default endpoints).
    :param connect_timeout: seconds to wait for each peer's connection.
    :param idle_timeout: seconds of silence after which a peer is skipped.
    :param endpoint_for: builds a client endpoint for a peer (TLS later).
    :param report: called with each finished L{Attempt}, for progress output.
    """

    def __init__(
        self,
        reactor,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        endpoint_for: EndpointFor | None = None,
        report: Callable[[Attempt], None] = lambda attempt: None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.endpoint_for = endpoint_for or (
            lambda peer: peer_endpoint(reactor, peer, connect_timeout)
        )
        self.report = report
        self.now = now

    def attempt(
        self, name: str, peer: wire.PeerEntry, sink: SpoolSink
    ) -> Deferred[wire.FileHeader]:
        """Ask one peer for C{name}."""
        protocol = FileFetchProtocol(
            wire.Get(name), sink, self.reactor, self.idle_timeout
        )
        endpoint = self.endpoint_for(peer)
        factory = Factory.forProtocol(lambda: protocol)
        factory.noisy = False
        d = endpoint.connect(factory)
        # The endpoint's own timeout may be coarse (whole seconds); this one
        # bounds the connection attempt exactly.  After that, the protocol's
        # idle timeout takes over.
        d.addTimeout(
            self.connect_timeout, self.reactor, onTimeoutCancel=cancelled_to_timeout
        )
        d.addCallback(lambda _: protocol.result)
        return d

    @inlineCallbacks
    def fetch(
        self, name: str, peers: Sequence[wire.PeerEntry], sink: SpoolSink
    ) -> Generator[Deferred[wire.FileHeader], wire.FileHeader, FetchResult]:
        """
        Try C{peers} one at a time until one delivers C{name} intact.

        Returns a Deferred firing with a L{FetchResult}; it fails with
        L{NotFoundAnywhere} (listing every attempt) when no peer delivers.
        A loop rather than a chain of errbacks: endpoints that fail at once
        would otherwise nest one errback per peer and overflow the stack
        with a relay's full list (1000 peers).
        """
        attempts: list[Attempt] = []
        for peer in peers:
            started = self.now()
            try:
                header = yield self.attempt(name, peer, sink)
            except SKIPPABLE:
                failure = Failure()
                sink.reset()
                attempt = Attempt(peer, False, describe(failure), self.now() - started)
                attempts.append(attempt)
                self.report(attempt)
                continue
            attempt = Attempt(peer, True, "found", self.now() - started)
            attempts.append(attempt)
            self.report(attempt)
            return FetchResult(name, peer, header, attempts)
        raise NotFoundAnywhere(name, attempts)


def list_peers(
    relay: IStreamClientEndpoint, clock: IReactorTime, timeout: float
) -> Deferred[list[wire.PeerEntry]]:
    """Phase 2: the relay's list of active peers."""
    d = request_lines(relay, "relay", wire.Peers().to_line(), clock, True, timeout)
    d.addCallback(lambda lines: [wire.PeerEntry.from_line(line) for line in lines[1:]])
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
