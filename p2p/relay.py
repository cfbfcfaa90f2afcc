"""The relay: peers lease a place in its table, clients read the table.

``RelayProtocol`` only frames lines and reports errors; ``Relay`` holds the
policy (leases, observed addresses, logging) and talks to an
L{p2p.interfaces.IRegistry}.  See ``docs/protocol.rst``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

from p2p import wire
from p2p.interfaces import IRegistry
from p2p.registry import RegistryFull
from p2p.wire import Code, WireError

DEFAULT_TTL_SECONDS = 60
# The idle limit covers the whole connection: a request line must be complete
# within it, so a client trickling bytes (slowloris) is cut off too.
DEFAULT_IDLE_TIMEOUT_SECONDS = 30
# A bounded reply: the table may be huge, a reply must not be.
MAX_PEERS_PER_REPLY = 1000


def default_renew_interval(ttl: int) -> int:
    """Ask peers to renew three times per lease, so two renewals may fail."""
    return max(1, ttl // 3)


def observed_host(address: IAddress) -> str:
    """The source IP of a connection, IPv4-mapped IPv6 shown as IPv4."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        raise WireError(Code.BAD_REQUEST, "the relay only serves IP connections")
    return wire.normalise_host(host)


class Relay:
    """
    The relay's policy, shared by every connection.

    :param registry: the peer table.
    :param clock: the reactor's clock; all lease times come from it.
    :param ttl: lease length granted to peers, in seconds.
    :param renew: renewal interval suggested to peers, in seconds.
    :param allow_claimed_host: honour ``host=`` in REGISTER.  Only for relays
        behind a trusted proxy: otherwise anyone can point every client at a
        victim's address.
    """

    log = Logger()

    def __init__(
        self,
        registry: IRegistry,
        clock: IReactorTime,
        ttl: int = DEFAULT_TTL_SECONDS,
        renew: int | None = None,
        allow_claimed_host: bool = False,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.ttl = ttl
        self.renew = renew if renew is not None else default_renew_interval(ttl)
        self.allow_claimed_host = allow_claimed_host

    def handle(self, request: wire.RelayRequest, source: str) -> list[bytes]:
        """Answer one parsed request from C{source}; return the reply lines."""
        if isinstance(request, wire.Register):
            return [self.register(request, source).to_line()]
        if isinstance(request, wire.Unregister):
            return [self.unregister(request, source)]
        return self.peers()

    def register(self, request: wire.Register, source: str) -> wire.Registered:
        host = source
        if request.host is not None and request.host != source:
            if not self.allow_claimed_host:
                raise WireError(
                    Code.FORBIDDEN,
                    "host= is not accepted; the relay uses the observed address",
                )
            host = request.host
        now = self.clock.seconds()
        # Sweep first: a lease whose time is up must not count against the
        # limits, nor be revived as a "renewal" by its peer's next REGISTER.
        self.expire()
        held = len(self.registry)
        try:
            lease = self.registry.register(host, request.port, request.name, now)
        except RegistryFull as e:
            self.log.warn("registration refused: {reason}", reason=str(e))
            raise WireError(Code.TOO_MANY, str(e)) from None
        # New iff the table grew: comparing lease.registered with now would
        # call a renewal at the same clock reading a registration.
        event = "registered" if len(self.registry) > held else "renewed"
        self.log.info(
            "peer {peer_id} {event} at {address}",
            peer_id=lease.peer_id,
            event=event,
            address=wire.format_address(host, request.port),
            name=request.name,
        )
        return wire.Registered(lease.peer_id, self.ttl, self.renew, source)

    def unregister(self, request: wire.Unregister, source: str) -> bytes:
        lease = self.registry.unregister(source, request.port)
        if lease is None:
            raise WireError(Code.NOT_FOUND, "no such registration")
        self.log.info(
            "peer {peer_id} unregistered from {address}",
            peer_id=lease.peer_id,
            address=wire.format_address(lease.host, lease.port),
        )
        return wire.encode_line(f"OK {lease.peer_id}")

    def peers(self) -> list[bytes]:
        now = self.clock.seconds()
        self.expire()
        leases = self.registry.active(now, MAX_PEERS_PER_REPLY)
        self.log.info("peer list sent ({count} active)", count=len(leases))
        lines = [wire.format_count(len(leases))]
        for lease in leases:
            entry = wire.PeerEntry(
                lease.peer_id,
                lease.host,
                lease.port,
                int(now - lease.renewed),
                lease.name,
            )
            lines.append(entry.to_line())
        return lines

    def expire(self) -> None:
        """End every lease whose time is up, logging each."""
        for lease in self.registry.expire(self.clock.seconds()):
            self.log.info(
                "peer {peer_id} expired at {address}",
                peer_id=lease.peer_id,
                address=wire.format_address(lease.host, lease.port),
            )


class RelayProtocol(LineReceiver, TimeoutMixin):
    """One connection to the relay: a banner, then request/reply lines."""

    delimiter = wire.DELIMITER
    MAX_LENGTH = wire.MAX_LINE_LENGTH
    log = Logger()

    def __init__(self, relay: Relay, idle_timeout: float | None) -> None:
        self.relay = relay
        self.idle_timeout = idle_timeout

    def callLater(self, period, func):  # TimeoutMixin hook: use our clock
        return self.relay.clock.callLater(period, func)

    def connectionMade(self) -> None:
        self.setTimeout(self.idle_timeout)
        self.sendLine(wire.banner("relay"))

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        if not line.strip():
            return
        try:
            source = observed_host(self.transport.getPeer())
            request = wire.parse_relay_request(line)
            reply = self.relay.handle(request, source)
        except WireError as e:
            self.log.warn("refused a request: {error}", error=str(e))
            self.sendLine(e.to_line())
            return
        self.transport.writeSequence([part + self.delimiter for part in reply])

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(wire.format_error(Code.LINE_TOO_LONG, "line too long"))
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.sendLine(wire.format_error(Code.TIMEOUT, "idle timeout"))
        self.transport.loseConnection()


class RelayFactory(ServerFactory):
    """Builds a L{RelayProtocol} per connection, all sharing one L{Relay}."""

    noisy = False

    def __init__(
        self, relay: Relay, idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_SECONDS
    ) -> None:
        self.relay = relay
        self.idle_timeout = idle_timeout

    def buildProtocol(self, addr: IAddress) -> RelayProtocol:
        protocol = RelayProtocol(self.relay, self.idle_timeout)
        protocol.factory = self
        return protocol
