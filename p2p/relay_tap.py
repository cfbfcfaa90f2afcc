"""``twistd relay``: options and service tree."""

from __future__ import annotations

import os

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from p2p.daemon import (
    CONNECTION_LIMIT_OPTIONS,
    CONNECTION_OPTIONS,
    METRICS_OPTION,
    REQUEST_LIMIT_OPTIONS,
    REQUEST_OPTIONS,
    DaemonOptions,
    check_connection_options,
    check_limits,
    check_metrics,
    connection_limits,
    connection_policy,
    metrics_descriptors,
    request_budget,
    token_option,
)
from p2p.dialback import DEFAULT_TIMEOUT_SECONDS as DEFAULT_DIALBACK_TIMEOUT_SECONDS
from p2p.dialback import DialBack
from p2p.endpoints import check_server, server_description, server_endpoint
from p2p.options import named_types
from p2p.ratelimit import GuessBrake
from p2p.registry import MemoryRegistry
from p2p.relay import (
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    DEFAULT_TTL_SECONDS,
    DESCRIPTORS_PER_CONNECTION,
    NAME_QUERIES_PER_SECOND,
    Relay,
    RelayFactory,
    default_renew_interval,
)
from p2p.service import ListeningService, PortFileService
from p2p.wire import TOKEN_ENVIRONMENT_VARIABLE

# Not imported from p2p.redis_registry: the relay imports the Redis code only
# when it is asked for.
REDIS_URL_ENVIRONMENT_VARIABLE = "P2P_REDIS_URL"

log = Logger()

DEFAULT_LISTEN = "tcp:8000"
# Renewals and peer lists are logged as counts, once a minute.
DEFAULT_REPORT_INTERVAL_SECONDS = 60.0


DEFAULT_MAX_LEASES_PER_HOST = 64
DEFAULT_MAX_LEASES_PER_NETWORK = 256


