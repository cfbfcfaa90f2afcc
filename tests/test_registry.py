"""Tests for ``p2p.registry``: the relay's lease table and its expiry heap."""

from __future__ import annotations

import heapq
import random

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from p2p import registry as registry_module
from p2p.interfaces import ILease, IRegistry
from p2p.registry import Lease, MemoryRegistry, RegistryFull
from p2p.wire import peer_id_for

from ._registry_suite import SCENARIOS, Scenario

TTL = 60.0
HOST = "10.0.0.5"
OTHER_HOST = "10.0.0.6"
PORT = 9000


class CountingHeapq:
    """
    Stand-in for the ``heapq`` module inside ``p2p.registry``.

    Every heap entry ``expire`` examines is popped (or, for a renewed lease,
    replaced by itself with its new due time), so recording those measures
    exactly how much of the heap an expiry sweep touched, without reading the
    registry's private state.
    """

    heappush = staticmethod(heapq.heappush)
    heapify = staticmethod(heapq.heapify)

    def __init__(self) -> None:
        # (due time, host, port) of each entry examined, in order.
        self.popped: list[tuple[float, str, int]] = []

    def heappop(self, heap):
        entry = heapq.heappop(heap)
        self.popped.append((entry.due, entry.host, entry.port))
        return entry

    def heapreplace(self, heap, item):
        # A renewed lease that came due is examined and pushed back.
        entry = heap[0]
        self.popped.append((item.due, entry.host, entry.port))
        return heapq.heapreplace(heap, item)


class RegistryTestCase(SynchronousTestCase):
    """Shared helpers for the registry tests."""

    def count_heap_pops(self) -> CountingHeapq:
        """Observe heap pops made by ``p2p.registry`` for this test only."""
        counter = CountingHeapq()
        self.patch(registry_module, "heapq", counter)
        return counter

    def assertAlive(self, registry: MemoryRegistry, now: float, *leases) -> None:
        """Each lease survives expiry at ``now`` and is listed as active."""
        expired = registry.expire(now)
        for lease in leases:
            self.assertNotIn(lease, expired, f"{lease!r} expired at {now}")
            self.assertIn(lease, registry.active(now, 10**6))

    def assertExpiresAt(self, registry: MemoryRegistry, now: float, *leases) -> None:
        """Exactly ``leases`` expire at ``now`` and leave the table."""
        self.assertEqual(registry.expire(now), list(leases))
        active = registry.active(now, 10**6)
        for lease in leases:
            self.assertNotIn(lease, active)
            self.assertNotIn(lease, list(registry))


class InterfaceTests(SynchronousTestCase):
    """``MemoryRegistry`` and ``Lease`` provide their interfaces."""

    def test_registry(self) -> None:
        """MemoryRegistry provides IRegistry."""
        self.assertTrue(verifyClass(IRegistry, MemoryRegistry))
        self.assertTrue(verifyObject(IRegistry, MemoryRegistry(TTL)))

    def test_lease(self) -> None:
        """A lease handed out by register provides ILease."""
        lease = MemoryRegistry(TTL).register(HOST, PORT, "box", 0.0)
        self.assertTrue(verifyObject(ILease, lease))

    def test_bad_ttl(self) -> None:
        """A lease must last some time."""
        self.assertRaises(ValueError, MemoryRegistry, 0)
        self.assertRaises(ValueError, MemoryRegistry, -1.0)


