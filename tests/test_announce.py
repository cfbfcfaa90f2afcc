"""Tests for L{p2p.announce.Announcer}: the peer's lease at the relay.

The relay is a fake endpoint that answers each short connection from a
script; the listening service is a stub whose port the test controls.  All
timing runs on a L{Clock}; jitter is a constant so delays are exact.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.error import ConnectionRefusedError as TCPRefused
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.announce import (
    DEFAULT_MAX_RETRY_SECONDS,
    FIRST_RETRY_SECONDS,
    UNREGISTER_TIMEOUT_SECONDS,
    Announcer,
)

PORT = 4242
PEER_ID = "0123456789abcdef"
RENEW = 20
TTL = 60

Reply = Callable[[bytes], bytes]


def registered(renew: int = RENEW, ttl: int = TTL) -> Reply:
    """A relay answer: REGISTER gets a lease, UNREGISTER a plain OK."""

    def reply(request: bytes) -> bytes:
        if request.startswith(b"UNREGISTER"):
            return b"OK\n"
        return wire.Registered(PEER_ID, ttl, renew, "203.0.113.9").to_line() + b"\n"

    return reply


def answer(line: bytes) -> Reply:
    """A relay that answers every request with C{line}."""
    return lambda request: line


class FakeRelay:
    """
    A relay endpoint.  Each connection takes the next entry of C{script}
    (or C{default} once it is empty): a reply function, ``"refuse"`` or
    ``"hang"`` (connects, greets, never answers).  The request lines are
    recorded in C{requests}, refused attempts as C{None}.
    """

    def __init__(self, default: object = None) -> None:
        self.script: list[object] = []
        self.default = default if default is not None else registered()
        self.requests: list[bytes | None] = []
        self.hanging: list[StringTransport] = []

    def connect(self, factory):
        behaviour = self.script.pop(0) if self.script else self.default
        if behaviour == "refuse":
            self.requests.append(None)
            return fail(TCPRefused())
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4001))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"P2P/1 relay\n")
        request = transport.value()
        self.requests.append(request)
        if behaviour == "hang":
            self.hanging.append(transport)
        else:
            protocol.dataReceived(behaviour(request))
        return succeed(protocol)

    def verbs(self) -> list[str | None]:
        return [r.split(b" ")[0].decode() if r else None for r in self.requests]


class FakePort:
    """An IListeningPort reduced to getHost()."""

    def getHost(self):
        return IPv4Address("TCP", "0.0.0.0", PORT)


class StubListening:
    """A ListeningService stand-in: when_listening fires when told to."""

    def __init__(self, ready: bool = True) -> None:
        self.waiters: list[Deferred] = []
        self.ready = ready

    def when_listening(self) -> Deferred:
        if self.ready:
            return succeed(FakePort())
        d: Deferred = Deferred()
        self.waiters.append(d)
        return d

    def listen(self) -> None:
        self.ready = True
        for d in self.waiters:
            d.callback(FakePort())


class AnnouncerTestMixin:
    """An Announcer on a Clock, a FakeRelay and a ready StubListening."""

    jitter_value = 0.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.relay = FakeRelay()
        self.listening = StubListening()
        self.announcer = self.make()

    def make(self, **kwargs) -> Announcer:
        kwargs.setdefault("jitter", lambda: self.jitter_value)
        return Announcer(self.relay, self.listening, self.clock, **kwargs)

    def next_delay(self) -> float:
        """The delay until the one pending timer."""
        [call] = self.clock.getDelayedCalls()
        return call.getTime() - self.clock.seconds()

    def stop(self) -> None:
        """Stop the service; its Deferred must have fired (with None)."""
        self.assertIsNone(self.successResultOf(self.announcer.stopService()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.announcer.running)


class RegistrationTests(AnnouncerTestMixin, SynchronousTestCase):
    """Registration as soon as the port is known."""

    def test_registers_on_start(self) -> None:
        """With the port known, startService registers at once."""
        self.announcer.startService()
        self.assertEqual(self.relay.requests, [b"REGISTER 4242\n"])
        lease = self.successResultOf(self.announcer.when_registered())
        self.assertEqual(lease, wire.Registered(PEER_ID, TTL, RENEW, "203.0.113.9"))
        self.assertEqual(self.announcer.port, PORT)
        self.stop()

    def test_waits_for_listening(self) -> None:
        """Nothing is sent until the listening service reports its port."""
        self.listening.ready = False
        self.announcer.startService()
        d = self.announcer.when_registered()
        self.assertEqual(self.relay.requests, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNoResult(d)
        self.listening.listen()
        self.assertEqual(self.relay.requests, [b"REGISTER 4242\n"])
        self.assertEqual(self.successResultOf(d).peer_id, PEER_ID)
        self.stop()

    def test_stopped_before_listening(self) -> None:
        """A port reported after stopService registers nothing."""
        self.listening.ready = False
        self.announcer.startService()
        self.stop()
        self.listening.listen()
        self.assertEqual(self.relay.requests, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_name_and_token(self) -> None:
        """The display name and token go with REGISTER; the token with
        UNREGISTER."""
        self.announcer = self.make(name="alice", token="s3cret")
        self.announcer.startService()
        self.stop()
        self.assertEqual(
            self.relay.requests,
            [
                b"REGISTER 4242 name=alice token=s3cret\n",
                b"UNREGISTER 4242 token=s3cret\n",
            ],
        )

    def test_listen_failure(self) -> None:
        """
        If the file server never listens, nothing is announced and the
        failure is handled (logged), not left in a Deferred.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.listening.when_listening = lambda: fail(
            CannotListenError("", PORT, OSError("in use"))
        )
        self.announcer.startService()
        self.assertEqual(self.relay.requests, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(
            any(e.get("log_namespace", "").startswith("p2p.announce") for e in events)
        )
        self.stop()
        self.assertEqual(self.flushLoggedErrors(CannotListenError), [])


class RenewalTests(AnnouncerTestMixin, SynchronousTestCase):
    """Renewal at the relay's renew interval."""

    def test_renews_at_interval(self) -> None:
        """With no jitter, each renewal happens exactly C{renew} s later."""
        self.announcer.startService()
        for count in range(2, 6):
            self.assertEqual(self.next_delay(), RENEW)
            self.clock.advance(RENEW - 0.1)
            self.assertEqual(len(self.relay.requests), count - 1)
            self.clock.advance(0.1)
            self.assertEqual(len(self.relay.requests), count)
        self.assertEqual(set(self.relay.requests), {b"REGISTER 4242\n"})
        self.stop()

    def test_jitter_renews_early(self) -> None:
        """Jitter moves the renewal up to a tenth of the interval earlier."""
        self.jitter_value = 0.5
        self.announcer = self.make()
        self.announcer.startService()
        self.assertAlmostEqual(self.next_delay(), RENEW * 0.95)
        self.stop()

    def test_new_interval_honoured(self) -> None:
        """A relay that changes its renew interval is followed."""
        self.relay.script = [registered(renew=20), registered(renew=7)]
        self.announcer.startService()
        self.clock.advance(20)
        self.assertEqual(self.next_delay(), 7)
        self.stop()

    def test_renewal_fires_waiters_once(self) -> None:
        """when_registered() after a lease fires at once with that lease."""
        self.announcer.startService()
        first = self.successResultOf(self.announcer.when_registered())
        self.clock.advance(RENEW)
        self.assertEqual(self.successResultOf(self.announcer.when_registered()), first)
        self.stop()


class RetryTests(AnnouncerTestMixin, SynchronousTestCase):
    """Capped exponential backoff while the relay is unavailable."""

    def backoff(self, failures: int, cap: float) -> float:
        """The delay after C{failures} consecutive failures, jitter 0."""
        return min(cap, FIRST_RETRY_SECONDS * 2 ** (failures - 1)) * 0.5

    def test_backoff_grows_and_is_capped(self) -> None:
        """
        A relay refusing connections is retried after delays that double,
        up to the cap (jitter 0 halves every delay), and the retries go on.
        """
        self.relay.default = "refuse"
        self.announcer.startService()
        delays = []
        for _ in range(9):
            delays.append(self.next_delay())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [0.5, 1, 2, 4, 8, 10, 10, 10, 10])
        self.assertEqual(
            delays, [self.backoff(n, DEFAULT_MAX_RETRY_SECONDS) for n in range(1, 10)]
        )
        self.assertEqual(len(self.relay.requests), 10)
        self.assertEqual(self.announcer.failures, 10)
        self.stop()
        self.assertEqual(self.relay.verbs(), [None] * 10)  # no UNREGISTER

    def test_full_jitter_factor(self) -> None:
        """With the largest jitter the retry delay approaches the full value."""
        self.jitter_value = 0.999
        self.announcer = self.make()
        self.relay.default = "refuse"
        self.announcer.startService()
        self.assertAlmostEqual(self.next_delay(), 0.9995)
        self.stop()

    def test_recovers(self) -> None:
        """
        After failures the next success resets the backoff, fires the
        waiters and returns to the renewal rhythm.
        """
        self.relay.script = ["refuse", answer(b"ERR 503 busy\n"), "refuse"]
        self.announcer.startService()
        d = self.announcer.when_registered()
        self.clock.advance(0.5)
        self.clock.advance(1)
        self.assertNoResult(d)
        self.assertEqual(self.next_delay(), 2)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d).peer_id, PEER_ID)
        self.assertEqual(self.announcer.failures, 0)
        self.assertEqual(self.next_delay(), RENEW)
        self.stop()

    def test_failed_renewal(self) -> None:
        """
        A renewal that fails drops the lease and is retried with backoff
        from the first step; once the relay is back the lease is renewed.
        """
        self.announcer.startService()
        self.relay.script = ["refuse", "refuse"]
        self.clock.advance(RENEW)
        self.assertIsNone(self.announcer.lease)
        self.assertNoResult(self.announcer.when_registered())
        self.assertEqual(self.next_delay(), 0.5)
        self.clock.advance(0.5)
        self.assertEqual(self.next_delay(), 1)
        self.clock.advance(1)
        self.assertIsNotNone(self.announcer.lease)
        self.assertEqual(self.next_delay(), RENEW)
        self.stop()

    def test_cap_is_the_relays_interval(self) -> None:
        """
        Once the relay has told its renew interval, retries are capped by it
        (not by the default cap) for as long as the relay stays down.
        """
        self.relay.script = [registered(renew=3)]
        self.relay.default = "refuse"
        self.announcer.startService()
        delays = []
        for _ in range(6):
            self.clock.advance(self.next_delay())
            delays.append(self.next_delay())
        self.assertEqual(delays, [0.5, 1, 1.5, 1.5, 1.5, 1.5])
        self.stop()

    def test_errors_are_retried(self) -> None:
        """An ERR reply, a malformed reply and a timeout all lead to a retry."""
        self.relay.script = [
            answer(b"ERR 429 too many\n"),
            answer(b"OK nonsense\n"),
            "hang",
        ]
        self.announcer.startService()
        self.clock.advance(0.5)
        self.clock.advance(1)
        self.assertEqual(len(self.relay.requests), 3)
        self.assertEqual(self.next_delay(), 10)  # the request timeout
        self.clock.advance(10)
        self.assertTrue(self.relay.hanging[0].disconnected)
        self.assertEqual(self.next_delay(), 2)
        self.clock.advance(2)
        self.assertIsNotNone(self.announcer.lease)
        self.stop()

    def test_retry_after_is_honoured(self) -> None:
        """A relay's ``retry-after=`` (its request budget) is waited for,
        even when the backoff would retry sooner."""
        self.relay.script = [answer(b"ERR 429 too many requests; retry-after=7.5\n")]
        self.announcer.startService()
        self.assertEqual(self.next_delay(), 7.5)
        self.clock.advance(7.5)
        self.assertIsNotNone(self.announcer.lease)
        self.stop()


