"""Which source and which network an address counts as, for limits.

A limit per address is defeated by anyone with many addresses: an IPv6
host is handed a whole /64, and a small provider's customer or a cloud
tenant gets addresses from one /24.  So every limit the servers keep per
source is kept twice (see ``docs/security.rst``):

* per **source**: an IPv4 address, or the /64 of an IPv6 address (one
  host's share: its interface may pick any address inside it);
* per **network**: the /24 of an IPv4 address, the /48 of an IPv6 one (one
  site, as go-libp2p's resource manager and BitTorrent's BEP 42 group
  them).

Listings take turns by a wider group still, the *wide network*
(L{wide_network_of}): an IPv4 /16, an IPv6 /32, as Bitcoin Core's address
manager groups addresses (an allocation a provider or a cloud region hands
out), so that fakes from many /24s of one provider still take one turn.

Keys are short strings (``"10.1.2.3"``, ``"2001:db8:1:2::/64"``,
``"10.1.2.0/24"``) so that logs and tests can show them.  Anything that is
not an IP address (a UNIX socket's ``"?"``) is its own source and network.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


SOURCE_PREFIX_V6 = 64
NETWORK_PREFIX_V4 = 24
NETWORK_PREFIX_V6 = 48
WIDE_PREFIX_V4 = 16
WIDE_PREFIX_V6 = 32


# A canonical IPv4 address, as L{p2p.wire.normalise_host} writes one (no
# leading zeros): its /24 is its first three numbers, with no parsing.
_CANONICAL_IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
)


def groups(host: str) -> tuple[str, str]:
    """
    The C{(source, network)} keys of C{host}, an address as
    L{p2p.wire.normalise_host} gives it (IPv4-mapped IPv6 already plain
    IPv4).  An IPv4 address costs a regular expression (under a
    microsecond); any other is parsed (10-25 us) and cached: every
    connection and every request asks, and a relay sees far more distinct
    addresses than any cache holds.
    """
    if _CANONICAL_IPV4.fullmatch(host):
        return host, host[: host.rfind(".")] + ".0/24"
    return _parsed(host)[:2]


def wide_network_of(host: str) -> str:
    """
    The wide network of C{host} (see the module doc): its IPv4 /16 or its
    IPv6 /32; anything that is not an IP address is its own.  Cheap for an
    IPv4 address, as L{groups} is.
    """
    if _CANONICAL_IPV4.fullmatch(host):
        return host[: host.find(".", host.find(".") + 1)] + ".0.0/16"
    return _parsed(host)[2]


@functools.lru_cache(maxsize=8192)
def _parsed(host: str) -> tuple[str, str, str]:
    """
    The source, network and wide network of anything but a canonical IPv4
    address (L{groups}, L{wide_network_of}): one parse and one cache entry
    for all three.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host, host, host

    def prefix(length: int) -> str:
        return str(ipaddress.ip_network(f"{address}/{length}", strict=False))

    if address.version == 4:
        return host, prefix(NETWORK_PREFIX_V4), prefix(WIDE_PREFIX_V4)
    return (
        prefix(SOURCE_PREFIX_V6),
        prefix(NETWORK_PREFIX_V6),
        prefix(WIDE_PREFIX_V6),
    )


def source_of(host: str) -> str:
    """The per-source key of C{host} (see L{groups})."""
    return groups(host)[0]


def network_of(host: str) -> str:
    """The per-network key of C{host} (see L{groups})."""
    return groups(host)[1]


def tally(counts: dict[str, int], key: str, step: int) -> None:
    """
    Add C{step} to C{key}'s count in C{counts}, dropping the key at zero so
    that a table of counts per source or network holds only those present.
    Taking away from a key that is not there is a bug (a KeyError).
    """
    count = (counts[key] if step < 0 else counts.get(key, 0)) + step
    if count:
        counts[key] = count
    else:
        del counts[key]


def spread(
    items: Iterable[T], network: Callable[[T], str], per_network: int, limit: int
) -> list[T]:
    """
    At most C{limit} of C{items}, in order, except that each network's
    first C{per_network} come before any network's next: many items from
    one network (fakes answering from one /24, say) cannot push the others
    down the list.  Stops reading C{items} once C{limit} are taken.
    """
    result: list[T] = []
    overflow: list[T] = []
    taken: dict[str, int] = {}
    for item in items:
        key = network(item)
        count = taken.get(key, 0)
        if count >= per_network:
            overflow.append(item)
            continue
        taken[key] = count + 1
        result.append(item)
        if len(result) >= limit:
            return result
    return (result + overflow)[:limit]