class RegisterTests(RegistryTestCase):
    """register, renewal, unregister and listing."""

    def setUp(self) -> None:
        self.registry = MemoryRegistry(TTL)

    def test_register(self) -> None:
        """A new lease records the address, name and times."""
        lease = self.registry.register(HOST, PORT, "box", 100.0)
        self.assertIsInstance(lease, Lease)
        self.assertEqual(lease.peer_id, peer_id_for(HOST, PORT))
        self.assertEqual((lease.host, lease.port, lease.name), (HOST, PORT, "box"))
        self.assertEqual((lease.registered, lease.renewed), (100.0, 100.0))
        self.assertEqual(lease.expires, 100.0 + TTL)
        self.assertEqual(len(self.registry), 1)
        self.assertEqual(list(self.registry), [lease])
        self.assertIn(lease.peer_id, repr(lease))

    def test_renew(self) -> None:
        """Registering the same address again renews the same lease."""
        lease = self.registry.register(HOST, PORT, "old", 100.0)
        renewed = self.registry.register(HOST, PORT, "new", 130.0)
        self.assertIs(renewed, lease)
        self.assertEqual(lease.registered, 100.0)
        self.assertEqual(lease.renewed, 130.0)
        self.assertEqual(lease.expires, 130.0 + TTL)
        self.assertEqual(lease.name, "new")
        self.assertEqual(len(self.registry), 1)

    def test_renew_clears_name(self) -> None:
        """A renewal without a name drops the old one (latest wins)."""
        self.registry.register(HOST, PORT, "old", 0.0)
        self.assertIsNone(self.registry.register(HOST, PORT, None, 1.0).name)

    def test_distinct_addresses(self) -> None:
        """Host and port together identify a lease."""
        a = self.registry.register(HOST, PORT, None, 0.0)
        b = self.registry.register(HOST, PORT + 1, None, 0.0)
        c = self.registry.register(OTHER_HOST, PORT, None, 0.0)
        self.assertEqual(len({a.peer_id, b.peer_id, c.peer_id}), 3)
        self.assertEqual(len(self.registry), 3)

    def test_unregister(self) -> None:
        """unregister ends exactly that lease and returns it."""
        lease = self.registry.register(HOST, PORT, None, 0.0)
        other = self.registry.register(HOST, PORT + 1, None, 0.0)
        self.assertIs(self.registry.unregister(HOST, PORT), lease)
        self.assertEqual(list(self.registry), [other])
        self.assertEqual(self.registry.active(1.0, 10), [other])

    def test_unregister_unknown(self) -> None:
        """Unregistering an unknown address (or twice) returns None."""
        self.registry.register(HOST, PORT, None, 0.0)
        self.assertIsNone(self.registry.unregister(OTHER_HOST, PORT))
        self.assertIsNone(self.registry.unregister(HOST, PORT + 1))
        self.registry.unregister(HOST, PORT)
        self.assertIsNone(self.registry.unregister(HOST, PORT))
        self.assertEqual(len(self.registry), 0)

    def test_register_after_unregister(self) -> None:
        """After unregistering, a registration is a brand-new lease."""
        old = self.registry.register(HOST, PORT, None, 0.0)
        self.registry.unregister(HOST, PORT)
        new = self.registry.register(HOST, PORT, None, 10.0)
        self.assertIsNot(new, old)
        self.assertEqual(new.registered, 10.0)

    def test_iteration_is_a_snapshot(self) -> None:
        """Iterating while unregistering is safe."""
        for port in range(1, 6):
            self.registry.register(HOST, port, None, 0.0)
        for lease in self.registry:
            self.registry.unregister(lease.host, lease.port)
        self.assertEqual(len(self.registry), 0)

    def test_active_order_and_limit(self) -> None:
        """active lists oldest registrations first, at most ``limit``."""
        leases = [self.registry.register(HOST, p, None, float(p)) for p in (3, 1, 2)]
        self.registry.register(HOST, 3, None, 10.0)  # renewal keeps its place
        self.assertEqual(self.registry.active(10.0, 10), leases)
        self.assertEqual(self.registry.active(10.0, 2), leases[:2])
        self.assertEqual(self.registry.active(10.0, 0), [])


