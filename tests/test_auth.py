"""
Tests for the relay's optional shared secret (``--token`` / $P2P_TOKEN).

With a token, REGISTER and UNREGISTER must carry ``token=<token>`` or get
``ERR 401``; PEERS too with ``--token-for-queries``.  The comparison is
constant-time, and no token (right, wrong or malformed) ever reaches a log.
Relay connections are StringTransports (the helpers of ``test_relay``); the
peer's side is a real Announcer talking to a real relay protocol in memory.
"""

from __future__ import annotations

import hmac
import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, eventAsJSON, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2p import peer_tap, relay_tap, wire
from p2p import relay as relay_module
from p2p.announce import Announcer
from p2p.limits import MAX_ERRORS_PER_CONNECTION
from p2p.registry import MemoryRegistry
from p2p.relay import Relay, RelayFactory
from p2p.wire import Code

from .test_announce import StubListening
from .test_relay import PEER_B, RelayTestCase
from .test_share import temp_dir
from .test_tap import set_token_environment

TOKEN = "s3cr3t-T0ken/+="
WRONG_TOKENS = [
    "s3cr3t-T0ken/+",  # a prefix
    "s3cr3t-T0ken/+==",  # one character more
    "S3CR3T-t0KEN/+=",  # another case
    "x" * len(TOKEN),  # same length
    "a",
]


class TokenRelayTestCase(RelayTestCase):
    """A relay (as in test_relay) that requires C{TOKEN}."""

    token_for_queries = False

    def setUp(self) -> None:
        super().setUp()
        self.relay = Relay(
            self.registry,
            self.clock,
            ttl=60,
            allow_claimed_host=self.allow_claimed_host,
            token=TOKEN,
            token_for_queries=self.token_for_queries,
        )
        self.factory = RelayFactory(self.relay, self.idle_timeout)

    def assertUnauthorized(self, reply: list[bytes], message: str) -> None:
        self.assertEqual(self.assertError(reply, Code.UNAUTHORIZED), message)


