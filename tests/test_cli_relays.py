"""
Tests for ``p2p`` with several relays and the cached peer list, in
memory: the relays (and peers) are a MemoryReactorClock's connections,
answered or refused by hand.
"""

from __future__ import annotations

import os

from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock

from p2p import cli, wire
from p2p.relay_cache import PeerCache, default_cache_folder
from p2p.request import DEFAULT_REQUEST_TIMEOUT_SECONDS

from ._support import set_relay_environment
from .test_cli import PEER_A, PEER_B, CommandTestCase, FakeConsole, serve

A, B = "127.0.0.1:9", "127.0.0.1:10"
CONTENT = b"raven canyon otter\n" * 50
REFUSED = "cannot connect: Connection refused"


class SeveralRelaysOptionsTests(CommandTestCase):
    """--relay repeats; $P2P_RELAY may list several; GNU permutation and
    the seed form still work."""

    def test_repeated(self) -> None:
        options = cli.parse(["--relay", A, "-r", B, "get", "a.txt"])
        self.assertEqual(options["relay"], [A, B])
        self.assertEqual(options.settings().relays, [A, B])

    def test_after_the_command(self) -> None:
        options = cli.parse(["get", "a.txt", "--relay", A, "-o", "x", "-r", B])
        self.assertEqual(options["relay"], [A, B])
        self.assertEqual(options.subOptions["names"], ["a.txt"])
        self.assertEqual(options.subOptions["output"], "x")

    def test_seed_form(self) -> None:
        options = cli.parse(["127.0.0.1", "9", "a.txt", "--relay", B])
        self.assertEqual(options["relay"], [A, B])
        self.assertEqual(options.subOptions["names"], ["a.txt"])

    def test_environment_list(self) -> None:
        set_relay_environment(self, f" {A},{B}, ,{A}")
        self.assertEqual(cli.parse(["peers"])["relay"], [A, B])
        # The command line wins over the environment.
        self.assertEqual(cli.parse(["peers", "-r", "4001"])["relay"], ["4001"])
        set_relay_environment(self, None)
        self.assertEqual(cli.parse(["peers"])["relay"], ["tcp:127.0.0.1:8000"])

    def test_cache_folder(self) -> None:
        """The cache is under $XDG_CACHE_HOME; --no-cache turns it off."""
        settings = cli.parse(["peers"]).settings()
        self.assertEqual(settings.cache_folder, default_cache_folder())
        self.assertTrue(settings.cache_folder.startswith(self.cache_home))
        self.assertIsNone(cli.parse(["--no-cache", "peers"]).settings().cache_folder)
        self.assertIsNone(cli.parse(["peers", "--no-cache"]).settings().cache_folder)

    def test_help(self) -> None:
        text = str(cli.Options())
        for fragment in ("--relay", "repeat it", "comma-separated", "--no-cache"):
            self.assertIn(fragment, text)

    def test_demo_has_no_cache(self) -> None:
        """``p2p demo``'s relay lives for one run: its list is not cached."""
        settings = cli.parse(["-r", A, "-r", B, "demo"]).settings()
        self.assertIsNotNone(settings.cache_folder)
        settings = cli._with_relay(settings, "tcp:127.0.0.1:4001")
        self.assertEqual(settings.relays, ["tcp:127.0.0.1:4001"])
        self.assertIsNone(settings.cache_folder)

    def test_one_bad_relay(self) -> None:
        """One unusable relay among several is a usage error naming it."""
        code = self.successResultOf(
            self.run_cli("--relay", A, "--relay", "127.0.0.1:99999", "peers")
        )
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assert_one_error_line("99999")
        self.assertEqual(self.reactor.tcpClients, [])