class ExpiryTests(RegistryTestCase):
    """Leases end exactly ``ttl`` seconds after their last registration."""

    def setUp(self) -> None:
        self.registry = MemoryRegistry(TTL)

    def test_expires_exactly_at_ttl(self) -> None:
        """Alive at ttl - 0.1, gone at ttl."""
        lease = self.registry.register(HOST, PORT, None, 1000.0)
        self.assertAlive(self.registry, 1000.0 + TTL - 0.1, lease)
        self.assertExpiresAt(self.registry, 1000.0 + TTL, lease)
        self.assertEqual(len(self.registry), 0)

    def test_expire_once(self) -> None:
        """A lease is reported expired only once."""
        self.registry.register(HOST, PORT, None, 0.0)
        self.assertEqual(len(self.registry.expire(TTL)), 1)
        self.assertEqual(self.registry.expire(TTL), [])
        self.assertEqual(self.registry.expire(10 * TTL), [])

    def test_active_expires(self) -> None:
        """active never lists an expired lease, even without an expire call."""
        self.registry.register(HOST, PORT, None, 0.0)
        self.assertEqual(self.registry.active(TTL, 10), [])
        self.assertEqual(len(self.registry), 0)

    def test_expiry_order(self) -> None:
        """A sweep returns the leases in the order they ran out."""
        late = self.registry.register(HOST, 1, None, 5.0)
        early = self.registry.register(HOST, 2, None, 1.0)
        middle = self.registry.register(HOST, 3, None, 3.0)
        self.assertEqual(self.registry.expire(5.0 + TTL), [early, middle, late])

    def test_partial_sweep(self) -> None:
        """A sweep ends only the leases that are due."""
        first = self.registry.register(HOST, 1, None, 0.0)
        second = self.registry.register(HOST, 2, None, 10.0)
        self.assertExpiresAt(self.registry, TTL, first)
        self.assertAlive(self.registry, TTL + 9.9, second)
        self.assertExpiresAt(self.registry, TTL + 10.0, second)

    def test_renewal_postpones_expiry(self) -> None:
        """A renewal moves the expiry to renewal time + ttl."""
        lease = self.registry.register(HOST, PORT, None, 0.0)
        self.registry.register(HOST, PORT, None, 30.0)
        self.assertAlive(self.registry, 30.0 + TTL - 0.1, lease)
        self.assertExpiresAt(self.registry, 30.0 + TTL, lease)

    def test_stale_entry_does_not_expire_renewed_lease(self) -> None:
        """
        The heap entry left by the first registration comes due at the old
        expiry time; it must be recognised as stale and not end the lease.
        """
        lease = self.registry.register(HOST, PORT, None, 0.0)
        self.registry.register(HOST, PORT, None, 30.0)
        self.assertEqual(self.registry.expire(TTL), [])
        self.assertEqual(self.registry.active(TTL, 10), [lease])

    def test_many_renewals_each_stale(self) -> None:
        """Each of several stale entries is skipped as it comes due."""
        lease = self.registry.register(HOST, PORT, None, 0.0)
        for now in (10.0, 20.0, 30.0, 40.0):
            self.registry.register(HOST, PORT, None, now)
        for now in (TTL, TTL + 10.0, TTL + 20.0, TTL + 30.0):
            self.assertAlive(self.registry, now, lease)
        self.assertExpiresAt(self.registry, 40.0 + TTL, lease)

    def test_stale_entry_after_reregistration(self) -> None:
        """
        A lease ended by unregister leaves a heap entry behind; it must not
        end a later lease for the same address.
        """
        self.registry.register(HOST, PORT, None, 0.0)
        self.registry.unregister(HOST, PORT)
        lease = self.registry.register(HOST, PORT, None, 10.0)
        self.assertAlive(self.registry, TTL, lease)
        self.assertExpiresAt(self.registry, 10.0 + TTL, lease)

    def test_unregistered_not_reported_expired(self) -> None:
        """A lease ended by unregister is not reported again by expire."""
        self.registry.register(HOST, PORT, None, 0.0)
        self.registry.unregister(HOST, PORT)
        self.assertEqual(self.registry.expire(TTL), [])

    def test_lingers_until_expire(self) -> None:
        """Until a sweep, an expired lease still counts in len (documented)."""
        self.registry.register(HOST, PORT, None, 0.0)
        self.assertEqual(len(self.registry), 1)
        self.registry.expire(TTL)
        self.assertEqual(len(self.registry), 0)


