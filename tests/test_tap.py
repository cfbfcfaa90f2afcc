"""Tests for the twistd tap modules: Options parsing and makeService trees."""

from __future__ import annotations

import os

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from p2p import daemon, peer_tap, relay_tap, wire
from p2p.announce import (
    FILTER_REFRESH_SECONDS,
    UNREGISTER_TIMEOUT_SECONDS,
    Announcer,
)
from p2p.endpoints import DEFAULT_RELAY
from p2p.hints import build_filter
from p2p.limits import ConnectionLimits
from p2p.peer import PeerFactory
from p2p.relay import RelayFactory
from p2p.service import ListenFailed, ListeningService, PortFileService
from p2p.throttle import TokenBucket
from p2p.wire import TOKEN_ENVIRONMENT_VARIABLE

from ._support import set_environment, set_relay_environment

PEER_ID = "0123456789abcdef"


def parse_relay(*argv: str) -> relay_tap.Options:
    config = relay_tap.Options()
    config.parseOptions(list(argv))
    return config


def children(parent: MultiService, kind: type) -> list:
    return [service for service in parent if isinstance(service, kind)]


def set_token_environment(case: SynchronousTestCase, value: str | None) -> None:
    """Set (or unset, for C{None}) $P2P_TOKEN for the duration of C{case}."""
    set_environment(case, TOKEN_ENVIRONMENT_VARIABLE, value)


def fake_descriptor_limit(case: SynchronousTestCase, soft: int, hard: int) -> list[int]:
    """
    Stand in for the process's RLIMIT_NOFILE for the duration of C{case}
    (the daemons raise it at start): the returned [soft, hard] follows
    setrlimit, which refuses a soft limit above the hard one, as the
    kernel does.
    """
    import resource

    limits = [soft, hard]

    def setrlimit(which: int, wanted: tuple[int, int]) -> None:
        if wanted[0] > wanted[1]:
            raise ValueError("not allowed")
        limits[:] = wanted

    case.patch(resource, "getrlimit", lambda which: tuple(limits))
    case.patch(resource, "setrlimit", setrlimit)
    return limits


def activity_reports(events: list[dict]) -> list[dict]:
    """The relay's activity summaries among logged C{events}."""
    return [
        event for event in events if event.get("log_format", "").startswith("activity:")
    ]


# The options both servers take, with their defaults.
CONNECTION_DEFAULTS = {
    "max-connections": 10_000,
    "max-connections-per-host": 32,
    "max-connections-per-network": 256,
    "first-request-timeout": 5.0,
    "max-connection-lifetime": 300.0,
    "max-requests-per-connection": 1000,
}


class RelayOptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        set_token_environment(self, None)

    def test_defaults(self) -> None:
        self.assertEqual(
            dict(parse_relay()),
            {
                "listen": ["tcp:8000"],
                "ttl": 60,
                "renew": 20,
                "idle-timeout": 30,
                "max-peers": 100_000,
                "max-per-host": 64,
                "max-per-network": 256,
                **CONNECTION_DEFAULTS,
                "requests-per-second": 20.0,
                "network-requests-per-second": 100.0,
                "name-queries-per-second": 200.0,
                "dial-back-timeout": 3.0,
                "no-dial-back": 0,
                "token": None,
                "registry": None,
                "registry-prefix": "p2p:",
                "registry-ca": None,
                "redis": None,
                "port-file": None,
                "metrics": None,
                "report-interval": 60.0,
                "allow-claimed-host": 0,
                "token-for-queries": 0,
            },
        )

    def test_limits_and_token(self) -> None:
        """The connection limits and the token options are parsed."""
        config = parse_relay(
            "--max-connections",
            "10",
            "--max-connections-per-host",
            "0",
            "--token",
            "s3cr/t+=",
            "--token-for-queries",
        )
        self.assertEqual(
            (config["max-connections"], config["max-connections-per-host"]), (10, 0)
        )
        self.assertEqual(config["token"], "s3cr/t+=")
        self.assertTrue(config["token-for-queries"])

    def test_seed_port_argument(self) -> None:
        """``twistd relay 8000`` is the seed's spelling of ``--listen tcp:8000``."""
        self.assertEqual(parse_relay("9001")["listen"], ["tcp:9001"])

    def test_listen_repeatable(self) -> None:
        config = parse_relay(
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "-l",
            r"tcp6:0:interface=\:\:1",
            "--listen=7000",
        )
        self.assertEqual(
            config["listen"],
            ["tcp:0:interface=127.0.0.1", r"tcp6:0:interface=\:\:1", "tcp:7000"],
        )

    def test_listen_and_port_argument_combine(self) -> None:
        self.assertEqual(
            parse_relay("--listen", "tcp:7000", "8000")["listen"],
            ["tcp:7000", "tcp:8000"],
        )

    def test_ttl_sets_default_renew(self) -> None:
        config = parse_relay("--ttl", "9")
        self.assertEqual((config["ttl"], config["renew"]), (9, 3))
        config = parse_relay("--ttl", "1")
        self.assertEqual((config["ttl"], config["renew"]), (1, 1))

    def test_explicit_values(self) -> None:
        config = parse_relay(
            "--ttl",
            "30",
            "--renew",
            "5",
            "--idle-timeout",
            "2.5",
            "--max-peers",
            "10",
            "--max-per-host",
            "0",
            "--port-file",
            "relay.port",
            "--allow-claimed-host",
        )
        self.assertEqual(config["renew"], 5)
        self.assertEqual(config["idle-timeout"], 2.5)
        self.assertEqual((config["max-peers"], config["max-per-host"]), (10, 0))
        self.assertEqual(config["port-file"], "relay.port")
        self.assertTrue(config["allow-claimed-host"])

    def test_bad_values(self) -> None:
        for argv in (
            ["abc"],
            ["80a"],
            ["\u0663"],
            ["65536"],
            ["1", "2"],
            ["--ttl", "x"],
            ["--ttl", "0"],
            ["--renew", "0"],
            ["--ttl", "60", "--renew", "61"],
            ["--idle-timeout", "0"],
            ["--idle-timeout", "soon"],
            ["--report-interval", "-1"],
            ["--report-interval", "hourly"],
            ["--max-peers", "many"],
            ["--max-peers", "-1"],
            ["--max-per-host", "-1"],
            ["--name-queries-per-second", "-1"],
            ["--name-queries-per-second", "many"],
            ["--max-connections", "-1"],
            ["--max-connections", "lots"],
            ["--max-connections-per-host", "-5"],
            ["--token", "two words"],
            ["--token", "t" * 257],
            ["--token-for-queries"],
            ["--listen", "bogus:x"],
            ["--listen", "tcp:abc"],
            ["--listen", "99999"],
            ["--no-such-option"],
        ):
            with self.assertRaises(usage.UsageError, msg=argv):
                parse_relay(*argv)

    def test_help(self) -> None:
        text = str(relay_tap.Options())
        for fragment in (
            "--listen",
            "--ttl",
            "--port-file",
            "[PORT]",
            "lease",
            "--max-connections",
            "--max-connections-per-host",
            "--token",
            "--token-for-queries",
            "$P2P_TOKEN",
        ):
            self.assertIn(fragment, text)


class RelayServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        set_token_environment(self, None)

    def make(self, *argv: str) -> tuple[MultiService, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        return relay_tap.makeService(parse_relay(*argv), reactor), reactor

    def test_children(self) -> None:
        service, reactor = self.make()
        self.assertIsInstance(service, MultiService)
        self.assertEqual(len(children(service, ListeningService)), 1)
        self.assertEqual(len(children(service, TimerService)), 2)
        self.assertEqual(children(service, PortFileService), [])
        self.assertEqual(len(children(service, relay_tap.DialBackService)), 1)
        self.assertEqual(len(list(service)), 4)

    def test_no_dial_back(self) -> None:
        """--no-dial-back: no probes, every lease listed in registration
        order."""
        service, _ = self.make("--no-dial-back")
        self.assertEqual(children(service, relay_tap.DialBackService), [])
        relay = children(service, ListeningService)[0].factory.relay
        self.assertIsNone(relay.dialback)

    def test_reserve_is_for_verified_leases(self) -> None:
        """
        The connection reserve is for addresses whose lease a dial-back
        verified: one unverified lease per attacking address took all of
        it (e2).  Without dial-backs any lease counts.
        """
        service, _ = self.make()
        factory = children(service, ListeningService)[0].factory
        registry = factory.relay.registry
        registry.register("10.1.0.1", 30000, None, 0.0)
        registry.register("10.2.0.1", 9999, None, 0.0)
        registry.mark_verified("10.2.0.1", 9999)
        self.assertFalse(factory.limits.is_member("10.1.0.1"))
        self.assertTrue(factory.limits.is_member("10.2.0.1"))
        service, _ = self.make("--no-dial-back")
        factory = children(service, ListeningService)[0].factory
        factory.relay.registry.register("10.1.0.1", 30000, None, 0.0)
        self.assertTrue(factory.limits.is_member("10.1.0.1"))

    def test_descriptor_budget(self) -> None:
        """A relay's connection holds its socket alone; the dial-backs
        (a socket each, as many as run at once) are kept room for apart."""
        limits = fake_descriptor_limit(self, 1024, 1024)
        service, _ = self.make()
        factory = children(service, ListeningService)[0].factory
        probes = factory.relay.dialback.concurrency
        self.assertEqual(
            factory.limits.max_total, 1024 - daemon.SPARE_DESCRIPTORS - probes
        )
        service, _ = self.make("--no-dial-back")
        factory = children(service, ListeningService)[0].factory
        self.assertEqual(factory.limits.max_total, 1024 - daemon.SPARE_DESCRIPTORS)
        limits[:] = [1024, 1_000_000]
        service, _ = self.make()
        self.assertEqual(limits[0], 10_000 + probes + daemon.SPARE_DESCRIPTORS)

    def test_hostile_network_defaults(self) -> None:
        """The request budget, the guess brake (with a token), the reserve
        for registered peers and the connection policy are on by default."""
        service, _ = self.make("--token", "abc")
        factory = children(service, ListeningService)[0].factory
        relay = factory.relay
        self.assertEqual(
            (relay.budget.sources.rate, relay.budget.networks.rate), (20.0, 100.0)
        )
        self.assertIsNotNone(relay.brake)
        self.assertIsNotNone(relay.dialback)
        self.assertEqual(factory.limits.reserve, 1000)
        self.assertIs(relay.refusals, factory.policy.refusals)
        self.assertEqual(factory.policy.first_request.timeout, 5.0)
        self.assertEqual(
            (factory.policy.max_lifetime, factory.policy.max_requests), (300.0, 1000)
        )
        service, _ = self.make(
            "--requests-per-second", "0", "--network-requests-per-second", "0"
        )
        self.assertIsNone(children(service, ListeningService)[0].factory.relay.budget)

    def test_listens_on_every_endpoint(self) -> None:
        service, reactor = self.make(
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--listen",
            r"tcp6:0:interface=\:\:1",
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(
            [(port, interface) for port, _, _, interface in reactor.tcpServers],
            [(0, "127.0.0.1"), (0, "::1")],
        )
        factories = {id(factory) for _, factory, _, _ in reactor.tcpServers}
        self.assertEqual(len(factories), 1, "one RelayFactory shared by listeners")
        self.assertIsInstance(reactor.tcpServers[0][1], RelayFactory)

    def test_seed_port(self) -> None:
        service, reactor = self.make("8000")
        service.startService()
        self.addCleanup(service.stopService)
        port, _, _, interface = reactor.tcpServers[0]
        self.assertEqual((port, interface), (8000, ""))

    def test_reactor_threaded_into_relay(self) -> None:
        service, reactor = self.make("--ttl", "8", "--idle-timeout", "4")
        factory = children(service, ListeningService)[0].factory
        self.assertIs(factory.relay.clock, reactor)
        self.assertEqual((factory.relay.ttl, factory.relay.renew), (8, 2))
        self.assertEqual(factory.idle_timeout, 4.0)

    def test_connection_limits(self) -> None:
        """The listeners' factory counts connections with the options' limits."""
        service, reactor = self.make(
            "--max-connections", "7", "--max-connections-per-host", "3"
        )
        limits = children(service, ListeningService)[0].factory.limits
        self.assertEqual((limits.max_total, limits.max_per_host), (7, 3))
        service, reactor = self.make()
        limits = children(service, ListeningService)[0].factory.limits
        self.assertEqual((limits.max_total, limits.max_per_host), (10_000, 32))

    def test_token_threaded_into_relay(self) -> None:
        """--token and --token-for-queries reach the Relay policy."""
        service, _ = self.make("--token", "abc", "--token-for-queries")
        relay = children(service, ListeningService)[0].factory.relay
        self.assertTrue(relay.requires_token)
        self.assertTrue(relay.token_for_queries)
        service, _ = self.make()
        relay = children(service, ListeningService)[0].factory.relay
        self.assertFalse(relay.requires_token)
        self.assertFalse(relay.token_for_queries)

    def test_sweeper_runs_on_the_clock(self) -> None:
        """Expired leases are swept by a TimerService on the injected clock."""
        service, reactor = self.make("--ttl", "8", "--report-interval", "0")
        (sweeper,) = children(service, TimerService)
        self.assertIs(sweeper, service.getServiceNamed("expiry"))
        self.assertIs(sweeper.clock, reactor)
        self.assertEqual(sweeper.step, relay_tap.expiry_period(8))
        registry = children(service, ListeningService)[0].factory.relay.registry
        registry.register("127.0.0.1", 9000, None, reactor.seconds())
        service.startService()
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        reactor.advance(7.9)
        self.assertEqual(len(registry), 1)
        reactor.advance(sweeper.step)
        self.assertEqual(len(registry), 0)
        self.successResultOf(service.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertIsNone(children(service, ListeningService)[0].port)

    def test_activity_report_on_the_clock(self) -> None:
        """The activity summary is logged every --report-interval seconds."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service, reactor = self.make("--report-interval", "10")
        reporter = service.getServiceNamed("activity report")
        self.assertIs(reporter.clock, reactor)
        relay = children(service, ListeningService)[0].factory.relay
        service.startService()
        relay.register(wire.Register(port=9000), "127.0.0.1")
        reactor.advance(9.9)
        self.assertEqual(activity_reports(events), [])
        reactor.advance(0.1)
        [report] = activity_reports(events)
        self.assertEqual((report["registered"], report["active"]), (1, 1))
        self.successResultOf(service.stopService())

    def test_no_activity_report(self) -> None:
        """--report-interval 0: no reporter."""
        service, _ = self.make("--report-interval", "0")
        self.assertEqual(len(children(service, TimerService)), 1)
        self.assertRaises(KeyError, service.getServiceNamed, "activity report")

    def test_demo_relay_has_no_activity_line(self) -> None:
        """The demo's relay reports no activity once a minute: the line
        would land on the client's prompt (the narrator shows the events)."""
        from p2p.demo import DEMO_RELAY_OPTIONS

        service, _ = self.make(*DEMO_RELAY_OPTIONS)
        self.assertRaises(KeyError, service.getServiceNamed, "activity report")
        self.assertEqual(len(children(service, TimerService)), 1)  # expiry

    def test_port_file(self) -> None:
        path = self.mktemp()
        service, reactor = self.make(
            "--listen", "tcp:7001", "--listen", "tcp:7002", "--port-file", path
        )
        self.assertEqual(len(children(service, PortFileService)), 1)
        service.startService()
        with open(path) as stream:
            # MemoryReactor's fake ports report 0.0.0.0 for IPv4 listeners.
            self.assertEqual(stream.read(), "0.0.0.0 7001\n0.0.0.0 7002\n")
        self.successResultOf(service.stopService())
        self.assertFalse(os.path.exists(path))

    def test_bad_endpoint_from_config_is_usage_error(self) -> None:
        config = parse_relay()
        config["listen"] = ["bogus:x"]
        self.assertRaises(
            usage.UsageError, relay_tap.makeService, config, MemoryReactorClock()
        )

    def test_listen_failure_is_raised_at_startup(self) -> None:
        """A port in use stops twistd at startup instead of being only logged."""

        class Busy(MemoryReactorClock):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                raise CannotListenError(interface, port, OSError("in use"))

        service = relay_tap.makeService(parse_relay("8000"), Busy())
        error = self.assertRaises(ListenFailed, service.startService)
        self.assertIsInstance(error, SystemExit)
        self.assertEqual(str(error), "twistd relay: cannot listen on *:8000: in use")
        self.assertFalse(children(service, ListeningService)[0].running)


class PeerOptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        set_relay_environment(self, None)
        set_token_environment(self, None)
        # Where indexes go by default: never the real home folder in tests.
        self.state_home = os.path.abspath(self.mktemp())
        set_environment(self, "XDG_STATE_HOME", self.state_home)
        self.share = self.mktemp()
        os.mkdir(self.share)

    def parse(self, *argv: str) -> peer_tap.Options:
        config = peer_tap.Options()
        config.parseOptions(["--share", self.share, *argv])
        return config

    def share_file(self) -> str:
        """A regular file outside the share."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb"):
            pass
        return path

    def test_defaults(self) -> None:
        # From a folder that does not hold the test's $XDG_STATE_HOME.
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.share)
        config = peer_tap.Options()
        config.parseOptions([])
        self.assertEqual(
            dict(config),
            {
                "relay": [DEFAULT_RELAY],
                "share": ".",
                "listen": "tcp:0",
                "name": None,
                "idle-timeout": 30,
                **CONNECTION_DEFAULTS,
                "requests-per-second": 20.0,
                "network-requests-per-second": 100.0,
                "token": None,
                "port-file": None,
                "metrics": None,
                "include-hidden": 0,
                "state": peer_tap.default_state_folder("."),
                "rescan-interval": 300.0,
                "max-upload-rate": None,
            },
        )
        self.assertTrue(config["state"].startswith(self.state_home + os.sep))

    def test_state_folder_per_share(self) -> None:
        """
        By default a share's index lives under $XDG_STATE_HOME (else
        ~/.local/state), in a folder of its own named after the share's
        real path: two shares never mix, two spellings of one share agree,
        and the index is never inside the share.  Parsing creates nothing.
        """
        other = self.mktemp()
        os.mkdir(other)
        state = self.parse()["state"]
        self.assertEqual(
            os.path.dirname(state), os.path.join(self.state_home, "p2p-relay", "shares")
        )
        self.assertEqual(
            self.parse("--share", os.path.abspath(self.share))["state"], state
        )
        self.assertNotEqual(self.parse("--share", other)["state"], state)
        self.assertFalse(os.path.exists(self.state_home))
        set_environment(self, "XDG_STATE_HOME", None)
        home = os.path.expanduser("~")
        self.assertTrue(
            self.parse()["state"].startswith(
                os.path.join(home, ".local", "state", "p2p-relay", "shares") + os.sep
            )
        )

    def test_limits_and_token(self) -> None:
        """The connection limits and the token are parsed."""
        config = self.parse(
            "--max-connections",
            "0",
            "--max-connections-per-host",
            "5",
            "--token",
            "abc",
        )
        self.assertEqual(
            (config["max-connections"], config["max-connections-per-host"]), (0, 5)
        )
        self.assertEqual(config["token"], "abc")

    def test_seed_host_port(self) -> None:
        """``twistd peer HOST PORT`` is the seed's spelling of ``--relay``."""
        self.assertEqual(
            self.parse("relay.example", "4001")["relay"], ["relay.example:4001"]
        )

    def test_seed_ipv6_host(self) -> None:
        self.assertEqual(self.parse("::1", "4001")["relay"], ["[::1]:4001"])

    def test_relay_option(self) -> None:
        self.assertEqual(
            self.parse("--relay", "tcp:10.0.0.1:9")["relay"], ["tcp:10.0.0.1:9"]
        )
        self.assertEqual(self.parse("-r", "[::1]:9")["relay"], ["[::1]:9"])

    def test_several_relays(self) -> None:
        """--relay repeats (each relay once, in order); $P2P_RELAY may be a
        comma-separated list; a bad one among them is a usage error."""
        self.assertEqual(
            self.parse("--relay", "10.0.0.1:9", "-r", "4001", "--relay", "4001")[
                "relay"
            ],
            ["10.0.0.1:9", "4001"],
        )
        set_relay_environment(self, "10.0.0.1:9, tcp:10.0.0.2:9,")
        self.assertEqual(self.parse()["relay"], ["10.0.0.1:9", "tcp:10.0.0.2:9"])
        self.assertEqual(self.parse("-r", "4001")["relay"], ["4001"])
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--relay", "4001", "--relay", "127.0.0.1:99999")
        self.assertIn("99999", str(caught.exception))
        with self.assertRaises(usage.UsageError):
            self.parse("--relay", "4001", "10.0.0.1", "9")
        self.assertIn("repeat it", str(peer_tap.Options()))

    def test_environment(self) -> None:
        set_relay_environment(self, "relay.example:4001")
        self.assertEqual(self.parse()["relay"], ["relay.example:4001"])
        self.assertEqual(self.parse("10.0.0.1", "9")["relay"], ["10.0.0.1:9"])
        self.assertEqual(self.parse("--relay", "10.0.0.2:9")["relay"], ["10.0.0.2:9"])

    def test_other_options(self) -> None:
        config = self.parse(
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--name",
            "peer-1.a_b",
            "--idle-timeout",
            "1.5",
            "--port-file",
            "peer.port",
            "--include-hidden",
            "--state",
            "index-state",
            "--rescan-interval",
            "2.5",
            "--max-upload-rate",
            "20M",
        )
        self.assertEqual(config["listen"], "tcp:0:interface=127.0.0.1")
        self.assertEqual(config["name"], "peer-1.a_b")
        self.assertEqual(config["idle-timeout"], 1.5)
        self.assertEqual(config["port-file"], "peer.port")
        self.assertTrue(config["include-hidden"])
        self.assertEqual(config["state"], "index-state")
        self.assertEqual(config["rescan-interval"], 2.5)
        self.assertEqual(config["max-upload-rate"], 20 * 1024 * 1024)

    def test_bad_values(self) -> None:
        missing = self.mktemp()
        for argv in (
            ["host"],
            ["host", "port"],
            ["host", "\u0663"],
            ["host", "1", "2"],
            ["--relay", "10.0.0.1:9", "host", "1"],
            ["host", "70000"],
            ["--relay", "bogus:x"],
            ["--relay", "tcp:nohost"],
            ["--listen", "bogus:x"],
            ["--share", missing],
            ["--name", "two words"],
            ["--name", "x" * 65],
            ["--idle-timeout", "0"],
            ["--idle-timeout", "x"],
            ["--max-connections", "-1"],
            ["--max-connections-per-host", "-1"],
            ["--max-connections-per-host", "x"],
            ["--token", "a;b"],
            ["--rescan-interval", "0"],
            ["--rescan-interval", "x"],
            ["--max-upload-rate", "0"],
            ["--max-upload-rate", "fast"],
            # The index inside the share would be served (and re-indexed).
            ["--state", self.share],
            ["--state", os.path.join(self.share, "index")],
            ["--state", os.path.join(self.share, ".index"), "--include-hidden"],
            # Folders that cannot be: found when parsing, not as a traceback
            # from makeService.
            ["--state", ""],
            ["--state", os.path.join(self.share_file(), "index")],
            ["--state", self.share_file()],
        ):
            with self.assertRaises(usage.UsageError, msg=argv):
                self.parse(*argv)

    def test_malformed_number_names_its_option(self) -> None:
        for argv, message in (
            (["--rescan-interval", "x"], "--rescan-interval: not a number: 'x'"),
            (["--max-connections", "1.5"], "--max-connections: not a whole number"),
        ):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(*argv)
            self.assertIn(message, str(caught.exception))

    def test_seed_form_port_not_a_number(self) -> None:
        """``peer 127.0.0.1 notaport`` says the port is not a number."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("127.0.0.1", "notaport")
        self.assertEqual(
            str(caught.exception),
            "RELAY_PORT 'notaport' is not a number (RELAY_HOST RELAY_PORT, or "
            "use --relay)",
        )

    def test_default_state_inside_the_share(self) -> None:
        """
        The default --state is refused where it would be served (a share
        holding $XDG_STATE_HOME, or ~ with --include-hidden), and allowed
        under a hidden folder of the share, which is not served: a share
        of ~ keeps its index in ~/.local/state.
        """
        set_environment(self, "XDG_STATE_HOME", os.path.join(self.share, "st"))
        with self.assertRaises(usage.UsageError) as caught:
            self.parse()
        self.assertIn("the default --state folder", str(caught.exception))
        self.assertIn("give --state a folder outside --share", str(caught.exception))
        hidden = os.path.join(self.share, ".local", "state")
        set_environment(self, "XDG_STATE_HOME", hidden)
        self.assertTrue(self.parse()["state"].startswith(hidden + os.sep))
        self.assertRaises(usage.UsageError, self.parse, "--include-hidden")
        explicit = os.path.join(self.share, ".p2p")
        self.assertEqual(self.parse("--state", explicit)["state"], explicit)

    def test_help(self) -> None:
        text = str(peer_tap.Options())
        for fragment in (
            "--relay",
            "--share",
            "--listen",
            "RELAY_HOST RELAY_PORT",
            "--max-connections",
            "--max-connections-per-host",
            "--token",
            "$P2P_TOKEN",
            "--state",
            "--rescan-interval",
            "--max-upload-rate",
        ):
            self.assertIn(fragment, text)


class RelayNamedServiceTests(SynchronousTestCase):
    def test_listeners_by_name(self) -> None:
        """The first listener is named LISTENER, the others numbered."""
        config = relay_tap.Options()
        config.parseOptions(["--listen", "tcp:0", "--listen", "tcp:0"])
        service = relay_tap.makeService(config, MemoryReactorClock())
        first = service.getServiceNamed(relay_tap.LISTENER)
        second = service.getServiceNamed(f"{relay_tap.LISTENER} 2")
        self.assertEqual(children(service, ListeningService), [first, second])


class PeerServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        set_relay_environment(self, None)
        set_token_environment(self, None)
        self.share = self.mktemp()
        os.mkdir(self.share)
        # The index's folder: given explicitly, and the default moved too,
        # so that no test writes to the real ~/.local/state.
        self.state = os.path.abspath(self.mktemp())
        set_environment(self, "XDG_STATE_HOME", os.path.abspath(self.mktemp()))
        self.reactor = MemoryReactorClock()

    def make(self, *argv: str) -> MultiService:
        config = peer_tap.Options()
        config.parseOptions(["--share", self.share, "--state", self.state, *argv])
        return peer_tap.makeService(config, self.reactor)

    def started(self, *argv: str) -> MultiService:
        service = self.make(*argv)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def register(self, index: int) -> bytes:
        """Play the relay for the REGISTER of connection C{index} (it is
        granted a lease); return the request line."""
        factory = self.reactor.tcpClients[index][2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"P2P/1 relay\n")
        request = transport.value()
        protocol.dataReceived(
            f"OK {PEER_ID} ttl=60 renew=20 observed=10.0.0.2\n".encode()
        )
        return request

    def test_children(self) -> None:
        service = self.make()
        self.assertEqual(len(children(service, peer_tap.IndexService)), 1)
        self.assertEqual(len(children(service, ListeningService)), 1)
        self.assertEqual(len(children(service, Announcer)), 1)
        self.assertEqual(children(service, PortFileService), [])
        self.assertEqual(len(list(service)), 3)
        # The listener starts first (a port in use stops twistd before the
        # index's threads exist), then the index, before the announcer.
        self.assertEqual(
            [type(child) for child in service][:2],
            [ListeningService, peer_tap.IndexService],
        )
        self.assertEqual(
            len(children(self.make("--port-file", "p"), PortFileService)), 1
        )

    def test_named_services(self) -> None:
        """The listener and the announcer are reachable by name (the demo
        uses that), whatever display name the peer has."""
        service = self.make("--name", "announcer")
        self.assertIsInstance(
            service.getServiceNamed(peer_tap.LISTENER), ListeningService
        )
        announcer = service.getServiceNamed(peer_tap.ANNOUNCER)
        self.assertIsInstance(announcer, Announcer)
        self.assertEqual(announcer.display_name, "announcer")

    def test_listens_and_registers(self) -> None:
        """
        Starting listens on --listen and registers that port at the relay;
        stopping unregisters and leaves no timer behind.
        """
        with open(os.path.join(self.share, "a.txt"), "wb") as stream:
            stream.write(b"alpha\n")
        service = self.make(
            "--listen", "tcp:0:interface=127.0.0.1", "--name", "p1", "10.0.0.1", "4001"
        )
        (listener,) = children(service, ListeningService)
        (announcer,) = children(service, Announcer)
        self.assertIs(announcer.clock, self.reactor)
        self.assertIs(listener.factory.clock, self.reactor)
        self.assertIsInstance(listener.factory, PeerFactory)
        self.assertEqual(
            os.path.realpath(listener.factory.share.root),
            os.path.realpath(self.share),
        )

        service.startService()
        port, _, _, interface = self.reactor.tcpServers[0]
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        host, relay_port = self.reactor.tcpClients[0][:2]
        self.assertEqual((host, relay_port), ("10.0.0.1", 4001))

        # The name filter of the share's files goes with every REGISTER
        # (see p2p.hints), built from what the index found.
        request = self.register(0)
        files = build_filter(["a.txt"])
        self.assertEqual(request, f"REGISTER 0 name=p1 files={files}\n".encode())
        registered = self.successResultOf(announcer.when_registered())
        self.assertEqual(registered.peer_id, PEER_ID)
        # The renewal, a little before the 20 s the relay asked for; the
        # index's rescan, every --rescan-interval (300 s by default).
        renewal, rescan = sorted(c.getTime() for c in self.reactor.getDelayedCalls())
        self.assertTrue(18 <= renewal <= 20, renewal)
        self.assertEqual(rescan, 300.0)

        stopped = service.stopService()
        self.assertEqual(len(self.reactor.tcpClients), 2, "the UNREGISTER")
        self.assertNoResult(stopped)
        # No relay answers: the unregistration gives up after its timeout.
        self.reactor.advance(UNREGISTER_TIMEOUT_SECONDS)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertIsNone(listener.port)

    def test_registers_at_each_relay(self) -> None:
        """
        With several --relay, one announcer per relay (the first keeps the
        plain name), each registering the same port at its own relay and
        renewing on that relay's interval; the log names the relay; stopping
        unregisters at each.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = self.make(
            "--listen", "tcp:0:interface=127.0.0.1",
            "--relay", "10.0.0.1:4001", "--relay", "10.0.0.2:4002",
        )  # fmt: skip
        first, second = children(service, Announcer)
        self.assertIs(service.getServiceNamed(peer_tap.ANNOUNCER), first)
        self.assertIs(service.getServiceNamed(peer_tap.announcer_name(2)), second)
        service.startService()
        relays = [client[:2] for client in self.reactor.tcpClients]
        self.assertEqual(relays, [("10.0.0.1", 4001), ("10.0.0.2", 4002)])
        self.assertTrue(self.register(0).startswith(b"REGISTER 0"))
        self.assertNoResult(second.when_registered())
        self.assertTrue(self.register(1).startswith(b"REGISTER 0"))
        self.successResultOf(first.when_registered())
        self.successResultOf(second.when_registered())
        registered = [
            event["relay"]
            for event in events
            if event["log_format"].startswith("registered at the relay")
        ]
        self.assertEqual(registered, ["10.0.0.1:4001", "10.0.0.2:4002"])
        # Each lease is renewed on its own timer, at its own relay.
        renewals = [c for c in self.reactor.getDelayedCalls() if c.getTime() < 20.5]
        self.assertEqual(len(renewals), 2)
        self.reactor.advance(20)
        relays = [client[:2] for client in self.reactor.tcpClients[2:]]
        self.assertEqual(sorted(relays), [("10.0.0.1", 4001), ("10.0.0.2", 4002)])
        self.register(2)
        self.register(3)

        stopped = service.stopService()
        relays = [client[:2] for client in self.reactor.tcpClients[4:]]
        self.assertEqual(sorted(relays), [("10.0.0.1", 4001), ("10.0.0.2", 4002)])
        self.reactor.advance(UNREGISTER_TIMEOUT_SECONDS)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_index_lives_in_the_state_folder(self) -> None:
        """
        The index is a database in --state, never in the share; a restarted
        peer finds its files there before any rescan.
        """
        with open(os.path.join(self.share, "a.txt"), "wb") as stream:
            stream.write(b"alpha\n")
        service = self.make()
        service.startService()
        self.assertEqual(os.listdir(self.share), ["a.txt"])
        self.assertIn("index.sqlite3", os.listdir(self.state))
        self.successResultOf(service.stopService())

        (indexing,) = children(self.started(), peer_tap.IndexService)
        self.assertEqual(indexing.index.names(), ["a.txt"])
        self.assertEqual(os.listdir(self.share), ["a.txt"])

    def test_index_that_cannot_open_stops_the_peer(self) -> None:
        """
        A database that cannot be opened at all (a folder in its place)
        stops the peer with a critical line naming it, instead of leaving
        it registered and refusing every request.
        """
        os.makedirs(os.path.join(self.state, "index.sqlite3"))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.reactor.running = True  # MemoryReactor.stop() asks
        self.started()
        self.assertTrue(self.reactor.hasStopped)
        [critical] = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(critical["path"], os.path.join(self.state, "index.sqlite3"))
        self.assertIn("unable to open database file", critical["error"])

    def test_new_files_reach_the_relay_soon(self) -> None:
        """
        A file that appears in the share is found by the next rescan, and
        the relay gets the new name filter within FILTER_REFRESH_SECONDS,
        not at the next renewal.
        """
        self.started("--rescan-interval", "5", "10.0.0.1", "4001")
        request = self.register(0)
        self.assertEqual(request, f"REGISTER 0 files={build_filter([])}\n".encode())
        with open(os.path.join(self.share, "new.txt"), "wb") as stream:
            stream.write(b"new\n")
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(FILTER_REFRESH_SECONDS)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        request = self.register(1)
        files = build_filter(["new.txt"])
        self.assertEqual(request, f"REGISTER 0 files={files}\n".encode())

    def test_connection_limits(self) -> None:
        """The file server's factory counts connections with the limits given."""
        service = self.make("--max-connections", "9", "--max-connections-per-host", "2")
        limits = children(service, ListeningService)[0].factory.limits
        self.assertEqual((limits.max_total, limits.max_per_host), (9, 2))

    def test_descriptor_budget(self) -> None:
        """
        A peer's connection holds two descriptors (its socket, the file it
        serves): the soft limit is raised to fit both for every connection
        allowed, and under a low hard limit the connections are fitted to
        half of what is left.
        """
        limits = fake_descriptor_limit(self, 1024, 1_000_000)

        def limits_of() -> ConnectionLimits:
            return children(self.make(), ListeningService)[0].factory.limits

        self.assertEqual(limits_of().max_total, 10_000)
        self.assertEqual(limits[0], 2 * 10_000 + daemon.SPARE_DESCRIPTORS)
        limits[:] = [1024, 1024]
        self.assertEqual(limits_of().max_total, (1024 - daemon.SPARE_DESCRIPTORS) // 2)

    def test_token_sent_by_the_announcer(self) -> None:
        """--token goes to the Announcer, which sends it with REGISTER."""
        service = self.make("--token", "s3cret", "10.0.0.1", "4001")
        (announcer,) = children(service, Announcer)
        self.assertEqual(announcer.token, "s3cret")
        service.startService()
        self.addCleanup(service.stopService)
        request = self.register(0)
        files = build_filter([])
        self.assertEqual(request, f"REGISTER 0 token=s3cret files={files}\n".encode())

    def test_no_token(self) -> None:
        """Without --token or $P2P_TOKEN the Announcer sends none."""
        (announcer,) = children(self.make(), Announcer)
        self.assertIsNone(announcer.token)

    def test_default_relay(self) -> None:
        self.started()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 8000))

    def test_ipv6_relay(self) -> None:
        self.started("::1", "4001")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("::1", 4001))

    def test_upload_rate(self) -> None:
        """--max-upload-rate gives every transfer one shared budget."""
        factory = children(self.make(), ListeningService)[0].factory
        self.assertIsNone(factory.throttle)
        service = self.make("--max-upload-rate", "64K")
        factory = children(service, ListeningService)[0].factory
        self.assertIsInstance(factory.throttle, TokenBucket)
        self.assertIs(factory.throttle.clock, self.reactor)

    def test_bad_endpoint_from_config_is_usage_error(self) -> None:
        config = peer_tap.Options()
        config.parseOptions(["--share", self.share, "--state", self.state])
        config["relay"] = "bogus:x"
        self.assertRaises(usage.UsageError, peer_tap.makeService, config, self.reactor)


