"""Tests for L{p2p.endpoints}: user-typed addresses to Twisted endpoints."""

from __future__ import annotations

from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2p import endpoints
from p2p.endpoints import (
    DEFAULT_BACKLOG,
    DEFAULT_RELAY,
    check_client,
    check_server,
    client_description,
    client_endpoint,
    relays_from_environment,
    server_description,
    server_endpoint,
    with_default_backlog,
)

from ._support import set_relay_environment


class ClientDescriptionTests(SynchronousTestCase):
    def test_host_port(self) -> None:
        self.assertEqual(
            client_description("relay.example:4001"),
            "tcp:host=relay.example:port=4001",
        )

    def test_ipv4_host_port(self) -> None:
        self.assertEqual(
            client_description("127.0.0.1:8000"), "tcp:host=127.0.0.1:port=8000"
        )

    def test_bracketed_ipv6(self) -> None:
        """The colons of an IPv6 literal are escaped for the endpoint parser."""
        self.assertEqual(client_description("[::1]:8000"), r"tcp:host=\:\:1:port=8000")

    def test_bare_port_is_localhost(self) -> None:
        self.assertEqual(client_description("8000"), "tcp:host=127.0.0.1:port=8000")

    def test_surrounding_space_ignored(self) -> None:
        self.assertEqual(client_description(" 8000\n"), "tcp:host=127.0.0.1:port=8000")

    def test_endpoint_strings_pass_through(self) -> None:
        for text in (
            "tcp:relay.example:4001",
            "tcp:host=127.0.0.1:port=1",
            "unix:/run/p2p.sock",
            r"tcp6:host=\:\:1:port=4001",
        ):
            self.assertEqual(client_description(text), text)

    def test_port_out_of_range(self) -> None:
        for text in ("0", "65536", "99999", "host:0", "host:70000", "[::1]:65536"):
            with self.assertRaises(ValueError, msg=text):
                client_description(text)

    def test_non_ascii_digits_are_not_a_port(self) -> None:
        """C{\\d} would accept U+0663; such text is left to the endpoint parser."""
        self.assertEqual(client_description("\u0663"), "\u0663")
        self.assertRaises(ValueError, check_client, "\u0663")


class RelayIdentityTests(SynchronousTestCase):
    """One spelling per relay, however it was typed."""

    def test_tcp_spellings_agree(self) -> None:
        spellings = [
            "127.0.0.1:8000",
            "tcp:127.0.0.1:8000",
            "tcp:host=127.0.0.1:port=8000",
            "TCP:127.0.0.1:08000:timeout=3",
            "tcp:port=8000:host=127.0.0.1",
        ]
        self.assertEqual(
            {endpoints.relay_identity(text) for text in spellings},
            {"tcp:host=127.0.0.1:port=8000"},
        )

    def test_ipv6(self) -> None:
        self.assertEqual(
            endpoints.relay_identity("[::1]:8000"),
            endpoints.relay_identity("tcp:host=\\:\\:1:port=8000"),
        )

    def test_others_are_their_own(self) -> None:
        """Different relays stay different; other kinds are left as typed."""
        self.assertNotEqual(
            endpoints.relay_identity("127.0.0.1:8000"),
            endpoints.relay_identity("127.0.0.1:8001"),
        )
        for text in ("tls:host=a:port=1", "unix:/tmp/relay.sock", "tcp:nohost"):
            self.assertEqual(endpoints.relay_identity(text), text)


class ServerDescriptionTests(SynchronousTestCase):
    def test_bare_port(self) -> None:
        self.assertEqual(server_description("8000"), "tcp:8000")
        self.assertEqual(server_description("0"), "tcp:0")

    def test_endpoint_string(self) -> None:
        text = r"tcp6:0:interface=\:\:1"
        self.assertEqual(server_description(text), text)

    def test_port_out_of_range(self) -> None:
        self.assertRaises(ValueError, server_description, "65536")


