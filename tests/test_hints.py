"""
Tests for the optional name index: L{p2p.hints}, ``files=`` and ``hint=`` on
the wire, the registry's bounded scan, the relay's reply, the announcer and
share that feed it and the client that orders peers by it.
"""

from __future__ import annotations

import hashlib
import os
import random

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2p import cli, hints, session, wire
from p2p.pieces import PIECE_SIZE
from p2p.registry import ROUND_SHIFT, MemoryRegistry
from p2p.share import ShareFolder
from p2p.wire import Code, WireError

from ._indexed import indexed, peer_factory
from .test_announce import AnnouncerTestMixin
from .test_cli import PEER_A, PEER_B, CommandTestCase
from .test_relay import PEER_B as RELAY_PEER_B
from .test_relay import RelayTestCase
from .test_share import read_listing, root_hex, temp_dir

PEER_C = "cccccccccccccccc"


class HintTests(SynchronousTestCase):
    """The pure module: hints, filters, membership."""

    def test_name_hint(self) -> None:
        digest = hashlib.sha256(b"a/b.txt").hexdigest()
        self.assertEqual(hints.name_hint("a/b.txt"), digest[:16])
        self.assertTrue(hints.is_hint(hints.name_hint("é")))

    def test_positions(self) -> None:
        """Three disjoint 11-bit fields of the hint's low 33 bits."""
        value = (5 << 22) | (7 << 11) | 2047
        self.assertEqual(hints.positions(f"{value:016x}"), (2047, 7, 5))

    def test_filter_layout(self) -> None:
        name = "x.txt"
        text = hints.build_filter([name])
        self.assertEqual(len(text), 512)
        self.assertTrue(hints.is_filter(text))
        raw = bytes.fromhex(text)
        set_bits = {
            8 * i + b for i, byte in enumerate(raw) for b in range(8) if byte >> b & 1
        }
        self.assertEqual(set_bits, set(hints.positions(hints.name_hint(name))))
        self.assertEqual(hints.build_filter([]), "0" * 512)

    def test_no_false_negatives(self) -> None:
        names = [f"folder/file-{i}.bin" for i in range(3000)]
        for count in (1, 100, 1000, 3000):
            raw = hints.filter_bytes(names[:count])
            for name in names[:count]:
                hint = hints.name_hint(name)
                self.assertTrue(hints.may_hold(raw, hint), name)
                self.assertTrue(hints.matcher(hint)(raw), name)

    def test_false_positive_rate(self) -> None:
        """Close to the documented rates: 0.25 % (100), 4.5 % (300), 45 % (1000)."""
        others = [hints.name_hint(f"other-{i}") for i in range(20_000)]
        for count, expected in ((100, 0.0025), (300, 0.045), (1000, 0.45)):
            raw = hints.filter_bytes(f"held-{i}" for i in range(count))
            rate = sum(hints.may_hold(raw, h) for h in others) / len(others)
            self.assertLess(rate, expected * 1.6 + 0.002, count)
            self.assertGreater(rate, expected / 1.6, count)

    def test_matcher_agrees(self) -> None:
        rng = random.Random(6)
        raw = hints.filter_bytes(f"n{i}" for i in range(400))
        for _ in range(2000):
            hint = f"{rng.getrandbits(64):016x}"
            self.assertEqual(hints.matcher(hint)(raw), hints.may_hold(raw, hint))

    def test_well_formed(self) -> None:
        self.assertFalse(hints.is_hint("ABCDEF0123456789"))
        self.assertFalse(hints.is_hint("0" * 15))
        self.assertFalse(hints.is_filter("0" * 511))
        self.assertFalse(hints.is_filter("F" * 512))


