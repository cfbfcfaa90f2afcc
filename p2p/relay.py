"""The relay: peers lease a place in its table, clients read the table.

``RelayProtocol`` only frames lines and reports errors; ``Relay`` holds the
policy (leases, observed addresses, logging) and talks to an
L{p2p.interfaces.IRegistry}.  See ``docs/protocol.rst``.

What is logged: every change to the table (a new peer, an unregistered or
expired one) and every refusal, one event each; the routine traffic
(renewals, peer lists) only as counts in a periodic activity summary
(L{Relay.report_activity}).  Ten thousand peers renewing every 20 seconds
are 500 requests a second: a line each would drown the events that matter,
and even filtered out, an event per request was a tenth of the relay's
time per request.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import NoReturn

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IPullProducer, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import wire
from p2p.dialback import DialBack
from p2p.interfaces import IRegistry, ISharedRegistry
from p2p.limits import (
    UNKNOWN_HOST,
    ConnectionLimits,
    ConnectionPolicy,
    IdleTimeouts,
    LimitedServerFactory,
    RefusalLog,
    ServerLineProtocol,
)
from p2p.ratelimit import BucketTable, GuessBrake, RequestBudget
from p2p.registry import MAX_HINT_SCAN, Lease, RegistryFull, RegistryUnavailable
from p2p.transports import (
    cap_send_buffer,
    limit_unsent,
    plain_socket,
    unbuffered_write,
    write_now,
)
from p2p.wire import Code, WireError

DEFAULT_TTL_SECONDS = 60
# The idle limit covers the whole connection: a request line must be complete
# within it, so a client trickling bytes (slowloris) is cut off too.
DEFAULT_IDLE_TIMEOUT_SECONDS = 30
# A bounded reply: the table may be huge, a reply must not be.  Also the
# default page size (PEERS without limit=).
MAX_PEERS_PER_REPLY = wire.MAX_PEERS_PER_PAGE
# Formatted PEER lines kept (about 250 bytes each with their key, so at
# most a few MB): a table that fits is listed without formatting lines again
# within the same second; a bigger one still pays only for the pages it
# serves.
LINE_CACHE_ENTRIES = 16_384
# Request costs in budget tokens (see Relay.charge): a hinted query scans up
# to MAX_HINT_SCAN leases, about three times a full page's work.
HINT_COST = 3.0
# Name queries (PEERS hint=) answered per second by the whole relay, from
# every source together (bursts of as many), counted as full scans: one
# over a table of MAX_HINT_SCAN leases or more costs 1 (up to 3 ms), one
# over a smaller table its share of that (at least MIN_NAME_QUERY_COST),
# so a small relay answers proportionally more.  Sources in 80 /24s, each
# within its own budget, kept a relay busy with them and other clients'
# requests waiting for seconds.  A query refused here costs its client only
# the suggestion: it fetches over the full list, asked for at the same time.
NAME_QUERIES_PER_SECOND = 200.0
MIN_NAME_QUERY_COST = 0.01
PAGE_LINES_PER_TOKEN = 1000
# A line with its filter (files=1) is about nine times as long: bytes are
# what such a page costs.
FILTER_LINES_PER_TOKEN = 250
# The kernel send buffer of a relay connection (see cap_send_buffer).
SEND_BUFFER_BYTES = 64 * 1024
# A reply longer than this goes out as the client reads it (LinesProducer),
# a chunk at a time: a PEERS files=1 page is 564 KB, and handed to the
# transport whole it was copied into every connection that asked and never
# read (2,000 of them took the relay from 48 to 939 MiB).
STREAM_REPLY_BYTES = SEND_BUFFER_BYTES
REPLY_CHUNK_BYTES = 16 * 1024
# Table changes logged one by one per minute; the rest are counted.
TABLE_EVENTS_LOGGED_PER_MINUTE = 600
# Descriptors one connection holds: its socket only (the relay opens no
# file for a client, and its dial-backs are bounded apart from the
# connections; see p2p.dialback).  The daemon sizes its descriptor limit by
# this (p2p.daemon.fit_descriptors).
DESCRIPTORS_PER_CONNECTION = 1


def default_renew_interval(ttl: int) -> int:
    """Ask peers to renew three times per lease, so two renewals may fail."""
    return max(1, ttl // 3)


def observed_host(address: IAddress) -> str:
    """The source IP of a connection, IPv4-mapped IPv6 shown as IPv4."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        raise WireError(Code.BAD_REQUEST, "the relay only serves IP connections")
    return wire.normalise_host(host)