class EndpointTests(SynchronousTestCase):
    """Descriptions become endpoints that connect or listen where asked."""

    def test_client_host_port_connects_there(self) -> None:
        reactor = MemoryReactorClock()
        endpoint = client_endpoint(reactor, "relay.example:4001")
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        endpoint.connect(Factory.forProtocol(Protocol))
        host, port = reactor.tcpClients[0][:2]
        self.assertEqual((host, port), ("relay.example", 4001))

    def test_client_ipv6_connects_to_ipv6(self) -> None:
        reactor = MemoryReactorClock()
        client_endpoint(reactor, "[::1]:4001").connect(Factory.forProtocol(Protocol))
        self.assertEqual(reactor.tcpClients[0][:2], ("::1", 4001))

    def test_client_bare_port(self) -> None:
        reactor = MemoryReactorClock()
        client_endpoint(reactor, "4001").connect(Factory.forProtocol(Protocol))
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 4001))

    def test_client_unix(self) -> None:
        endpoint = client_endpoint(MemoryReactorClock(), "unix:/run/p2p.sock")
        self.assertIsInstance(endpoint, UNIXClientEndpoint)

    def test_server_bare_port(self) -> None:
        reactor = MemoryReactorClock()
        endpoint = server_endpoint(reactor, "8000")
        self.assertIsInstance(endpoint, TCP4ServerEndpoint)
        endpoint.listen(Factory.forProtocol(Protocol))
        port, _, _, interface = reactor.tcpServers[0]
        self.assertEqual((port, interface), (8000, ""))

    def test_server_default_backlog(self) -> None:
        """TCP listeners get a backlog of DEFAULT_BACKLOG (511), not
        Twisted's 50, unless the description names one."""
        reactor = MemoryReactorClock()
        for text, backlog in [
            ("8000", DEFAULT_BACKLOG),
            ("tcp:0:interface=127.0.0.1", DEFAULT_BACKLOG),
            (r"tcp6:0:interface=\:\:1", DEFAULT_BACKLOG),
            ("tcp:0:backlog=7", 7),
        ]:
            server_endpoint(reactor, text).listen(Factory.forProtocol(Protocol))
            self.assertEqual(reactor.tcpServers[-1][2], backlog, text)
        self.assertEqual(DEFAULT_BACKLOG, 511)
        self.assertEqual(
            with_default_backlog("unix:/run/p2p.sock"), "unix:/run/p2p.sock"
        )

    def test_server_ipv6_interface(self) -> None:
        reactor = MemoryReactorClock()
        endpoint = server_endpoint(reactor, r"tcp6:0:interface=\:\:1")
        self.assertIsInstance(endpoint, TCP6ServerEndpoint)
        endpoint.listen(Factory.forProtocol(Protocol))
        port, _, _, interface = reactor.tcpServers[0]
        self.assertEqual((port, interface), (0, "::1"))

    def test_bad_descriptions_raise_readable_value_errors(self) -> None:
        for text in ("bogus:x", "tcp:nohost", "tcp:a:b", "host:99999"):
            with self.assertRaises(ValueError) as caught:
                client_endpoint(MemoryReactorClock(), text)
            self.assertIn(repr(text), str(caught.exception))
        for text in ("bogus:x", "tcp:abc", "99999"):
            with self.assertRaises(ValueError) as caught:
                server_endpoint(MemoryReactorClock(), text)
            self.assertIn(repr(text), str(caught.exception))

    def test_missing_parameter_named(self) -> None:
        """A description without a required parameter says which, not the
        parser's TypeError ("__init__() missing 1 required positional
        argument: 'port'")."""
        for text, missing in (("tcp:host=127.0.0.1", "port"), ("tcp:port=1", "host")):
            with self.assertRaises(ValueError) as caught:
                client_endpoint(MemoryReactorClock(), text)
            self.assertEqual(
                str(caught.exception), f"bad endpoint {text!r}: no {missing}= given"
            )

    def test_checks_need_no_reactor(self) -> None:
        check_client("127.0.0.1:8000")
        check_client("[::1]:8000")
        check_server("tcp:0:interface=127.0.0.1")
        self.assertRaises(ValueError, check_client, "bogus:x")
        self.assertRaises(ValueError, check_server, "tcp:abc")


class EnvironmentTests(SynchronousTestCase):
    """The relays: explicit options, then $P2P_RELAY (a comma-separated
    list), then the default."""

    def test_default(self) -> None:
        set_relay_environment(self, None)
        self.assertEqual(relays_from_environment(), [DEFAULT_RELAY])
        self.assertEqual(relays_from_environment([]), ["tcp:127.0.0.1:8000"])

    def test_environment_beats_default(self) -> None:
        set_relay_environment(self, "relay.example:4001")
        self.assertEqual(relays_from_environment(), ["relay.example:4001"])

    def test_environment_list(self) -> None:
        """Commas separate relays; blanks around them and empty entries are
        dropped, a repeat too (the first place stays)."""
        set_relay_environment(self, " a.example:1 ,tcp:b.example:2,,a.example:1,")
        self.assertEqual(relays_from_environment(), ["a.example:1", "tcp:b.example:2"])

    def test_explicit_beats_environment(self) -> None:
        set_relay_environment(self, "relay.example:4001,other.example:4001")
        self.assertEqual(relays_from_environment(["10.0.0.1:9"]), ["10.0.0.1:9"])
        self.assertEqual(
            relays_from_environment(["10.0.0.1:9", "4001", "10.0.0.1:9"]),
            ["10.0.0.1:9", "4001"],
        )

    def test_empty_environment_is_unset(self) -> None:
        set_relay_environment(self, "")
        self.assertEqual(relays_from_environment(), [DEFAULT_RELAY])
        set_relay_environment(self, " , ")
        self.assertEqual(relays_from_environment(), [DEFAULT_RELAY])

    def test_variable_name(self) -> None:
        self.assertEqual(endpoints.RELAY_ENVIRONMENT_VARIABLE, "P2P_RELAY")
