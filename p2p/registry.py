"""The relay's in-memory peer table: leases, heap-driven expiry, paging.

Three structures, each chosen for one job (see ``docs/performance.rst``):

* **by address**: ``host -> Lease`` for a host holding one lease (the
  common case on the internet), ``host -> {port: Lease}`` once it holds
  more.  No ``(host, port)`` tuple per lease, no separate per-host counter,
  and every lease of a host shares one host string.
* **by listing order, in two tiers**: verified leases (the relay
  dialled the peer back and it answered as a peer, see L{p2p.dialback})
  and the others, each a *chunked list* (L{_Order}): short lists of leases
  in the order of their listing keys (L{listing_key}) plus the first key
  of each chunk.  A listing gives every verified lease before any
  unverified one, so leases on ports where no peer answers (a Sybil flood)
  cannot push honest peers off the first pages; and inside a tier, every
  wide network's first lease before any wide network's second, so leases
  that do answer, from a few providers' networks, cannot either.
  ``page`` finds a cursor by bisection (O(log n)) and then reads forward,
  so a reply costs O(log n + limit) however big the table is.  Adding or
  removing a lease costs O(log n + chunk size).
* **by expiry time**: a min-heap of the leases themselves, ordered by the
  time they were last *due* to be checked.  A renewal only moves
  ``expires``; when the lease comes due the sweep sees it was renewed and
  pushes it back down (``heapreplace``), so each lease sits in the heap
  once, and a sweep costs O((expired + renewed since last due) * log n).
"""

from __future__ import annotations

import heapq
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from operator import attrgetter

from zope.interface import implementer

from p2p import hints, netgroup
from p2p.interfaces import ILease, IRegistry
from p2p.wire import peer_id_for

# Leases per chunk of the order list: big enough that the chunk index stays
# small (2,000 entries for 1M leases), small enough that deleting inside a
# chunk (a memmove) costs well under a microsecond.
CHUNK_SIZE = 512

# Leases a hinted query (``PEERS hint=``) examines at most, oldest
# registration first: bounds its cost (about 0.25 us per lease, 2.5 ms in
# all) however big the table, at the price of never suggesting the younger
# peers of a huge one (they are still listed, and a client still tries them).
MAX_HINT_SCAN = 10_000

# A filter with more bits set than this matches most names (a false
# positive rate of 1/8 and up: an honest peer with about 470 names, or one
# that set every bit to be suggested for everything).  The registry keeps
# no such filter: its peer is listed, never suggested for a name.
SATURATED_FILTER_BITS = hints.FILTER_BITS // 2

# Suggestions for a name from one network before every other network's
# (see likely_holders); the same rule for a client matching names itself.
SUGGESTED_PER_NETWORK = hints.SUGGESTED_PER_NETWORK

# Cursor positions in the unverified tier carry this bit (see position).
UNVERIFIED_TIER = 1 << 62

# A listing key is a lease's *round* above its registration number (see
# listing_key).  Registration numbers stay below 2**ROUND_SHIFT (17.6
# trillion); a wide network's leases past its 256th share the last round,
# by registration.  Keys stay below 2**52: exact as Redis scores, which
# are doubles, and clear of UNVERIFIED_TIER.
ROUND_SHIFT = 44
MAX_ROUND = 255

_seq_of = attrgetter("seq")


def listing_key(held_by_wide_network: int, number: int) -> int:
    """
    Where a new lease goes in its tier's listing: its *round*, the leases
    its wide network (an IPv4 /16, an IPv6 /32: L{p2p.netgroup}) held when
    it registered, above its registration C{number}.  Listing by key gives
    every wide network's first lease, then every one's second, and so on,
    each round oldest first: a hundred addresses from a few providers'
    networks take a few places per round, and an honest peer alone in its
    wide network is in the first round whenever it registered.  Taking
    the first rounds needs addresses from many providers.
    """
    return min(held_by_wide_network, MAX_ROUND) << ROUND_SHIFT | number