class ExpiryCostTests(RegistryTestCase):
    """expire costs O(expired + stale), never a scan of the live table."""

    def test_sweep_touches_only_due_entries(self) -> None:
        """With 1000 live leases and 3 due, a sweep pops exactly 3 entries."""
        registry = MemoryRegistry(TTL)
        due = [registry.register(HOST, port, None, 0.0) for port in (1, 2, 3)]
        for port in range(100, 1100):
            registry.register(OTHER_HOST, port, None, 10.0)
        pops = self.count_heap_pops()
        self.assertEqual(registry.expire(TTL), due)
        self.assertEqual(len(pops.popped), 3)
        self.assertEqual({entry[1] for entry in pops.popped}, {HOST})
        self.assertEqual(len(registry), 1000)

    def test_sweep_with_nothing_due(self) -> None:
        """A sweep with nothing due touches nothing at all."""
        registry = MemoryRegistry(TTL)
        for port in range(1, 1001):
            registry.register(HOST, port, None, 0.0)
        pops = self.count_heap_pops()
        self.assertEqual(registry.expire(TTL - 0.1), [])
        self.assertEqual(pops.popped, [])

    def test_sweep_pops_stale_entries_once(self) -> None:
        """A renewed lease is examined once when due, then at its new expiry."""
        registry = MemoryRegistry(TTL)
        lease = registry.register(HOST, PORT, None, 0.0)
        for now in (10.0, 20.0):
            registry.register(HOST, PORT, None, now)
        for port in range(100, 200):
            registry.register(OTHER_HOST, port, None, 30.0)
        pops = self.count_heap_pops()
        self.assertEqual(registry.expire(TTL + 10.0), [])
        # Renewed twice, the lease is examined once at its first due time
        # and pushed back to its current expiry (the last renewal's).
        self.assertEqual(pops.popped, [(TTL + 20.0, HOST, PORT)])
        self.assertEqual(registry.expire(TTL + 20.0), [lease])
        self.assertEqual(len(pops.popped), 2)


