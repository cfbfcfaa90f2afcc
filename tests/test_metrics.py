"""
Tests for ``p2p.metrics``: the relay's and the peer's collectors, the
``/metrics`` page and the ``--metrics`` option, all in memory (Clock,
StringTransport, MemoryReactorClock).  The real processes are scraped in
test_metrics_integration.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS,
)
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from p2p import daemon, peer_tap, relay_tap
from p2p.limits import MAX_REASONS, RefusalLog
from p2p.metrics import (
    METRICS,
    DurationHistogram,
    LimitedMetricsFactory,
    MetricsPage,
    PeerCollector,
    RelayCollector,
)
from p2p.registry import MemoryRegistry
from p2p.relay import Relay, RelayFactory
from p2p.service import ListenFailed, ListeningService
from p2p.throttle import TokenBucket
from p2p.wire import TOKEN_ENVIRONMENT_VARIABLE

from ._support import set_environment
from .test_peer import A_CONTENT, BIG_SIZE, PeerTestMixin
from .test_relay import PEER_A, PEER_B, TTL, HeldRegistry, RelayTestCase

METRICS_PORT = 9101


def registry_of(collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


class DurationHistogramTests(SynchronousTestCase):
    def test_buckets_are_cumulative(self) -> None:
        """Each bucket counts the observations at or below its bound; +Inf
        counts them all, and the sum adds them up."""
        histogram = DurationHistogram([0.001, 0.01])
        for seconds in (0.0005, 0.001, 0.002, 0.5):
            histogram.observe(seconds)
        family = histogram.family("h_seconds", "test")
        samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        self.assertEqual(samples[("h_seconds_bucket", "0.001")], 2)
        self.assertEqual(samples[("h_seconds_bucket", "0.01")], 3)
        self.assertEqual(samples[("h_seconds_bucket", "+Inf")], 4)
        self.assertEqual(samples[("h_seconds_count", None)], 4)
        self.assertAlmostEqual(samples[("h_seconds_sum", None)], 0.5035)


class RefusalCountTests(SynchronousTestCase):
    def test_counted_by_label(self) -> None:
        """Every refusal is counted, logged or not, under its label (its
        reason by default); labels are bounded, the rest are "other"."""
        refusals = RefusalLog(Clock(), burst=1)
        refusals.refused("x", "429")
        refusals.refused("x", "429")
        refusals.refused("x", "too many from 10.1.2.0/24", label="connections")
        self.assertEqual(refusals.counts, {"429": 2, "connections": 1})
        for n in range(MAX_REASONS):
            refusals.refused("x", f"reason {n}")
        self.assertEqual(len(refusals.counts), MAX_REASONS + 1)
        self.assertEqual(refusals.counts["other"], 2)


class RelayCollectorTests(RelayTestCase):
    """The relay's metrics follow its requests, and survive its activity
    reports (which reset the summary counts)."""

    def setUp(self) -> None:
        super().setUp()
        self.durations = DurationHistogram()
        self.relay.durations = self.durations.observe
        self.metrics = registry_of(RelayCollector(self.factory, self.durations))

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.get_sample_value(name, labels)

    def test_counts_follow_requests(self) -> None:
        for name in (
            "p2p_relay_leases",
            "p2p_relay_registrations_total",
            "p2p_relay_request_duration_seconds_count",
            "p2p_relay_connections",
            "p2p_relay_registry_errors_total",
        ):
            self.assertEqual(self.value(name), 0, name)
        a = self.connect(PEER_A)
        b = self.connect(PEER_B)
        self.assertEqual(self.value("p2p_relay_connections"), 2)
        a.request(b"REGISTER 7000")
        a.request(b"REGISTER 7000")
        b.request(b"REGISTER 7001")
        b.request(b"UNREGISTER 7001")
        a.request(b"PEERS")
        a.request(b"PEERS hint=" + b"0" * 16)
        self.assertEqual(self.value("p2p_relay_queries_total", kind="hint"), 1)
        a.request(b"BOGUS")
        self.assertEqual(self.value("p2p_relay_leases"), 1)
        self.assertEqual(self.value("p2p_relay_registrations_total"), 2)
        self.assertEqual(self.value("p2p_relay_renewals_total"), 1)
        self.assertEqual(self.value("p2p_relay_unregistrations_total"), 1)
        self.assertEqual(self.value("p2p_relay_queries_total", kind="list"), 1)
        self.assertEqual(self.value("p2p_relay_queries_total", kind="hint"), 1)
        self.assertEqual(self.value("p2p_relay_refusals_total", reason="501"), 1)
        # Every request line was timed, the refused one too.
        self.assertEqual(self.value("p2p_relay_request_duration_seconds_count"), 7)
        self.assertEqual(
            self.value("p2p_relay_request_duration_seconds_bucket", le="+Inf"), 7
        )
        b.lose()
        self.assertEqual(self.value("p2p_relay_connections"), 1)

    def test_expiries_and_reports(self) -> None:
        """Counters never go down: an activity report moves the counts to
        the totals; an expired lease is counted and leaves the gauge."""
        self.connect(PEER_A).request(b"REGISTER 7000")
        self.relay.report_activity()
        self.assertEqual(self.value("p2p_relay_registrations_total"), 1)
        self.clock.advance(TTL + 1)
        self.relay.expire()
        self.assertEqual(self.value("p2p_relay_expiries_total"), 1)
        self.assertEqual(self.value("p2p_relay_leases"), 0)
        self.relay.report_activity()
        self.assertEqual(self.value("p2p_relay_registrations_total"), 1)
        self.assertEqual(self.value("p2p_relay_expiries_total"), 1)

    def test_shared_registry_answers_are_timed_when_written(self) -> None:
        """With a registry that answers later (Redis), a request is timed
        once its answer is written, not when it was read."""
        self.registry = HeldRegistry(TTL)
        self.relay = Relay(self.registry, self.clock, ttl=TTL)
        self.factory = RelayFactory(self.relay)
        observed: list[float] = []
        self.relay.durations = observed.append
        connection = self.connect(PEER_A)
        self.assertEqual(connection.send(b"PEERS\n"), [])
        self.assertEqual(observed, [])
        self.registry.release()
        self.assertEqual(connection.output(), [b"OK 0"])
        self.assertEqual(len(observed), 1)
        self.assertGreater(observed[0], 0)

    def test_registry_errors(self) -> None:
        """The registry's C{errors} count, when it keeps one, is exported."""
        self.registry.errors = 3
        self.assertEqual(self.value("p2p_relay_registry_errors_total"), 3)


