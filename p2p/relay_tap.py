"""``twistd relay``: options and service tree."""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from p2p import wire
from p2p.dialback import DEFAULT_TIMEOUT_SECONDS as DEFAULT_DIALBACK_TIMEOUT_SECONDS
from p2p.dialback import DialBack
from p2p.endpoints import check_server, server_description, server_endpoint
from p2p.limits import (
    DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_HOST,
    DEFAULT_MAX_CONNECTIONS_PER_NETWORK,
    DEFAULT_MAX_LIFETIME_SECONDS,
    DEFAULT_MAX_REQUESTS_PER_CONNECTION,
    ConnectionLimits,
    ConnectionPolicy,
)
from p2p.ratelimit import GuessBrake, RequestBudget
from p2p.registry import MemoryRegistry
from p2p.relay import (
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    DEFAULT_TTL_SECONDS,
    Relay,
    RelayFactory,
    default_renew_interval,
)
from p2p.service import ListeningService, PortFileService
from p2p.wire import TOKEN_ENVIRONMENT_VARIABLE

log = Logger()

DEFAULT_LISTEN = "tcp:8000"
# Renewals and peer lists are logged as counts, once a minute.
DEFAULT_REPORT_INTERVAL_SECONDS = 60.0


# Options both servers take: how many connections, from where, for how long.
CONNECTION_OPTIONS = [
    [
        "max-connections",
        None,
        DEFAULT_MAX_CONNECTIONS,
        "Most connections open at once (0: no limit).",
        int,
    ],
    [
        "max-connections-per-host",
        None,
        DEFAULT_MAX_CONNECTIONS_PER_HOST,
        "Most connections open at once from one address, an IPv6 /64 "
        "counting as one (0: no limit).",
        int,
    ],
    [
        "max-connections-per-network",
        None,
        DEFAULT_MAX_CONNECTIONS_PER_NETWORK,
        "Most connections open at once from one network: an IPv4 /24, an "
        "IPv6 /48 (0: no limit).",
        int,
    ],
    [
        "first-request-timeout",
        None,
        DEFAULT_FIRST_REQUEST_TIMEOUT_SECONDS,
        "Close a new connection that sends no complete request within this "
        "many seconds.",
        float,
    ],
    [
        "max-connection-lifetime",
        None,
        DEFAULT_MAX_LIFETIME_SECONDS,
        "Refuse further requests on a connection this many seconds old, "
        "and close it; a transfer in progress is never cut (0: no limit).",
        float,
    ],
    [
        "max-requests-per-connection",
        None,
        DEFAULT_MAX_REQUESTS_PER_CONNECTION,
        "Requests one connection may make (0: no limit).",
        int,
    ],
]
CONNECTION_LIMIT_OPTIONS = [
    "max-connections",
    "max-connections-per-host",
    "max-connections-per-network",
    "max-connection-lifetime",
    "max-requests-per-connection",
]
# Request budgets: a burst of this many seconds' worth is allowed.
BURST_SECONDS = 5.0
DEFAULT_REQUESTS_PER_SECOND = 20.0
DEFAULT_NETWORK_REQUESTS_PER_SECOND = 100.0
# Both servers' request budgets (the peer charges LIST and PIECES only:
# transfers are bounded by the connection limits and the upload rate).
REQUEST_OPTIONS = [
    [
        "requests-per-second",
        None,
        DEFAULT_REQUESTS_PER_SECOND,
        "Requests (a peer counts LIST and PIECES) one address may make per "
        f"second, on average; bursts of {BURST_SECONDS:g} s worth (0: no limit).",
        float,
    ],
    [
        "network-requests-per-second",
        None,
        DEFAULT_NETWORK_REQUESTS_PER_SECOND,
        "The same for one network (IPv4 /24, IPv6 /48); a relay does not "
        "count renewals of existing leases here (0: no limit).",
        float,
    ],
]
REQUEST_LIMIT_OPTIONS = ["requests-per-second", "network-requests-per-second"]
DEFAULT_MAX_LEASES_PER_HOST = 64
DEFAULT_MAX_LEASES_PER_NETWORK = 256
# Descriptors kept beyond the connection limit: listeners, logs, dial-backs.
SPARE_DESCRIPTORS = 256


class DaemonOptions(usage.Options):
    """
    A daemon's options that, when they are wrong, let twistd print a short
    usage hint before the error instead of every option (twistd prints the
    failed subcommand's whole usage, then the one line that matters).
    """

    _failed = False

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError:
            self._failed = True
            raise

    def getUsage(self, width: int | None = None) -> str:
        if self._failed:
            command = getattr(self, "subCommand", None) or self.tapname
            return (
                f"Usage: twistd [options] {command} {self.synopsis}\n"
                f"Run 'twistd {command} --help' for every option."
            )
        return super().getUsage(width)