class RegistrationAuthTests(TokenRelayTestCase):
    """REGISTER and UNREGISTER need the token."""

    def test_register_without_token(self) -> None:
        """No token: 401 "token required", nothing registered, link usable."""
        connection = self.connect()
        self.assertUnauthorized(connection.request(b"REGISTER 9000"), "token required")
        self.assertEqual(len(self.registry), 0)
        self.assertTrue(connection.open)

    def test_register_wrong_token(self) -> None:
        """Near misses are all a 401 "wrong token"; nothing is registered."""
        for token in WRONG_TOKENS:
            reply = self.connect().request(f"REGISTER 9000 token={token}".encode())
            self.assertUnauthorized(reply, "wrong token")
        self.assertEqual(len(self.registry), 0)

    def test_register_malformed_token(self) -> None:
        """A token the wire cannot carry is a 400, not a 401."""
        reply = self.connect().request(b"REGISTER 9000 token=a;b")
        self.assertError(reply, Code.BAD_REQUEST)
        self.assertEqual(len(self.registry), 0)

    def test_register_right_token(self) -> None:
        """The right token registers (and renews) as usual."""
        connection = self.connect()
        line = f"REGISTER 9000 name=box token={TOKEN}".encode()
        first = self.register(connection, line)
        self.assertEqual(first.peer_id, wire.peer_id_for("10.0.0.5", 9000))
        self.assertEqual(self.register(connection, line), first)
        self.assertEqual(len(self.registry), 1)

    def test_unregister_needs_token(self) -> None:
        """
        UNREGISTER without or with a wrong token is a 401 and the lease
        stays; with the token it ends.
        """
        reply = self.register(self.connect(), f"REGISTER 9000 token={TOKEN}".encode())
        connection = self.connect()
        self.assertUnauthorized(
            connection.request(b"UNREGISTER 9000"), "token required"
        )
        self.assertUnauthorized(
            connection.request(f"UNREGISTER 9000 token={WRONG_TOKENS[0]}".encode()),
            "wrong token",
        )
        self.assertEqual(len(self.registry), 1)
        self.assertEqual(
            connection.request(f"UNREGISTER 9000 token={TOKEN}".encode()),
            [f"OK {reply.peer_id}".encode()],
        )
        self.assertEqual(len(self.registry), 0)

    def test_checked_first(self) -> None:
        """
        Without the token a client learns nothing else: not whether host=
        is allowed (403), nor whether a lease exists (404).
        """
        connection = self.connect()
        self.assertUnauthorized(
            connection.request(b"REGISTER 9000 host=192.0.2.1"), "token required"
        )
        self.assertUnauthorized(
            connection.request(b"UNREGISTER 9000 token=guess"), "wrong token"
        )

    def test_peers_open(self) -> None:
        """Without --token-for-queries PEERS needs no token (one is ignored)."""
        self.register(self.connect(), f"REGISTER 9000 token={TOKEN}".encode())
        self.assertEqual(len(self.peers()), 1)
        reply = self.connect(PEER_B).request(b"PEERS token=wrong")
        self.assertEqual(reply[0], b"OK 1")

    def test_guessing_stopped(self) -> None:
        """
        One connection cannot be used to try tokens without end: after ten
        refusals it gets ERR 429 and is closed.
        """
        connection = self.connect()
        lines = (
            b"".join(b"REGISTER 9000 token=guess%d\n" % n for n in range(1000))
            + f"REGISTER 9000 token={TOKEN}\n".encode()
        )
        reply = connection.send(lines)
        self.assertEqual(len(reply), MAX_ERRORS_PER_CONNECTION + 1)
        self.assertEqual(reply[-1], b"ERR 429 too many errors")
        self.assertFalse(connection.open)
        self.assertEqual(len(self.registry), 0)

    def test_constant_time_comparison(self) -> None:
        """The token is compared with hmac.compare_digest, on bytes."""
        calls = []
        real = hmac.compare_digest

        def compare_digest(a, b):
            calls.append((a, b))
            return real(a, b)

        self.patch(relay_module.hmac, "compare_digest", compare_digest)
        self.connect().request(b"REGISTER 9000 token=guess")
        self.register(self.connect(), f"REGISTER 9000 token={TOKEN}".encode())
        self.assertEqual(
            calls, [(b"guess", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]
        )


class ClaimedHostAuthTests(TokenRelayTestCase):
    """Behind a trusted proxy, claimed hosts and tokens work together."""

    allow_claimed_host = True

    def test_claimed_host_with_token(self) -> None:
        """REGISTER and UNREGISTER with host= and the token."""
        line = f"REGISTER 9000 host=192.0.2.1 token={TOKEN}".encode()
        reply = self.register(self.connect(), line)
        connection = self.connect(PEER_B)
        self.assertUnauthorized(
            connection.request(b"UNREGISTER 9000 host=192.0.2.1"), "token required"
        )
        self.assertEqual(
            connection.request(
                f"UNREGISTER 9000 host=192.0.2.1 token={TOKEN}".encode()
            ),
            [f"OK {reply.peer_id}".encode()],
        )


class QueryAuthTests(TokenRelayTestCase):
    """With token_for_queries, PEERS needs the token as well."""

    token_for_queries = True

    def test_peers_needs_token(self) -> None:
        self.register(self.connect(), f"REGISTER 9000 token={TOKEN}".encode())
        connection = self.connect(PEER_B)
        self.assertUnauthorized(connection.request(b"PEERS"), "token required")
        self.assertUnauthorized(
            connection.request(f"PEERS token={WRONG_TOKENS[1]}".encode()),
            "wrong token",
        )
        reply = connection.request(f"PEERS token={TOKEN}".encode())
        self.assertEqual(reply[0], b"OK 1")
        self.assertEqual(
            wire.PeerEntry.from_line(reply[1]).peer_id,
            wire.peer_id_for("10.0.0.5", 9000),
        )

    def test_needs_a_token(self) -> None:
        """Asking for query auth without a token is a programming error."""
        self.assertRaises(
            ValueError, Relay, self.registry, self.clock, token_for_queries=True
        )


class NoTokenTests(RelayTestCase):
    """Without a token nothing is checked, whatever a client sends."""

    def test_tokens_ignored(self) -> None:
        self.assertFalse(self.relay.requires_token)
        self.register(self.connect(), b"REGISTER 9000")
        self.register(self.connect(PEER_B), b"REGISTER 9001 token=anything")
        reply = self.connect().request(b"UNREGISTER 9000 token=whatever")
        self.assertTrue(reply[0].startswith(b"OK "))


class LoggingTests(TokenRelayTestCase):
    """No token ever appears in a log event, however it is rendered."""

    def setUp(self) -> None:
        super().setUp()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def assertNotLogged(self, *secrets: str) -> None:
        """No event, as text or JSON (twist's format), nor its repr, holds one."""
        self.assertTrue(self.events)
        for event in self.events:
            renderings = [formatEvent(event), eventAsJSON(event), repr(event)]
            for secret in secrets:
                for rendering in renderings:
                    self.assertNotIn(secret, rendering)

    def test_wrong_token_logged_without_value(self) -> None:
        """
        A refused token is logged as a warning saying 401, without the value
        sent (nor the relay's own token).
        """
        guess = "my-guess-0123"
        self.connect().request(f"REGISTER 9000 token={guess}".encode())
        [event] = [
            event
            for event in self.events
            if event.get("log_namespace") == "p2p.limits.RefusalLog"
        ]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn("401", formatEvent(event))
        self.assertNotLogged(guess, TOKEN)

    def test_right_token_not_logged(self) -> None:
        """A successful registration, renewal, query and unregistration."""
        connection = self.connect()
        self.register(connection, f"REGISTER 9000 name=box token={TOKEN}".encode())
        self.register(connection, f"REGISTER 9000 name=box token={TOKEN}".encode())
        self.peers()
        connection.request(f"UNREGISTER 9000 token={TOKEN}".encode())
        self.assertNotLogged(TOKEN)

    def test_malformed_or_misspelt_token_not_logged(self) -> None:
        """Refusals of broken requests do not quote the secret either."""
        for line in [
            f"REGISTER 9000 token={TOKEN};",
            f"REGISTER 9000 tokn={TOKEN}",
            f"REGISTER 9000 token={TOKEN} token={TOKEN}",
            f"UNREGISTER 9000 Token={TOKEN}",
            f"PEERS toke={TOKEN}",
            f"REGISTER x token={TOKEN}",
        ]:
            self.assertError(self.connect().request(line.encode()), Code.BAD_REQUEST)
        self.assertNotLogged(TOKEN)


class TapTokenTests(SynchronousTestCase):
    """--token, or $P2P_TOKEN when it is absent, for both daemons."""

    def setUp(self) -> None:
        set_token_environment(self, None)
        self.share = temp_dir(self)

    def relay_token(self, *argv: str) -> str | None:
        config = relay_tap.Options()
        config.parseOptions(list(argv))
        return config["token"]

    def peer_token(self, *argv: str) -> str | None:
        config = peer_tap.Options()
        config.parseOptions(["--share", self.share, *argv])
        return config["token"]

    def test_no_token(self) -> None:
        """Neither option nor environment: no token."""
        self.assertIsNone(self.relay_token())
        self.assertIsNone(self.peer_token())

    def test_environment(self) -> None:
        """$P2P_TOKEN is used when --token is absent."""
        set_token_environment(self, "from-env")
        self.assertEqual(self.relay_token(), "from-env")
        self.assertEqual(self.peer_token(), "from-env")
        config = relay_tap.Options()
        config.parseOptions(["--token-for-queries"])
        self.assertTrue(config["token-for-queries"])

    def test_option_wins(self) -> None:
        """--token beats the environment."""
        set_token_environment(self, "from-env")
        self.assertEqual(self.relay_token("--token", "opt"), "opt")
        self.assertEqual(self.peer_token("--token", "opt"), "opt")

    def test_empty_environment(self) -> None:
        """An empty $P2P_TOKEN means no token."""
        set_token_environment(self, "")
        self.assertIsNone(self.relay_token())
        self.assertIsNone(self.peer_token())
        config = relay_tap.Options()
        self.assertRaises(
            usage.UsageError, config.parseOptions, ["--token-for-queries"]
        )

    def test_malformed_not_repeated(self) -> None:
        """A token the wire cannot carry is a usage error that does not echo it."""
        for argv in (["--token", "bad secret"], []):
            set_token_environment(self, "bad secret")
            for parse in (self.relay_token, self.peer_token):
                error = self.assertRaises(usage.UsageError, parse, *argv)
                self.assertNotIn("bad secret", str(error))


class RelayEndpoint:
    """A client endpoint that connects, in memory, to a real relay factory."""

    def __init__(self, factory: RelayFactory, clock: Clock) -> None:
        self.factory = factory
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []

    def connect(self, client_factory):
        source = IPv4Address("TCP", "10.0.0.5", 50000)
        server = self.factory.buildProtocol(source)
        client = client_factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 8000))
        self.pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, isServer=True, peerAddress=source),
                client,
                iosim.makeFakeClient(client),
                greet=False,
                clock=self.clock,
            )
        )
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


