"""
Connections to peers kept open between fetches, as curl and HTTP/1.1
clients keep theirs.

A peer answers any number of requests on one connection, one after the
other (docs/protocol.rst).  ``p2p get`` with many small files used to open
a connection per file: the connect, the close and the peer's accept were
most of a 4 KiB file's cost.  L{ConnectionPool} wraps the endpoint of each
peer so that a fetch that ended cleanly hands its connection back
(L{release}) and the next fetch from the same peer takes it, greeted as
if new: the protocol of a fetch never knows the difference.

A kept connection may be closed by the peer while idle (its idle timeout,
its limit of requests or lifetime per connection: ``ERR 429 ...;
reconnect``).  A request that meets such an end before any reply is sent
again, once, on a new connection, so a holder is never skipped for it.
The pool keeps few connections (L{MAX_IDLE}) and retires them young
(L{MAX_USES}, L{MAX_AGE_SECONDS}), well inside the peers' default limits.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import wire
from p2p.transports import (
    no_delay,
    read_in_large_chunks,
    read_into_buffers,
    set_receive_low_water,
    write_now,
)

# Idle connections kept in all (the oldest idle one is closed past it).
MAX_IDLE = 8
# Requests and seconds a kept connection serves before it is closed (a
# peer's defaults are 1000 requests and 300 s: see p2p/limits.py).
MAX_USES = 200
MAX_AGE_SECONDS = 60.0
# Error replies a kept connection may have carried (``ERR 404`` only: any
# other error closes it): a peer closes a connection after ten (its error
# budget, p2p.limits.MAX_ERRORS_PER_CONNECTION), which would cost the next
# fetch its holder.
MAX_ERRORS_KEPT = 8


def release(transport: object, error: bool = False) -> None:
    """
    The fetch on C{transport} ended cleanly, every byte of its reply read
    (with C{error}: the reply was ``ERR 404``): keep the connection for the
    next fetch if it came from a pool, close it otherwise.
    """
    keep = getattr(transport, "release_to_pool", None)
    if keep is not None:
        keep(error)
    else:
        transport.loseConnection()  # type: ignore[attr-defined]


class ConnectionPool:
    """
    Idle connections per peer address, for the endpoints L{wrap} makes.

    :param clock: for the age of connections.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        # Idle carriers per peer address, the most recently used last.
        self._idle: dict[str, list[_Carrier]] = {}
        self._idle_count = 0

    def wrap(
        self, endpoint_for: Callable[[wire.PeerEntry], IStreamClientEndpoint]
    ) -> Callable[[wire.PeerEntry], IStreamClientEndpoint]:
        """Endpoints that reuse this pool's connections."""

        def pooled(peer: wire.PeerEntry) -> IStreamClientEndpoint:
            return _PooledEndpoint(self, peer.address, lambda: endpoint_for(peer))

        return pooled

    def close(self) -> None:
        """Close every idle connection (the session ends)."""
        for carriers in list(self._idle.values()):
            for carrier in list(carriers):
                carrier.retire()

    # -- for carriers ----------------------------------------------------

    def _take(self, key: str) -> _Carrier | None:
        carriers = self._idle.get(key)
        while carriers:
            carrier = carriers.pop()
            self._idle_count -= 1
            if not carriers:
                del self._idle[key]
            if carrier.fresh_enough():
                return carrier
            carrier.close()
            carriers = self._idle.get(key)
        return None

    def _keep(self, carrier: _Carrier) -> None:
        if self._idle_count >= MAX_IDLE:
            oldest = min(
                (c for cs in self._idle.values() for c in cs),
                key=lambda c: c.idle_since,
            )
            oldest.retire()
        self._idle.setdefault(carrier.key, []).append(carrier)
        self._idle_count += 1

    def _forget(self, carrier: _Carrier) -> None:
        carriers = self._idle.get(carrier.key)
        if carriers and carrier in carriers:
            carriers.remove(carrier)
            self._idle_count -= 1
            if not carriers:
                del self._idle[carrier.key]