def saturated(files: bytes) -> bool:
    """Whether a filter matches too much to suggest its peer for a name."""
    return int.from_bytes(files, "big").bit_count() > SATURATED_FILTER_BITS


def check_settings(ttl: float, *limits: int) -> None:
    """Refuse (ValueError) a lease length or registration limits that
    cannot work; every registry checks its settings so."""
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    if any(limit < 0 for limit in limits):
        # A negative limit would refuse every registration.
        raise ValueError("registration limits must be 0 (no limit) or more")


def too_many_peers(limit: int) -> str:
    """Why a registration is refused: the table is full."""
    return f"the relay holds its maximum of {limit} peers"


def too_many_per_host(limit: int) -> str:
    """Why a registration is refused: its source holds its share."""
    return f"at most {limit} registrations per address"


def too_many_per_network(limit: int, network: str) -> str:
    """Why a registration is refused: its network holds its share."""
    return f"at most {limit} registrations per network ({network})"


class RegistryFull(Exception):
    """A registration limit was reached; the message says why."""


class RegistryUnavailable(Exception):
    """A shared registry's store did not answer in time (the relay answers
    ``ERR 503 registry unavailable``)."""


@implementer(ILease)
class Lease:
    """
    One peer's registration; mutable so that renewals cost no allocation.
    C{seq} is its listing key (L{listing_key}): its place in its tier.
    C{network} is its network's key (L{p2p.netgroup}), one shared string
    per network, kept by L{MemoryRegistry} (parsing the address again costs
    10 us, and a hinted query may ask for 10,000 leases' networks); the
    Redis registry keeps it in Redis and leaves this empty.

    The peer id (16 hex digits of a SHA-256 of the address) is kept as a
    64-bit int, C{pid}: 40 bytes, where the string would take 72 and
    recomputing it for every listed line would cost 1.5 us (half of a
    ``PEERS`` reply's time).
    """

    __slots__ = (
        "pid",
        "host",
        "network",
        "port",
        "name",
        "seq",
        "registered",
        "renewed",
        "expires",
        "due",
        "files",
        "verified",
    )

    def __init__(
        self,
        host: str,
        port: int,
        name: str | None,
        now: float,
        expires: float,
        seq: int = 0,
        files: bytes | None = None,
        network: str = "",
    ) -> None:
        self.pid = int(peer_id_for(host, port), 16)
        self.host = host
        self.network = network
        self.port = port
        self.name = name
        self.seq = seq
        self.registered = now
        self.renewed = now
        self.expires = expires
        # Its key in the expiry heap: fixed while it is in the heap (the
        # heap's order must not change behind its back), caught up with
        # expires when the lease comes due.
        self.due = expires
        # The announced name filter (256 raw bytes, see p2p.hints) or None:
        # one slot for a peer that announces none (free in practice: it
        # fits in the object's 16-byte allocation rounding).
        self.files = files
        # Whether the relay dialled the peer back and it answered.
        self.verified = False

    @property
    def peer_id(self) -> str:
        return f"{self.pid:016x}"

    def __lt__(self, other: Lease) -> bool:
        # The expiry heap's order; ties go by registration, so a sweep
        # reports leases due at the same moment in a repeatable order.
        return self.due < other.due or (self.due == other.due and self.seq < other.seq)

    def __repr__(self) -> str:
        return f"<Lease {self.peer_id} {self.host}:{self.port} expires={self.expires}>"