class AnnouncerTokenTests(SynchronousTestCase):
    """The peer's Announcer against a relay that requires a token."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = MemoryRegistry(60)
        relay = Relay(self.registry, self.clock, ttl=60, token=TOKEN)
        self.endpoint = RelayEndpoint(RelayFactory(relay, 30), self.clock)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def announcer(self, token: str | None) -> Announcer:
        announcer = Announcer(
            self.endpoint, StubListening(), self.clock, token=token, jitter=lambda: 0
        )
        announcer.startService()
        self.endpoint.flush()
        return announcer

    def stop(self, announcer: Announcer) -> None:
        d = announcer.stopService()
        self.endpoint.flush()
        self.successResultOf(d)

    def test_right_token(self) -> None:
        """With the relay's token the peer registers, and unregisters on stop."""
        announcer = self.announcer(TOKEN)
        self.assertIsNotNone(announcer.lease)
        self.assertEqual(len(self.registry), 1)
        self.stop(announcer)
        self.assertEqual(len(self.registry), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wrong_token(self) -> None:
        """
        A wrong token is refused; the peer logs an error (without either
        token), keeps retrying, and never registers.
        """
        announcer = self.announcer("not-the-token")
        self.assertIsNone(announcer.lease)
        self.assertEqual(len(self.registry), 0)
        errors = [
            event
            for event in self.events
            if event.get("log_namespace") == "p2p.announce.Announcer"
            and event["log_level"] == LogLevel.error
        ]
        self.assertEqual(len(errors), 1)
        self.assertIn("401", formatEvent(errors[0]))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "the retry")
        for event in self.events:
            text = formatEvent(event) + json.dumps(json.loads(eventAsJSON(event)))
            self.assertNotIn("not-the-token", text)
            self.assertNotIn(TOKEN, text)
        self.stop(announcer)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_token(self) -> None:
        """A peer without a token is refused the same way."""
        announcer = self.announcer(None)
        self.assertIsNone(announcer.lease)
        self.assertEqual(len(self.registry), 0)
        self.stop(announcer)