@implementer(IStreamClientEndpoint)
class _PooledEndpoint:
    def __init__(
        self, pool: ConnectionPool, key: str, make: Callable[[], IStreamClientEndpoint]
    ) -> None:
        self.pool = pool
        self.key = key
        self.make = make

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        carrier = self.pool._take(self.key)
        if carrier is not None:
            protocol = factory.buildProtocol(carrier.transport.getPeer())
            if protocol is None:
                carrier.retire()
                return fail(ValueError("the factory built no protocol"))
            carrier.carry(protocol, reused=True)
            return succeed(protocol)
        return self.connect_new(factory.buildProtocol)

    def connect_new(
        self,
        build: Callable[[object], Protocol | None] | None,
        replay: tuple[Protocol, _Borrowed] | None = None,
    ) -> Deferred[Protocol | None]:
        """A new connection whose carrier builds the fetch's protocol once
        connected (C{build}), or takes over C{replay}'s (see
        L{_Carrier._retry})."""
        carrier_factory = Factory.forProtocol(
            lambda: _Carrier(self.pool, self, build, replay)
        )
        d = self.make().connect(carrier_factory)
        d.addCallback(lambda carrier: carrier.inner)
        return d


class _Borrowed:
    """
    The transport a fetch's protocol sees: the connection's own, except
    that L{release_to_pool} hands the connection back instead of closing
    it.  Anything else is the connection's (through C{__getattr__}).
    """

    def __init__(self, carrier: _Carrier, reused: bool) -> None:
        self._carrier = carrier
        # What the protocol wrote before the first reply byte on a kept
        # connection: sent again on a new one if the kept one was closed.
        self.unanswered: list[bytes] | None = [] if reused else None
        # The fetch closed it (it may be between two connections then).
        self.closed = False

    def __getattr__(self, name: str):
        return getattr(self._carrier.transport, name)

    def setTcpNoDelay(self, enabled: bool) -> None:
        """The carrier turned Nagle's algorithm off when it connected: only
        turning it back on costs a system call."""
        if not enabled:
            self._carrier.transport.setTcpNoDelay(False)

    def set_receive_low_water(self, size: int) -> bool:
        """The connection's (L{p2p.transports.set_receive_low_water})."""
        return set_receive_low_water(self._carrier.transport, size)

    def write(self, data: bytes) -> None:
        if self.unanswered is not None:
            self.unanswered.append(data)
        write_now(self._carrier.transport, data)

    def writeSequence(self, data: list[bytes]) -> None:
        for part in data:
            self.write(part)

    def loseConnection(self) -> None:
        self.closed = True
        self._carrier.close()

    def abortConnection(self) -> None:
        self.closed = True
        self._carrier.abort()

    def release_to_pool(self, error: bool = False) -> None:
        self._carrier.release(self, error)


