"""One-shot line requests: connect, ask, read the banner and the reply, close.

Both the relay (REGISTER, UNREGISTER, PEERS) and a peer's LIST follow the
seed's connect-ask-close shape, so one small protocol serves them all.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from p2p import wire
from p2p.pool import release
from p2p.transports import write_now
from p2p.wire import WireError

DEFAULT_REQUEST_TIMEOUT_SECONDS = 10
# A relay or peer that promises more lines than this is misbehaving.
MAX_LISTING_LINES = 100_000
# A server's "retry-after=" is honoured this many times per request, when
# it asks for at most this long (a longer wait is reported instead).
RETRIES_AFTER_429 = 3
MAX_RETRY_AFTER_SECONDS = 5.0


class IncompleteReply(Exception):
    """The connection closed before the whole reply arrived."""


# Looks at a line before the reply: None, it is the reply; else it is an
# interim line (a peer's INDEXING progress), True when it renews the
# exchange's time.  It may raise to fail the request.
Interim = Callable[[bytes], "bool | None"]


class LineRequestProtocol(LineReceiver):
    """
    Send C{request} as soon as connected (a round trip sooner than after
    the banner); check the banner of a C{role} server, then collect the
    reply.  With C{listing}, the reply is ``OK <n>`` plus n lines.  With
    C{interim}, lines before the reply go to it first (L{Interim}); one
    that renews calls C{renew}.

    C{result} fires with the reply lines, or fails with L{WireError} (a
    malformed reply), L{wire.RemoteError} (an ``ERR`` reply),
    L{IncompleteReply} or what C{interim} raised.  Cancelling it aborts
    the connection.
    """

    delimiter = wire.DELIMITER
    MAX_LENGTH = wire.MAX_RECEIVE_LENGTH

    def __init__(
        self,
        role: str,
        request: bytes,
        listing: bool,
        interim: Interim | None = None,
        renew: Callable[[], object] = lambda: None,
    ) -> None:
        self.role = role
        self.request = request
        self.listing = listing
        self.interim = interim
        self.renew = renew
        self.lines: list[bytes] = []
        self._greeted = False
        self._expected: int | None = None
        self.result: Deferred[list[bytes]] = Deferred(self._cancel)

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        # At once, not at the reactor's next turn (p2p.transports.write_now).
        write_now(self.transport, self.request + self.delimiter)

    def lineReceived(self, line: bytes) -> None:
        if self.result.called:
            return
        try:
            self._line(line)
        except (WireError, wire.RemoteError) as e:
            self._finish(Failure(e))

    def _line(self, line: bytes) -> None:
        if not self._greeted:
            wire.check_banner(line, self.role)
            self._greeted = True
            return
        if not self.lines and self.interim is not None:
            try:
                renews = self.interim(line)
            except (WireError, wire.RemoteError):
                raise
            except Exception:
                self._finish(Failure())
                return
            if renews is not None:
                if renews:
                    self.renew()
                return
        self.lines.append(line)
        if self._expected is None:
            if not self.listing:
                wire.parse_ok(wire.decode_line(line))
                self._finish(self.lines)
                return
            self._expected = wire.parse_count(line, MAX_LISTING_LINES)
        if len(self.lines) == self._expected + 1:
            self._finish(self.lines)

    def _finish(self, result: list[bytes] | Failure) -> None:
        if isinstance(result, Failure):
            error = result.value
            not_found = wire.Code.NOT_FOUND
            if isinstance(error, wire.RemoteError) and error.code == not_found:
                # A whole ERR 404 reply: kept, as FileFetchProtocol._fail.
                self._replied = True
                release(self.transport, error=True)
                self.result.errback(result)
                return
            # Fire first: a transport may report connectionLost from inside
            # loseConnection, which would otherwise fire an IncompleteReply
            # first.
            self.result.errback(result)
            self.transport.loseConnection()
            return
        # A whole reply: the connection is kept (p2p.pool), handed back
        # before the result fires so that what it starts can take it.
        self._replied = True
        release(self.transport)
        self.result.callback(result)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.result.called:
            return  # junk after a complete reply (we are closing anyway)
        self._finish(Failure(WireError(wire.Code.LINE_TOO_LONG, "reply line too long")))

    # Set once the whole reply is in (the connection may then be lost).
    _replied = False

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.result.called and not self._replied:
            why = reason.value if reason is not None else ConnectionDone()
            self.result.errback(IncompleteReply(f"connection closed: {why}"))


def cancelled_to_timeout(result: object, timeout: float) -> object:
    """
    C{onTimeoutCancel} for L{Deferred.addTimeout} around a connection.

    Cancelling a real TCP endpoint's connection attempt fails with
    L{ConnectingCancelledError}, not L{CancelledError}, which addTimeout's
    default conversion lets through unchanged; both mean the time ran out.
    """
    if isinstance(result, Failure):
        result.trap(CancelledError, ConnectingCancelledError)
        raise TimeoutError(timeout, "timed out")
    return result


def request_lines(
    endpoint: IStreamClientEndpoint,
    role: str,
    request: bytes,
    clock: IReactorTime,
    listing: bool = False,
    timeout: float = DEFAULT_REQUEST_TIMEOUT_SECONDS,
    retries: int = RETRIES_AFTER_429,
    interim: Interim | None = None,
) -> Deferred[list[bytes]]:
    """
    Connect to C{endpoint}, send C{request}, and return the reply lines.

    Each exchange (connect included) is bounded by C{timeout} seconds,
    after which it fails with L{twisted.internet.defer.TimeoutError}; an
    C{interim} line that renews (L{LineRequestProtocol}) gives it C{timeout}
    seconds afresh.  A
    server that answers ``ERR 429 ...; retry-after=S`` (a request budget)
    is asked again after S seconds, up to C{retries} times, when S is at
    most L{MAX_RETRY_AFTER_SECONDS}; a longer wait fails at once with the
    L{wire.RemoteError}, which says how long.
    """

    def attempt(left: int) -> Deferred[list[bytes]]:
        d = _request_once(endpoint, role, request, clock, listing, timeout, interim)
        if left > 0:
            d.addErrback(retry, left)
        return d

    def retry(failure: Failure, left: int) -> Deferred[list[bytes]] | Failure:
        error = failure.value
        if not isinstance(error, wire.RemoteError) or error.code != 429:
            return failure
        wait = wire.retry_after(error.message)
        if wait is None or wait > MAX_RETRY_AFTER_SECONDS:
            return failure
        return deferLater(clock, wait, attempt, left - 1)

    return attempt(retries)


def _request_once(
    endpoint: IStreamClientEndpoint,
    role: str,
    request: bytes,
    clock: IReactorTime,
    listing: bool,
    timeout: float,
    interim: Interim | None = None,
) -> Deferred[list[bytes]]:
    """One exchange of L{request_lines}."""
    # Deferred.addTimeout, with a deadline an interim line may renew.
    timer: list[IDelayedCall] = []
    expired: list[bool] = []

    def renew() -> None:
        if timer and timer[0].active():
            timer[0].reset(timeout)

    def make() -> LineRequestProtocol:
        return LineRequestProtocol(role, request, listing, interim, renew)

    factory = Factory.forProtocol(make)
    factory.noisy = False
    d = endpoint.connect(factory)
    d.addCallback(lambda protocol: protocol.result)

    def expire() -> None:
        expired.append(True)
        d.cancel()

    def settle(result: object) -> object:
        if timer[0].active():
            timer[0].cancel()
        if expired:
            return cancelled_to_timeout(result, timeout)
        return result

    timer.append(clock.callLater(timeout, expire))
    d.addBoth(settle)
    return d