class WireTests(SynchronousTestCase):
    """``files=`` on REGISTER, ``hint=`` on PEERS."""

    FILTER = hints.build_filter(["a.txt"])
    HINT = hints.name_hint("a.txt")

    def test_register_files_round_trip(self) -> None:
        request = wire.Register(4001, "p", token="t", files=self.FILTER)
        line = request.to_line()
        self.assertTrue(line.endswith(f" files={self.FILTER}".encode()))
        self.assertEqual(wire.parse_relay_request(line), request)
        self.assertNotIn(self.FILTER, repr(request))

    def test_longest_register_fits(self) -> None:
        request = wire.Register(
            65535, "n" * 64, "1234:5678:9abc:def0:1234:5678:9abc:def0", "t" * 256,
            "f" * 512,
        )  # fmt: skip
        self.assertEqual(wire.parse_relay_request(request.to_line()), request)

    def test_register_without_files(self) -> None:
        self.assertIsNone(wire.parse_relay_request(b"REGISTER 4001").files)

    def test_malformed_files(self) -> None:
        for bad in ("0" * 511, "0" * 513, "F" * 512, "g" * 512, ""):
            line = f"REGISTER 4001 files={bad}".encode()
            error = self.assertRaises(WireError, wire.parse_relay_request, line)
            self.assertEqual(error.code, Code.BAD_REQUEST, bad)

    def test_peers_hint_round_trip(self) -> None:
        request = wire.Peers(token="t", limit=5, hint=self.HINT)
        self.assertEqual(
            request.to_line(), f"PEERS hint={self.HINT} limit=5 token=t".encode()
        )
        self.assertEqual(wire.parse_relay_request(request.to_line()), request)
        self.assertFalse(request.paged)

    def test_malformed_hint(self) -> None:
        for line in (
            b"PEERS hint=xyz",
            b"PEERS hint=ABCDEF0123456789",
            b"PEERS hint=",
            f"PEERS hint={self.HINT} cursor=1a".encode(),
            f"PEERS hint={self.HINT} limit=0".encode(),
            f"PEERS hint={self.HINT} hint={self.HINT}".encode(),
        ):
            error = self.assertRaises(WireError, wire.parse_relay_request, line)
            self.assertEqual(error.code, Code.BAD_REQUEST, line)

    def test_peers_files_round_trip(self) -> None:
        request = wire.Peers(limit=5, cursor="1a", files=True)
        self.assertEqual(request.to_line(), b"PEERS files=1 limit=5 cursor=1a")
        self.assertEqual(wire.parse_relay_request(request.to_line()), request)
        self.assertTrue(request.paged)

    def test_malformed_files_request(self) -> None:
        for line in (
            b"PEERS files=0",
            b"PEERS files=yes",
            f"PEERS files=1 hint={self.HINT}".encode(),
        ):
            error = self.assertRaises(WireError, wire.parse_relay_request, line)
            self.assertEqual(error.code, Code.BAD_REQUEST, line)

    def test_peer_line_files_round_trip(self) -> None:
        entry = wire.PeerEntry(
            PEER_C, "10.0.0.1", 4001, 3, files=bytes.fromhex(self.FILTER)
        )
        line = entry.to_line()
        self.assertTrue(line.endswith(f" files={self.FILTER}".encode()))
        self.assertEqual(wire.PeerEntry.from_line(line), entry)
        bad = line[: -len(self.FILTER)] + b"F" * 512
        error = self.assertRaises(WireError, wire.PeerEntry.from_line, bad)
        self.assertEqual(error.code, Code.BAD_REQUEST)

    def test_old_forms_unchanged(self) -> None:
        self.assertEqual(wire.parse_relay_request(b"PEERS"), wire.Peers())
        self.assertTrue(wire.parse_relay_request(b"PEERS limit=3").paged)


class RegistryTests(SynchronousTestCase):
    """L{MemoryRegistry.likely_holders}: the bounded scan."""

    def setUp(self) -> None:
        self.registry = MemoryRegistry(ttl=60)

    def add(self, index: int, names: list[str] | None) -> None:
        raw = hints.filter_bytes(names) if names is not None else None
        self.registry.register(f"10.0.{index >> 8}.{index & 255}", 4001, None, 0, raw)

    def holders(self, name: str, limit: int = 1000, scan: int = 10_000) -> list[int]:
        leases = self.registry.likely_holders(1, hints.name_hint(name), limit, scan)
        # The registration numbers, below each listing key's round.
        return [lease.seq & ((1 << ROUND_SHIFT) - 1) for lease in leases]

    def test_matches_in_registration_order(self) -> None:
        for index in range(1, 11):
            self.add(index, [f"f{index}", "common"])
        self.add(11, None)  # announces nothing: never suggested
        self.assertEqual(self.holders("f3"), [3])
        self.assertEqual(self.holders("common"), list(range(1, 11)))
        self.assertEqual(self.holders("common", limit=4), [1, 2, 3, 4])
        self.assertEqual(self.holders("nowhere"), [])

    def test_scan_is_bounded(self) -> None:
        for index in range(1, 1201):  # spans several chunks of 512
            self.add(index, ["common"])
        self.assertEqual(len(self.holders("common", scan=700)), 700)
        self.assertEqual(len(self.holders("common", scan=512)), 512)
        self.assertEqual(self.holders("common", limit=2, scan=5), [1, 2])

    def test_renewal_replaces_filter(self) -> None:
        self.add(1, ["old"])
        self.assertEqual(self.holders("old"), [1])
        self.add(1, ["new"])
        self.assertEqual(self.holders("old"), [])
        self.assertEqual(self.holders("new"), [1])
        self.add(1, None)
        self.assertEqual(self.holders("new"), [])

    def test_expired_leases_not_suggested(self) -> None:
        self.add(1, ["a"])
        self.assertEqual(self.registry.likely_holders(61, hints.name_hint("a"), 9), [])