@implementer(IRegistry)
class MemoryRegistry:
    """
    Leases by address, by listing order and by expiry time (see the
    module docstring for the layout and its costs).

    Expiry costs O(expired + renewed) heap operations and never scans the
    table; a page of C{limit} leases from a cursor costs O(log n + limit).

    :param ttl: seconds a lease lasts after each registration or renewal.
    :param max_peers: total leases allowed (0: no limit).
    :param max_per_host: leases allowed per source: an IPv4 address or an
        IPv6 /64 (0: no limit).
    :param max_per_network: leases allowed per network: an IPv4 /24 or an
        IPv6 /48 (0: no limit; see L{p2p.netgroup}).
    """

    def __init__(
        self,
        ttl: float,
        max_peers: int = 0,
        max_per_host: int = 0,
        max_per_network: int = 0,
    ) -> None:
        check_settings(ttl, max_peers, max_per_host, max_per_network)
        self.ttl = ttl
        self.max_peers = max_peers
        self.max_per_host = max_per_host
        self.max_per_network = max_per_network
        self._by_host: dict[str, Lease | dict[int, Lease]] = {}
        # Leases per wide network (for listing keys), and per network and
        # per IPv6 /64 (an IPv4 source is one host, counted by _by_host)
        # for the caps, kept only while their limit is on.
        self._per_network: dict[str, int] = {}
        self._per_wide_network: dict[str, int] = {}
        self._per_source_v6: dict[str, int] = {}
        # Verified leases per host: the connection reserve's members.
        self._verified_hosts: dict[str, int] = {}
        self._count = 0
        self._seq = 0
        self._verified = _Order()
        self._unverified = _Order()
        self._heap: list[Lease] = []
        # One int object per distinct port, shared by every lease using it.
        self._ports: dict[int, int] = {}

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Lease]:
        return iter([*self._verified, *self._unverified])

    # -- by address ----------------------------------------------------------

    def _find(self, host: str, port: int) -> Lease | None:
        held = self._by_host.get(host)
        if held is None or type(held) is Lease:
            return held if held is not None and held.port == port else None
        return held.get(port)

    def _held(self, host: str) -> int:
        held = self._by_host.get(host)
        if held is None:
            return 0
        return 1 if type(held) is Lease else len(held)

    def holds(self, host: str) -> bool:
        """IRegistry API: whether C{host} holds a lease (expired or not)."""
        return host in self._by_host

    def holds_verified(self, host: str) -> bool:
        """IRegistry API: whether C{host} holds a lease whose peer answered
        the dial-back."""
        return host in self._verified_hosts

    def find(self, host: str, port: int) -> Lease | None:
        """IRegistry API: the lease of C{host}:C{port}, if any (maybe
        expired but not swept yet)."""
        return self._find(host, port)

    def _refusal(self, host: str) -> str | None:
        """Why a new lease for C{host} is refused, or C{None}."""
        if self.max_peers and self._count >= self.max_peers:
            return too_many_peers(self.max_peers)
        if self.max_per_host:
            source = netgroup.source_of(host)
            held = (
                self._held(host)
                if source == host
                else self._per_source_v6.get(source, 0)
            )
            if held >= self.max_per_host:
                return too_many_per_host(self.max_per_host)
        if self.max_per_network:
            network = netgroup.network_of(host)
            if self._per_network.get(network, 0) >= self.max_per_network:
                return too_many_per_network(self.max_per_network, network)
        return None

    def _count_groups(self, lease: Lease, step: int) -> None:
        """Add C{step} to C{lease}'s network, wide network and IPv6 source
        counts."""
        wide = netgroup.wide_network_of(lease.host)
        netgroup.tally(self._per_wide_network, wide, step)
        if self.max_per_network:
            netgroup.tally(self._per_network, lease.network, step)
        if self.max_per_host and ":" in lease.host:
            source = netgroup.source_of(lease.host)
            if source != lease.host:
                netgroup.tally(self._per_source_v6, source, step)

    def _add(self, lease: Lease) -> None:
        held = self._by_host.get(lease.host)
        if held is None:
            self._by_host[lease.host] = lease
        elif type(held) is Lease:
            lease.host = held.host  # share one string per host
            self._by_host[lease.host] = {held.port: held, lease.port: lease}
        else:
            lease.host = next(iter(held.values())).host
            held[lease.port] = lease
        self._count += 1

    def _remove(self, lease: Lease) -> None:
        held = self._by_host[lease.host]
        if held is lease:
            del self._by_host[lease.host]
        else:
            del held[lease.port]
            if len(held) == 1:
                (self._by_host[lease.host],) = held.values()
        self._count -= 1
        self._count_groups(lease, -1)
        if lease.verified:
            netgroup.tally(self._verified_hosts, lease.host, -1)
        self._unlist(lease)

    # -- by listing order ----------------------------------------------------

    def _order_of(self, lease: Lease) -> _Order:
        return self._verified if lease.verified else self._unverified

    def _unlist(self, lease: Lease) -> None:
        self._order_of(lease).remove(lease)

    def position(self, lease: Lease) -> int:
        """
        IRegistry API: where C{lease} stands in a listing, as a cursor
        (verified leases first, each tier by listing key).
        """
        return lease.seq if lease.verified else UNVERIFIED_TIER | lease.seq

    def page(
        self, now: float, after: int, limit: int, files: bool = False
    ) -> tuple[list[Lease], bool]:
        """
        IRegistry API: up to C{limit} leases listed after position C{after}
        (see L{position}; 0: from the start), verified leases first, and
        whether more remain.  The leases here always hold their filters,
        whatever C{files} says.
        """
        self.expire(now)
        result: list[Lease] = []
        if not after & UNVERIFIED_TIER:
            result, more = self._verified.page(after, limit)
            if more or len(result) >= limit:
                return result, bool(more or len(self._unverified))
            after = 0
        leases, more = self._unverified.page(
            after & ~UNVERIFIED_TIER, limit - len(result)
        )
        result.extend(leases)
        return result, more

    def active(self, now: float, limit: int) -> list[Lease]:
        return self.page(now, 0, limit)[0]

    def likely_holders(
        self, now: float, hint: str, limit: int, scan: int = MAX_HINT_SCAN
    ) -> list[Lease]:
        """
        IRegistry API: up to C{limit} leases whose announced filter may hold
        the name of C{hint}, in listing order, among the first C{scan}
        unexpired leases.
        """
        self.expire(now)
        match = hints.matcher(hint)

        def matching() -> Iterator[Lease]:
            seen = 0
            for order in (self._verified, self._unverified):
                for chunk in order.chunks:
                    for lease in chunk[: scan - seen]:
                        files = lease.files
                        if files is not None and match(files):
                            yield lease
                    seen += len(chunk)
                    if seen >= scan:
                        return

        # A network's matches beyond its first few wait until every other
        # network's came: fakes that answer the dial-back from one network
        # cannot push an honest holder from another down the list.
        return netgroup.spread(
            matching(),
            attrgetter("network"),
            SUGGESTED_PER_NETWORK,
            limit,
        )

    # -- register, unregister, expire ----------------------------------------

    def register(
        self,
        host: str,
        port: int,
        name: str | None,
        now: float,
        files: bytes | None = None,
    ) -> Lease:
        expires = now + self.ttl
        if files is not None and saturated(files):
            files = None  # it would make its peer a suggestion for any name
        lease = self._find(host, port)
        if lease is not None and lease.expires <= now:
            # Run out but not yet swept: a new registration, not a renewal.
            self.unregister(host, port)
            lease = None
        if lease is not None:
            lease.renewed = now
            lease.expires = expires
            lease.name = name
            lease.files = files
            return lease
        refusal = self._refusal(host)
        if refusal is not None:
            raise RegistryFull(refusal)
        self._seq += 1
        port = self._ports.setdefault(port, port)
        network = sys.intern(netgroup.network_of(host))
        held = self._per_wide_network.get(netgroup.wide_network_of(host), 0)
        key = listing_key(held, self._seq)
        lease = Lease(host, port, name, now, expires, key, files, network)
        self._add(lease)
        self._count_groups(lease, 1)
        self._unverified.add(lease)
        heapq.heappush(self._heap, lease)
        if len(self._heap) > 2 * self._count + 1024:
            self._compact()
        return lease

    def _compact(self) -> None:
        # Leases unregistered before they came due stay in the heap until
        # then; a register/unregister loop would grow it, so rebuild it from
        # the live leases now and then (amortised O(1) per registration).
        heap = []
        for lease in self:
            lease.due = lease.expires
            heap.append(lease)
        heapq.heapify(heap)
        self._heap = heap

    def mark_verified(self, host: str, port: int) -> Lease | None:
        """
        IRegistry API: the peer at C{host}:C{port} answered the relay's
        dial-back: list its lease with the verified ones.

        :return: the lease, or C{None} if it is gone.
        """
        lease = self._find(host, port)
        if lease is not None and not lease.verified:
            self._unverified.remove(lease)
            lease.verified = True
            self._verified.add(lease)
            netgroup.tally(self._verified_hosts, lease.host, 1)
        return lease

    def unregister(self, host: str, port: int) -> Lease | None:
        lease = self._find(host, port)
        if lease is not None:
            # Its heap entry is recognised as gone and dropped when it
            # comes due.
            self._remove(lease)
        return lease

    def expire(self, now: float) -> list[Lease]:
        expired = []
        heap = self._heap
        while heap and heap[0].due <= now:
            lease = heap[0]
            if self._find(lease.host, lease.port) is not lease:
                heapq.heappop(heap)  # unregistered earlier
            elif lease.expires <= now:
                heapq.heappop(heap)
                self._remove(lease)
                expired.append(lease)
            else:
                # Renewed since it was pushed: check again when it is due.
                lease.due = lease.expires
                heapq.heapreplace(heap, lease)
        return expired


