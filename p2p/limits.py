"""Connection limits shared by the relay and the peer.

A server that accepts without bound can be exhausted by one host opening
connections in a loop.  ``ConnectionLimits`` counts open connections in
total and per source address; a factory asks it before building a protocol
and, past a limit, answers with ``RefusingProtocol``: the banner, one
``ERR 503`` line saying which limit, then a close.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol

from p2p import wire
from p2p.wire import Code

DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_CONNECTIONS_PER_HOST = 64


class ConnectionLimits:
    """
    Open-connection counters.

    :param max_total: connections allowed at once (0: no limit).
    :param max_per_host: connections allowed at once from one source
        address (0: no limit).
    """

    def __init__(
        self,
        max_total: int = DEFAULT_MAX_CONNECTIONS,
        max_per_host: int = DEFAULT_MAX_CONNECTIONS_PER_HOST,
    ) -> None:
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.total = 0
        self._per_host: dict[str, int] = {}

    def admit(self, host: str) -> str | None:
        """Count a new connection from C{host}, or say why it is refused."""
        if self.max_total and self.total >= self.max_total:
            return f"too many connections (limit {self.max_total})"
        held = self._per_host.get(host, 0)
        if self.max_per_host and held >= self.max_per_host:
            return f"too many connections from your address (limit {self.max_per_host})"
        self.total += 1
        self._per_host[host] = held + 1
        return None

    def release(self, host: str) -> None:
        """Forget a connection that L{admit} counted."""
        self.total -= 1
        held = self._per_host[host] - 1
        if held:
            self._per_host[host] = held
        else:
            del self._per_host[host]

    def open_from(self, host: str) -> int:
        return self._per_host.get(host, 0)


class RefusingProtocol(Protocol):
    """Greets, explains the refusal in one ``ERR 503`` line, and hangs up."""

    def __init__(self, role: str, reason: str) -> None:
        self.role = role
        self.reason = reason

    def connectionMade(self) -> None:
        self.transport.write(
            wire.banner(self.role)
            + wire.DELIMITER
            + wire.format_error(Code.UNAVAILABLE, self.reason)
            + wire.DELIMITER
        )
        self.transport.loseConnection()


def source_host(address) -> str:
    """The host part of a connection's address, for counting ("?" if none)."""
    host = getattr(address, "host", None)
    return wire.normalise_host(host) if isinstance(host, str) else "?"