class PeerCollectorTests(PeerTestMixin, SynchronousTestCase):
    """The peer's metrics follow its transfers."""

    def setUp(self) -> None:
        super().setUp()
        self.metrics = registry_of(PeerCollector(self.factory))

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.get_sample_value(name, labels)

    def test_transfers(self) -> None:
        self.assertEqual(self.value("p2p_peer_files_indexed"), len(self.index))
        self.assertGreater(self.value("p2p_peer_files_indexed"), 0)
        self.assertEqual(self.value("p2p_peer_connections"), 1)
        self.assertEqual(self.value("p2p_peer_upload_rate_limit_bytes"), 0)
        self.get(b"GET a.txt\n")
        self.assertEqual(self.value("p2p_peer_transfers_total", outcome="sent"), 1)
        self.assertEqual(self.value("p2p_peer_sent_bytes_total"), len(A_CONTENT))
        self.send(b"GET missing.txt\n")
        self.assertEqual(self.value("p2p_peer_refusals_total", reason="404"), 1)
        # A big file: bytes count as they go, and a client that leaves
        # mid-transfer is counted so, with what it was sent.
        self.take()
        self.send(b"GET big.bin\n")
        producer = self.file_producer()
        producer.resumeProducing()
        producer.resumeProducing()
        self.assertEqual(
            self.value("p2p_peer_sent_bytes_total"), len(A_CONTENT) + producer.sent
        )
        self.assertLess(producer.sent, BIG_SIZE)
        # The transport stops its producer when the connection is lost.
        producer.stopProducing()
        self.lose()
        self.assertEqual(
            self.value("p2p_peer_transfers_total", outcome="client-left"), 1
        )
        self.assertEqual(self.value("p2p_peer_transfers_total", outcome="failed"), 0)
        self.assertEqual(
            self.value("p2p_peer_sent_bytes_total"), len(A_CONTENT) + producer.sent
        )
        self.assertEqual(self.value("p2p_peer_connections"), 0)

    def test_upload_rate_limit(self) -> None:
        self.factory.throttle = TokenBucket(self.clock, 20 * 1024 * 1024)
        self.assertEqual(
            self.value("p2p_peer_upload_rate_limit_bytes"), 20 * 1024 * 1024
        )