class LimitTests(RegistryTestCase):
    """max_peers and max_per_host refuse newcomers and evict nobody."""

    def assertRefused(self, registry: MemoryRegistry, host: str, port: int) -> None:
        """Registering host:port raises RegistryFull and changes nothing."""
        before = list(registry)
        self.assertRaises(RegistryFull, registry.register, host, port, None, 5.0)
        self.assertEqual(list(registry), before)
        self.assertIsNone(registry.unregister(host, port))
        self.assertEqual(list(registry), before)

    def test_max_peers(self) -> None:
        """The table refuses a newcomer once it holds max_peers leases."""
        registry = MemoryRegistry(TTL, max_peers=2)
        leases = [
            registry.register(HOST, 1, None, 0.0),
            registry.register(OTHER_HOST, 1, None, 0.0),
        ]
        self.assertRefused(registry, "10.0.0.7", 1)
        self.assertEqual(registry.active(1.0, 10), leases)
        error = self.assertRaises(
            RegistryFull, registry.register, "10.0.0.7", 1, None, 1.0
        )
        self.assertIn("maximum of 2 peers", str(error))

    def test_max_peers_renewal_allowed(self) -> None:
        """A full table still renews the leases it holds."""
        registry = MemoryRegistry(TTL, max_peers=1)
        lease = registry.register(HOST, 1, None, 0.0)
        self.assertIs(registry.register(HOST, 1, None, 30.0), lease)
        self.assertAlive(registry, 30.0 + TTL - 0.1, lease)

    def test_max_peers_frees_on_unregister(self) -> None:
        """Unregistering frees a place."""
        registry = MemoryRegistry(TTL, max_peers=1)
        registry.register(HOST, 1, None, 0.0)
        registry.unregister(HOST, 1)
        registry.register(OTHER_HOST, 1, None, 1.0)
        self.assertEqual(len(registry), 1)

    def test_max_peers_frees_on_expiry(self) -> None:
        """An expired (and swept) lease frees its place."""
        registry = MemoryRegistry(TTL, max_peers=1)
        registry.register(HOST, 1, None, 0.0)
        registry.expire(TTL)
        lease = registry.register(OTHER_HOST, 1, None, TTL)
        self.assertEqual(list(registry), [lease])

    def test_max_per_host(self) -> None:
        """One host gets max_per_host leases; other hosts are unaffected."""
        registry = MemoryRegistry(TTL, max_per_host=2)
        registry.register(HOST, 1, None, 0.0)
        registry.register(HOST, 2, None, 0.0)
        self.assertRefused(registry, HOST, 3)
        error = self.assertRaises(RegistryFull, registry.register, HOST, 3, None, 1.0)
        self.assertIn("at most 2 registrations per address", str(error))
        registry.register(OTHER_HOST, 3, None, 0.0)
        registry.register(OTHER_HOST, 4, None, 0.0)
        self.assertRefused(registry, OTHER_HOST, 5)
        self.assertEqual(len(registry), 4)

    def test_max_per_host_renewal_allowed(self) -> None:
        """A host at its limit still renews its leases."""
        registry = MemoryRegistry(TTL, max_per_host=1)
        lease = registry.register(HOST, 1, None, 0.0)
        self.assertIs(registry.register(HOST, 1, "n", 30.0), lease)

    def test_max_per_host_frees_on_unregister_and_expiry(self) -> None:
        """The per-host count drops on unregister and on expiry, without leaks."""
        registry = MemoryRegistry(TTL, max_per_host=1)
        for round_ in range(10):
            registry.register(HOST, 1 + round_, None, 0.0)
            registry.unregister(HOST, 1 + round_)
        registry.register(HOST, 1, None, 0.0)
        self.assertRefused(registry, HOST, 2)
        registry.expire(TTL)
        registry.register(HOST, 2, None, TTL)
        self.assertRefused(registry, HOST, 3)

    def test_both_limits(self) -> None:
        """The total limit applies even when the host has room."""
        registry = MemoryRegistry(TTL, max_peers=2, max_per_host=5)
        registry.register(HOST, 1, None, 0.0)
        registry.register(OTHER_HOST, 1, None, 0.0)
        self.assertRefused(registry, HOST, 2)

    def test_zero_means_unlimited(self) -> None:
        """0 disables a limit."""
        registry = MemoryRegistry(TTL, max_peers=0, max_per_host=0)
        for port in range(1, 2001):
            registry.register(HOST, port, None, 0.0)
        self.assertEqual(len(registry), 2000)