class RelayHintTests(RelayTestCase):
    """``REGISTER ... files=`` and ``PEERS hint=`` through the relay."""

    def register_files(self, peer: str, port: int, names: list[str] | None) -> None:
        line = f"REGISTER {port}"
        if names is not None:
            line += f" files={hints.build_filter(names)}"
        address = IPv4Address("TCP", peer, 5555)
        self.register(self.connect(address), line.encode())

    def hinted(self, line: bytes) -> list[bytes]:
        return self.connect(RELAY_PEER_B).request(line)

    def test_suggests_holders(self) -> None:
        self.register_files("10.0.0.1", 4001, ["a.txt"])
        self.register_files("10.0.0.2", 4002, ["b.txt"])
        self.register_files("10.0.0.3", 4003, None)
        self.register_files("10.0.0.4", 4004, ["b.txt", "a.txt"])
        hint = hints.name_hint("a.txt")
        reply = self.hinted(f"PEERS hint={hint}".encode())
        self.assertEqual(reply[0], b"OK 2")
        entries = [wire.PeerEntry.from_line(line) for line in reply[1:]]
        self.assertEqual([e.port for e in entries], [4001, 4004])
        reply = self.hinted(f"PEERS hint={hint} limit=1".encode())
        self.assertEqual(reply[0], b"OK 1", "never next=")
        self.assertEqual(len(reply), 2)
        self.assertEqual(self.hinted(f"PEERS hint={'0' * 16}".encode()), [b"OK 0"])
        self.assertEqual(len(self.peers()), 4, "the full list is unchanged")

    def test_listing_with_filters(self) -> None:
        """``PEERS files=1``: every peer, each with the filter it announced
        (none for a peer that announced none)."""
        self.register_files("10.0.0.1", 4001, ["a.txt"])
        self.register_files("10.0.0.3", 4003, None)
        reply = self.hinted(b"PEERS files=1")
        self.assertEqual(reply[0], b"OK 2")
        entries = [wire.PeerEntry.from_line(line) for line in reply[1:]]
        self.assertEqual(entries[0].files, hints.filter_bytes(["a.txt"]))
        self.assertIsNone(entries[1].files)
        self.assertEqual([e.files for e in self.peers()], [None, None])
        paged = self.hinted(b"PEERS files=1 limit=1")
        self.assertTrue(paged[0].startswith(b"OK 1 next="), paged[0])
        self.assertIn(b" files=", paged[1])

    def test_malformed(self) -> None:
        self.assertError(self.hinted(b"PEERS hint=nothex"), Code.BAD_REQUEST)
        reply = self.connect().request(b"REGISTER 4001 files=00")
        self.assertError(reply, Code.BAD_REQUEST)