class MetricsPageTests(SynchronousTestCase):
    def setUp(self) -> None:
        durations = DurationHistogram()
        durations.observe(0.0001)
        factory = RelayFactory(Relay(MemoryRegistry(TTL), Clock()))
        self.registry = registry_of(RelayCollector(factory, durations))
        self.page = MetricsPage(self.registry)

    def test_text_format(self) -> None:
        request = DummyRequest([b""])
        body = self.page.render_GET(request)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [b"text/plain; version=0.0.4; charset=utf-8"],
        )
        self.assertIn(b"# TYPE p2p_relay_registrations_total counter\n", body)
        self.assertIn(b"p2p_relay_request_duration_seconds_count 1.0\n", body)

    def test_openmetrics_when_asked(self) -> None:
        request = DummyRequest([b""])
        request.requestHeaders.addRawHeader(
            b"accept", b"application/openmetrics-text; version=1.0.0"
        )
        body = self.page.render_GET(request)
        [content_type] = request.responseHeaders.getRawHeaders(b"content-type")
        self.assertTrue(content_type.startswith(OPENMETRICS.encode()), content_type)
        self.assertTrue(body.endswith(b"# EOF\n"))


def parse(options_class, *argv: str):
    config = options_class()
    config.parseOptions(list(argv))
    return config


class MetricsOptionTests(SynchronousTestCase):
    """``--metrics ENDPOINT`` on both daemons: off by default, a listener
    named METRICS when given, one-line errors."""

    def setUp(self) -> None:
        set_environment(self, TOKEN_ENVIRONMENT_VARIABLE, None)
        self.share = self.mktemp()
        os.mkdir(self.share)

    def relay(self, *argv: str) -> relay_tap.Options:
        return parse(relay_tap.Options, "--listen", "tcp:8000", *argv)

    def peer(self, *argv: str) -> peer_tap.Options:
        return parse(
            peer_tap.Options,
            "--share",
            self.share,
            "--state",
            self.mktemp(),
            "--relay",
            "127.0.0.1:8000",
            *argv,
        )

    def test_off_by_default(self) -> None:
        for config, make in (
            (self.relay(), relay_tap.makeService),
            (self.peer(), peer_tap.makeService),
        ):
            self.assertIsNone(config["metrics"])
            service = make(config, MemoryReactorClock())
            self.assertNotIn(METRICS, [s.name for s in service])

    def test_bad_endpoint(self) -> None:
        for parser in (self.relay, self.peer):
            for value in ("bogus:x", "tcp:abc", "99999"):
                error = self.assertRaises(usage.UsageError, parser, "--metrics", value)
                self.assertTrue(str(error).startswith("--metrics: "), str(error))

    def test_relay_listens_and_logs(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reactor = MemoryReactorClock()
        description = f"tcp:{METRICS_PORT}:interface=127.0.0.1"
        service = relay_tap.makeService(self.relay("--metrics", description), reactor)
        listener = service.getServiceNamed(METRICS)
        self.assertIsInstance(listener, ListeningService)
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, _, interface)] = [
            server for server in reactor.tcpServers if server[0] == METRICS_PORT
        ]
        self.assertIsInstance(factory, LimitedMetricsFactory)
        self.assertIsInstance(factory.wrappedFactory, Site)
        self.assertEqual(interface, "127.0.0.1")
        self.assertIn(
            "relay metrics",
            [
                event.get("role")
                for event in events
                if "listening" in event.get("log_format", "")
            ],
        )
        # The relay now times its requests.
        relay = service.getServiceNamed("listener").factory.relay
        self.assertIsNotNone(relay.durations)

    def test_peer_listens(self) -> None:
        reactor = MemoryReactorClock()
        service = peer_tap.makeService(
            self.peer("--metrics", f"tcp:{METRICS_PORT}"), reactor
        )
        listener = service.getServiceNamed(METRICS)
        listener.startService()
        self.addCleanup(listener.stopService)
        self.assertEqual([port for port, *_ in reactor.tcpServers], [METRICS_PORT])

    def test_port_in_use(self) -> None:
        """A metrics port in use stops the daemon with one line."""

        class Busy(MemoryReactorClock):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                if port == METRICS_PORT:
                    raise CannotListenError(interface, port, OSError("in use"))
                return super().listenTCP(port, factory, backlog, interface)

        service = relay_tap.makeService(
            self.relay("--metrics", f"tcp:{METRICS_PORT}"), Busy()
        )
        error = self.assertRaises(
            ListenFailed, service.getServiceNamed(METRICS).startService
        )
        self.assertEqual(
            str(error),
            f"twistd relay metrics: cannot listen on *:{METRICS_PORT}: in use",
        )

    def metrics_factory(self, reactor: MemoryReactorClock) -> LimitedMetricsFactory:
        """The relay's metrics listener's factory, listening on C{reactor}."""
        service = relay_tap.makeService(
            self.relay("--metrics", f"tcp:{METRICS_PORT}"), reactor
        )
        listener = service.getServiceNamed(METRICS)
        listener.startService()
        self.addCleanup(listener.stopService)
        [factory] = [f for port, f, *_ in reactor.tcpServers if port == METRICS_PORT]
        return factory

    def test_connections_bounded(self) -> None:
        """
        The metrics listener takes 16 connections at once, 4 from one
        address, and closes the rest at once: 1,100 idle connections to it
        once used up the relay's descriptors (e8).  A closed one frees its
        place.
        """
        factory = self.metrics_factory(MemoryReactorClock())
        opened = []
        for n in range(1100):
            address = IPv4Address("TCP", f"10.0.{n // 200}.{1 + n % 200}", 5000)
            protocol = factory.buildProtocol(address)
            if protocol is not None:
                protocol.makeConnection(StringTransport(peerAddress=address))
                opened.append(protocol)
        self.assertEqual(len(opened), daemon.METRICS_MAX_CONNECTIONS)
        same = IPv4Address("TCP", "10.9.0.1", 5000)
        for protocol in opened[:5]:
            protocol.connectionLost(Failure(ConnectionDone()))
        held = [factory.buildProtocol(same) for _ in range(5)]
        self.assertEqual([p is not None for p in held], [True, True, True, True, False])

    def test_idle_connection_closed(self) -> None:
        """A metrics connection idle for 10 s is closed (Twisted's default:
        a minute)."""
        reactor = MemoryReactorClock()
        factory = self.metrics_factory(reactor)
        address = IPv4Address("TCP", "10.0.0.1", 5000)
        transport = StringTransport(peerAddress=address)
        factory.buildProtocol(address).makeConnection(transport)
        reactor.advance(daemon.METRICS_IDLE_TIMEOUT_SECONDS - 0.1)
        self.assertFalse(transport.disconnecting)
        reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_descriptor_budget(self) -> None:
        """The metrics listener's connections are budgeted apart from the
        servers' (the relay's and the peer's)."""
        from .test_tap import fake_descriptor_limit

        fake_descriptor_limit(self, 1024, 1024)
        for config, make, per_connection in (
            (self.relay("--no-dial-back"), relay_tap.makeService, 1),
            (self.peer(), peer_tap.makeService, 2),
        ):
            plain = make(config, MemoryReactorClock())
            config["metrics"] = f"tcp:{METRICS_PORT}"
            metered = make(config, MemoryReactorClock())
            limits = [
                service.getServiceNamed("listener").factory.limits.max_total
                for service in (plain, metered)
            ]
            self.assertEqual(
                limits[1],
                (1024 - daemon.SPARE_DESCRIPTORS - daemon.METRICS_MAX_CONNECTIONS)
                // per_connection,
            )
            self.assertLess(limits[1], limits[0])

    def test_plugins_do_not_import_prometheus_client(self) -> None:
        """The daemons' options and the client load without the metrics
        library: only --metrics imports it."""
        code = (
            "import sys, p2p.relay_tap, p2p.peer_tap, p2p.cli;"
            "print('prometheus_client' in sys.modules)"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.stdout.strip(), "False", result.stderr)


DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
METRIC_NAME = re.compile(r"\bp2p_(?:relay|peer)_[a-z_]+")


def without_suffix(name: str) -> str:
    """A histogram's name, from one of its series' names."""
    for suffix in ("_bucket", "_count", "_sum"):
        name = name.removesuffix(suffix)
    return name


class DocumentedMetricsTests(PeerTestMixin, SynchronousTestCase):
    """docs/deployment.rst documents every metric the collectors export,
    and the sample dashboard graphs only exported ones."""

    def exported(self) -> set[str]:
        """The names of the exported metrics (counters with their _total)."""
        relay = RelayFactory(Relay(MemoryRegistry(TTL), Clock()))
        names = set()
        for collector in (
            RelayCollector(relay, DurationHistogram()),
            PeerCollector(self.factory),
        ):
            for family in collector.collect():
                counter = family.type == "counter"
                names.add(family.name + "_total" if counter else family.name)
        return names

    def test_documented(self) -> None:
        with open(os.path.join(DOCS, "deployment.rst"), encoding="utf-8") as f:
            documented = {without_suffix(n) for n in METRIC_NAME.findall(f.read())}
        self.assertEqual(documented, self.exported())

    def test_dashboard(self) -> None:
        with open(os.path.join(DOCS, "grafana-dashboard.json"), encoding="utf-8") as f:
            dashboard = json.load(f)
        used = {
            without_suffix(name)
            for panel in dashboard["panels"]
            for target in panel.get("targets", [])
            for name in METRIC_NAME.findall(target["expr"])
        }
        self.assertEqual(used, self.exported())
