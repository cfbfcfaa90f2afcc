"""The relay's in-memory peer table: leases, heap-driven expiry, paging.

Three structures, each chosen for one job (see ``docs/performance.rst``):

* **by address**: ``host -> Lease`` for a host holding one lease (the
  common case on the internet), ``host -> {port: Lease}`` once it holds
  more.  No ``(host, port)`` tuple per lease, no separate per-host counter,
  and every lease of a host shares one host string.
* **by registration order**: a *chunked list*, a list of short lists of
  leases in sequence-number order plus the first sequence number of each
  chunk.  ``page`` finds a cursor by bisection (O(log n)) and then reads
  forward, so a reply costs O(log n + limit) however big the table is.
  Removing a lease costs O(log n + chunk size).
* **by expiry time**: a min-heap of the leases themselves, ordered by the
  time they were last *due* to be checked.  A renewal only moves
  ``expires``; when the lease comes due the sweep sees it was renewed and
  pushes it back down (``heapreplace``), so each lease sits in the heap
  once, and a sweep costs O((expired + renewed since last due) * log n).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from operator import attrgetter

from zope.interface import implementer

from p2p import hints
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

_seq_of = attrgetter("seq")


class RegistryFull(Exception):
    """A registration limit was reached; the message says why."""


@implementer(ILease)
class Lease:
    """
    One peer's registration; mutable so that renewals cost no allocation.

    The peer id (16 hex digits of a SHA-256 of the address) is kept as a
    64-bit int, C{pid}: 40 bytes, where the string would take 72 and
    recomputing it for every listed line would cost 1.5 us (half of a
    ``PEERS`` reply's time).
    """

    __slots__ = (
        "pid",
        "host",
        "port",
        "name",
        "seq",
        "registered",
        "renewed",
        "expires",
        "due",
        "files",
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
    ) -> None:
        self.pid = int(peer_id_for(host, port), 16)
        self.host = host
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
    Leases by address, by registration order and by expiry time (see the
    module docstring for the layout and its costs).

    Expiry costs O(expired + renewed) heap operations and never scans the
    table; a page of C{limit} leases from a cursor costs O(log n + limit).

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
        self._by_host: dict[str, Lease | dict[int, Lease]] = {}
        self._count = 0
        self._seq = 0
        self._chunks: list[list[Lease]] = []
        self._firsts: list[int] = []
        self._heap: list[Lease] = []
        # One int object per distinct port, shared by every lease using it.
        self._ports: dict[int, int] = {}

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Lease]:
        return iter([lease for chunk in self._chunks for lease in chunk])

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
        self._unlist(lease)

    # -- by registration order -----------------------------------------------

    def _list(self, lease: Lease) -> None:
        chunks = self._chunks
        if chunks and len(chunks[-1]) < CHUNK_SIZE:
            chunks[-1].append(lease)
        else:
            chunks.append([lease])
            self._firsts.append(lease.seq)

    def _unlist(self, lease: Lease) -> None:
        chunks, firsts = self._chunks, self._firsts
        index = bisect_right(firsts, lease.seq) - 1
        chunk = chunks[index]
        position = bisect_left(chunk, lease.seq, key=_seq_of)
        del chunk[position]
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

    def page(self, now: float, after: int, limit: int) -> tuple[list[Lease], bool]:
        """
        IRegistry API: up to C{limit} leases registered after sequence
        number C{after}, oldest first, and whether more remain.
        """
        self.expire(now)
        chunks = self._chunks
        index = bisect_right(self._firsts, after) - 1
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

    def active(self, now: float, limit: int) -> list[Lease]:
        return self.page(now, 0, limit)[0]

    def likely_holders(
        self, now: float, hint: str, limit: int, scan: int = MAX_HINT_SCAN
    ) -> list[Lease]:
        """
        IRegistry API: up to C{limit} leases whose announced filter may hold
        the name of C{hint}, oldest registration first, among the first
        C{scan} unexpired leases.
        """
        self.expire(now)
        match = hints.matcher(hint)
        result: list[Lease] = []
        seen = 0
        for chunk in self._chunks:
            for lease in chunk[: scan - seen]:
                files = lease.files
                if files is not None and match(files):
                    result.append(lease)
                    if len(result) >= limit:
                        return result
            seen += len(chunk)
            if seen >= scan:
                break
        return result

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
        if self.max_peers and self._count >= self.max_peers:
            raise RegistryFull(f"the relay holds its maximum of {self.max_peers} peers")
        if self.max_per_host and self._held(host) >= self.max_per_host:
            raise RegistryFull(f"at most {self.max_per_host} registrations per address")
        self._seq += 1
        port = self._ports.setdefault(port, port)
        lease = Lease(host, port, name, now, expires, self._seq, files)
        self._add(lease)
        self._list(lease)
        heapq.heappush(self._heap, lease)
        if len(self._heap) > 2 * self._count + 1024:
            self._compact()
        return lease

    def _compact(self) -> None:
        # Leases unregistered before they came due stay in the heap until
        # then; a register/unregister loop would grow it, so rebuild it from
        # the live leases now and then (amortised O(1) per registration).
        heap = []
        for chunk in self._chunks:
            for lease in chunk:
                lease.due = lease.expires
                heap.append(lease)
        heapq.heapify(heap)
        self._heap = heap

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