class Activity:
    """Counts of the requests a relay answered since its last summary."""

    __slots__ = (
        "registered",
        "renewed",
        "unregistered",
        "expired",
        "verified",
        "lists",
        "hinted",
    )

    def __init__(self) -> None:
        self.registered = self.renewed = self.unregistered = self.expired = 0
        self.verified = self.lists = self.hinted = 0

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in self.__slots__)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def add(self, other: Activity) -> None:
        """Add C{other}'s counts to these."""
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Relay:
    """
    The relay's policy, shared by every connection.

    :param registry: the peer table: in memory (L{IRegistry}, answered at
        once), or shared (L{ISharedRegistry}: each request is one round trip
        to the store, and L{handle} returns a Deferred).
    :param clock: the reactor's clock; all lease times come from it.
    :param ttl: lease length granted to peers, in seconds.
    :param renew: renewal interval suggested to peers, in seconds.
    :param allow_claimed_host: honour ``host=`` in REGISTER and UNREGISTER.
        Only for relays behind a trusted proxy: otherwise anyone can point
        every client at a victim's address.
    :param token: a shared secret: REGISTER and UNREGISTER must carry it as
        ``token=``, or get ``ERR 401``.  C{None}: no authentication (a
        token sent anyway is ignored).
    :param token_for_queries: require the token for PEERS too.
    :param budget: per-source and per-network request rates
        (L{RequestBudget}); C{None}: no rate limit.
    :param brake: slows down token guessing (L{GuessBrake}); C{None}: none.
    :param dialback: probes new peers (L{DialBack}); leases whose peer
        answers are listed first.  C{None}: none is probed, and every lease
        is listed in one group.
    :param refusals: where refused registrations are logged (rate-limited);
        default: a L{RefusalLog} of its own.
    :param name_queries_per_second: ``PEERS hint=`` answered per second
        from all sources together, over a table of 10,000 leases or more
        (see L{NAME_QUERIES_PER_SECOND}; 0: no limit); past it, ``ERR 429``.
    """

    log = Logger()

    def __init__(
        self,
        registry: IRegistry,
        clock: IReactorTime,
        ttl: int = DEFAULT_TTL_SECONDS,
        renew: int | None = None,
        allow_claimed_host: bool = False,
        token: str | None = None,
        token_for_queries: bool = False,
        budget: RequestBudget | None = None,
        brake: GuessBrake | None = None,
        refusals: RefusalLog | None = None,
        name_queries_per_second: float = NAME_QUERIES_PER_SECOND,
    ) -> None:
        if token_for_queries and not token:
            raise ValueError("token_for_queries needs a token")
        self.registry = registry
        self.shared = ISharedRegistry.providedBy(registry)
        if self.shared:
            # Leases end inside the calls that find them due; the relay
            # that ended one logs it.
            registry.report_expired_to(self._ended)
        self.clock = clock
        self.ttl = ttl
        self.renew = renew if renew is not None else default_renew_interval(ttl)
        self.allow_claimed_host = allow_claimed_host
        # Only the bytes are kept, in a private attribute: nothing that
        # renders this object (a log event, a repr) shows the secret.
        self._token = token.encode("utf-8") if token else None
        self.token_for_queries = token_for_queries
        # Lease -> (renewed, age, age + 1, name, its PEER line) (see
        # _listing); bounded.
        self._lines: dict[object, tuple[float, float, float, str | None, bytes]] = {}
        # Lease -> (its PEER line, its filter, the line with files=) (see
        # _page); bounded like _lines.
        self._filter_lines: dict[object, tuple[bytes, bytes, bytes]] = {}
        self.activity = Activity()
        # The counts of every summary so far (the metrics add the current
        # activity to them), and where request durations go (p2p.metrics
        # sets it; None: nothing is timed).
        self.totals = Activity()
        self.durations: Callable[[float], object] | None = None
        self.budget = budget
        # One bucket for the whole relay (see NAME_QUERIES_PER_SECOND).
        self.name_queries = (
            BucketTable(
                name_queries_per_second, max(1.0, name_queries_per_second), size=1
            )
            if name_queries_per_second
            else None
        )
        self.brake = brake
        self.dialback: DialBack | None = None
        self.refusals = (
            refusals if refusals is not None else RefusalLog(clock, logger=self.log)
        )
        # Changes to the table, logged one event each up to a share per
        # minute (a registration flood must not fill the disk), the rest
        # only counted in the activity summary.
        self.changes = RefusalLog(
            clock,
            TABLE_EVENTS_LOGGED_PER_MINUTE,
            60.0,
            "table changes",
            LogLevel.info,
            self.log,
        )

    def probe_with(self, dialback: DialBack) -> None:
        """Dial new peers back with C{dialback} (its answers mark leases
        verified)."""
        self.dialback = dialback

    def answered(self, host: str, port: int) -> None:
        """The peer at C{host}:C{port} answered the dial-back."""
        lease = self.registry.mark_verified(host, port)
        if isinstance(lease, Deferred):
            lease.addCallbacks(self._verified, _unavailable_is_logged)
            lease.addErrback(self._bug)
        else:
            self._verified(lease)

    def _verified(self, lease: Lease | None) -> None:
        if lease is not None:
            self.activity.verified += 1

    @property
    def requires_token(self) -> bool:
        """Whether REGISTER and UNREGISTER need ``token=``."""
        return self._token is not None

    def handle(
        self, request: wire.RelayRequest, source: str
    ) -> list[bytes] | Deferred[list[bytes]]:
        """
        Answer one parsed request from C{source}.

        :return: the reply as lines without their delimiters; with a shared
            registry, a Deferred of them (failing with L{WireError}: ``ERR
            503`` when the store does not answer).
        :raise WireError: a refusal decided without the registry.
        """
        if self.budget is not None:
            self.charge(request, source)
        if isinstance(request, wire.Peers) and request.hint is not None:
            self.charge_name_query()
        if isinstance(request, wire.Register):
            self.check_token(request.token, source)
            registered = self.register(request, source)
            if isinstance(registered, Deferred):
                return registered.addCallbacks(_register_reply, _unavailable)
            return [registered.to_line()]
        if isinstance(request, wire.Unregister):
            self.check_token(request.token, source)
            unregistered = self.unregister(request, source)
            if isinstance(unregistered, Deferred):
                return unregistered.addCallbacks(_one_line, _unavailable)
            return [unregistered]
        if self.token_for_queries:
            self.check_token(request.token, source)
        listing = self.peers(request)
        if isinstance(listing, Deferred):
            return listing.addErrback(_unavailable)
        return listing

    def charge(self, request: wire.RelayRequest, source: str) -> None:
        """
        Charge C{request} to its source's and network's budgets, or refuse
        it (429 with a retry-after).  A renewal of a lease the source holds
        is charged to its source only: neighbours flooding from the same
        network cannot starve a peer's renewals.
        """
        assert self.budget is not None
        renewal = False
        if isinstance(request, wire.Register):
            cost = 1.0
            lease = self.registry.find(source, request.port)
            renewal = lease is not None and lease.expires > self.clock.seconds()
        elif isinstance(request, wire.Peers):
            lines = request.limit or MAX_PEERS_PER_REPLY
            cost = (
                HINT_COST
                if request.hint is not None
                else 1.0
                + lines
                / (FILTER_LINES_PER_TOKEN if request.files else PAGE_LINES_PER_TOKEN)
            )
        else:
            cost = 1.0
        wait = self.budget.charge(source, cost, exempt_network=renewal)
        if wait:
            raise wire.retry_later("too many requests", wait)

    def charge_name_query(self) -> None:
        """
        Take a name query from the relay's budget for them, or refuse it
        (429 with a retry-after): past that rate the relay stops spending
        its CPU on suggestions, never on the listing itself.
        """
        if self.name_queries is None:
            return
        now = self.clock.seconds()
        cost = max(MIN_NAME_QUERY_COST, min(1.0, len(self.registry) / MAX_HINT_SCAN))
        wait = self.name_queries.wait("", cost, now)
        if wait:
            raise wire.retry_later("the relay's name queries are spent", wait)
        self.name_queries.take("", cost, now)

    def check_token(self, given: str | None, source: str | None = None) -> None:
        """
        Refuse (401) a request without the relay's token, when it has one.

        The comparison takes the same time whatever the bytes, so a client
        cannot guess the token byte by byte from response times; and with a
        L{GuessBrake}, each wrong token in a row doubles the wait before the
        source's next one is compared (429 with a retry-after until then).
        Neither the reply nor the log repeats what was sent.
        """
        if self._token is None:
            return
        if given is None:
            raise WireError(Code.UNAUTHORIZED, "token required")
        brake = self.brake if source is not None else None
        if brake is not None:
            wait = brake.wait(source)
            if wait:
                raise wire.retry_later("too many wrong tokens", wait)
        if not hmac.compare_digest(given.encode("utf-8"), self._token):
            if brake is not None:
                brake.wrong(source)
            raise WireError(Code.UNAUTHORIZED, "wrong token")
        if brake is not None:
            brake.right(source)

    def _claimed_host(self, claimed: str | None, source: str) -> str:
        """The host a request acts on: the observed one unless trusted."""
        if claimed is None or claimed == source:
            return source
        if not self.allow_claimed_host:
            raise WireError(
                Code.FORBIDDEN,
                "host= is not accepted; the relay uses the observed address",
            )
        return claimed

    def register(
        self, request: wire.Register, source: str
    ) -> wire.Registered | Deferred[wire.Registered]:
        host = self._claimed_host(request.host, source)
        now = self.clock.seconds()
        files = bytes.fromhex(request.files) if request.files else None
        if self.shared:
            # The store's script sweeps first, and says whether it created
            # the lease, in the same round trip.
            d = self.registry.register(host, request.port, request.name, now, files)

            def registered(lease) -> wire.Registered:
                return self._registered(lease, lease.created, host, request, source)

            def full(failure: Failure) -> NoReturn:
                failure.trap(RegistryFull)
                self._full(failure.value)

            return d.addCallbacks(registered, full)
        # Sweep first: a lease whose time is up must not count against the
        # limits, nor be revived as a "renewal" by its peer's next REGISTER.
        self.expire()
        held = len(self.registry)
        try:
            lease = self.registry.register(host, request.port, request.name, now, files)
        except RegistryFull as e:
            self._full(e)
        # New iff the table grew: comparing lease.registered with now would
        # call a renewal at the same clock reading a registration.
        return self._registered(lease, len(self.registry) > held, host, request, source)

    def _full(self, error: RegistryFull) -> NoReturn:
        self.refusals.refused(
            "registration refused: {error}", "registration", error=str(error)
        )
        raise WireError(Code.TOO_MANY, str(error)) from None

    def _registered(
        self,
        lease: Lease,
        new: bool,
        host: str,
        request: wire.Register,
        source: str,
    ) -> wire.Registered:
        """Count and log a registration (C{new}) or a renewal."""
        if new:
            self.activity.registered += 1
            self.changes.refused(
                "peer {peer_id} {event} at {address}",
                "registered",
                peer_id=lease.peer_id,
                event="registered",
                address=wire.format_address(host, request.port),
                name=request.name,
            )
            if self.dialback is not None:
                self.dialback.submit(host, request.port)
        else:
            self.activity.renewed += 1
            if self.dialback is not None and not lease.verified:
                self.dialback.submit(host, request.port)
        return wire.Registered(lease.peer_id, self.ttl, self.renew, source)

    def unregister(
        self, request: wire.Unregister, source: str
    ) -> bytes | Deferred[bytes]:
        host = self._claimed_host(request.host, source)
        lease = self.registry.unregister(host, request.port)
        if isinstance(lease, Deferred):
            return lease.addCallback(self._unregistered)
        return self._unregistered(lease)

    def _unregistered(self, lease: Lease | None) -> bytes:
        if lease is None:
            raise WireError(Code.NOT_FOUND, "no such registration")
        self.activity.unregistered += 1
        if self.dialback is not None:
            self.dialback.forget(lease.host, lease.port)
        self.changes.refused(
            "peer {peer_id} unregistered from {address}",
            "unregistered",
            peer_id=lease.peer_id,
            address=wire.format_address(lease.host, lease.port),
        )
        return wire.encode_line(f"OK {lease.peer_id}")

    def peers(
        self, request: wire.Peers | None = None
    ) -> list[bytes] | Deferred[list[bytes]]:
        """
        One page of the peer list: the header line, then one ``PEER`` line
        per lease (see L{handle}).

        The page starts after the request's cursor (the registration
        sequence number of the last peer of the previous page), so the
        relay keeps no state between pages, and costs O(log n + limit)
        however many peers are registered.  A request without ``limit=`` or
        ``cursor=`` gets the pre-paging reply: never a ``next=``.  One with
        ``hint=`` gets the likely holders of one name instead (see
        L{IRegistry.likely_holders}), also without ``next=``.
        """
        request = request if request is not None else wire.Peers()
        limit = request.limit or MAX_PEERS_PER_REPLY
        now = self.clock.seconds()
        if not self.shared:
            self.expire()  # a shared registry's call sweeps by itself
        if request.hint is not None:
            # Likely holders of one name: never paged, and the scan is
            # bounded (MAX_HINT_SCAN leases) however big the table.
            leases = self.registry.likely_holders(
                now, request.hint, limit, MAX_HINT_SCAN
            )
            self.activity.hinted += 1
            if isinstance(leases, Deferred):
                return leases.addCallback(self._listing, now, None)
            return self._listing(leases, now, None)
        after = wire.parse_cursor(request.cursor) if request.cursor else 0
        page = self.registry.page(now, after, limit, files=request.files)
        self.activity.lists += 1
        if isinstance(page, Deferred):
            return page.addCallback(self._page, now, request)
        return self._page(page, now, request)

    def _page(
        self, page: tuple[list[Lease], bool], now: float, request: wire.Peers
    ) -> list[bytes]:
        leases, more = page
        next_cursor = None
        if more and leases and request.paged:
            next_cursor = wire.format_cursor(self.registry.position(leases[-1]))
        lines = self._listing(leases, now, next_cursor)
        if request.files:
            # Each peer's name filter, for a client matching many names
            # itself: appended to the (cached) line, as on the wire.  Those
            # lines are cached too, so that a long reply going out slowly
            # (LinesProducer) holds lines every such reply shares, not a
            # copy of its own.
            cache = self._filter_lines
            if len(cache) > LINE_CACHE_ENTRIES:
                cache.clear()
            for i, lease in enumerate(leases, 1):
                files = lease.files
                if files is None:
                    continue
                line = lines[i]
                cached = cache.get(lease)
                if cached is not None and cached[0] is line and cached[1] is files:
                    lines[i] = cached[2]
                    continue
                full = line + b" files=" + files.hex().encode()
                cache[lease] = (line, files, full)
                lines[i] = full
        return lines

    def _listing(
        self, leases: Sequence[Lease], now: float, next_cursor: str | None
    ) -> list[bytes]:
        """The reply lines listing C{leases} (see L{peers})."""
        # The hot path of a listing: no PeerEntry objects and no
        # re-validation (every field was checked when the peer registered).
        # A lease's line changes only with its age in whole seconds and its
        # name, so the last line built for it is kept, in a bounded cache,
        # with what it was built from: the renewal time, the name, and the
        # span of "now - renewed" that rounds down to its age, as floats.
        # Comparing floats is cheaper than working the age out again (int()
        # of a float, or float-to-int comparisons), and just as exact.
        cache = self._lines
        if len(cache) > LINE_CACHE_ENTRIES:
            cache.clear()
        lines = [wire.format_count(len(leases), next_cursor)]
        append = lines.append
        for lease in leases:
            renewed = lease.renewed
            cached = cache.get(lease)
            if (
                cached is not None
                and cached[0] == renewed
                and cached[1] <= now - renewed < cached[2]
                and cached[3] == lease.name
            ):
                append(cached[4])
                continue
            age = int(now - renewed)
            name = lease.name
            line = f"PEER {lease.peer_id} {lease.host} {lease.port} age={age}"
            if name:
                line = f"{line} name={name}"
            encoded = line.encode()
            cache[lease] = (renewed, float(age), float(age + 1), name, encoded)
            append(encoded)
        return lines

    def report_activity(self) -> None:
        """
        Log what the relay did since the last report, in one info event
        (fields: the L{Activity} counts and C{active}), and start counting
        afresh.  Nothing is logged when nothing happened.
        """
        self.expire()
        activity, self.activity = self.activity, Activity()
        self.totals.add(activity)
        if not activity:
            return
        self.log.info(
            "activity: {registered} new peers, {renewed} renewals, "
            "{unregistered} unregistered, {expired} expired, {verified} "
            "answered the dial-back, {lists} peer lists, {hinted} name "
            "queries; {active} peers active",
            active=len(self.registry),
            **activity.as_dict(),
        )

    def expire(self) -> Deferred[None] | None:
        """
        End every lease whose time is up, logging each.  With a shared
        registry, a Deferred that fires when the sweep is done (it never
        fails: an unavailable store is logged by the registry).
        """
        expired = self.registry.expire(self.clock.seconds())
        if isinstance(expired, Deferred):
            # The leases were reported to _ended already.
            expired.addCallbacks(lambda _: None, _unavailable_is_logged)
            return expired.addErrback(self._bug)
        self._ended(expired)
        return None

    def _ended(self, leases: Sequence[Lease]) -> None:
        """Count and log leases that expired."""
        for lease in leases:
            self.activity.expired += 1
            if self.dialback is not None:
                self.dialback.forget(lease.host, lease.port)
            self.changes.refused(
                "peer {peer_id} expired at {address}",
                "expired",
                peer_id=lease.peer_id,
                address=wire.format_address(lease.host, lease.port),
            )

    def _bug(self, failure: Failure) -> None:
        self.log.failure("unexpected error from the registry", failure)


