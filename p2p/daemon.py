"""What both daemons' options share: limits, budgets, the token, usage.

``twistd relay`` (L{p2p.relay_tap}) and ``twistd peer``
(L{p2p.peer_tap}) take the same connection limits, request budgets and
token, and fail the same way on a wrong option; this module holds those
options and turns them into the objects the servers use.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from p2p import wire
from p2p.endpoints import check_server
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
from p2p.ratelimit import RequestBudget
from p2p.wire import TOKEN_ENVIRONMENT_VARIABLE

log = Logger()


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


# Both servers' metrics listener (p2p.metrics), off unless given.
METRICS_OPTION = [
    "metrics",
    None,
    None,
    "Serve Prometheus metrics at /metrics on this endpoint (e.g. "
    "tcp:9101:interface=127.0.0.1).  Default: none.",
]


# The metrics listener's bounds: a scraper or two keep a connection each;
# these leave room for a few more, and a connection idle this long is
# closed, so idle connections cannot use up the daemon's descriptors.
METRICS_MAX_CONNECTIONS = 16
METRICS_MAX_CONNECTIONS_PER_HOST = 4
METRICS_IDLE_TIMEOUT_SECONDS = 10


def metrics_descriptors(config: usage.Options) -> int:
    """Descriptors the C{--metrics} listener's connections may hold, kept
    apart from the servers' connections (0 without C{--metrics})."""
    return METRICS_MAX_CONNECTIONS if config["metrics"] else 0


def check_metrics(config: usage.Options) -> None:
    """C{--metrics}, when given, is a listening endpoint, and the metrics
    library is there (checked without importing it)."""
    if config["metrics"] is None:
        return
    try:
        check_server(config["metrics"])
    except ValueError as e:
        raise usage.UsageError(f"--metrics: {e}") from None
    if importlib.util.find_spec("prometheus_client") is None:
        raise usage.UsageError("--metrics needs prometheus_client (pip install it)")


# Descriptors kept beyond what the connections and the reserved ones hold:
# listeners, logs, the index's database and its scans, the registry's link.
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
    config: usage.Options,
    is_member: Callable[[str], bool] | None = None,
    *,
    per_connection: int,
    reserved: int = 0,
) -> ConnectionLimits:
    """
    The L{ConnectionLimits} the options ask for (with a tenth of the total
    kept for sources C{is_member} vouches for, when given), within what the
    process may open (L{fit_descriptors}) when each connection may hold
    C{per_connection} descriptors and C{reserved} more are held besides.
    """
    total = fit_descriptors(config["max-connections"], per_connection, reserved)
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


def fit_descriptors(total: int, per_connection: int = 1, reserved: int = 0) -> int:
    """
    Make room for C{total} connections in the process's descriptor limit,
    each holding up to C{per_connection} descriptors at once (a peer's
    holds its socket and the file it serves), plus C{reserved} the daemon
    holds whatever the connections do (a relay's dial-backs) and some
    spare: raise the soft limit (up to the hard one) when it is lower.  If
    even the hard limit is too low, the connection limit is lowered to fit,
    and a warning says so.  Past the limit, accept() and open() fail with
    EMFILE, for everyone: a budget of one per connection let stalled
    downloads, within the connection limit, starve every other client.

    :return: the connection limit to use.
    """
    try:
        import resource
    except ImportError:  # not on POSIX
        return total
    kept = reserved + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = total * per_connection + kept if total else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and total and soft < wanted:
        fitted = max(1, (soft - kept) // per_connection)
        log.warn(
            "--max-connections {total} does not fit in the descriptor limit "
            "({soft}): it needs {wanted} ({per_connection} a connection, {kept} "
            "besides); using {fitted}",
            total=total,
            wanted=wanted,
            per_connection=per_connection,
            kept=kept,
            soft=soft,
            fitted=fitted,
        )
        return fitted
    return total


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
