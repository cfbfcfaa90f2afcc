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

Every close a server decides (a timeout, a limit, a refusal) is final
within ``CLOSE_GRACE_SECONDS`` (L{ServerLineProtocol.hang_up}): a polite
close waits for the client (to read, to finish a TLS handshake, to answer
TLS's close), and a client that does none of these would otherwise hold
its socket and its place in the limits for ever.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol as Interface

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import netgroup, wire
from p2p.transports import unsent_output, write_now
from p2p.wire import Code, WireError

# Idle connections are cheap (measured by bench/attack.py: about 1.4 KiB
# each over TCP, 25 KiB over TLS): the total is set well above what one
# network may hold, so that it takes many networks to fill it.
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_CONNECTIONS_PER_HOST = 32
DEFAULT_MAX_CONNECTIONS_PER_NETWORK = 256
# A well-behaved client makes one request per connection; ten refusals in a
# row is a broken or hostile one.
MAX_ERRORS_PER_CONNECTION = 10
# A client sends its request as soon as it has read the banner.
DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS = 5.0
# Our clients make one to a few requests per connection; these bound a
# connection kept open by a trickle of cheap questions.
DEFAULT_MAX_LIFETIME_SECONDS = 300.0
DEFAULT_MAX_REQUESTS_PER_CONNECTION = 1000
# Refusals logged one by one per period; the rest are summarised.
REFUSALS_LOGGED_PER_PERIOD = 20
REFUSAL_LOG_PERIOD_SECONDS = 60.0
# What one member may hold once the server is into its reserve: a peer's
# renewal needs one connection, so two each (and a sixteenth of the reserve
# per network) make it take a hundred verified addresses in seventeen
# networks to fill a reserve of 200, where seven addresses once did.
RESERVE_PER_HOST = 2
RESERVE_NETWORK_SHARE = 16
# Distinct reasons counted per period (the rest count as "other").
MAX_REASONS = 32

# What a client told why it is cut off (ERR 408, 413, 429, 503) has to read
# it and close, or to finish its TLS handshake and read it: then the server
# aborts.  Twisted's polite close waits for the client, and over TLS for
# ever while the handshake is unfinished or a producer is registered (150
# silent TLS connections were all still open after 100 s).
CLOSE_GRACE_SECONDS = 5.0

# What source_host says of a connection without an IP source.
UNKNOWN_HOST = "?"

# The replies after which a server always hangs up.
_CLOSING_CODES = frozenset({Code.LINE_TOO_LONG, Code.TIMEOUT})


class ConnectionLimits:
    """
    Open-connection counters, per source, per network and in total.

    Sources and networks are those of L{p2p.netgroup}: an IPv4 address or
    an IPv6 /64; an IPv4 /24 or an IPv6 /48.  The last C{reserve} places
    of the total are kept for sources that C{is_member} vouches for (the
    relay: addresses holding a verified lease), so a flood that fills the
    server still leaves room for its peers' renewals.  Once into the
    reserve, a member is admitted only while its source holds fewer than
    C{reserve_per_host} connections and its network fewer than
    C{reserve_per_network}: a few members cannot take the whole reserve
    with their usual per-source share.

    :param max_total: connections allowed at once (0: no limit).
    :param max_per_host: connections allowed at once from one source (0:
        no limit).  Connections without an IP source (UNIX sockets) all
        count as one source.
    :param max_per_network: connections allowed at once from one network
        (0: no limit).
    :param reserve: places of C{max_total} only members may take.
    :param is_member: whether a source address may use the reserve.
    :param reserve_per_host: connections a member's source may hold, at
        most, to be admitted into the reserve.
    :param reserve_per_network: the same for its network (default: a
        L{RESERVE_NETWORK_SHARE}th of the reserve, and at least
        C{reserve_per_host}).
    """

    log = Logger()

    def __init__(
        self,
        max_total: int = DEFAULT_MAX_CONNECTIONS,
        max_per_host: int = DEFAULT_MAX_CONNECTIONS_PER_HOST,
        max_per_network: int = DEFAULT_MAX_CONNECTIONS_PER_NETWORK,
        reserve: int | None = None,
        is_member: Callable[[str], bool] | None = None,
        reserve_per_host: int = RESERVE_PER_HOST,
        reserve_per_network: int | None = None,
    ) -> None:
        if max_total < 0 or max_per_host < 0 or max_per_network < 0:
            raise ValueError("connection limits must be 0 (no limit) or more")
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.max_per_network = max_per_network
        if reserve is None:
            reserve = max_total // 10 if is_member is not None else 0
        if not 0 <= reserve <= max_total:
            raise ValueError("the reserve must be between 0 and the total limit")
        self.reserve = reserve
        self.is_member = is_member
        self.reserve_per_host = reserve_per_host
        if reserve_per_network is None:
            reserve_per_network = max(
                reserve_per_host, reserve // RESERVE_NETWORK_SHARE
            )
        self.reserve_per_network = reserve_per_network
        self.total = 0
        self._per_host: dict[str, int] = {}
        self._per_network: dict[str, int] = {}

    def admit(self, host: str) -> str | None:
        """Count a new connection from C{host}, or say why it is refused."""
        source, network = netgroup.groups(host)
        held = self._per_host.get(source, 0)
        in_network = self._per_network.get(network, 0)
        if self.max_total:
            if self.total >= self.max_total:
                return f"too many connections (limit {self.max_total})"
            if self.total >= self.max_total - self.reserve and not (
                self.is_member is not None
                and held < self.reserve_per_host
                and in_network < self.reserve_per_network
                and self.is_member(host)
            ):
                return (
                    f"too many connections (limit {self.max_total}, the last "
                    f"{self.reserve} kept for verified peers, "
                    f"{self.reserve_per_host} each)"
                )
        if self.max_per_host and held >= self.max_per_host:
            return f"too many connections from your address (limit {self.max_per_host})"
        if self.max_per_network and in_network >= self.max_per_network:
            return (
                f"too many connections from your network {network} "
                f"(limit {self.max_per_network})"
            )
        self.total += 1
        self._per_host[source] = held + 1
        self._per_network[network] = in_network + 1
        return None

    def release(self, host: str) -> None:
        """Forget a connection that L{admit} counted."""
        source, network = netgroup.groups(host)
        self.total -= 1
        netgroup.tally(self._per_host, source, -1)
        netgroup.tally(self._per_network, network, -1)

    def open_from(self, host: str) -> int:
        """How many counted connections C{host}'s source holds."""
        return self._per_host.get(netgroup.source_of(host), 0)

    def open_from_network(self, host: str) -> int:
        """How many counted connections C{host}'s network holds."""
        return self._per_network.get(netgroup.network_of(host), 0)

    def protocol_for(
        self,
        address: object,
        role: str,
        build: Callable[[str, Callable[[], None]], Protocol],
        refusals: RefusalLog | None = None,
        clock: IReactorTime | None = None,
    ) -> Protocol:
        """
        The protocol for a new connection from C{address}: C{build(host,
        release)} if the limits admit it, else a L{RefusingProtocol}.

        C{host} is the source address as L{source_host} gives it.
        C{release} must be called exactly once, when the connection is lost
        (L{ServerLineProtocol} does that).  Refusals go to C{refusals} when
        given (rate-limited), else straight to the log.  With C{clock}, a
        refused connection is aborted if still open after
        L{CLOSE_GRACE_SECONDS}.
        """
        host = source_host(address)
        refusal = self.admit(host)
        if refusal is not None:
            # No address in the log: a flood would fill it with one victim's
            # (possibly spoofed-by-proxy) address; the reason says enough.
            format = "refused a {role} connection: {reason}"
            if refusals is not None:
                refusals.refused(format, refusal, role=role, label="connections")
            else:
                self.log.warn(format, role=role, reason=refusal)
            return RefusingProtocol(role, refusal, clock)
        try:
            return build(host, lambda: self.release(host))
        except BaseException:
            self.release(host)
            raise


class RefusalLog:
    """
    Refusals, logged so that a flood cannot fill the disk.

    The first C{burst} refusals of each C{period} are logged one event each
    (as before); the rest are only counted, by reason, and one summary event
    says how many were left out once the period ends.  Log growth is then
    bounded by about C{burst + 1} events a period, whatever is thrown at the
    server (see docs/security.rst for the measured bytes per second).

    The relay also logs changes to its table (new, unregistered and expired
    peers) through one of these, with a larger share: a registration flood
    must not fill the disk either.

    :param clock: the reactor's clock (the summary is a timed call).
    :param what: what the summary calls the events left out.
    :param level: the level events are logged at.
    :param logger: the logger to emit through (default: this class's), so
        that events keep their source's namespace.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        burst: int = REFUSALS_LOGGED_PER_PERIOD,
        period: float = REFUSAL_LOG_PERIOD_SECONDS,
        what: str = "refusals",
        level: LogLevel = LogLevel.warn,
        logger: Logger | None = None,
    ) -> None:
        if logger is not None:
            self.log = logger
        self.clock = clock
        self.burst = burst
        self.period = period
        self.what = what
        self.level = level
        self._logged = 0
        self._window_ends = 0.0
        self._left_out: dict[str, int] = {}
        self._summary: IDelayedCall | None = None
        self.total = 0
        # Every refusal since the start, by label (the metrics' reasons):
        # never reset, and at most MAX_REASONS labels plus "other".
        self.counts: dict[str, int] = {}

    def refused(
        self, format: str, reason: str, label: str | None = None, **fields: object
    ) -> None:
        """
        Log a refusal event (C{format} with C{fields}), unless this period's
        share is used up; C{reason} is the short reason it is counted under.
        C{label} (default C{reason}) is what L{counts} keeps it under, for a
        reason that names an address or a limit.
        """
        self.total += 1
        label = label or reason
        counts = self.counts
        if label not in counts and len(counts) >= MAX_REASONS:
            label = "other"
        counts[label] = counts.get(label, 0) + 1
        now = self.clock.seconds()
        if now >= self._window_ends:
            self._window_ends = now + self.period
            self._logged = 0
        if self._logged < self.burst:
            self._logged += 1
            self.log.emit(self.level, format, reason=reason, **fields)
            return
        left_out = self._left_out
        if reason not in left_out and len(left_out) >= MAX_REASONS:
            reason = "other"
        left_out[reason] = left_out.get(reason, 0) + 1
        if self._summary is None:
            self._summary = self.clock.callLater(
                self._window_ends - now, self.summarise
            )

    def summarise(self) -> None:
        """Log how many refusals were left out, by reason (one event)."""
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._summary = None
        left_out, self._left_out = self._left_out, {}
        if not left_out:
            return
        reasons = ", ".join(
            f"{count} x {reason}"
            for reason, count in sorted(left_out.items(), key=lambda i: -i[1])[:10]
        )
        self.log.emit(
            self.level,
            "{count} more {what} not logged one by one: {reasons}",
            count=sum(left_out.values()),
            what=self.what,
            reasons=reasons,
            left_out=left_out,
        )

    def stop(self) -> None:
        """Log what is pending now (the server is stopping)."""
        self.summarise()


class ConnectionPolicy:
    """
    What every connection of one server lives under, besides the idle
    timeout and the open-connection limits: a short deadline for its first
    request, a maximum lifetime and request count (so nobody can hold a
    place for ever by asking cheap questions), and the refusal log.

    :param clock: the reactor's clock.
    :param first_request_timeout: seconds a new connection has to send its
        first complete request line (C{None}: only the idle timeout).
    :param max_lifetime: seconds after which a connection's next request
        is refused and the connection closed (0: no limit).  Checked at
        requests only, so a transfer in progress is never cut.
    :param max_requests: requests one connection may make (0: no limit).
    """

    def __init__(
        self,
        clock: IReactorTime,
        first_request_timeout: float | None = DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS,
        max_lifetime: float = DEFAULT_MAX_LIFETIME_SECONDS,
        max_requests: int = DEFAULT_MAX_REQUESTS_PER_CONNECTION,
        refusals: RefusalLog | None = None,
    ) -> None:
        if max_lifetime < 0 or max_requests < 0:
            raise ValueError("connection limits must be 0 (no limit) or more")
        if first_request_timeout is not None and first_request_timeout <= 0:
            raise ValueError("the first-request timeout must be positive")
        self.clock = clock
        self.first_request = (
            IdleTimeouts(clock, first_request_timeout)
            if first_request_timeout is not None
            else None
        )
        self.max_lifetime = max_lifetime
        self.max_requests = max_requests
        self.refusals = refusals if refusals is not None else RefusalLog(clock)

    def used_up(self, connected_at: float, requests: int) -> str | None:
        """Why a connection must not make another request, or C{None}."""
        if self.max_requests and requests >= self.max_requests:
            return f"{self.max_requests} requests on one connection"
        if self.max_lifetime and self.clock.seconds() - connected_at >= (
            self.max_lifetime
        ):
            return f"connection older than {self.max_lifetime:g} s"
        return None


class LimitedServerFactory(ServerFactory):
    """
    A factory for connections that live under L{ConnectionLimits} and share
    one L{IdleTimeouts}: the relay's and the peer's.

    Subclasses set C{role} and implement L{build}.

    :param clock: the reactor's clock (idle deadlines run on it).
    :param idle_timeout: see L{ServerLineProtocol} (C{None}: never).
    :param limits: open-connection limits; past them a connection gets a
        L{RefusingProtocol} (``ERR 503``).  Default: L{ConnectionLimits}'s.
    :param policy: the first-request deadline, lifetime and request count
        of each connection, and the refusal log.  Default:
        L{ConnectionPolicy}'s.
    """

    noisy = False
    role = "server"

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float | None,
        limits: ConnectionLimits | None = None,
        policy: ConnectionPolicy | None = None,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.limits = limits if limits is not None else ConnectionLimits()
        self.policy = policy if policy is not None else ConnectionPolicy(clock)
        self.idle_timeouts = (
            IdleTimeouts(clock, idle_timeout) if idle_timeout is not None else None
        )

    def buildProtocol(self, addr: object) -> Protocol:
        return self.limits.protocol_for(
            addr, self.role, self._build, self.policy.refusals, self.clock
        )

    def _build(self, host: str, on_lost: Callable[[], None]) -> Protocol:
        protocol = self.build(host, on_lost)
        protocol.factory = self
        protocol.policy = self.policy
        return protocol

    def doStop(self) -> None:
        self.policy.refusals.stop()
        super().doStop()

    def build(self, host: str, on_lost: Callable[[], None]) -> Protocol:
        """The protocol for an admitted connection from C{host} (subclasses);
        C{on_lost} must reach its L{ServerLineProtocol}."""
        raise NotImplementedError


class _GraceAbort:
    """
    The abort that makes a polite close final within L{CLOSE_GRACE_SECONDS}
    (see the module's docstring), for the protocols a server closes; they
    have a C{clock} and a C{transport}.
    """

    _abort_call: IDelayedCall | None = None

    def _abort_after_grace(self) -> None:
        """Abort the connection once the grace is over, unless it is lost
        first; a second call keeps the first deadline."""
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(
                CLOSE_GRACE_SECONDS, self.transport.abortConnection
            )

    def _cancel_abort(self) -> None:
        """The connection is lost: nothing is left to abort."""
        call, self._abort_call = self._abort_call, None
        if call is not None and call.active():
            call.cancel()


class RefusingProtocol(_GraceAbort, Protocol):
    """
    Greets, explains the refusal in one ``ERR 503`` line, and hangs up;
    with a clock, for good within L{CLOSE_GRACE_SECONDS} (over TLS the
    lines wait for a handshake the client may never make).
    """

    def __init__(
        self, role: str, reason: str, clock: IReactorTime | None = None
    ) -> None:
        self.role = role
        self.reason = reason
        self.clock = clock

    @property
    def greeting(self) -> bytes:
        """Everything this connection sends."""
        return (
            wire.banner(self.role)
            + wire.DELIMITER
            + wire.format_error(Code.UNAVAILABLE, self.reason)
            + wire.DELIMITER
        )

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)
        self.transport.loseConnection()
        if self.clock is not None:
            self._abort_after_grace()

    def dataReceived(self, data: bytes) -> None:
        """Whatever the client sends is ignored: we are hanging up."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_abort()


class ReadGate:
    """
    A connection's reading, as the transport's streaming producer: the
    transport pauses it while it holds more answers than its buffer size,
    and resumes it when the client has read them.  Pausing pauses the
    protocol (no request is read); the count of resumes tells an idle
    timeout whether the client is still reading.
    """

    __slots__ = ("protocol", "paused", "resumes")

    def __init__(self, protocol: ServerLineProtocol) -> None:
        self.protocol = protocol
        self.paused = False
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.protocol.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1
        self.protocol.resumeProducing()

    def stopProducing(self) -> None:
        self.protocol.transport.loseConnection()


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


@implementer(IHandshakeListener)
class ServerLineProtocol(_GraceAbort, LineReceiver):
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

    Every close the server decides goes through L{hang_up}, final within
    L{CLOSE_GRACE_SECONDS}.
    """

    delimiter = wire.DELIMITER
    # The longest legal line plus the CR of a CRLF line end; decode_line
    # refuses (413) what is longer once the CR is gone.
    MAX_LENGTH = wire.MAX_RECEIVE_LENGTH
    role = "server"
    log = Logger()
    # Set by the factory (L{LimitedServerFactory}); None: only the idle
    # timeout, line length and error budget apply.
    policy: ConnectionPolicy | None = None
    # Complete requests received so far.
    requests = 0
    # Whether the TLS handshake is over (IHandshakeListener; never set on
    # a connection without TLS).
    _handshake_done = False

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
        self._connected_at = self.clock.seconds()
        policy = self.policy
        if policy is not None and policy.first_request is not None:
            # A shorter deadline until the first request; the idle timeout
            # between requests starts with it.
            policy.first_request.restart(self)
        else:
            self.resetTimeout()
        # Not through send_answer: reading must not be paused before a TLS
        # handshake (the banner waits in the TLS layer until then, and a
        # paused read would never receive the client's hello).
        write_now(self.transport, self.greeting)

    @property
    def greeting(self) -> bytes:
        """The banner line every connection gets first."""
        return wire.banner(self.role) + self.delimiter

    def sendLine(self, line: bytes) -> None:
        """Send one line (see L{send_answer})."""
        self.send_answer(line + self.delimiter)

    def send_lines(self, lines: list[bytes]) -> None:
        """Send C{lines}, each with its delimiter, in one write (the list
        is used up: it gains an empty last item)."""
        lines.append(b"")
        self.send_answer(self.delimiter.join(lines))

    # The streaming producer registered with the transport while answers
    # may wait unsent (see send_answer), or None.
    _gate: ReadGate | None = None

    def send_answer(self, data: bytes) -> None:
        """
        Send (part of) an answer, at once when the socket takes it
        (L{write_now}).

        A client that sends requests without reading the answers would make
        the transport queue them without bound.  So once an answer may be
        left waiting (the socket did not take it all, or the transport
        cannot say: TLS), the protocol's reading is registered as the
        transport's streaming producer (L{IConsumer.registerProducer}, on
        TCP and TLS alike): Twisted then pauses it (no more requests are
        read) while more than the transport's buffer size is queued, and
        resumes it when the client has read.
        """
        # Registered before the bytes are queued: Twisted pauses a producer
        # when a write fills its buffer, not when it registers (a 564 KB
        # reply written first left the gate unpaused, its client never cut).
        gate = None if self._gate is not None else self._gate_reading
        write_now(self.transport, data, gate)

    def _gate_reading(self) -> None:
        self._gate = ReadGate(self)
        self.transport.registerProducer(self._gate, True)

    def release_transport(self) -> None:
        """Stop being the transport's producer, so another may register."""
        if self._gate is not None:
            self._gate = None
            self.transport.unregisterProducer()

    def resumeProducing(self) -> None:
        """Read requests again; a half-closed connection may now be done."""
        super().resumeProducing()
        self.close_if_done()

    def resetTimeout(self) -> None:
        """Restart the idle period: the connection made progress."""
        if self._idle is not None:
            self._idle.restart(self)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: TLS is up, what we send can now be read."""
        self._handshake_done = True

    @property
    def before_handshake(self) -> bool:
        """Whether this is a TLS connection whose handshake is unfinished:
        its client can read nothing we send yet."""
        return not self._handshake_done and ISSLTransport.providedBy(self.transport)

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes arriving after we asked for a close are dropped: a TLS
        connection keeps reading while it closes (for the client's close),
        and LineReceiver would keep them, without bound, in its buffer.
        """
        if self.transport.disconnecting:
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_abort()
        if self._idle is not None:
            self._idle.stop(self)
        if not self.requests and self.policy is not None:
            if self.policy.first_request is not None:
                self.policy.first_request.stop(self)
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
        policy = self.policy
        if policy is not None:
            if not self.requests and policy.first_request is not None:
                policy.first_request.stop(self)
            used_up = policy.used_up(self._connected_at, self.requests)
            if used_up is not None:
                self.refuse(WireError(Code.TOO_MANY, f"{used_up}; reconnect"))
                self.close_after_answers()
                return
        self.requests += 1
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
        self.hang_up()

    def close_if_done(self) -> None:
        """Close a half-closed connection once no request is in progress."""
        if self._input_ended and not self.paused:
            self.transport.loseConnection()

    def refuse(self, error: WireError) -> None:
        """Log a refused request (rate-limited, see L{RefusalLog}) and reply
        with its ``ERR`` line."""
        self.log_refusal(
            "refused a request: {error}", str(int(error.code)), error=str(error)
        )
        self.send_error(error.code, error.message)

    def log_refusal(self, format: str, reason: str, **fields: object) -> None:
        """Log a refusal through the server's L{RefusalLog} when it has one."""
        if self.policy is not None:
            self.policy.refusals.refused(format, reason, **fields)
        else:
            self.log.warn(format, reason=reason, **fields)

    def send_error(self, code: Code, message: str) -> None:
        """
        Send ``ERR <code> <message>``; close after a 413 or 408, or once the
        connection has used up its error budget.
        """
        self.sendLine(wire.format_error(code, message))
        if code in _CLOSING_CODES:
            self.close_after_answers()
            return
        self.errors += 1
        if self.errors >= MAX_ERRORS_PER_CONNECTION:
            self.log_refusal(
                "closing a connection after {count} error replies",
                "error budget",
                count=self.errors,
            )
            self.sendLine(wire.format_error(Code.TOO_MANY, "too many errors"))
            self.close_after_answers()

    def close_after_answers(self) -> None:
        """Close once the answers sent so far are out (here: at once, the
        transport sends what it holds first); subclasses whose answers may
        wait before they reach the transport close later."""
        self.hang_up()

    def hang_up(self) -> None:
        """
        Close the connection, for good within L{CLOSE_GRACE_SECONDS}.

        A polite close sends what the transport holds first, and over TLS
        waits for the client's close in return.  A TLS client that has not
        finished its handshake can read nothing we send: it is aborted at
        once (Twisted would otherwise wait for the handshake, with our
        banner queued, and with reading paused never notice the client
        leave: its socket stayed in CLOSE-WAIT for good).  Any other client
        has the grace time to read the last answer and close; then the
        connection is aborted.
        """
        transport = self.transport
        # A registered producer holds back TLS's close until it leaves.
        self.release_transport()
        if self.before_handshake:
            transport.abortConnection()
            return
        transport.loseConnection()
        if unsent_output(transport):
            # (A plain TCP transport holding nothing closes at its next turn:
            # no timer, which cost REGISTER about 8% of the relay's CPU per
            # request when every close set one up.)
            self._abort_after_grace()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.log_refusal("refused a request: line too long", "413")
        self.send_error(Code.LINE_TOO_LONG, "line too long")

    # The gate's resume count at the last idle timeout.
    _resumes_at_timeout = -1

    def timeoutConnection(self) -> None:
        """
        ``ERR 408`` and a close, for a client that sent no request for the
        idle period.  One whose transport holds more answers than it can
        buffer (it paused our reading) is different: if it resumed us since
        the last timeout, the client reads, which is progress, and it gets
        another period; one that has stopped reading is cut off (an abort:
        a polite close would wait for it to read, maybe for ever, holding
        its place in the limits).
        """
        gate = self._gate
        if gate is not None and gate.paused:
            if gate.resumes > self._resumes_at_timeout:
                self._resumes_at_timeout = gate.resumes
                self.resetTimeout()
                return
            self.log_refusal(
                "closing a connection whose client stopped reading", "not reading"
            )
            self.transport.abortConnection()
            return
        if self.before_handshake:
            # No ERR line: it could not be read, and it would wait in TLS.
            self.hang_up()
            return
        if not self.requests and self.policy is not None:
            timeout = self.policy.first_request
            if timeout is not None:
                self.send_error(
                    Code.TIMEOUT, f"no request within {timeout.timeout:g} s"
                )
                return
        self.send_error(Code.TIMEOUT, "idle timeout")