class FloodTests(RegistryTestCase):
    """
    One address registering thousands of ports: refused past its limit,
    without evicting or blocking anyone else.
    """

    def flood(self, registry: MemoryRegistry, host: str, now: float) -> int:
        """Register ports 1..5000 from C{host}; return how many were refused."""
        refused = 0
        for port in range(1, 5001):
            try:
                registry.register(host, port, None, now)
            except RegistryFull:
                refused += 1
        return refused

    def test_flood_from_one_address(self) -> None:
        """
        Past max_per_host every registration is refused; the victims'
        leases stay, renew, and newcomers from other addresses still fit.
        """
        registry = MemoryRegistry(TTL, max_peers=1000, max_per_host=100)
        victims = [registry.register(f"10.1.0.{n}", 9000, None, 0.0) for n in (1, 2)]
        self.assertEqual(self.flood(registry, HOST, 1.0), 4900)
        self.assertEqual(len(registry), 102)
        self.assertAlive(registry, 2.0, *victims)
        for victim in victims:
            self.assertIs(registry.register(victim.host, 9000, None, 30.0), victim)
        newcomer = registry.register("10.1.0.3", 9000, None, 31.0)
        self.assertAlive(registry, 31.0, newcomer, *victims)
        # The flood's own leases expire like any other, freeing the room.
        self.assertEqual(len(registry.expire(1.0 + TTL)), 100)
        self.assertEqual(len(registry), 3)

    def test_flood_cannot_fill_the_table(self) -> None:
        """
        With max_per_host below max_peers, one address cannot take the
        whole table: other addresses can still register.
        """
        registry = MemoryRegistry(TTL, max_peers=150, max_per_host=100)
        self.flood(registry, HOST, 0.0)
        self.assertEqual(len(registry), 100)
        for n in range(50):
            registry.register(f"10.2.0.{n}", 9000, None, 0.0)
        self.assertEqual(len(registry), 150)

    def test_total_limit_under_many_addresses(self) -> None:
        """
        Many flooding addresses fill the table up to max_peers, never past
        it; the peers already in keep their leases and can renew, and no
        lease was evicted to make room.
        """
        registry = MemoryRegistry(TTL, max_peers=1000, max_per_host=100)
        victim = registry.register(OTHER_HOST, 9000, None, 0.0)
        refused = sum(self.flood(registry, f"10.3.0.{n}", 1.0) for n in range(20))
        self.assertEqual(len(registry), 1000)
        self.assertEqual(refused, 20 * 5000 - 999)
        self.assertIs(registry.register(OTHER_HOST, 9000, None, 30.0), victim)
        self.assertAlive(registry, 30.0, victim)
        error = self.assertRaises(
            RegistryFull, registry.register, "10.4.0.1", 1, None, 30.0
        )
        self.assertIn("maximum of 1000 peers", str(error))

    def test_negative_limits_refused(self) -> None:
        """A negative limit would refuse everyone: it is a ValueError."""
        self.assertRaises(ValueError, MemoryRegistry, TTL, max_peers=-1)
        self.assertRaises(ValueError, MemoryRegistry, TTL, max_per_host=-1)