class _Carrier(Protocol):
    """
    The protocol a pooled connection runs: it carries one fetch's protocol
    at a time, and remembers the peer's greeting to give the next one.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        endpoint: _PooledEndpoint,
        build: Callable[[object], Protocol | None] | None,
        replay: tuple[Protocol, _Borrowed] | None,
    ) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.key = endpoint.key
        self._build = build
        # A fetch whose kept connection ended unanswered: taken over once
        # this connection's greeting is in.
        self._replay = replay
        self.inner: Protocol | None = None
        self.borrowed: _Borrowed | None = None
        self.greeting: bytes | None = None
        self._heard = bytearray()  # the greeting, or a kept one's first line
        self.uses = 0
        self.errors = 0  # ERR 404 replies carried (see MAX_ERRORS_KEPT)
        self.born = pool.clock.seconds()
        self.idle_since = self.born
        self._ending = False
        self._lost = False

    # -- life of the connection ---------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        read_in_large_chunks(self.transport)
        read_into_buffers(self.transport, self)
        if self._build is not None:
            protocol = self._build(self.transport.getPeer())
            if protocol is None:
                self.close()
            else:
                self.carry(protocol, reused=False)

    def carry(self, protocol: Protocol, reused: bool) -> None:
        """Give the connection to C{protocol} (a new fetch)."""
        self.inner = protocol
        self.uses += 1
        self._heard.clear()
        self.borrowed = _Borrowed(self, reused)
        protocol.makeConnection(self.borrowed)
        if reused and self.greeting is not None:
            protocol.dataReceived(self.greeting)

    def fresh_enough(self) -> bool:
        return (
            not self._lost
            and not self._ending
            and self.uses < MAX_USES
            and self.errors < MAX_ERRORS_KEPT
            and self.pool.clock.seconds() - self.born < MAX_AGE_SECONDS
        )

    def release(self, borrowed: _Borrowed, error: bool = False) -> None:
        """The fetch ended cleanly (with C{error}: on an ``ERR 404``): keep
        the connection, idle."""
        if borrowed is not self.borrowed or self.inner is None:
            return
        self.errors += error
        inner, self.inner, self.borrowed = self.inner, None, None
        inner.connectionLost(Failure(ConnectionDone("kept for the next fetch")))
        if not self.fresh_enough():
            self.close()
            return
        self.idle_since = self.pool.clock.seconds()
        # Read while idle, to see the peer close it (the fetch paused it).
        self.transport.resumeProducing()
        self.pool._keep(self)

    def retire(self) -> None:
        self.pool._forget(self)
        self.close()

    def close(self) -> None:
        self._ending = True
        self.transport.loseConnection()

    def abort(self) -> None:
        self._ending = True
        self.transport.abortConnection()

    # -- bytes and the end -------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.greeting is None or (
            self.borrowed is not None and self.borrowed.unanswered is not None
        ):
            data = self._listen(data)
            if not data:
                return
        if self.inner is None:
            self.close()  # a peer talking out of turn: not ours to keep
            return
        self.inner.dataReceived(data)

    def receive_buffer(self) -> memoryview | None:
        """The carried fetch's buffer for its next bytes, if it offers one
        (L{p2p.transports.read_into_buffers}); none while this connection
        still listens for its greeting or a kept one's first reply line."""
        inner = self.inner
        if (
            inner is None
            or self.greeting is None
            or (self.borrowed is not None and self.borrowed.unanswered is not None)
        ):
            return None
        offer = getattr(inner, "receive_buffer", None)
        return offer() if offer is not None else None

    def received_into(self, count: int) -> None:
        assert self.inner is not None
        self.inner.received_into(count)  # type: ignore[attr-defined]

    def _listen(self, data: bytes) -> bytes:
        """
        Learn the greeting of a new connection (passed on as it came), or
        hold a kept connection's first reply line until it is whole: a
        peer that says ``ERR 429 ...; reconnect`` is asked again on a new
        connection.  Returns what to pass on now.
        """
        self._heard += data
        newline = self._heard.find(b"\n")
        if self.greeting is None:
            if newline < 0:
                if len(self._heard) > wire.MAX_LINE_LENGTH:
                    self.abort()
                    return b""
                return b"" if self._replay is not None else data
            self.greeting = bytes(self._heard[: newline + 1])
            if self._replay is None:
                return data
            # A request asked again: its fetch was greeted already.
            rest = bytes(self._heard[newline + 1 :])
            self._take_over(*self._replay)
            return rest
        borrowed = self.borrowed
        assert borrowed is not None
        if newline < 0 and len(self._heard) <= wire.MAX_RECEIVE_LENGTH:
            return b""
        if self._heard.startswith(b"ERR 429") and b"reconnect" in self._heard[:newline]:
            self._retry()
            return b""
        borrowed.unanswered = None
        return bytes(self._heard)

    def _take_over(self, inner: Protocol, borrowed: _Borrowed) -> None:
        """Carry the fetch whose kept connection failed (see L{_retry})."""
        self._replay = None
        if borrowed.closed:
            self.close()  # the fetch gave up meanwhile
            inner.connectionLost(Failure(ConnectionDone()))
            return
        self.inner = inner
        self.borrowed = borrowed
        self.uses = 1
        unanswered, borrowed.unanswered = borrowed.unanswered or [], None
        borrowed._carrier = self
        for part in unanswered:
            self.transport.write(part)

    def _retry(self) -> None:
        """The kept connection ended before answering: ask on a new one."""
        inner, borrowed = self.inner, self.borrowed
        assert inner is not None and borrowed is not None
        self.inner = self.borrowed = None
        if not self._lost:
            self.close()

        def failed(failure: Failure) -> None:
            inner.connectionLost(failure)

        d = self.endpoint.connect_new(None, (inner, borrowed))
        d.addErrback(failed)

    def connectionLost(self, reason: Failure | None = None) -> None:
        reason = reason or Failure(ConnectionDone())
        self._lost = True
        self.pool._forget(self)
        if self._replay is not None:
            # Lost again before the greeting: the fetch hears of it now.
            inner = self._replay[0]
            self._replay = None
            inner.connectionLost(reason)
            return
        inner, borrowed = self.inner, self.borrowed
        if inner is None:
            return
        if borrowed is not None and borrowed.unanswered is not None:
            self._retry()
            return
        self.inner = self.borrowed = None
        inner.connectionLost(reason)
