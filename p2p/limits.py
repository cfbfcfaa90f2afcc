"""Limits shared by the relay and the peer: connections, idle time, errors.

A server that accepts without bound can be exhausted by one host opening
connections in a loop.  ``ConnectionLimits`` counts open connections in
total and per source address; a factory asks it before building a protocol
and, past a limit, answers with ``RefusingProtocol``: the banner, one
``ERR 503`` line saying which limit, then a close.

``ServerLineProtocol`` is the framing both servers share, with the limits
every connection lives under (see ``docs/security.rst``):

* the idle timeout, restarted only by a complete, non-blank line, so a
  client trickling bytes (slowloris) or sending bare newlines is cut off.
  A factory's connections share one ``IdleTimeouts``: a deadline list on a
  single timer, rather than a ``DelayedCall`` per connection to create,
  reset and cancel (the relay's one-request connections made that a
  noticeable part of each request);
* the line length (``ERR 413``, then a close);
* the error budget: after ``MAX_ERRORS_PER_CONNECTION`` error replies the
  connection gets ``ERR 429 too many errors`` and is closed, so one
  connection cannot be used as an error-reply pump.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol as Interface

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from p2p import wire
from p2p.transports import (
    is_plain_tcp,
    plain_socket,
    unsent_bytes,
    unsent_output,
    write_now,
)
from p2p.wire import Code, WireError

DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_CONNECTIONS_PER_HOST = 64
# A well-behaved client makes one request per connection; ten refusals in a
# row is a broken or hostile one.
MAX_ERRORS_PER_CONNECTION = 10

# What source_host says of a connection without an IP source.
UNKNOWN_HOST = "?"

# The replies after which a server always hangs up.
_CLOSING_CODES = frozenset({Code.LINE_TOO_LONG, Code.TIMEOUT})


class ConnectionLimits:
    """
    Open-connection counters.

    :param max_total: connections allowed at once (0: no limit).
    :param max_per_host: connections allowed at once from one source
        address (0: no limit).  Connections without an IP source (UNIX
        sockets) all count as one host.
    """

    log = Logger()

    def __init__(
        self,
        max_total: int = DEFAULT_MAX_CONNECTIONS,
        max_per_host: int = DEFAULT_MAX_CONNECTIONS_PER_HOST,
    ) -> None:
        if max_total < 0 or max_per_host < 0:
            raise ValueError("connection limits must be 0 (no limit) or more")
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.total = 0
        self._per_host: dict[str, int] = {}

    def admit(self, host: str) -> str | None:
        """Count a new connection from C{host}, or say why it is refused."""
        if self.max_total and self.total >= self.max_total:
            return f"too many connections (limit {self.max_total})"
        held = self._per_host.get(host, 0)
        if self.max_per_host and held >= self.max_per_host:
            return f"too many connections from your address (limit {self.max_per_host})"
        self.total += 1
        self._per_host[host] = held + 1
        return None

    def release(self, host: str) -> None:
        """Forget a connection that L{admit} counted."""
        self.total -= 1
        held = self._per_host[host] - 1
        if held:
            self._per_host[host] = held
        else:
            del self._per_host[host]

    def open_from(self, host: str) -> int:
        """How many counted connections C{host} holds."""
        return self._per_host.get(host, 0)

    def protocol_for(
        self,
        address: object,
        role: str,
        build: Callable[[str, Callable[[], None]], Protocol],
    ) -> Protocol:
        """
        The protocol for a new connection from C{address}: C{build(host,
        release)} if the limits admit it, else a L{RefusingProtocol}.

        C{host} is the source address as L{source_host} gives it.
        C{release} must be called exactly once, when the connection is lost
        (L{ServerLineProtocol} does that).
        """
        host = source_host(address)
        refusal = self.admit(host)
        if refusal is not None:
            # No address in the log: a flood would fill it with one victim's
            # (possibly spoofed-by-proxy) address; the reason says enough.
            self.log.warn(
                "refused a {role} connection: {reason}", role=role, reason=refusal
            )
            return RefusingProtocol(role, refusal)
        try:
            return build(host, lambda: self.release(host))
        except BaseException:
            self.release(host)
            raise


class LimitedServerFactory(ServerFactory):
    """
    A factory for connections that live under L{ConnectionLimits} and share
    one L{IdleTimeouts}: the relay's and the peer's.

    Subclasses set C{role} and implement L{build}.

    :param clock: the reactor's clock (idle deadlines run on it).
    :param idle_timeout: see L{ServerLineProtocol} (C{None}: never).
    :param limits: open-connection limits; past them a connection gets a
        L{RefusingProtocol} (``ERR 503``).  Default: 1000 in total, 64 per
        source address.
    """

    noisy = False
    role = "server"

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float | None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.limits = limits if limits is not None else ConnectionLimits()
        self.idle_timeouts = (
            IdleTimeouts(clock, idle_timeout) if idle_timeout is not None else None
        )

    def buildProtocol(self, addr: object) -> Protocol:
        return self.limits.protocol_for(addr, self.role, self._build)

    def _build(self, host: str, on_lost: Callable[[], None]) -> Protocol:
        protocol = self.build(host, on_lost)
        protocol.factory = self
        return protocol

    def build(self, host: str, on_lost: Callable[[], None]) -> Protocol:
        """The protocol for an admitted connection from C{host} (subclasses);
        C{on_lost} must reach its L{ServerLineProtocol}."""
        raise NotImplementedError


class RefusingProtocol(Protocol):
    """Greets, explains the refusal in one ``ERR 503`` line, and hangs up."""

    def __init__(self, role: str, reason: str) -> None:
        self.role = role
        self.reason = reason

    def connectionMade(self) -> None:
        self.transport.write(
            wire.banner(self.role)
            + wire.DELIMITER
            + wire.format_error(Code.UNAVAILABLE, self.reason)
            + wire.DELIMITER
        )
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """Whatever the client sends is ignored: we are hanging up."""


def source_host(address: object) -> str:
    """The host part of a connection's address, for counting
    (L{UNKNOWN_HOST} if it has none: a UNIX socket)."""
    host = getattr(address, "host", None)
    return wire.normalise_host(host) if isinstance(host, str) else UNKNOWN_HOST


class Expiring(Interface):
    """What L{IdleTimeouts} tracks: something that can be timed out."""

    def timeoutConnection(self) -> None: ...


class IdleTimeouts:
    """
    The idle deadlines of many connections, on one timer.

    Every connection of a factory has the same idle limit, so the deadlines
    are in the order the connections last made progress: an ordered dict
    from connection to deadline, where restarting one moves it to the end,
    and a single timer set for the first deadline.  Starting, restarting
    and stopping a deadline are O(1), and the reactor keeps one timed call
    however many connections are open.  A connection still times out at
    exactly its own deadline (the timer, when it fires early because the
    first connection made progress or left, is set again for the new first).
    Should the clock step backwards, a deadline may sit behind a later one:
    it is then honoured late, never early.

    :param clock: the reactor's clock.
    :param timeout: seconds a connection may go without progress.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._deadlines: OrderedDict[Expiring, float] = OrderedDict()
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def restart(self, connection: Expiring) -> None:
        """Give C{connection} a full idle period from now."""
        deadlines = self._deadlines
        deadlines[connection] = self.clock.seconds() + self.timeout
        deadlines.move_to_end(connection)
        if self._call is None:
            # The same arithmetic as the deadline, so the call is due at
            # exactly that time.
            self._call = self.clock.callLater(self.timeout, self._expire)

    def stop(self, connection: Expiring) -> None:
        """Forget C{connection}'s deadline (it closed)."""
        deadlines = self._deadlines
        if deadlines.pop(connection, None) is not None and not deadlines:
            if self._call is not None:
                self._call.cancel()
                self._call = None

    def _expire(self) -> None:
        """Time out every connection whose deadline has come; set the timer
        for the next one."""
        self._call = None
        now = self.clock.seconds()
        deadlines = self._deadlines
        while deadlines:
            connection, deadline = next(iter(deadlines.items()))
            if deadline > now:
                self._call = self.clock.callLater(deadline - now, self._expire)
                return
            del deadlines[connection]
            try:
                connection.timeoutConnection()
            except Exception:
                # One connection's failure must not leave the rest untimed.
                self.log.failure("timing out an idle connection failed")