class StopTests(AnnouncerTestMixin, SynchronousTestCase):
    """stopService: unregister, and leave no timer behind."""

    def test_unregisters(self) -> None:
        """A registered peer unregisters when stopped."""
        self.announcer.startService()
        self.stop()
        self.assertEqual(
            self.relay.requests, [b"REGISTER 4242\n", b"UNREGISTER 4242\n"]
        )
        self.assertIsNone(self.announcer.lease)

    def test_stop_cancels_renewal(self) -> None:
        """The pending renewal timer is cancelled; time passing sends nothing."""
        self.announcer.startService()
        self.stop()
        self.clock.advance(RENEW * 10)
        self.assertEqual(len(self.relay.requests), 2)

    def test_stop_while_retrying(self) -> None:
        """Stopped between retries: the retry timer is cancelled, no
        UNREGISTER (there is no lease)."""
        self.relay.default = "refuse"
        self.announcer.startService()
        self.clock.advance(0.5)
        self.stop()
        self.clock.advance(100)
        self.assertEqual(self.relay.verbs(), [None, None])

    def test_stop_while_registering(self) -> None:
        """
        Stopped while a REGISTER is in flight: it is cancelled (its
        connection aborted, its timeout timer gone) and nothing else is sent.
        """
        self.relay.default = "hang"
        self.announcer.startService()
        self.stop()
        self.assertTrue(self.relay.hanging[0].disconnected)
        self.assertEqual(self.relay.verbs(), ["REGISTER"])

    def test_stop_while_renewing(self) -> None:
        """Stopped mid-renewal: the renewal is cancelled, then UNREGISTER."""
        self.announcer.startService()
        self.relay.script = ["hang"]
        self.clock.advance(RENEW)
        self.stop()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "REGISTER", "UNREGISTER"])

    def test_unregister_refused(self) -> None:
        """An unreachable relay at stop time still lets the service stop."""
        self.announcer.startService()
        self.relay.default = "refuse"
        self.stop()

    def test_unregister_error_reply(self) -> None:
        """An ERR answer to UNREGISTER still lets the service stop."""
        self.announcer.startService()
        self.relay.default = answer(b"ERR 404 unknown\n")
        self.stop()

    def test_unregister_hangs(self) -> None:
        """A relay that never answers UNREGISTER is given up after its timeout."""
        self.announcer.startService()
        self.relay.default = "hang"
        d = self.announcer.stopService()
        self.assertNoResult(d)
        self.clock.advance(UNREGISTER_TIMEOUT_SECONDS)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restart(self) -> None:
        """A stopped announcer can start again and registers anew."""
        self.announcer.startService()
        self.stop()
        self.announcer.startService()
        self.assertEqual(self.relay.verbs(), ["REGISTER", "UNREGISTER", "REGISTER"])
        self.assertEqual(self.next_delay(), RENEW)
        self.stop()


class RelayNamedTests(AnnouncerTestMixin, SynchronousTestCase):
    """A peer may keep leases at several relays (an announcer each): every
    log event of an announcer names its relay."""

    def test_events_name_the_relay(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.announcer = self.make(relay_text="relay2.example:4001")
        self.relay.script = ["refuse"]
        self.announcer.startService()
        self.clock.advance(FIRST_RETRY_SECONDS)
        self.stop()
        formats = [event["log_format"].split(" (")[0] for event in events]
        self.assertEqual(
            formats,
            [
                "relay registration failed",
                "registered at the relay as {peer_id}",
                "unregistered from the relay",
            ],
        )
        self.assertEqual(
            [event["relay"] for event in events], ["relay2.example:4001"] * 3
        )
        self.assertIn("(at relay2.example:4001, ", formatEvent(events[1]))