def _register_reply(registered: wire.Registered) -> list[bytes]:
    return [registered.to_line()]


def _one_line(line: bytes) -> list[bytes]:
    return [line]


def _unavailable(failure: Failure) -> NoReturn:
    """A store that did not answer is ERR 503 to the client."""
    failure.trap(RegistryUnavailable)
    raise WireError(Code.UNAVAILABLE, "registry unavailable")


def _unavailable_is_logged(failure: Failure) -> None:
    """Background calls (sweeps, dial-back results) may meet an unavailable
    store: the registry logged it once already."""
    failure.trap(RegistryUnavailable)


def _timed(
    result: object, observe: Callable[[float], object], started: float
) -> object:
    """Observe the time since C{started} (a Deferred callback)."""
    observe(perf_counter() - started)
    return result


@implementer(IPullProducer)
class LinesProducer:
    """
    A long reply, written as the client reads it: the transport asks for
    more (a pull producer) when it has sent what it held, so a client that
    stops reading holds one chunk in the relay, not the whole reply.  The
    lines are the relay's cached ones, shared with every other reply.  Each
    pull is progress (it restarts the idle timeout); a reply the client
    stops reading is cut off at the idle timeout (L{RelayProtocol}).
    """

    def __init__(self, protocol: RelayProtocol, lines: list[bytes]) -> None:
        self.protocol = protocol
        self._lines = lines
        self._next = 0

    def resumeProducing(self) -> None:
        lines = self._lines
        if self._next >= len(lines):
            return  # sent, or stopped
        protocol = self.protocol
        protocol.resetTimeout()
        transport = protocol.transport
        delimiter = protocol.delimiter
        while True:
            start = end = self._next
            size = 0
            while end < len(lines) and size < REPLY_CHUNK_BYTES:
                size += len(lines[end]) + 1
                end += 1
            self._next = end
            chunk = delimiter.join(lines[start:end]) + delimiter
            if end == len(lines):
                protocol.reply_streamed(chunk)
                return
            if plain_socket(transport) is None:
                # TLS: straight to the TLS layer, so that the transport sees
                # (and pauses us at) what it holds; one chunk per pull.
                unbuffered_write(transport)(chunk)
                return
            if not write_now(transport, chunk):
                return  # the rest waits in the transport: it asks again

    def stopProducing(self) -> None:
        """The connection is gone: drop the reply."""
        self._lines = []
        self._next = 0


