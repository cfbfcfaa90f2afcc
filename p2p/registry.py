"""The relay's in-memory peer table: leases with heap-driven expiry."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from zope.interface import implementer

from p2p.interfaces import ILease, IRegistry
from p2p.wire import peer_id_for


class RegistryFull(Exception):
    """A registration limit was reached; the message says which."""


@implementer(ILease)
class Lease:
    """One peer's registration; mutable so that renewals cost no allocation."""

    __slots__ = ("peer_id", "host", "port", "name", "registered", "renewed", "expires")

    def __init__(
        self, host: str, port: int, name: str | None, now: float, expires: float
    ) -> None:
        self.peer_id = peer_id_for(host, port)
        self.host = host
        self.port = port
        self.name = name
        self.registered = now
        self.renewed = now
        self.expires = expires

    def __repr__(self) -> str:
        return f"<Lease {self.peer_id} {self.host}:{self.port} expires={self.expires}>"


@implementer(IRegistry)
class MemoryRegistry:
    """
    Leases in a dict keyed by address, plus a min-heap of expiry times.

    A renewal pushes a fresh heap entry and leaves the old one behind; stale
    entries are recognised (their time no longer matches the lease) and
    dropped when they reach the top.  So expiry costs O(expired + stale) and
    never scans the table, and the heap holds at most about ttl/renew entries
    per lease.

    :param ttl: seconds a lease lasts after each registration or renewal.
    :param max_peers: total leases allowed (0: no limit).
    :param max_per_host: leases allowed per observed host (0: no limit).
    """

    def __init__(self, ttl: float, max_peers: int = 0, max_per_host: int = 0) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if max_peers < 0 or max_per_host < 0:
            # A negative limit would refuse every registration.
            raise ValueError("registration limits must be 0 (no limit) or more")
        self.ttl = ttl
        self.max_peers = max_peers
        self.max_per_host = max_per_host
        self._leases: dict[tuple[str, int], Lease] = {}
        self._per_host: dict[str, int] = {}
        self._heap: list[tuple[float, str, int]] = []

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._leases.values()))

    def register(self, host: str, port: int, name: str | None, now: float) -> Lease:
        key = (host, port)
        expires = now + self.ttl
        lease = self._leases.get(key)
        if lease is not None and lease.expires <= now:
            # Run out but not yet swept: a new registration, not a renewal.
            self.unregister(host, port)
            lease = None
        if lease is None:
            if self.max_peers and len(self._leases) >= self.max_peers:
                raise RegistryFull(
                    f"the relay holds its maximum of {self.max_peers} peers"
                )
            held = self._per_host.get(host, 0)
            if self.max_per_host and held >= self.max_per_host:
                raise RegistryFull(
                    f"at most {self.max_per_host} registrations per address"
                )
            lease = Lease(host, port, name, now, expires)
            self._leases[key] = lease
            self._per_host[host] = held + 1
        else:
            lease.renewed = now
            lease.expires = expires
            lease.name = name
        heapq.heappush(self._heap, (expires, host, port))
        if len(self._heap) > 4 * len(self._leases) + 1024:
            self._compact()
        return lease

    def _compact(self) -> None:
        # Peers that renew far more often than asked leave many stale heap
        # entries; rebuilding now and then keeps the heap O(leases), at an
        # amortised O(1) per renewal.
        self._heap = [
            (lease.expires, lease.host, lease.port) for lease in self._leases.values()
        ]
        heapq.heapify(self._heap)

    def unregister(self, host: str, port: int) -> Lease | None:
        lease = self._leases.pop((host, port), None)
        if lease is not None:
            self._forget_host(host)
        # Its heap entries turn stale and are dropped when they come due.
        return lease

    def expire(self, now: float) -> list[Lease]:
        expired = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, host, port = heapq.heappop(heap)
            lease = self._leases.get((host, port))
            if lease is not None and lease.expires == when:
                del self._leases[(host, port)]
                self._forget_host(host)
                expired.append(lease)
        return expired

    def active(self, now: float, limit: int) -> list[Lease]:
        self.expire(now)
        result = []
        for lease in self._leases.values():
            if len(result) >= limit:
                break
            result.append(lease)
        return result

    def _forget_host(self, host: str) -> None:
        held = self._per_host[host] - 1
        if held:
            self._per_host[host] = held
        else:
            del self._per_host[host]
