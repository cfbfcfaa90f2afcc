"""
Tests for L{p2p.fetch}'s bookkeeping of failures (the fallback itself is
tested in C{test_client.FetcherTests} and C{StaggerAndResumeTests}).
"""

from __future__ import annotations

import io

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.errors import FailureKind
from p2p.fetch import Fetcher
from p2p.sink import PieceSink, StreamOutput

from .test_client import CONTENT, NAME, reply_for

PEER_A = wire.PeerEntry("a" * 16, "127.0.0.1", 4001)
PEER_B = wire.PeerEntry("b" * 16, "127.0.0.1", 4002)


class BuggyCancel(Exception):
    """What a broken endpoint raises when its connection attempt is
    cancelled: a bug, not a peer's fault."""


class _Endpoints:
    """Peer A's connection never completes, and cancelling it fails with
    C{cancel_error} (a bug by default); peer B connects at once to a
    StringTransport."""

    def __init__(self, cancel_error: Exception | None = None) -> None:
        self.protocols: dict[int, object] = {}
        self.cancel_error = cancel_error or BuggyCancel("cancelled badly")

    def endpoint_for(self, peer: wire.PeerEntry):
        return _Endpoint(self, peer)


class _Endpoint:
    def __init__(self, endpoints: _Endpoints, peer: wire.PeerEntry) -> None:
        self.endpoints = endpoints
        self.peer = peer

    def connect(self, factory):
        if self.peer is PEER_A:
            error = self.endpoints.cancel_error
            return Deferred(lambda d: d.errback(error))
        protocol = factory.buildProtocol(
            IPv4Address("TCP", self.peer.host, self.peer.port)
        )
        protocol.makeConnection(StringTransport())
        self.endpoints.protocols[self.peer.port] = protocol
        return succeed(protocol)


class UnexpectedFailureTests(SynchronousTestCase):
    """A failure that is not an expected skip is never dropped silently,
    even from an attempt that no longer matters."""

    def test_abandoned_attempt_bug_is_logged(self) -> None:
        clock = Clock()
        endpoints = _Endpoints()
        fetcher = Fetcher(
            clock,
            endpoint_for=endpoints.endpoint_for,
            now=clock.seconds,
            stagger=0.25,
        )
        out = io.BytesIO()
        d = fetcher.fetch(NAME, [PEER_A, PEER_B], PieceSink(StreamOutput(out)))
        clock.advance(0.25)  # A is silent: B is asked too
        protocol = endpoints.protocols[4002]
        protocol.dataReceived(wire.banner("peer") + b"\n")
        # B's header wins: A's attempt is abandoned (cancelled), and its
        # cancellation fails with a bug.
        protocol.dataReceived(reply_for(CONTENT))
        result = self.successResultOf(d)
        self.assertEqual(result.peer, PEER_B)
        self.assertEqual(out.getvalue(), CONTENT)
        self.assertEqual(len(self.flushLoggedErrors(BuggyCancel)), 1)

    def test_cancelled_tcp_connection_is_expected(self) -> None:
        """
        A real TCP endpoint's cancelled connection attempt fails with
        ConnectingCancelledError: an abandoned attempt's normal end, not a
        bug to log.
        """
        clock = Clock()
        endpoints = _Endpoints(ConnectingCancelledError(PEER_A.address))
        fetcher = Fetcher(clock, endpoint_for=endpoints.endpoint_for, now=clock.seconds)
        out = io.BytesIO()
        d = fetcher.fetch(NAME, [PEER_A, PEER_B], PieceSink(StreamOutput(out)))
        clock.advance(0.25)
        protocol = endpoints.protocols[4002]
        protocol.dataReceived(wire.banner("peer") + b"\n")
        protocol.dataReceived(reply_for(CONTENT))
        self.assertEqual(self.successResultOf(d).peer, PEER_B)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_attempts_carry_their_kind(self) -> None:
        """Each finished attempt says why, as a L{FailureKind}."""
        clock = Clock()
        endpoints = _Endpoints()
        reports = []
        fetcher = Fetcher(
            clock,
            endpoint_for=endpoints.endpoint_for,
            now=clock.seconds,
            stagger=0,
            report=reports.append,
        )
        d = fetcher.fetch(NAME, [PEER_B], PieceSink(StreamOutput(io.BytesIO())))
        protocol = endpoints.protocols[4002]
        protocol.dataReceived(wire.banner("peer") + b"\n")
        protocol.dataReceived(b"ERR 404 no such file\n")
        self.failureResultOf(d)
        self.assertEqual([r.kind for r in reports], [FailureKind.REFUSED])
        self.assertIs(type(reports[0].kind), FailureKind)


class _CountingClock(Clock):
    """Remembers the delay of every call it was asked to schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: list[float] = []

    def callLater(self, delay, f, *args, **kwargs):
        self.delays.append(delay)
        return super().callLater(delay, f, *args, **kwargs)


class ConnectTimerTests(SynchronousTestCase):
    """The connection attempt's own timer is made only while it connects."""

    def fetch(self, peer: wire.PeerEntry):
        self.clock = _CountingClock()
        self.endpoints = _Endpoints()
        fetcher = Fetcher(
            self.clock,
            connect_timeout=5,
            endpoint_for=self.endpoints.endpoint_for,
            now=self.clock.seconds,
            stagger=0,
        )
        return fetcher.fetch(NAME, [peer], PieceSink(StreamOutput(io.BytesIO())))

    def timers(self) -> list[float]:
        return sorted(call.getTime() for call in self.clock.getDelayedCalls())

    def test_connected_at_once_makes_no_connect_timer(self) -> None:
        """A connection there at once (a kept one, p2p.pool) schedules only
        the protocol's own timers (idle, header deadline), none of 5 s."""
        self.fetch(PEER_B)
        self.assertNotIn(5, self.clock.delays)

    def test_connecting_is_bounded(self) -> None:
        d = self.fetch(PEER_A)
        self.assertEqual(self.timers(), [5.0])
        self.clock.advance(5)
        self.failureResultOf(d)