class Options(DaemonOptions):
    tapname = "relay"
    synopsis = "[options] [PORT]"
    longdesc = (
        "Run a relay: peers register (a lease of --ttl seconds, renewed "
        "periodically), clients ask for the active peers.  PORT is the seed's "
        "short form of --listen tcp:PORT."
    )
    optParameters = named_types(
        [
            ["ttl", None, DEFAULT_TTL_SECONDS, "Lease length in seconds.", int],
            [
                "renew",
                None,
                None,
                "Renewal interval asked of peers (default ttl/3).",
                int,
            ],
            [
                "idle-timeout",
                None,
                DEFAULT_IDLE_TIMEOUT_SECONDS,
                "Close connections silent for this many seconds.",
                float,
            ],
            [
                "max-peers",
                None,
                100_000,
                "Most leases held at once (0: no limit).",
                int,
            ],
            [
                "max-per-host",
                None,
                DEFAULT_MAX_LEASES_PER_HOST,
                "Most leases per address, an IPv6 /64 counting as one (0: no limit).",
                int,
            ],
            [
                "max-per-network",
                None,
                DEFAULT_MAX_LEASES_PER_NETWORK,
                "Most leases per network: an IPv4 /24, an IPv6 /48 (0: no limit).",
                int,
            ],
            *CONNECTION_OPTIONS,
            *REQUEST_OPTIONS,
            [
                "name-queries-per-second",
                None,
                NAME_QUERIES_PER_SECOND,
                "Name queries (PEERS hint=) answered per second from all "
                "addresses together, over a table of 10,000 peers or more "
                "(a smaller table allows proportionally more); past it they "
                "get ERR 429 and clients fetch without a suggestion (0: no "
                "limit).",
                float,
            ],
            [
                "dial-back-timeout",
                None,
                DEFAULT_DIALBACK_TIMEOUT_SECONDS,
                "Seconds a new peer's port has to answer the relay's dial-back.",
                float,
            ],
            [
                "token",
                None,
                None,
                "Shared secret peers must send (token=) to REGISTER and UNREGISTER "
                f"(default ${TOKEN_ENVIRONMENT_VARIABLE}; none: no check).  Prefer the "
                "environment variable: a command line is visible to other users.",
            ],
            [
                "registry",
                None,
                None,
                "Where leases live: 'memory' (this relay only), or a Redis shared "
                "by several relays: redis://[:PASSWORD@]HOST[:PORT][/DB], rediss:// "
                f"for TLS (default ${REDIS_URL_ENVIRONMENT_VARIABLE}, else memory).  "
                "Prefer the environment variable for a password.",
            ],
            [
                "registry-prefix",
                None,
                "p2p:",
                "Prefix of the Redis keys; relays sharing a table use the same.",
            ],
            [
                "registry-ca",
                None,
                None,
                "For rediss://: trust this CA certificate (PEM) for Redis's "
                "certificate instead of the system's CAs.",
            ],
            ["port-file", None, None, "Write 'HOST PORT' lines here once listening."],
            METRICS_OPTION,
            [
                "report-interval",
                None,
                DEFAULT_REPORT_INTERVAL_SECONDS,
                "Log an activity summary (renewals, peer lists, ...) this often, "
                "in seconds (0: never).",
                float,
            ],
        ]
    )
    optFlags = [
        [
            "allow-claimed-host",
            None,
            "Record the host= a peer claims instead of the observed address. "
            "Only behind a trusted proxy: anyone could list a victim's address.",
        ],
        [
            "token-for-queries",
            None,
            "Require the token for PEERS too (needs --token).",
        ],
        [
            "no-dial-back",
            None,
            "Do not dial new peers back: list leases in one group, "
            "verified or not, and keep the connection reserve for any lease "
            "holder (see docs/security.rst).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on (repeatable; default tcp:8000)."""
        self["listen"].append(_listen_description(description))

    opt_l = opt_listen

    def parseArgs(self, port: str | None = None) -> None:
        if port is not None:
            if not (port.isascii() and port.isdigit()):
                raise usage.UsageError(f"PORT must be a number, not {port!r}")
            self["listen"].append(_listen_description(port))

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for description in self["listen"]:
            try:
                check_server(description)
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if self["ttl"] < 1:
            raise usage.UsageError("--ttl must be at least 1 second")
        if self["renew"] is None:
            self["renew"] = default_renew_interval(self["ttl"])
        if not 1 <= self["renew"] <= self["ttl"]:
            raise usage.UsageError("--renew must be between 1 and --ttl seconds")
        if self["idle-timeout"] <= 0:
            raise usage.UsageError("--idle-timeout must be positive")
        if self["report-interval"] < 0:
            raise usage.UsageError("--report-interval must be 0 (never) or more")
        check_limits(
            self,
            [
                "max-peers",
                "max-per-host",
                "max-per-network",
                "name-queries-per-second",
                *REQUEST_LIMIT_OPTIONS,
                *CONNECTION_LIMIT_OPTIONS,
            ],
        )
        check_connection_options(self)
        check_metrics(self)
        if self["dial-back-timeout"] <= 0:
            raise usage.UsageError("--dial-back-timeout must be positive")
        self["token"] = token_option(self["token"])
        self["redis"] = _registry_option(self["registry"])
        if self["registry-ca"] is not None:
            if self["redis"] is None or not self["redis"].tls:
                raise usage.UsageError("--registry-ca needs a rediss:// --registry")
            if not os.path.isfile(self["registry-ca"]):
                raise usage.UsageError(
                    f"--registry-ca: no such file: {self['registry-ca']}"
                )
        if self["token-for-queries"] and self["token"] is None:
            raise usage.UsageError(
                f"--token-for-queries needs --token (or ${TOKEN_ENVIRONMENT_VARIABLE})"
            )


def _registry_option(given: str | None):
    """
    The Redis address that C{--registry} (or C{$P2P_REDIS_URL}) names, or
    C{None} for the in-memory table; the Redis code is imported only then.
    """
    url = given if given is not None else os.environ.get(REDIS_URL_ENVIRONMENT_VARIABLE)
    if not url or url == "memory":
        return None
    from p2p.redis_registry import RedisURLError, parse_redis_url

    try:
        address = parse_redis_url(url)
    except RedisURLError as e:
        raise usage.UsageError(str(e)) from None
    try:
        import txredisapi  # noqa: F401
    except ImportError:
        raise usage.UsageError(
            "--registry redis:// needs txredisapi (pip install txredisapi)"
        ) from None
    return address


def _listen_description(text: str) -> str:
    try:
        return server_description(text)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def expiry_period(ttl: int) -> float:
    """How often to sweep expired leases: often enough to log them promptly."""
    return max(0.5, min(5.0, ttl / 4))


# The names of the services makeService builds, for getServiceNamed: the
# (first) listener; the others are "listener 2", "listener 3"...
LISTENER = "listener"


def makeService(config: Options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    parent = MultiService()
    if config["redis"] is None:
        registry = MemoryRegistry(
            config["ttl"],
            config["max-peers"],
            config["max-per-host"],
            config["max-per-network"],
        )
    else:
        from p2p.redis_registry import (
            RedisClientService,
            RedisConnection,
            RedisRegistry,
        )

        connection = RedisConnection(reactor, config["redis"], config["registry-ca"])
        registry = RedisRegistry(
            connection.handler,
            reactor,
            config["ttl"],
            config["max-peers"],
            config["max-per-host"],
            config["max-per-network"],
            prefix=config["registry-prefix"],
            where=str(config["redis"]),
        )
        RedisClientService(connection, registry).setServiceParent(parent)
    policy = connection_policy(config, reactor)
    relay = Relay(
        registry,
        reactor,
        ttl=config["ttl"],
        renew=config["renew"],
        allow_claimed_host=config["allow-claimed-host"],
        token=config["token"],
        token_for_queries=bool(config["token-for-queries"]),
        budget=request_budget(config, reactor),
        brake=GuessBrake(reactor) if config["token"] else None,
        refusals=policy.refusals,
        name_queries_per_second=config["name-queries-per-second"],
    )
    probes = 0
    # The connection reserve is for addresses whose lease a dial-back
    # verified: an unverified lease is one line away for anyone.  Without
    # dial-backs nothing is ever verified, so any lease counts (the reserve
    # is then as weak as registering is open; see docs/security.rst).
    is_member = registry.holds
    if not config["no-dial-back"]:
        dialback = DialBack(
            reactor, relay.answered, timeout=config["dial-back-timeout"]
        )
        relay.probe_with(dialback)
        DialBackService(dialback).setServiceParent(parent)
        probes = dialback.concurrency  # a socket each, whatever the clients do
        is_member = registry.holds_verified
    factory = RelayFactory(
        relay,
        config["idle-timeout"],
        connection_limits(
            config,
            is_member,
            per_connection=DESCRIPTORS_PER_CONNECTION,
            reserved=probes + metrics_descriptors(config),
        ),
        policy,
    )
    listeners = []
    for number, description in enumerate(config["listen"], start=1):
        try:
            endpoint = server_endpoint(reactor, description)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        listener = ListeningService(endpoint, factory, "relay")
        listener.setName(LISTENER if number == 1 else f"{LISTENER} {number}")
        listener.setServiceParent(parent)
        listeners.append(listener)
    if config["metrics"]:
        from p2p.metrics import relay_metrics

        relay_metrics(config["metrics"], reactor, factory).setServiceParent(parent)
    sweeper = TimerService(expiry_period(config["ttl"]), relay.expire)
    sweeper.clock = reactor
    sweeper.setName("expiry")
    sweeper.setServiceParent(parent)
    if config["report-interval"]:
        reporter = TimerService(config["report-interval"], relay.report_activity)
        reporter.clock = reactor
        reporter.setName("activity report")
        reporter.setServiceParent(parent)
    if config["port-file"]:
        PortFileService(config["port-file"], listeners).setServiceParent(parent)
    return parent


class DialBackService(Service):
    """Stops the relay's dial-backs when the relay stops."""

    def __init__(self, dialback: DialBack) -> None:
        self.dialback = dialback

    def stopService(self) -> None:
        self.dialback.stop()
        return super().stopService()
