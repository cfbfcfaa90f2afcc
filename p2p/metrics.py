"""Prometheus metrics for ``twistd relay --metrics`` and ``twistd peer --metrics``.

Only imported when ``--metrics`` is given: the plugins stay cheap to import
and the ``p2p`` client never loads prometheus_client.

The counts already live in the servers (the relay's L{Activity} and its
totals, the refusal logs' counts, the connection limits, the peer's
L{Transfers}); the collectors here read them when Prometheus scrapes, so
serving a request costs nothing more, except on the relay one timing and
one L{DurationHistogram.observe}.  Every metric is documented in
docs/deployment.rst.

Scrapes are answered on the reactor thread, not in a thread pool as
C{prometheus_client.twisted.MetricsResource} does: the state read is the
reactor's (a thread would read it while the reactor changes it), and a
relay's page (2.8 KB) takes about 0.5 ms to render.
Each service has its own C{CollectorRegistry}, never the global one.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IAddress
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from p2p.daemon import (
    METRICS_IDLE_TIMEOUT_SECONDS,
    METRICS_MAX_CONNECTIONS,
    METRICS_MAX_CONNECTIONS_PER_HOST,
)
from p2p.endpoints import server_endpoint
from p2p.limits import ConnectionLimits, RefusalLog, source_host
from p2p.peer import PeerFactory
from p2p.relay import Activity, RelayFactory
from p2p.service import ListeningService

# A relay answers most requests in tens of microseconds (docs/performance.rst):
# fine buckets below a millisecond, coarse ones for the stalls above.
REQUEST_DURATION_BUCKETS_SECONDS = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    50e-3,
    250e-3,
    1.0,
)
# The service name makeService gives the metrics listener.
METRICS = "metrics"
# Where the page is: Prometheus's default metrics_path.
METRICS_PATH = b"metrics"


class DurationHistogram:
    """
    A histogram of durations in seconds, cheap to add to: about 0.5 us an
    observation, against 2.8 us for C{prometheus_client.Histogram}, which
    takes a lock per call (measured; the reactor thread is the only writer
    and the only reader here, so none is needed).
    """

    def __init__(
        self, bounds: Sequence[float] = REQUEST_DURATION_BUCKETS_SECONDS
    ) -> None:
        self.bounds = tuple(bounds)
        # counts[i]: observations in (bounds[i-1], bounds[i]]; the last: above.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram as Prometheus exposes it: cumulative buckets."""
        buckets = []
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            buckets.append((repr(bound), total))
        buckets.append(("+Inf", total + self.counts[-1]))
        return HistogramMetricFamily(
            name, documentation, buckets=buckets, sum_value=self.sum
        )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _refusals(name: str, refusals: RefusalLog) -> CounterMetricFamily:
    family = CounterMetricFamily(
        name,
        "Connections and requests refused, by reason: the ERR code of the "
        "reply, or connections, registration, error budget, not reading.",
        labels=["reason"],
    )
    for reason, count in sorted(refusals.counts.items()):
        family.add_metric([reason], count)
    return family


class RelayCollector(Collector):
    """
    A relay's metrics, read from its state at each scrape.

    ``p2p_relay_registry_errors_total`` is the registry's C{errors}
    attribute (an int counting its failed calls, never reset: see
    L{p2p.redis_registry.RedisRegistry}), read with C{getattr}: 0 for a
    registry without one, such as the in-memory one, which cannot fail.
    """

    def __init__(self, factory: RelayFactory, durations: DurationHistogram) -> None:
        self.factory = factory
        self.durations = durations

    def collect(self) -> Iterator[Metric]:
        factory = self.factory
        relay = factory.relay
        # What earlier activity summaries counted, plus what the next will.
        done = Activity()
        done.add(relay.totals)
        done.add(relay.activity)
        yield GaugeMetricFamily(
            "p2p_relay_leases", "Leases in the table.", value=len(relay.registry)
        )
        yield _counter(
            "p2p_relay_registrations_total",
            "REGISTERs that added a peer to the table.",
            done.registered,
        )
        yield _counter(
            "p2p_relay_renewals_total",
            "REGISTERs that renewed a lease.",
            done.renewed,
        )
        yield _counter(
            "p2p_relay_unregistrations_total",
            "UNREGISTERs that ended a lease.",
            done.unregistered,
        )
        yield _counter("p2p_relay_expiries_total", "Leases that ran out.", done.expired)
        yield _counter(
            "p2p_relay_dialback_answers_total",
            "New peers that answered the relay's dial-back.",
            done.verified,
        )
        queries = CounterMetricFamily(
            "p2p_relay_queries_total",
            "PEERS requests answered: pages of the list, or hinted name queries.",
            labels=["kind"],
        )
        queries.add_metric(["list"], done.lists)
        queries.add_metric(["hint"], done.hinted)
        yield queries
        yield _refusals("p2p_relay_refusals_total", factory.policy.refusals)
        yield self.durations.family(
            "p2p_relay_request_duration_seconds",
            "Time the relay took to answer a request line, refusals included.",
        )
        yield GaugeMetricFamily(
            "p2p_relay_connections",
            "Client and peer connections open.",
            value=factory.limits.total,
        )
        yield _counter(
            "p2p_relay_registry_errors_total",
            "Calls to the shared registry (Redis) that failed.",
            getattr(relay.registry, "errors", 0),
        )