class RelayProtocol(ServerLineProtocol):
    """One connection to the relay: a banner, then request/reply lines.

    Framing, idle timeout, line length and error budget come from
    L{ServerLineProtocol}; the answers from the shared L{Relay}.
    """

    role = "relay"
    log = Logger()

    def __init__(
        self,
        relay: Relay,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_SECONDS,
        on_lost: Callable[[], None] | None = None,
        idle_timeouts: IdleTimeouts | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(relay.clock, idle_timeout, on_lost, idle_timeouts)
        self.relay = relay
        # The observed address, when the factory already worked it out.
        self._source = source

    def connectionMade(self) -> None:
        # A relay's answers are at most about 80 KB: a bigger kernel buffer
        # would only let clients that stop reading park memory in it.
        cap_send_buffer(self.transport, SEND_BUFFER_BYTES)
        # Over TLS, what the client has not read waits encrypted in the TCP
        # connection under it: pause (a long reply, pipelined requests) at
        # a chunk, not Twisted's 64 KiB (800 TLS clients not reading a long
        # reply held 135 KiB each with 64 KiB).
        limit_unsent(self.transport, REPLY_CHUNK_BYTES)
        super().connectionMade()

    # Whether a request waits for a shared registry's answer (reading is
    # paused meanwhile), and whether the connection is gone.
    _waiting = False
    _lost = False
    # A long reply going out as the client reads (reading is paused).
    _streaming: LinesProducer | None = None

    def send_lines(self, lines: list[bytes]) -> None:
        """Send a reply; one longer than L{STREAM_REPLY_BYTES} as the client
        reads it (L{LinesProducer})."""
        if len(lines) < 2 or sum(map(len, lines)) < STREAM_REPLY_BYTES:
            super().send_lines(lines)
            return
        # The producer takes the transport over; no request is read until
        # the reply is out (answers stay in order).
        self.release_transport()
        self.pauseProducing()
        self._streaming = LinesProducer(self, lines)
        self.transport.registerProducer(self._streaming, False)

    def reply_streamed(self, last: bytes) -> None:
        """The long reply's last chunk: send it, and read requests again."""
        self._streaming = None
        self.transport.unregisterProducer()
        self.send_answer(last)
        self._read_next(None)

    def timeoutConnection(self) -> None:
        """A long reply the client stopped reading (no pull for the idle
        period) is cut off: an error line would land inside it."""
        if self._streaming is None:
            super().timeoutConnection()
            return
        self.log_refusal(
            "closing a connection whose client stopped reading", "not reading"
        )
        self.transport.abortConnection()

    def request_received(self, line: bytes) -> None:
        observe = self.relay.durations
        if observe is None:
            self._request(line)
            return
        # Timed until the reply is written: at once, or when a shared
        # registry answers.
        started = perf_counter()
        pending = None
        try:
            pending = self._request(line)
        finally:
            if pending is None:
                observe(perf_counter() - started)
        if pending is not None:
            pending.addBoth(_timed, observe, started)

    def _request(self, line: bytes) -> Deferred[None] | None:
        """Answer C{line}; the Deferred of an answer that waits for a
        shared registry, else C{None} (answered)."""
        # The source address cannot change: work it out once per connection.
        source = self._source
        if source is None:
            source = self._source = observed_host(self.transport.getPeer())
        request = wire.parse_relay_request(line)
        reply = self.relay.handle(request, source)
        if type(reply) is list:
            self.send_lines(reply)
            return None
        # A shared registry answers later: read no further request until
        # then, so answers go out in the order the requests came (and the
        # budgets were charged in that order too).
        self._waiting = True
        self.pauseProducing()
        reply.addCallbacks(self._answer, self._refused)
        reply.addErrback(self.relay._bug)
        return reply.addBoth(self._read_next)

    def _answer(self, lines: list[bytes]) -> None:
        if not self._lost:
            self.send_lines(lines)

    def _refused(self, failure: Failure) -> None:
        failure.trap(WireError)
        if self._lost:
            return
        error = failure.value
        if error.code == Code.UNAVAILABLE:
            # The registry logged the outage once; a line per request
            # refused meanwhile would say nothing more.
            self.send_error(error.code, error.message)
        else:
            self.refuse(error)

    def _read_next(self, _: object) -> None:
        self._waiting = False
        gate = self._gate
        if (
            not self._lost
            and not self.transport.disconnecting
            and not (gate is not None and gate.paused)
        ):
            self.resumeProducing()

    def resumeProducing(self) -> None:
        # The transport's buffer drained (see send_answer), but a request
        # still waits for the registry, or a long reply is going out: its
        # end resumes reading.
        if not self._waiting and self._streaming is None:
            super().resumeProducing()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        super().connectionLost(reason)


class RelayFactory(LimitedServerFactory):
    """
    Builds a L{RelayProtocol} per connection, all sharing one L{Relay}.

    :param limits: open-connection limits; past them a connection gets a
        L{RefusingProtocol} (``ERR 503``).  Default: L{ConnectionLimits}'s.
    :param policy: each connection's first-request deadline, lifetime and
        request count, and the refusal log (L{ConnectionPolicy}).
    """

    role = "relay"

    def __init__(
        self,
        relay: Relay,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_SECONDS,
        limits: ConnectionLimits | None = None,
        policy: ConnectionPolicy | None = None,
    ) -> None:
        super().__init__(relay.clock, idle_timeout, limits, policy)
        self.relay = relay

    def build(self, host: str, on_lost: Callable[[], None]) -> RelayProtocol:
        return RelayProtocol(
            self.relay,
            self.idle_timeout,
            on_lost,
            self.idle_timeouts,
            # source_host's "?" (not an IP connection) is refused on request.
            source=None if host == UNKNOWN_HOST else host,
        )