class ShareNamesTests(SynchronousTestCase):
    """The share index's names: what the peer's filter is built from."""

    def test_names(self) -> None:
        """The names the filter is built from are the names the peer lists
        (hidden files only when shared; never twistd's own files)."""
        root = temp_dir(self)
        os.makedirs(os.path.join(root, "sub"))
        os.makedirs(os.path.join(root, ".secret"))
        for name in ("a.txt", "sub/b.txt", ".hidden", ".secret/c", "twistd.pid"):
            with open(os.path.join(root, name), "w") as stream:
                stream.write("x")
        share = ShareFolder(root)
        index = indexed(self, share, Clock())
        self.assertEqual(sorted(index.names()), ["a.txt", "sub/b.txt"])
        factory = peer_factory(self, share, Clock(), index_clock=Clock())
        served = [entry.name for entry in read_listing(factory)]
        self.assertEqual(sorted(served), sorted(index.names()), "what LIST serves")
        hidden = indexed(self, ShareFolder(root, include_hidden=True), Clock())
        self.assertEqual(
            sorted(hidden.names()), [".hidden", ".secret/c", "a.txt", "sub/b.txt"]
        )


class AnnouncerFilesTests(AnnouncerTestMixin, SynchronousTestCase):
    """The announcer sends ``files=`` with every REGISTER, fresh each time."""

    def test_sent_and_refreshed(self) -> None:
        names = ["a.txt"]
        self.announcer = self.make(files=lambda: hints.build_filter(names))
        self.announcer.startService()
        first = hints.build_filter(["a.txt"])
        self.assertEqual(
            self.relay.requests, [f"REGISTER 4242 files={first}\n".encode()]
        )
        names.append("b.txt")
        self.clock.advance(self.next_delay())
        second = hints.build_filter(["a.txt", "b.txt"])
        self.assertEqual(
            self.relay.requests[1], f"REGISTER 4242 files={second}\n".encode()
        )
        self.stop()

    def test_unreadable_share(self) -> None:
        def broken() -> str:
            raise PermissionError("no")

        self.announcer = self.make(files=broken)
        self.announcer.startService()
        self.assertEqual(self.relay.requests, [b"REGISTER 4242\n"])
        self.stop()

    def test_filter_built_elsewhere(self) -> None:
        """A filter that arrives later (built on a thread) is waited for,
        then sent with the REGISTER."""
        from twisted.internet.defer import Deferred

        pending: Deferred = Deferred()
        self.announcer = self.make(files=lambda: pending)
        self.announcer.startService()
        self.assertEqual(self.relay.requests, [])
        built = hints.build_filter(["a.txt"])
        pending.callback(built)
        self.assertEqual(
            self.relay.requests, [f"REGISTER 4242 files={built}\n".encode()]
        )
        self.stop()

    def test_unexpected_filter_error(self) -> None:
        """A bug in building the filter is logged; the lease goes on."""

        def buggy() -> str:
            raise ZeroDivisionError()

        self.announcer = self.make(files=buggy)
        self.announcer.startService()
        self.assertEqual(self.relay.requests, [b"REGISTER 4242\n"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.stop()


class ClientOrderTests(CommandTestCase):
    """``p2p get`` tries the relay's suggestions first."""

    CONTENT = b"hinted\n" * 10
    A = (PEER_A, "127.0.0.1", 4001)
    B = (PEER_B, "127.0.0.1", 4002)
    C = (PEER_C, "127.0.0.1", 4003)

    def serve(self, index: int, content: bytes) -> bytes:
        """Play a peer (P2P/2) that has the file, one piece long; return the
        request it got."""
        protocol, transport = self.connect(index, b"P2P/2 peer")
        request = transport.value()
        header = wire.FileHeader(
            len(content), root_hex(content), 0, len(content), PIECE_SIZE, 0
        )
        protocol.dataReceived(header.to_line() + b"\n" + content)
        return request

    def test_hinted_order(self) -> None:
        a, b, c = (
            wire.PeerEntry(p, h, port) for p, h, port in (self.A, self.B, self.C)
        )
        self.assertEqual(session.hinted_order([c, a], [a, b, c]), [c, a, b])
        self.assertEqual(session.hinted_order([], [a, b]), [a, b])
        self.assertEqual(session.hinted_order([c], [a]), [c, a])

    def test_suggested_peer_first(self) -> None:
        target = self.mktemp()
        d = self.run_cli("--relay", "127.0.0.1:9", "get", "-o", target, "a.txt")
        self.answer_peers(0, self.A, self.B, self.C)
        request = self.answer_peers(1, self.C)
        self.assertEqual(request, f"PEERS hint={hints.name_hint('a.txt')}\n".encode())
        self.assertEqual(self.reactor.tcpClients[2][:2], ("127.0.0.1", 4003))
        self.serve(2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(len(self.reactor.tcpClients), 3, "one peer contacted")
        self.assertIn(
            "3 active peer(s), 1 suggested for a.txt", self.console.err_lines[0]
        )
        self.assert_no_timers()

    def test_wrong_hint_falls_back(self) -> None:
        """A suggested peer without the file is skipped; then the full list,
        in its order, without asking the suggested peer again."""
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "-o", "x", "a.txt")
        self.answer_peers(0, self.A, self.B)
        self.answer_peers(1, self.B)
        protocol, _ = self.connect(2, b"P2P/2 peer")
        self.assertEqual(self.reactor.tcpClients[2][:2], ("127.0.0.1", 4002))
        protocol.dataReceived(b"ERR 404 no such file\n")
        self.assertEqual(self.reactor.tcpClients[3][:2], ("127.0.0.1", 4001))
        self.refuse(3)
        self.assertEqual(len(self.reactor.tcpClients), 4)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assert_one_error_line("a.txt", "not found on any of 2")
        self.assert_no_timers()

    def test_older_relay(self) -> None:
        """ERR 400 to hint= (a relay from before hints): no suggestion."""
        target = self.mktemp()
        d = self.run_cli("--relay", "127.0.0.1:9", "get", "-o", target, "a.txt")
        self.answer_peers(0, self.A, self.B)
        protocol, _ = self.connect(1, b"P2P/1 relay")
        protocol.dataReceived(b"ERR 400 unexpected argument 'hint=...'\n")
        self.assertEqual(self.reactor.tcpClients[2][:2], ("127.0.0.1", 4001))
        self.serve(2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertIn("2 active peer(s), 0 suggested", self.console.err_lines[0])
        self.assert_no_timers()

    def test_busy_relay_refuses_the_hint(self) -> None:
        """
        ERR 429 to hint= (the relay's name queries are spent): the fetch
        goes on over the full list, and stderr says why there is no
        suggestion.
        """
        target = self.mktemp()
        d = self.run_cli("--relay", "127.0.0.1:9", "get", "-o", target, "a.txt")
        self.answer_peers(0, self.A)
        protocol, _ = self.connect(1, b"P2P/1 relay")
        protocol.dataReceived(
            b"ERR 429 the relay's name queries are spent; retry-after=0.5\n"
        )
        self.serve(2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertIn(
            "no suggestion (refused: ERR 429 the relay's name queries are spent",
            self.console.stderr.getvalue(),
        )
        self.assert_no_timers()

    def test_hint_request_fails(self) -> None:
        """A relay that fails the hinted query: go on with the full list."""
        target = self.mktemp()
        d = self.run_cli("--relay", "127.0.0.1:9", "get", "-o", target, "a.txt")
        self.answer_peers(0, self.A)
        self.refuse(1)
        self.serve(2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertIn("no suggestion", self.console.stderr.getvalue())
        self.assert_no_timers()


class SuggestTests(SynchronousTestCase):
    """L{hints.suggest}: a client's own matching of a listing with filters,
    in the relay's order and with its spread over networks."""

    def entry(self, host: str, port: int, names: list[str] | None):
        files = hints.filter_bytes(names) if names is not None else None
        return wire.PeerEntry(PEER_C, host, port, files=files)

    def test_matches_in_order(self) -> None:
        entries = [
            self.entry("10.0.0.1", 1, ["b"]),
            self.entry("10.0.1.1", 2, ["a"]),
            self.entry("10.0.2.1", 3, None),
            self.entry("10.0.3.1", 4, ["a", "b"]),
        ]
        self.assertEqual([e.port for e in hints.suggest(entries, "a", 10)], [2, 4])
        self.assertEqual([e.port for e in hints.suggest(entries, "a", 1)], [2])
        self.assertEqual(hints.suggest(entries, "zzz-not-there", 10), [])

    def test_spread_over_networks(self) -> None:
        """A third holder from one /24 waits behind another network's."""
        entries = [self.entry(f"10.9.9.{n}", n, ["a"]) for n in range(1, 5)]
        entries.append(self.entry("10.0.0.1", 99, ["a"]))
        ports = [e.port for e in hints.suggest(entries, "a", 10)]
        self.assertEqual(ports, [1, 2, 99, 3, 4])