class PeerCollector(Collector):
    """A peer's metrics, read from its factory and index at each scrape."""

    def __init__(self, factory: PeerFactory) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        factory = self.factory
        transfers = factory.transfers
        yield GaugeMetricFamily(
            "p2p_peer_files_indexed",
            "Files of the share indexed (digests known, ready to serve).",
            value=len(factory.index),
        )
        yield _counter(
            "p2p_peer_sent_bytes_total",
            "File bytes sent to clients, transfers in progress included.",
            transfers.sent_bytes,
        )
        outcomes = CounterMetricFamily(
            "p2p_peer_transfers_total",
            "Transfers (GET, RANGE, BLOB) ended, by outcome.",
            labels=["outcome"],
        )
        for outcome, count in transfers.outcomes.items():
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield _refusals("p2p_peer_refusals_total", factory.policy.refusals)
        yield GaugeMetricFamily(
            "p2p_peer_connections",
            "Client connections open.",
            value=factory.limits.total,
        )
        throttle = factory.throttle
        yield GaugeMetricFamily(
            "p2p_peer_upload_rate_limit_bytes",
            "The upload cap in bytes per second (--max-upload-rate; 0: none).",
            value=throttle.rate if throttle is not None else 0,
        )


class MetricsPage(Resource):
    """``GET /metrics``: the registry in the format the scraper accepts
    (Prometheus text, or OpenMetrics when asked for)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        request.setHeader("content-type", content_type)
        return encoder(self.registry)


class MetricsSite(Site):
    """The metrics listener's site: no access log line per scrape."""

    noisy = False

    def log(self, request: Request) -> None:
        pass


def metrics_site(registry: CollectorRegistry, reactor) -> Site:
    """
    A site serving C{registry} at ``/metrics`` (other paths: 404); a
    connection idle for L{METRICS_IDLE_TIMEOUT_SECONDS} is closed (Twisted's
    default is a minute, long enough to pile idle connections up).
    """
    root = Resource()
    root.putChild(METRICS_PATH, MetricsPage(registry))
    return MetricsSite(root, reactor=reactor, timeout=METRICS_IDLE_TIMEOUT_SECONDS)


class LimitedMetricsFactory(WrappingFactory):
    """
    The metrics site behind connection limits: at most
    L{METRICS_MAX_CONNECTIONS} open, L{METRICS_MAX_CONNECTIONS_PER_HOST}
    from one source; past them a connection is closed at once.  Without
    them, idle connections to the metrics port (1,100 of them) used up
    the daemon's descriptors and its own listener failed.  The daemon
    keeps descriptors for these apart (L{p2p.daemon.metrics_descriptors}).
    """

    noisy = False

    def __init__(
        self,
        site: Site,
        max_total: int = METRICS_MAX_CONNECTIONS,
        max_per_host: int = METRICS_MAX_CONNECTIONS_PER_HOST,
    ) -> None:
        super().__init__(site)
        self.limits = ConnectionLimits(max_total, max_per_host, 0)
        self._hosts: dict[ProtocolWrapper, str] = {}

    def buildProtocol(self, addr: IAddress) -> ProtocolWrapper | None:
        host = source_host(addr)
        if self.limits.admit(host) is not None:
            return None  # Twisted closes the connection
        try:
            wrapper = super().buildProtocol(addr)
        except BaseException:
            self.limits.release(host)
            raise
        self._hosts[wrapper] = host
        return wrapper

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        """Called by the wrapper when its connection is lost."""
        super().unregisterProtocol(p)
        host = self._hosts.pop(p, None)
        if host is not None:
            self.limits.release(host)


def metrics_service(
    description: str, collector: Collector, reactor, role: str
) -> ListeningService:
    """
    The listener for C{--metrics}: serves C{collector}'s metrics (in a
    registry of its own) on the endpoint C{description}, logging
    ``<role> metrics listening on ADDRESS``; a port in use stops the daemon
    with one line (L{ListeningService}).

    :raise usage.UsageError: for an unusable endpoint description.
    """
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        endpoint = server_endpoint(reactor, description)
    except ValueError as e:
        raise usage.UsageError(f"--metrics: {e}") from None
    service = ListeningService(
        endpoint,
        LimitedMetricsFactory(metrics_site(registry, reactor)),
        f"{role} {METRICS}",
    )
    service.setName(METRICS)
    return service


def relay_metrics(description: str, reactor, factory: RelayFactory) -> ListeningService:
    """C{--metrics} for a relay: also starts timing its requests."""
    durations = DurationHistogram()
    factory.relay.durations = durations.observe
    return metrics_service(
        description, RelayCollector(factory, durations), reactor, "relay"
    )


def peer_metrics(description: str, reactor, factory: PeerFactory) -> ListeningService:
    """C{--metrics} for a peer."""
    return metrics_service(description, PeerCollector(factory), reactor, "peer")