class _Order:
    """
    Leases in listing-key order, as a chunked list: short lists of leases
    plus the first key of each (see the module doc).  A lease with the
    largest key appends; any other (a later round's, or a lease moving
    tiers) inserts into its chunk, which splits when it grows too long.
    """

    __slots__ = ("chunks", "firsts", "count")

    def __init__(self) -> None:
        self.chunks: list[list[Lease]] = []
        self.firsts: list[int] = []
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Lease]:
        return iter([lease for chunk in self.chunks for lease in chunk])

    def add(self, lease: Lease) -> None:
        chunks, firsts = self.chunks, self.firsts
        self.count += 1
        if not chunks or lease.seq > chunks[-1][-1].seq:
            if chunks and len(chunks[-1]) < CHUNK_SIZE:
                chunks[-1].append(lease)
            else:
                chunks.append([lease])
                firsts.append(lease.seq)
            return
        index = max(0, bisect_right(firsts, lease.seq) - 1)
        chunk = chunks[index]
        chunk.insert(bisect_left(chunk, lease.seq, key=_seq_of), lease)
        firsts[index] = chunk[0].seq
        if len(chunk) > 2 * CHUNK_SIZE:
            chunks.insert(index + 1, chunk[CHUNK_SIZE:])
            del chunk[CHUNK_SIZE:]
            firsts.insert(index + 1, chunks[index + 1][0].seq)

    def remove(self, lease: Lease) -> None:
        chunks, firsts = self.chunks, self.firsts
        index = bisect_right(firsts, lease.seq) - 1
        chunk = chunks[index]
        position = bisect_left(chunk, lease.seq, key=_seq_of)
        del chunk[position]
        self.count -= 1
        if not chunk:
            del chunks[index], firsts[index]
            return
        if position == 0:
            firsts[index] = chunk[0].seq
        # Merge a chunk that shrank with its successor, so churn cannot
        # leave many tiny chunks behind.
        if len(chunk) < CHUNK_SIZE // 4 and index + 1 < len(chunks):
            following = chunks[index + 1]
            if len(chunk) + len(following) <= CHUNK_SIZE:
                chunk.extend(following)
                del chunks[index + 1], firsts[index + 1]

    def page(self, after: int, limit: int) -> tuple[list[Lease], bool]:
        """Up to C{limit} leases after listing key C{after}, and whether
        more follow."""
        chunks = self.chunks
        index = bisect_right(self.firsts, after) - 1
        if index < 0:
            index, position = 0, 0
        else:
            position = bisect_right(chunks[index], after, key=_seq_of)
        result: list[Lease] = []
        while index < len(chunks) and len(result) < limit:
            chunk = chunks[index]
            taken = chunk[position : position + limit - len(result)]
            result.extend(taken)
            position += len(taken)
            if position >= len(chunk):
                index, position = index + 1, 0
        more = index < len(chunks) and position < len(chunks[index])
        return result, more