class Options(DaemonOptions):
    tapname = "relay"
    synopsis = "[options] [PORT]"
    longdesc = (
        "Run a relay: peers register (a lease of --ttl seconds, renewed "
        "periodically), clients ask for the active peers.  PORT is the seed's "
        "short form of --listen tcp:PORT."
    )
    optParameters = [
        ["ttl", None, DEFAULT_TTL_SECONDS, "Lease length in seconds.", int],
        ["renew", None, None, "Renewal interval asked of peers (default ttl/3).", int],
        [
            "idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT_SECONDS,
            "Close connections silent for this many seconds.",
            float,
        ],
        ["max-peers", None, 100_000, "Most leases held at once (0: no limit).", int],
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
        ["port-file", None, None, "Write 'HOST PORT' lines here once listening."],
        [
            "report-interval",
            None,
            DEFAULT_REPORT_INTERVAL_SECONDS,
            "Log an activity summary (renewals, peer lists, ...) this often, "
            "in seconds (0: never).",
            float,
        ],
    ]
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
            "Do not dial new peers back: list leases in registration order, "
            "verified or not.",
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
                *REQUEST_LIMIT_OPTIONS,
                *CONNECTION_LIMIT_OPTIONS,
            ],
        )
        check_connection_options(self)
        if self["dial-back-timeout"] <= 0:
            raise usage.UsageError("--dial-back-timeout must be positive")
        self["token"] = token_option(self["token"])
        if self["token-for-queries"] and self["token"] is None:
            raise usage.UsageError(
                f"--token-for-queries needs --token (or ${TOKEN_ENVIRONMENT_VARIABLE})"
            )


def check_connection_options(config: usage.Options) -> None:
    """The first-request timeout is positive."""
    if config["first-request-timeout"] <= 0:
        raise usage.UsageError("--first-request-timeout must be positive")


def check_limits(config: usage.Options, names: list[str]) -> None:
    """Every limit is 0 (no limit) or more: a negative one would refuse all."""
    for name in names:
        if config[name] < 0:
            raise usage.UsageError(f"--{name} must be 0 (no limit) or more")


def token_option(value: str | None) -> str | None:
    """
    The token to use: C{value} (from ``--token``), else $P2P_TOKEN, else
    C{None}; an empty value means none.  A token the wire cannot carry is a
    usage error that does not repeat it.
    """
    if value is None:
        value = os.environ.get(TOKEN_ENVIRONMENT_VARIABLE)
    if not value:
        return None
    try:
        return wire.parse_token(value)
    except wire.WireError as e:
        raise usage.UsageError(
            f"--token (or ${TOKEN_ENVIRONMENT_VARIABLE}): {e.message}"
        ) from None


def connection_limits(
    config: usage.Options, is_member: Callable[[str], bool] | None = None
) -> ConnectionLimits:
    """
    The L{ConnectionLimits} the options ask for (with a tenth of the total
    kept for sources C{is_member} vouches for, when given), within what the
    process may open (L{fit_descriptors}).
    """
    total = fit_descriptors(config["max-connections"])
    return ConnectionLimits(
        total,
        config["max-connections-per-host"],
        config["max-connections-per-network"],
        is_member=is_member,
    )


def connection_policy(config: usage.Options, clock: IReactorTime) -> ConnectionPolicy:
    """The L{ConnectionPolicy} the options ask for."""
    return ConnectionPolicy(
        clock,
        config["first-request-timeout"],
        config["max-connection-lifetime"],
        config["max-requests-per-connection"],
    )


def fit_descriptors(total: int) -> int:
    """
    Make room for C{total} connections in the process's descriptor limit:
    raise the soft limit (up to the hard one) when it is lower than
    C{total} plus some spare.  If even the hard limit is too low, the
    connection limit is lowered to fit, and a warning says so (past it,
    accept() would fail with EMFILE, for everyone).

    :return: the connection limit to use.
    """
    try:
        import resource
    except ImportError:  # not on POSIX
        return total
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = total + SPARE_DESCRIPTORS if total else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and total and soft < wanted:
        fitted = max(1, soft - SPARE_DESCRIPTORS)
        log.warn(
            "--max-connections {wanted} does not fit in the descriptor limit "
            "({soft}); using {fitted}",
            wanted=total,
            soft=soft,
            fitted=fitted,
        )
        return fitted
    return total


def _listen_description(text: str) -> str:
    try:
        return server_description(text)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def expiry_period(ttl: int) -> float:
    """How often to sweep expired leases: often enough to log them promptly."""
    return max(0.5, min(5.0, ttl / 4))


def request_budget(config: usage.Options, clock: IReactorTime) -> RequestBudget | None:
    """The per-source and per-network request rates the options ask for."""
    per_source = config["requests-per-second"]
    per_network = config["network-requests-per-second"]
    if not per_source and not per_network:
        return None
    return RequestBudget(
        clock,
        per_source,
        max(1.0, per_source * BURST_SECONDS),
        per_network,
        max(1.0, per_network * BURST_SECONDS),
    )


def makeService(config: Options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    registry = MemoryRegistry(
        config["ttl"],
        config["max-peers"],
        config["max-per-host"],
        config["max-per-network"],
    )
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
    )
    factory = RelayFactory(
        relay,
        config["idle-timeout"],
        connection_limits(config, registry.holds),
        policy,
    )
    parent = MultiService()
    if not config["no-dial-back"]:
        dialback = DialBack(
            reactor, relay.answered, timeout=config["dial-back-timeout"]
        )
        relay.probe_with(dialback)
        DialBackService(dialback).setServiceParent(parent)
    listeners = []
    for description in config["listen"]:
        try:
            endpoint = server_endpoint(reactor, description)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        listener = ListeningService(endpoint, factory, "relay")
        listener.setServiceParent(parent)
        listeners.append(listener)
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
