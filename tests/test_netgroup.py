"""Tests for L{p2p.netgroup}: which source and network an address counts as."""

from __future__ import annotations

import ipaddress
import random

from twisted.trial.unittest import SynchronousTestCase

from p2p import netgroup


class GroupsTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """An IPv4 address is its own source, in its /24."""
        self.assertEqual(netgroup.groups("127.1.0.7"), ("127.1.0.7", "127.1.0.0/24"))
        self.assertEqual(netgroup.network_of("10.2.3.4"), "10.2.3.0/24")
        self.assertEqual(netgroup.source_of("10.2.3.4"), "10.2.3.4")

    def test_ipv4_without_parsing(self) -> None:
        """
        A canonical IPv4 address's groups, taken from its text, are those
        its parsed form gives, at every octet's edges; a non-canonical one
        (leading zeros) is parsed, and is no address.
        """
        rng = random.Random(5)
        edges = [0, 1, 9, 10, 99, 100, 199, 200, 249, 250, 255]
        hosts = [".".join(str(rng.choice(edges)) for _ in range(4)) for _ in range(300)]
        hosts += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(300)]
        for host in hosts:
            network = ipaddress.ip_network(f"{host}/24", strict=False)
            self.assertEqual(netgroup.groups(host), (host, str(network)))
        self.assertEqual(netgroup.groups("010.1.2.3"), ("010.1.2.3", "010.1.2.3"))
        self.assertEqual(netgroup.groups("1.2.3.256"), ("1.2.3.256", "1.2.3.256"))

    def test_wide_networks(self) -> None:
        """
        Listings take turns by IPv4 /16 and IPv6 /32 (Bitcoin Core's
        address groups); an IPv4 address's is read from its text, and is
        the parsed one.
        """
        self.assertEqual(netgroup.wide_network_of("10.1.2.3"), "10.1.0.0/16")
        self.assertEqual(netgroup.wide_network_of("10.1.200.3"), "10.1.0.0/16")
        self.assertEqual(netgroup.wide_network_of("2001:db8:1:2::1"), "2001:db8::/32")
        self.assertEqual(netgroup.wide_network_of("2001:db9::1"), "2001:db9::/32")
        self.assertEqual(netgroup.wide_network_of("?"), "?")
        rng = random.Random(7)
        for _ in range(300):
            host = str(ipaddress.IPv4Address(rng.getrandbits(32)))
            wide = ipaddress.ip_network(f"{host}/16", strict=False)
            self.assertEqual(netgroup.wide_network_of(host), str(wide))

    def test_ipv6(self) -> None:
        """An IPv6 address counts as its /64, in its /48: a host that picks
        any address of its /64 is still one source."""
        first = netgroup.groups("2001:db8:1:2::1")
        second = netgroup.groups("2001:db8:1:2:ffff::9")
        self.assertEqual(first, ("2001:db8:1:2::/64", "2001:db8:1::/48"))
        self.assertEqual(first, second)
        self.assertNotEqual(
            netgroup.source_of("2001:db8:1:3::1"), first[0]
        )  # another /64 of the same /48
        self.assertEqual(netgroup.network_of("2001:db8:1:3::1"), first[1])

    def test_loopback_v6(self) -> None:
        self.assertEqual(netgroup.groups("::1"), ("::/64", "::/48"))

    def test_not_an_address(self) -> None:
        """A UNIX socket's "?" (or anything not an IP) is its own group."""
        self.assertEqual(netgroup.groups("?"), ("?", "?"))


class TallyTests(SynchronousTestCase):
    def test_counts_and_drops_at_zero(self) -> None:
        counts: dict[str, int] = {}
        netgroup.tally(counts, "10.0.0.0/24", 1)
        netgroup.tally(counts, "10.0.0.0/24", 1)
        netgroup.tally(counts, "10.0.0.0/24", -1)
        self.assertEqual(counts, {"10.0.0.0/24": 1})
        netgroup.tally(counts, "10.0.0.0/24", -1)
        self.assertEqual(counts, {})

    def test_taking_from_nothing_is_a_bug(self) -> None:
        self.assertRaises(KeyError, netgroup.tally, {}, "x", -1)


class SpreadTests(SynchronousTestCase):
    def test_first_of_each_network_first(self) -> None:
        items = ["a1", "a2", "a3", "b1", "a4", "c1"]
        spread = netgroup.spread(items, lambda item: item[0], 2, 10)
        self.assertEqual(spread, ["a1", "a2", "b1", "c1", "a3", "a4"])

    def test_limit_stops_reading(self) -> None:
        read: list[str] = []

        def items():
            for item in ["a1", "b1", "a2", "b2", "c1"]:
                read.append(item)
                yield item

        self.assertEqual(netgroup.spread(items(), lambda i: i[0], 1, 2), ["a1", "b1"])
        self.assertEqual(read, ["a1", "b1"])
        self.assertEqual(
            netgroup.spread(["a1", "a2"], lambda i: i[0], 1, 5), ["a1", "a2"]
        )