class CompactionTests(RegistryTestCase):
    """Frequent renewals must not grow the heap without bound or break expiry."""

    RENEWALS = 10_000

    def renew_often(self, registry: MemoryRegistry, start: float) -> float:
        """Renew HOST:PORT ``RENEWALS`` times, 0.01 s apart; return the last time."""
        now = start
        for i in range(self.RENEWALS):
            now = start + i / 100
            registry.register(HOST, PORT, None, now)
        return now

    def test_renewed_lease_expires_on_time(self) -> None:
        """After many renewals (and compactions) expiry is still exact."""
        registry = MemoryRegistry(TTL)
        last = self.renew_often(registry, 0.0)
        lease = list(registry)[0]
        self.assertEqual(lease.expires, last + TTL)
        self.assertAlive(registry, last + TTL - 0.1, lease)
        self.assertExpiresAt(registry, last + TTL, lease)

    def test_heap_stays_bounded(self) -> None:
        """
        The final sweep pops at most one compaction's worth of entries, not
        one per renewal: the heap was rebuilt along the way.
        """
        registry = MemoryRegistry(TTL)
        last = self.renew_often(registry, 0.0)
        pops = self.count_heap_pops()
        registry.expire(last + TTL)
        self.assertLessEqual(len(pops.popped), 4 * 1 + 1024 + 1)
        self.assertLess(len(pops.popped), self.RENEWALS // 5)

    def test_other_leases_survive_compaction(self) -> None:
        """
        Compaction keeps every other lease's expiry, including leases that
        ran out but were not swept yet, and drops unregistered ones.
        """
        registry = MemoryRegistry(TTL)
        unswept = registry.register(OTHER_HOST, 1, None, 0.0)
        gone = registry.register(OTHER_HOST, 2, None, 0.0)
        registry.unregister(OTHER_HOST, 2)
        later = registry.register(OTHER_HOST, 3, None, 90.0)
        last = self.renew_often(registry, 0.0)  # to t=99.99, past unswept's end
        self.assertEqual(len(registry.active(0.0, 10)), 3)  # nothing due at 0
        self.assertExpiresAt(registry, TTL, unswept)
        self.assertNotIn(gone, list(registry))
        self.assertAlive(registry, 90.0 + TTL - 0.1, later)
        self.assertExpiresAt(registry, 90.0 + TTL, later)
        (renewed_lease,) = list(registry)
        self.assertExpiresAt(registry, last + TTL, renewed_lease)


class ModelTests(RegistryTestCase):
    """
    Random register/renew/unregister/expire sequences against a plain model
    (a dict in registration order), with tiny chunks so that the chunked
    order list splits, empties and merges chunks all the time.
    """

    def sweep(self, registry: MemoryRegistry, model: dict, now: float) -> None:
        """Expire ``registry`` and ``model`` alike; the same leases must go."""
        expired = registry.expire(now)
        due = [k for k, lease in model.items() if lease.expires <= now]
        self.assertEqual(sorted((e.host, e.port) for e in expired), sorted(due))
        for key in due:
            del model[key]

    def check(self, registry: MemoryRegistry, model: dict, now: float, rng) -> None:
        expected = [lease for lease in model.values() if lease.expires > now]
        # Verified leases first, each tier by registration.
        expected.sort(key=lambda lease: (not lease.verified, lease.seq))
        # Order, paging from random cursors, and the page's "more" flag.
        self.assertEqual(registry.active(now, 10**6), expected)
        self.assertEqual(len(registry), len(expected))
        for _ in range(5):
            start = rng.randrange(0, len(expected) + 1)
            after = registry.position(expected[start - 1]) if start else 0
            limit = rng.randrange(1, 6)
            tail = expected[start:]
            self.assertEqual(
                registry.page(now, after, limit), (tail[:limit], len(tail) > limit)
            )

    def test_random_operations(self) -> None:
        """Every operation keeps the three indexes consistent with the model."""
        self.patch(registry_module, "CHUNK_SIZE", 4)
        for seed in range(5):
            rng = random.Random(seed)
            registry = MemoryRegistry(TTL, max_per_host=6)
            model: dict[tuple[str, int], Lease] = {}
            now = 0.0
            for _ in range(1500):
                now += rng.choice([0.0, 0.5, 3.0])
                host = f"10.0.0.{rng.randrange(4)}"
                port = rng.randrange(1, 10)
                action = rng.random()
                if action < 0.6:
                    # As the relay does: sweep, then register.
                    self.sweep(registry, model, now)
                    try:
                        lease = registry.register(host, port, None, now)
                    except RegistryFull:
                        held = sum(1 for h, _ in model if h == host)
                        self.assertGreaterEqual(held, 6)
                        continue
                    if (host, port) not in model:
                        model[(host, port)] = lease
                    self.assertIs(model[(host, port)], lease)
                elif action < 0.7:
                    gone = registry.unregister(host, port)
                    self.assertIs(gone, model.pop((host, port), None))
                elif action < 0.8:
                    # The relay's dial-back reached the peer.
                    verified = registry.mark_verified(host, port)
                    self.assertIs(verified, model.get((host, port)))
                    if verified is not None:
                        self.assertTrue(verified.verified)
                else:
                    self.sweep(registry, model, now)
                model = dict(sorted(model.items(), key=lambda item: item[1].seq))
                self.check(registry, model, now, rng)
                # Listing swept what was due (active and page expire first).
                model = {k: v for k, v in model.items() if v.expires > now}


def last_seq(leases: list[Lease]) -> int:
    """The largest sequence number among C{leases} (0 for none)."""
    return max((lease.seq for lease in leases), default=0)


class SharedSuiteTests(SynchronousTestCase):
    """
    The behaviour suite every registry passes (L{tests._registry_suite}), on
    a L{MemoryRegistry}: each scenario completes synchronously.
    """


def _memory_test(scenario: Scenario):
    def test(self: SynchronousTestCase) -> None:
        self.successResultOf(Deferred.fromCoroutine(scenario(MemoryRegistry)))

    test.__name__ = f"test_{scenario.__name__}"
    test.__doc__ = scenario.__doc__
    return test


for _scenario in SCENARIOS:
    setattr(SharedSuiteTests, f"test_{_scenario.__name__}", _memory_test(_scenario))