class ServerLineProtocol(LineReceiver):
    """
    The relay's and the peer's connection: a banner, then request lines.

    A client that half-closes after its requests (``printf 'PEERS\\n' | nc
    -N``) still gets every answer: the connection closes once the last
    request is answered, not when the client's end of input arrives.  Half-
    close support (L{IHalfCloseableProtocol}) is offered only while an answer
    is unfinished or unsent (L{__conform__}): otherwise Twisted closes at
    the client's end of input straight away, which spares a one-request
    connection a trip through the reactor (a sixth of the relay's time per
    request).

    Subclasses set C{role} and implement L{request_received}, raising
    L{WireError} to refuse a request.

    :param clock: the reactor's clock; the idle timer runs on it.
    :param idle_timeout: seconds without a complete request line before
        the server sends ``ERR 408`` and closes (C{None}: never).
    :param on_lost: called once when the connection is lost (releases its
        place in the L{ConnectionLimits}).
    :param idle_timeouts: the deadline list this connection joins; a
        factory shares one among its connections.  Default: a list of its
        own, on C{clock} with C{idle_timeout}.
    """

    delimiter = wire.DELIMITER
    # The longest legal line plus the CR of a CRLF line end; decode_line
    # refuses (413) what is longer once the CR is gone.
    MAX_LENGTH = wire.MAX_RECEIVE_LENGTH
    role = "server"
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float | None,
        on_lost: Callable[[], None] | None = None,
        idle_timeouts: IdleTimeouts | None = None,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        if idle_timeouts is None and idle_timeout is not None:
            idle_timeouts = IdleTimeouts(clock, idle_timeout)
        self._idle = idle_timeouts
        self.errors = 0
        self._on_lost = on_lost
        self._input_ended = False

    def connectionMade(self) -> None:
        self.resetTimeout()
        self.sendLine(wire.banner(self.role))

    def sendLine(self, line: bytes) -> None:
        """Send one line (see L{send_answer})."""
        self.send_answer(line + self.delimiter)

    def send_lines(self, lines: list[bytes]) -> None:
        """Send C{lines}, each with its delimiter, in one write (the list
        is used up: it gains an empty last item)."""
        lines.append(b"")
        self.send_answer(self.delimiter.join(lines))

    # Registered as the transport's streaming producer (see send_answer).
    _holding = False
    # Bytes of answers written, sent or not (see timeoutConnection).
    _answered = 0

    def send_answer(self, data: bytes) -> None:
        """
        Send (part of) an answer, at once when the socket takes it
        (L{write_now}).

        A client that sends requests without reading the answers would make
        the transport queue them without bound.  So once an answer is left
        waiting on a plain TCP connection, the protocol registers itself as
        the transport's streaming producer: Twisted then pauses it (no more
        requests are read) while more than the transport's buffer size is
        queued, and resumes it when the client has read.  Over TLS the
        transport cannot say what it holds; see docs/security.rst.
        """
        self._answered += len(data)
        if write_now(self.transport, data) or self._holding:
            return
        if plain_socket(self.transport) is None:
            return
        self._holding = True
        self.transport.registerProducer(self, True)

    def release_transport(self) -> None:
        """Stop being the transport's producer, so another may register."""
        if self._holding:
            self._holding = False
            self.transport.unregisterProducer()

    def resumeProducing(self) -> None:
        """Read requests again; a half-closed connection may now be done."""
        super().resumeProducing()
        self.close_if_done()

    def resetTimeout(self) -> None:
        """Restart the idle period: the connection made progress."""
        if self._idle is not None:
            self._idle.restart(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._idle is not None:
            self._idle.stop(self)
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()

    def lineReceived(self, line: bytes) -> None:
        if self.transport.disconnecting:
            # LineReceiver hands over one more buffered line after a close
            # was asked for (e.g. on resumeProducing): ignore it.
            return
        # Only a complete, non-blank line is progress: bare newlines and
        # bytes trickled without a line end never restart the idle timer.
        if not line.strip():
            return
        self.resetTimeout()
        try:
            self.request_received(line)
        except WireError as e:
            self.refuse(e)

    def request_received(self, line: bytes) -> None:
        """Answer one non-blank request line (subclasses)."""
        raise NotImplementedError

    def __conform__(self, interface: object) -> object:
        """
        Adapt to L{IHalfCloseableProtocol} only while closing at the
        client's end of input could lose part of an answer: a request in
        progress (reading is paused) or bytes the transport has not sent.
        Twisted asks this when the end of input arrives.
        """
        if interface is IHalfCloseableProtocol and (
            self.paused or unsent_output(self.transport)
        ):
            return self
        return None

    def readConnectionLost(self) -> None:
        """IHalfCloseableProtocol: the client will send nothing more."""
        self._input_ended = True
        self.close_if_done()

    def writeConnectionLost(self) -> None:
        """IHalfCloseableProtocol: the client reads nothing more."""
        self.transport.loseConnection()

    def close_if_done(self) -> None:
        """Close a half-closed connection once no request is in progress."""
        if self._input_ended and not self.paused:
            self.transport.loseConnection()

    def refuse(self, error: WireError) -> None:
        """Log a refused request and reply with its ``ERR`` line."""
        self.log.warn("refused a request: {error}", error=str(error))
        self.send_error(error.code, error.message)

    def send_error(self, code: Code, message: str) -> None:
        """
        Send ``ERR <code> <message>``; close after a 413 or 408, or once the
        connection has used up its error budget.
        """
        self.sendLine(wire.format_error(code, message))
        if code in _CLOSING_CODES:
            self.transport.loseConnection()
            return
        self.errors += 1
        if self.errors >= MAX_ERRORS_PER_CONNECTION:
            self.log.warn(
                "closing a connection after {count} error replies",
                count=self.errors,
            )
            self.sendLine(wire.format_error(Code.TOO_MANY, "too many errors"))
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.log.warn("refused a request: line too long")
        self.send_error(Code.LINE_TOO_LONG, "line too long")

    # Bytes of answers the client had taken at the last idle timeout.
    _delivered_at_timeout = -1

    def timeoutConnection(self) -> None:
        """
        ``ERR 408`` and a close, for a client that sent no request for the
        idle period.  One that still has answers to read is different: as
        long as it reads (it took more bytes than by the last timeout) that
        is progress and it gets another period; one that has stopped
        reading is cut off (an abort: a polite close would wait for it to
        read, maybe for ever, holding its place in the limits).
        """
        unsent = unsent_bytes(self.transport) if is_plain_tcp(self.transport) else 0
        if unsent:
            delivered = self._answered - unsent
            if delivered > self._delivered_at_timeout:
                self._delivered_at_timeout = delivered
                self.resetTimeout()
                return
            self.log.info("closing a connection whose client stopped reading")
            self.transport.abortConnection()
            return
        self.send_error(Code.TIMEOUT, "idle timeout")