class PortFileErrorTests(SynchronousTestCase):
    """A port file that cannot be written is logged, not an unhandled error."""

    def test_unwritable_folder(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.defer import succeed
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        class Listening:
            def when_listening(self):
                class Port:
                    def getHost(self):
                        return IPv4Address("TCP", "127.0.0.1", 4321)

                return succeed(Port())

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = PortFileService("/nonexistent-folder/port", [Listening()])
        service.startService()
        self.assertTrue(
            any("cannot write the port file" in e["log_format"] for e in events)
        )
        service.stopService()


class DescriptorLimitTests(SynchronousTestCase):
    """--max-connections is fitted to what the process may open."""

    def setUp(self) -> None:
        self.limits = fake_descriptor_limit(self, 1024, 4096)

    def test_soft_limit_raised(self) -> None:
        self.assertEqual(daemon.fit_descriptors(2000), 2000)
        self.assertEqual(self.limits, [2000 + daemon.SPARE_DESCRIPTORS, 4096])

    def test_lowered_to_the_hard_limit(self) -> None:
        self.assertEqual(
            daemon.fit_descriptors(10_000), 4096 - daemon.SPARE_DESCRIPTORS
        )
        self.assertEqual(self.limits, [4096, 4096])

    def test_enough_already(self) -> None:
        self.limits[:] = [20_000, 20_000]
        self.assertEqual(daemon.fit_descriptors(10_000), 10_000)

    def test_soft_limit_raised_for_every_descriptor(self) -> None:
        """Room is made for what each connection may hold, and for the
        reserved descriptors, not just for one socket each."""
        self.assertEqual(daemon.fit_descriptors(1000, 2, 32), 1000)
        self.assertEqual(self.limits, [2000 + 32 + daemon.SPARE_DESCRIPTORS, 4096])

    def test_lowered_for_every_descriptor(self) -> None:
        """
        Under a hard limit of 1,024 a peer's connections (two descriptors
        each) are fitted to 384, not 768: 760 stalled GETs held 1,520
        descriptors, and honest clients met EMFILE.  The warning gives the
        arithmetic.
        """
        self.limits[:] = [1024, 1024]
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(daemon.fit_descriptors(10_000, 2), 384)
        (event,) = [e for e in events if "does not fit" in e["log_format"]]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(
            (event["total"], event["wanted"], event["per_connection"], event["soft"]),
            (10_000, 20_000 + daemon.SPARE_DESCRIPTORS, 2, 1024),
        )
        self.assertEqual(event["fitted"], 384)

    def test_fitted_limit_covers_the_worst_case(self) -> None:
        """Whatever the hard limit, every connection holding all it may
        hold, plus the reserved descriptors, leaves the spare free."""
        for hard in (300, 1024, 4096, 10_256, 20_255, 20_256, 100_000):
            for per_connection, reserved in ((1, 0), (1, 32), (2, 0)):
                self.limits[:] = [1024, hard]
                fitted = daemon.fit_descriptors(10_000, per_connection, reserved)
                if fitted > 1:
                    self.assertLessEqual(
                        fitted * per_connection + reserved + daemon.SPARE_DESCRIPTORS,
                        self.limits[0],
                        (hard, per_connection, reserved),
                    )


class UsageErrorTests(SynchronousTestCase):
    """A wrong option: twistd prints our usage, which is then a two-line
    hint, not every option, before the error itself."""

    def test_relay(self) -> None:
        config = relay_tap.Options()
        self.assertRaises(usage.UsageError, config.parseOptions, ["--ttl", "0"])
        self.assertEqual(
            config.getUsage(),
            "Usage: twistd [options] relay [options] [PORT]\n"
            "Run 'twistd relay --help' for every option.",
        )

    def test_peer(self) -> None:
        config = peer_tap.Options()
        self.assertRaises(usage.UsageError, config.parseOptions, ["--bogus"])
        self.assertIn("Run 'twistd peer --help' for every option.", config.getUsage())

    def test_help_is_complete(self) -> None:
        """Without an error, the usage lists every option."""
        self.assertIn("--max-connections-per-network", str(relay_tap.Options()))
