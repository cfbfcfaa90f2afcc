"""
One behaviour suite for every lease table: the in-memory registry
(``tests/test_registry.py`` runs it synchronously, on fake times) and the
Redis one (``tests/test_redis_registry.py`` runs it against a real
redis-server).  Not a test module itself.

Each scenario is an ``async`` function of a C{make(ttl, max_peers=0,
max_per_host=0, max_per_network=0)} that builds an empty registry; it
awaits every registry call through L{call}, which passes a synchronous
result through, so the in-memory runs never wait on anything.  Times are
passed in (``now``), as the interface says: Redis's own clock plays no part.
Leases are compared by address and fields, never by identity (the Redis
registry builds a new object per answer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred

from p2p import hints
from p2p.registry import UNVERIFIED_TIER, RegistryFull
from p2p.wire import peer_id_for

TTL = 60.0
HOST = "10.0.0.5"
PORT = 9000
EVERYTHING = 10**6

Make = Callable[..., Any]
Scenario = Callable[[Make], Awaitable[None]]
SCENARIOS: list[Scenario] = []


def scenario(function: Scenario) -> Scenario:
    SCENARIOS.append(function)
    return function


async def call(result: Any) -> Any:
    """The result of a registry call, whether a Deferred or a value."""
    if isinstance(result, Deferred):
        return await result
    return result


def addresses(leases) -> list[tuple[str, int]]:
    return [(lease.host, lease.port) for lease in leases]


async def listed(registry, now: float) -> list[tuple[str, int]]:
    return addresses(await call(registry.active(now, EVERYTHING)))


async def refused(registry, host: str, port: int, now: float) -> str:
    """The reason a registration is refused (it must be)."""
    try:
        await call(registry.register(host, port, None, now))
    except RegistryFull as e:
        return str(e)
    raise AssertionError(f"{host}:{port} was not refused")


# -- register, renew, unregister ---------------------------------------------


@scenario
async def register_and_renew(make: Make) -> None:
    """A new lease records address, name and times; a renewal keeps its
    place and registration time and replaces name and expiry."""
    registry = make(TTL)
    lease = await call(registry.register(HOST, PORT, "box", 100.0))
    assert (lease.host, lease.port, lease.name) == (HOST, PORT, "box")
    assert lease.peer_id == peer_id_for(HOST, PORT)
    assert (lease.registered, lease.renewed, lease.expires) == (100.0, 100.0, 160.0)
    assert lease.seq > 0 and not lease.verified
    renewed = await call(registry.register(HOST, PORT, None, 130.0))
    assert (renewed.seq, renewed.registered) == (lease.seq, 100.0)
    assert (renewed.renewed, renewed.expires, renewed.name) == (130.0, 190.0, None)
    assert await listed(registry, 131.0) == [(HOST, PORT)]


@scenario
async def unregister(make: Make) -> None:
    """unregister ends exactly that lease and returns it; an unknown one
    gives None."""
    registry = make(TTL)
    await call(registry.register(HOST, PORT, "a", 0.0))
    await call(registry.register(HOST, PORT + 1, None, 0.0))
    ended = await call(registry.unregister(HOST, PORT))
    assert (ended.host, ended.port, ended.name) == (HOST, PORT, "a")
    assert await call(registry.unregister(HOST, PORT)) is None
    assert await listed(registry, 1.0) == [(HOST, PORT + 1)]
    again = await call(registry.register(HOST, PORT, None, 2.0))
    assert again.seq > ended.seq  # a new registration: listed last
    assert await listed(registry, 3.0) == [(HOST, PORT + 1), (HOST, PORT)]


@scenario
async def holds_verified(make: Make) -> None:
    """Only a host holding a lease its peer verified is a member of the
    connection reserve; it stops being one when that lease ends."""
    registry = make(TTL)
    await call(registry.register(HOST, PORT, None, 0.0))
    await call(registry.register("10.0.0.6", PORT, None, 0.0))
    assert registry.holds(HOST) and registry.holds("10.0.0.6")
    assert not registry.holds_verified(HOST)
    await call(registry.mark_verified(HOST, PORT))
    assert registry.holds_verified(HOST)
    assert not registry.holds_verified("10.0.0.6")
    await call(registry.register(HOST, PORT, None, 10.0))  # a renewal
    assert registry.holds_verified(HOST)
    await call(registry.unregister(HOST, PORT))
    assert not registry.holds_verified(HOST)
    await call(registry.register(HOST, PORT + 1, None, 20.0))
    await call(registry.mark_verified(HOST, PORT + 1))
    await call(registry.expire(20.0 + TTL))
    assert not registry.holds_verified(HOST)


# -- expiry ------------------------------------------------------------------


@scenario
async def expiry(make: Make) -> None:
    """A lease ends exactly TTL after its last renewal, once; expire reports
    it; listings never show it, with or without a sweep first."""
    registry = make(TTL)
    await call(registry.register(HOST, PORT, None, 0.0))
    await call(registry.register(HOST, PORT + 1, None, 10.0))
    assert await call(registry.expire(59.9)) == []
    assert addresses(await call(registry.expire(60.0))) == [(HOST, PORT)]
    assert await call(registry.expire(60.0)) == []
    assert await listed(registry, 70.0) == []  # PORT + 1 ran out too
    await call(registry.register(HOST, PORT + 2, None, 100.0))
    await call(registry.register(HOST, PORT + 2, None, 150.0))  # renewed
    assert await listed(registry, 200.0) == [(HOST, PORT + 2)]
    assert await listed(registry, 210.0) == []


@scenario
async def reregistration_after_expiry(make: Make) -> None:
    """A REGISTER after the lease ran out (swept or not) is a new lease: a
    new place in the listing, and registered afresh."""
    registry = make(TTL)
    first = await call(registry.register(HOST, PORT, None, 0.0))
    await call(registry.register(HOST, PORT + 1, None, 30.0))
    second = await call(registry.register(HOST, PORT, None, 61.0))
    assert second.seq > first.seq and second.registered == 61.0
    assert await listed(registry, 62.0) == [(HOST, PORT + 1), (HOST, PORT)]


# -- paging and the verified tier --------------------------------------------


@scenario
async def paging(make: Make) -> None:
    """Pages follow registration order, resume after a cursor, say whether
    more follow, and show later registrations on later pages."""
    registry = make(TTL)
    for port in range(1, 6):
        await call(registry.register(HOST, port, None, 0.0))
    seen = []
    after, more = 0, True
    while more:
        page, more = await call(registry.page(1.0, after, 2))
        assert len(page) <= 2
        seen += addresses(page)
        after = registry.position(page[-1])
        if len(seen) == 4:
            await call(registry.register(HOST, 6, None, 1.0))
    assert seen == [(HOST, port) for port in range(1, 7)]
    assert await call(registry.page(1.0, after, 2)) == ([], False)
    await call(registry.unregister(HOST, 3))
    page, more = await call(registry.page(1.0, 0, 3))
    assert (addresses(page), more) == ([(HOST, 1), (HOST, 2), (HOST, 4)], True)


@scenario
async def verified_first(make: Make) -> None:
    """Verified leases are listed before the others, each tier by
    registration; a cursor from either tier resumes in the right place."""
    registry = make(TTL)
    for port in range(1, 5):
        await call(registry.register(HOST, port, None, 0.0))
    lease = await call(registry.mark_verified(HOST, 3))
    assert lease.verified and (lease.host, lease.port) == (HOST, 3)
    assert await call(registry.mark_verified(HOST, 99)) is None
    await call(registry.mark_verified(HOST, 2))
    expected = [(HOST, 2), (HOST, 3), (HOST, 1), (HOST, 4)]
    assert await listed(registry, 1.0) == expected
    page, more = await call(registry.page(1.0, 0, 2))
    assert (addresses(page), more) == (expected[:2], True)
    assert not registry.position(page[-1]) & UNVERIFIED_TIER
    page, more = await call(registry.page(1.0, registry.position(page[-1]), 1))
    assert (addresses(page), more) == (expected[2:3], True)
    assert registry.position(page[-1]) & UNVERIFIED_TIER
    page, more = await call(registry.page(1.0, registry.position(page[-1]), 5))
    assert (addresses(page), more) == (expected[3:], False)


# -- name hints --------------------------------------------------------------


@scenario
async def name_hints(make: Make) -> None:
    """likely_holders: leases whose filter may hold the name, in listing
    order; none for a peer without a filter or with a saturated one; a
    renewal replaces the filter; limit and scan bound the answer."""
    registry = make(TTL)
    wanted = hints.name_hint("wanted.txt")
    holder = hints.filter_bytes(["wanted.txt", "other.txt"])
    await call(registry.register(HOST, 1, None, 0.0, holder))
    await call(registry.register(HOST, 2, None, 0.0, None))
    await call(registry.register(HOST, 3, None, 0.0, b"\xff" * hints.FILTER_BYTES))
    await call(registry.register(HOST, 4, None, 0.0, hints.filter_bytes(["no"])))
    await call(registry.register(HOST, 5, None, 0.0, holder))
    found = await call(registry.likely_holders(1.0, wanted, 10, 100))
    assert addresses(found) == [(HOST, 1), (HOST, 5)]
    await call(registry.mark_verified(HOST, 5))
    found = await call(registry.likely_holders(1.0, wanted, 10, 100))
    assert addresses(found) == [(HOST, 5), (HOST, 1)]
    assert len(await call(registry.likely_holders(1.0, wanted, 1, 100))) == 1
    # Only the first two leases in listing order (5, then 1) are examined.
    assert addresses(await call(registry.likely_holders(1.0, wanted, 10, 1))) == [
        (HOST, 5)
    ]
    # Two: across the tiers, the verified lease then the oldest other.
    assert addresses(await call(registry.likely_holders(1.0, wanted, 10, 2))) == [
        (HOST, 5),
        (HOST, 1),
    ]
    await call(registry.register(HOST, 1, None, 2.0, None))  # filter withdrawn
    found = await call(registry.likely_holders(3.0, wanted, 10, 100))
    assert addresses(found) == [(HOST, 5)]
    assert await call(registry.likely_holders(70.0, wanted, 10, 100)) == []


@scenario
async def hints_spread_over_networks(make: Make) -> None:
    """A network's third match comes after every other network's first two
    (here two /24s of one wide network, which take no turns)."""
    registry = make(TTL)
    holder = hints.filter_bytes(["x"])
    for port in range(1, 5):
        await call(registry.register("10.0.0.1", port, None, 0.0, holder))
    await call(registry.register("10.0.9.1", 1, None, 0.0, holder))
    found = await call(registry.likely_holders(1.0, hints.name_hint("x"), 4, 100))
    assert addresses(found) == [
        ("10.0.0.1", 1),
        ("10.0.0.1", 2),
        ("10.0.9.1", 1),
        ("10.0.0.1", 3),
    ]


# -- listing order: wide networks take turns ----------------------------------


@scenario
async def wide_networks_take_turns(make: Make) -> None:
    """Each tier lists every wide network's (IPv4 /16, IPv6 /32) first
    lease, then every one's second, and so on, each round oldest first;
    pages follow that order."""
    registry = make(TTL)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        await call(registry.register(host, 1, None, 0.0))
    await call(registry.register("10.1.0.1", 1, None, 1.0))
    await call(registry.register("2001:db8:1::1", 1, None, 2.0))
    await call(registry.register("10.1.0.2", 1, None, 3.0))
    assert await listed(registry, 4.0) == [
        ("10.0.0.1", 1),
        ("10.1.0.1", 1),
        ("2001:db8:1::1", 1),
        ("10.0.0.2", 1),
        ("10.1.0.2", 1),
        ("10.0.0.3", 1),
    ]
    # Paging from a cursor in the middle of a round.
    page = await call(registry.page(4.0, 0, 2))
    assert addresses(page[0]) == [("10.0.0.1", 1), ("10.1.0.1", 1)] and page[1]
    page = await call(registry.page(4.0, registry.position(page[0][-1]), 2))
    assert addresses(page[0]) == [("2001:db8:1::1", 1), ("10.0.0.2", 1)]
    # A verified lease keeps its round in the verified tier.
    await call(registry.mark_verified("10.0.0.3", 1))
    await call(registry.mark_verified("10.1.0.1", 1))
    assert (await listed(registry, 4.0))[:2] == [("10.1.0.1", 1), ("10.0.0.3", 1)]


@scenario
async def a_wide_network_takes_one_turn(make: Make) -> None:
    """Leases from several /24s (or IPv6 /48s) of one wide network share
    its turns: a peer from another comes second, not last."""
    registry = make(TTL)
    for host in ("10.0.0.1", "10.0.1.1", "10.0.2.1", "2001:db8:1::1", "2001:db8:2::1"):
        await call(registry.register(host, 1, None, 0.0))
    await call(registry.register("10.9.0.1", 1, None, 1.0))
    await call(registry.register("2001:db9::1", 1, None, 1.0))
    assert (await listed(registry, 2.0))[:4] == [
        ("10.0.0.1", 1),
        ("2001:db8:1::1", 1),
        ("10.9.0.1", 1),
        ("2001:db9::1", 1),
    ]


@scenario
async def many_addresses_cannot_bury_a_newcomer(make: Make) -> None:
    """A peer alone in its wide network, registered after 3 wide networks
    x 40 leases, is listed fourth and found by a hinted scan of the first
    four leases."""
    registry = make(TTL)
    names = hints.filter_bytes(["x"])
    for index in range(40):
        for network in range(3):
            host = f"10.{network}.{index}.1"
            await call(registry.register(host, 1, None, 0.0, names))
    await call(registry.register("10.9.9.9", 1, None, 1.0, names))
    assert (await listed(registry, 2.0))[3] == ("10.9.9.9", 1)
    found = await call(registry.likely_holders(2.0, hints.name_hint("x"), 10, 4))
    assert ("10.9.9.9", 1) in addresses(found)


@scenario
async def late_rounds_page_exactly(make: Make) -> None:
    """Keys past the last round (a wide network's 256th lease and on) still
    list and page each lease once, in registration order: a store that
    keeps them as doubles (Redis) must not round them."""
    registry = make(TTL)
    for port in range(1, 301):
        await call(registry.register(HOST, port, None, 0.0))
    walked: list[tuple[str, int]] = []
    after, more = 0, True
    while more:
        page, more = await call(registry.page(1.0, after, 7))
        walked.extend(addresses(page))
        after = registry.position(page[-1])
    assert walked == [(HOST, port) for port in range(1, 301)]


@scenario
async def rounds_follow_what_a_wide_network_holds(make: Make) -> None:
    """A lease's round is what its wide network held when it registered:
    one that registers after its wide network's others ended is in an
    early round."""
    registry = make(TTL)
    await call(registry.register("10.0.0.1", 1, None, 0.0))
    await call(registry.register("10.0.0.2", 1, None, 0.0))
    await call(registry.register("10.1.0.1", 1, None, 0.0))
    await call(registry.register("10.1.0.2", 1, None, 0.0))
    await call(registry.unregister("10.0.0.1", 1))
    await call(registry.unregister("10.0.0.2", 1))
    await call(registry.register("10.0.0.3", 1, None, 1.0))  # round 0 again
    assert await listed(registry, 2.0) == [
        ("10.1.0.1", 1),
        ("10.0.0.3", 1),
        ("10.1.0.2", 1),
    ]


# -- limits --------------------------------------------------------------------


@scenario
async def table_size(make: Make) -> None:
    """max_peers: a full table refuses new leases, not renewals; an
    unregistered or expired lease frees its place."""
    registry = make(TTL, max_peers=2)
    await call(registry.register(HOST, 1, None, 0.0))
    await call(registry.register(HOST, 2, None, 10.0))
    assert await refused(registry, HOST, 3, 10.0) == (
        "the relay holds its maximum of 2 peers"
    )
    await call(registry.register(HOST, 2, None, 11.0))  # a renewal
    await call(registry.unregister(HOST, 2))
    await call(registry.register(HOST, 3, None, 12.0))
    assert await refused(registry, HOST, 4, 12.0)
    # What ran out frees its place once swept (the relay sweeps first).
    await call(registry.expire(60.0))
    await call(registry.register(HOST, 4, None, 60.0))  # port 1 ran out


@scenario
async def per_address(make: Make) -> None:
    """max_per_host: per IPv4 address, and per IPv6 /64 (its addresses are
    one source); renewals allowed; other sources unaffected."""
    registry = make(TTL, max_per_host=2)
    await call(registry.register(HOST, 1, None, 0.0))
    await call(registry.register(HOST, 2, None, 0.0))
    assert await refused(registry, HOST, 3, 0.0) == (
        "at most 2 registrations per address"
    )
    await call(registry.register(HOST, 1, None, 1.0))
    await call(registry.register("10.0.0.6", 3, None, 1.0))
    await call(registry.register("2001:db8:0:1::1", 1, None, 1.0))
    await call(registry.register("2001:db8:0:1::2", 1, None, 1.0))
    assert await refused(registry, "2001:db8:0:1::3", 1, 1.0)
    await call(registry.register("2001:db8:0:2::1", 1, None, 1.0))
    await call(registry.unregister("2001:db8:0:1::1", 1))
    await call(registry.register("2001:db8:0:1::3", 1, None, 2.0))
    # What ran out frees its place once swept (the relay sweeps first).
    await call(registry.expire(60.0))
    await call(registry.register(HOST, 3, None, 60.0))  # ports 1 and 2 ran out


@scenario
async def per_network(make: Make) -> None:
    """max_per_network: per IPv4 /24 and per IPv6 /48, named in the
    refusal."""
    registry = make(TTL, max_per_network=2)
    await call(registry.register("10.0.0.1", 1, None, 0.0))
    await call(registry.register("10.0.0.2", 1, None, 0.0))
    assert await refused(registry, "10.0.0.3", 1, 0.0) == (
        "at most 2 registrations per network (10.0.0.0/24)"
    )
    await call(registry.register("10.0.1.1", 1, None, 0.0))
    await call(registry.register("2001:db8:1:1::1", 1, None, 0.0))
    await call(registry.register("2001:db8:1:2::1", 1, None, 0.0))
    assert "2001:db8:1::/48" in await refused(registry, "2001:db8:1:3::1", 1, 0.0)
    # What ran out frees its place once swept (the relay sweeps first).
    await call(registry.expire(60.0))
    await call(registry.register("10.0.0.3", 1, None, 60.0))  # the others ran out