class FallbackTests(CommandTestCase):
    """The relays are asked in order; the first that answers is used, and
    named on stderr."""

    def relay_at(self, index: int) -> str:
        host, port = self.reactor.tcpClients[index][:2]
        return f"{host}:{port}"

    def test_next_relay_answers(self) -> None:
        d = self.run_cli("--relay", A, "--relay", B, "peers")
        self.assertEqual(self.relay_at(0), A)
        self.assertEqual(len(self.reactor.tcpClients), 1, "one relay at a time")
        self.refuse(0)
        self.assertEqual(self.relay_at(1), B)
        self.answer_peers(1, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, f"127.0.0.1:4001 {PEER_A}\n".encode())
        self.assertEqual(
            self.console.err_lines,
            [
                f"p2p: relay {B} answered (after {A}: {REFUSED})",
                f"p2p: 1 active peer(s) at {B}",
            ],
        )
        self.assert_no_timers()

    def test_first_answers(self) -> None:
        """The first relay answering: the others are never asked."""
        d = self.run_cli("--relay", A, "--relay", B, "peers")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertIn(f"p2p: relay {A} answered", self.console.err_lines)

    def test_silent_relay_times_out(self) -> None:
        """A relay that never answers is given up after the request
        timeout, then the next is asked; no timer is left behind."""
        d = self.run_cli("--relay", A, "--relay", B, "peers")
        self.connect(0, b"P2P/1 relay")
        self.reactor.advance(DEFAULT_REQUEST_TIMEOUT_SECONDS - 0.1)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.2)
        self.assertEqual(self.relay_at(1), B)
        self.answer_peers(1)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertIn(f"after {A}: timed out", self.console.stderr.getvalue())
        self.assert_no_timers()

    def test_all_fail(self) -> None:
        """Every relay failing (and no cache): status 3, one line that says
        why each failed."""
        for command in (["peers"], ["ls"], ["get", "a.txt"]):
            self.reactor = MemoryReactorClock()
            self.console = FakeConsole()
            d = self.run_cli("--relay", A, "--relay", B, *command)
            self.refuse(0)
            protocol, _ = self.connect(1, b"P2P/1 relay")
            protocol.dataReceived(b"ERR 503 going away\n")
            self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY, command)
            self.assert_one_error_line(
                f"no relay answered: {A}: {REFUSED}; {B}: refused: ERR 503 going away"
            )
            self.assertEqual(self.console.out, b"")
            self.assert_no_timers()

    def test_hint_goes_to_the_relay_that_answered(self) -> None:
        """``PEERS hint=`` is asked of the relay whose list is used."""
        d = self.run_cli("--relay", A, "--relay", B, "get", "a.txt")
        self.refuse(0)
        self.answer_peers(1, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(self.relay_at(2), B)
        request = self.answer_peers(2)
        self.assertTrue(request.startswith(b"PEERS hint="), request)
        self.assertEqual(serve(self.reactor, 3, CONTENT), b"GET a.txt\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, CONTENT)
        self.assertIn(f"p2p: relay {B}: 1 active peer(s), 0 suggested for a.txt",
                      self.console.err_lines)  # fmt: skip

    def test_pages_stay_on_one_relay(self) -> None:
        """A relay that answered a full first page is asked for the next
        pages too (cursors are its own); when its paging fails, the next
        relay's list is read from the start."""
        d = self.run_cli("--relay", A, "--relay", B, "peers")
        page = [
            (f"{index:016x}", "10.0.0.1", 1 + index)
            for index in range(wire.MAX_PEERS_PER_PAGE)
        ]
        self.answer_peers(0, *page)
        self.assertEqual(self.relay_at(1), A)
        protocol, transport = self.connect(1, b"P2P/1 relay")
        self.assertTrue(transport.value().startswith(b"PEERS limit="))
        protocol.dataReceived(b"ERR 503 going away\n")
        self.assertEqual(self.relay_at(2), B)
        request = self.answer_peers(2, (PEER_B, "127.0.0.1", 4002))
        self.assertEqual(request, b"PEERS\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, f"127.0.0.1:4002 {PEER_B}\n".encode())
        self.assertIn("ERR 503", self.console.err_lines[0])


class CacheTests(CommandTestCase):
    """The last good list is cached; ``get`` falls back on it when every
    relay fails."""

    def fetch_through(self, *argv: str) -> None:
        """One ``get a.txt`` through relay B (A refused), from PEER_A."""
        d = self.run_cli(*argv, "--relay", A, "--relay", B, "get", "a.txt")
        self.refuse(0)
        self.answer_peers(1, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(2)
        serve(self.reactor, 3, CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)

    def again(self, minutes: float) -> None:
        """A later run: a new reactor (its clock C{minutes} on), a new
        console."""
        self.reactor = MemoryReactorClock()
        self.reactor.advance(minutes * 60)
        self.console = FakeConsole()

    def cache_files(self) -> list[str]:
        folder = default_cache_folder()
        return os.listdir(folder) if os.path.isdir(folder) else []

    def test_relays_down_uses_the_cache(self) -> None:
        self.fetch_through()
        self.assertEqual(len(self.cache_files()), 1)
        self.again(minutes=5)
        d = self.run_cli("--relay", A, "--relay", B, "get", "a.txt")
        self.refuse(0)
        self.refuse(1)
        # Straight to the cached peer: no relay to ask for a hint.
        self.assertEqual(self.reactor.tcpClients[2][:2], ("127.0.0.1", 4001))
        self.assertEqual(serve(self.reactor, 2, CONTENT), b"GET a.txt\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, CONTENT)
        self.assertEqual(
            self.console.err_lines[0],
            "p2p: relays unreachable; using the peer list cached 5 min ago "
            f"({A}: {REFUSED}; {B}: {REFUSED})",
        )
        self.assert_no_timers()

    def test_quiet_still_says_so(self) -> None:
        """-q keeps the cache's line: the list may be stale."""
        self.fetch_through()
        self.again(minutes=90)
        d = self.run_cli("-q", "--relay", A, "--relay", B, "get", "a.txt")
        self.refuse(0)
        self.refuse(1)
        serve(self.reactor, 2, CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assert_one_error_line("cached 90 min ago")

    def test_cache_is_per_relay_list(self) -> None:
        """Another list of relays has no cache: status 3."""
        self.fetch_through()
        self.again(minutes=1)
        d = self.run_cli("--relay", B, "get", "a.txt")
        self.refuse(0)
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assert_one_error_line(f"relay {B}: {REFUSED}")

    def test_peers_does_not_use_the_cache(self) -> None:
        """``p2p peers`` (and ``ls``) show the relays' list or fail."""
        self.fetch_through()
        self.again(minutes=1)
        d = self.run_cli("--relay", A, "--relay", B, "peers")
        self.refuse(0)
        self.refuse(1)
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assert_one_error_line("no relay answered")

    def test_peers_writes_the_cache(self) -> None:
        d = self.run_cli("--relay", A, "peers")
        self.answer_peers(0, (PEER_B, "127.0.0.1", 4002))
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        cached = PeerCache(default_cache_folder(), [A], self.reactor.seconds).load()
        assert cached is not None
        self.assertEqual([peer.peer_id for peer in cached.peers], [PEER_B])

    def test_no_cache(self) -> None:
        """--no-cache neither writes the cache nor reads it."""
        self.fetch_through("--no-cache")
        self.assertEqual(self.cache_files(), [])
        self.again(minutes=0)
        self.fetch_through()
        self.again(minutes=1)
        d = self.run_cli("--no-cache", "--relay", A, "--relay", B, "get", "a.txt")
        self.refuse(0)
        self.refuse(1)
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assert_one_error_line("no relay answered")

    def test_corrupt_cache(self) -> None:
        """A corrupt cache is ignored with one line; then status 3."""
        self.fetch_through()
        (name,) = self.cache_files()
        with open(os.path.join(default_cache_folder(), name), "wb") as stream:
            stream.write(b"PEER \x00\n" * 3)
        self.again(minutes=1)
        d = self.run_cli("--relay", A, "--relay", B, "get", "a.txt")
        self.refuse(0)
        self.refuse(1)
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        lines = self.console.err_lines
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("ignoring the peer cache", lines[0])
        self.assertIn("not a peer list", lines[0])
        self.assertIn("no relay answered", lines[1])
        self.assertNotIn("Traceback", self.console.stderr.getvalue())

    def test_unwritable_cache(self) -> None:
        """A cache that cannot be written costs one line, not the fetch."""
        os.makedirs(os.path.dirname(default_cache_folder()), exist_ok=True)
        with open(default_cache_folder(), "w"):
            pass  # a file where the folder should be
        d = self.run_cli("--relay", A, "get", "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        serve(self.reactor, 2, CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertIn("cannot write the peer cache", self.console.stderr.getvalue())

    def test_interactive_uses_the_cache(self) -> None:
        """``p2p HOST PORT`` (names typed) starts from the cache too."""
        d = self.run_cli("--relay", A, "peers")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.successResultOf(d)
        self.again(minutes=3)
        self.console = FakeConsole("a.txt\n")
        self.patch(cli, "in_daemon_thread", lambda reactor, work: succeed(work()))
        d = self.run_cli("127.0.0.1", "9")
        self.refuse(0)
        self.assertEqual(
            self.console.err_lines[:2],
            [
                "p2p: relay unreachable; using the peer list cached 3 min ago "
                f"({A}: {REFUSED})",
                "p2p: relay (cached list): 1 active peer(s)",
            ],
        )
        # The name typed is fetched from the cached peer, with no hint.
        self.assertEqual(self.reactor.tcpClients[1][:2], ("127.0.0.1", 4001))
        serve(self.reactor, 1, CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, CONTENT)


class SeveralNamesTests(CommandTestCase):
    """With several names (one listing with the peers' name filters), the
    relays are still asked once for the run, and the cache once."""

    def test_listing_with_filters_from_the_next_relay(self) -> None:
        d = self.run_cli("-q", "--relay", A, "--relay", B, "get", "a.txt", "b.txt")
        self.refuse(0)
        listing = self.answer_peers(1, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(listing, b"PEERS files=1\n")
        serve(self.reactor, 2, CONTENT)
        serve(self.reactor, 3, CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, CONTENT * 2)
        self.assertEqual(len(self.reactor.tcpClients), 4, "no hint request")

    def test_relay_without_filters_is_asked_again(self) -> None:
        """A relay that cannot send filters (ERR 400) is listed again
        without them, not passed over."""
        d = self.run_cli("-q", "--relay", A, "--relay", B, "get", "a.txt", "b.txt")
        protocol, _ = self.connect(0, b"P2P/1 relay")
        protocol.dataReceived(b"ERR 400 unknown option 'files'\n")
        self.assertEqual(self.reactor.tcpClients[1][:2], ("127.0.0.1", 9))
        self.assertEqual(self.answer_peers(1, (PEER_A, "127.0.0.1", 4001)), b"PEERS\n")
        self.assertTrue(self.answer_peers(2).startswith(b"PEERS hint="))
        serve(self.reactor, 3, CONTENT)
        self.assertEqual(self.reactor.tcpClients[4][:2], ("127.0.0.1", 9))
        self.assertTrue(self.answer_peers(4).startswith(b"PEERS hint="))
        serve(self.reactor, 5, CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)

    def test_cache_used_once_for_the_run(self) -> None:
        d = self.run_cli("--relay", A, "peers")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.successResultOf(d)
        self.reactor = MemoryReactorClock()
        self.console = FakeConsole()
        d = self.run_cli("-q", "--relay", A, "get", "a.txt", "b.txt")
        self.refuse(0)
        serve(self.reactor, 1, CONTENT)
        serve(self.reactor, 2, CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, CONTENT * 2)
        peers = [client[1] for client in self.reactor.tcpClients[1:]]
        self.assertEqual(peers, [4001, 4001], "the relay was not asked again")
        self.assert_one_error_line("using the peer list cached 0 min ago")

    def test_jobs_share_one_fallback(self) -> None:
        """Names fetched at once (--jobs) wait on one round of the relays,
        and read the cache once, then each fetches from the cached peer."""
        d = self.run_cli("--relay", A, "--relay", B, "peers")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.successResultOf(d)
        self.reactor = MemoryReactorClock()
        self.console = FakeConsole()
        folder = self.mktemp()
        os.mkdir(folder)
        d = self.run_cli(
            "-q", "--relay", A, "--relay", B, "get", "-j", "2", "-o", folder, "a", "b"
        )
        self.assertEqual(len(self.reactor.tcpClients), 1, "one relay at a time")
        self.refuse(0)
        self.refuse(1)
        self.assertEqual(len(self.reactor.tcpClients), 4, "both names at once")
        serve(self.reactor, 2, CONTENT)
        serve(self.reactor, 3, CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(sorted(os.listdir(folder)), ["a", "b"])
        self.assertEqual(self.reactor.tcpClients[2][:2], ("127.0.0.1", 4001))
        self.assertEqual(self.reactor.tcpClients[3][:2], ("127.0.0.1", 4001))
        self.assert_one_error_line("using the peer list cached 0 min ago")
