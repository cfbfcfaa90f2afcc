"""
Tests for ``p2p.relay_cache``: the client's copy of the last peer list.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.relay_cache import (
    MAX_CACHE_BYTES,
    MAX_CACHED_PEERS,
    CacheUnusable,
    PeerCache,
    default_cache_folder,
    format_age,
)

from ._support import set_environment

RELAYS = ["127.0.0.1:9", "tcp:host=127.0.0.2:port=9"]
PEERS = [
    wire.PeerEntry("aaaaaaaaaaaaaaaa", "127.0.0.1", 4001, 3, "one"),
    wire.PeerEntry("bbbbbbbbbbbbbbbb", "::1", 4002, 0),
]


class PeerCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.folder = os.path.join(os.path.abspath(self.mktemp()), "p2p-relay")
        self.cache = PeerCache(self.folder, RELAYS, self.clock.seconds)

    def write(self, data: bytes) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(self.cache.path, "wb") as stream:
            stream.write(data)

    def assert_unusable(self, fragment: str) -> None:
        with self.assertRaises(CacheUnusable) as caught:
            self.cache.load()
        self.assertIn(fragment, str(caught.exception))

    def test_round_trip(self) -> None:
        """What is saved is read back, with the time it was saved."""
        self.assertIsNone(self.cache.load())
        self.cache.save(PEERS)
        self.clock.advance(600)
        cached = self.cache.load()
        assert cached is not None
        self.assertEqual(cached.peers, PEERS)
        self.assertEqual(self.clock.seconds() - cached.saved, 600)

    def test_one_list_per_relay_however_typed(self) -> None:
        """The seed's ``p2p 127.0.0.1 8000`` and the default
        ``tcp:127.0.0.1:8000`` share one list; another relay has its own."""
        seed = PeerCache(self.folder, ["127.0.0.1:8000"], self.clock.seconds)
        default = PeerCache(self.folder, ["tcp:127.0.0.1:8000"], self.clock.seconds)
        other = PeerCache(self.folder, ["127.0.0.1:8001"], self.clock.seconds)
        self.assertEqual(seed.path, default.path)
        self.assertNotEqual(seed.path, other.path)

    def test_private_and_atomic(self) -> None:
        """The folder is 0700, the file 0600, replaced by a rename (no
        temporary file stays), in the cache folder only."""
        self.cache.save(PEERS)
        self.cache.save(PEERS[:1])
        self.assertEqual(stat.S_IMODE(os.stat(self.folder).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.cache.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.folder), [os.path.basename(self.cache.path)])
        cached = self.cache.load()
        assert cached is not None
        self.assertEqual(cached.peers, PEERS[:1])

    def test_one_file_per_relay_list(self) -> None:
        """Another list of relays, or the same in another order, is another
        file; the same list, the same file."""
        paths = {
            PeerCache(self.folder, relays, self.clock.seconds).path
            for relays in (RELAYS, RELAYS[::-1], RELAYS[:1])
        }
        self.assertEqual(len(paths), 3)
        self.assertIn(self.cache.path, paths)
        again = PeerCache(self.folder, list(RELAYS), self.clock.seconds)
        self.assertEqual(again.path, self.cache.path)

    def test_addresses_only(self) -> None:
        """A listing's name filters are not kept."""
        self.cache.save([replace(PEERS[0], files=bytes(256))])
        cached = self.cache.load()
        assert cached is not None
        self.assertEqual(cached.peers, PEERS[:1])
        self.assertIsNone(cached.peers[0].files)
        with open(self.cache.path, "rb") as stream:
            self.assertNotIn(b"files=", stream.read())

    def test_bounded(self) -> None:
        """At most MAX_CACHED_PEERS are kept."""
        many = [
            wire.PeerEntry(f"{index:016x}", "10.0.0.1", 1 + index, 0)
            for index in range(MAX_CACHED_PEERS + 5)
        ]
        self.cache.save(many)
        cached = self.cache.load()
        assert cached is not None
        self.assertEqual(cached.peers, many[:MAX_CACHED_PEERS])

    def test_unwritable(self) -> None:
        """A folder that cannot be made is an OSError for the caller."""
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w"):
            pass
        cache = PeerCache(os.path.join(blocker, "p2p-relay"), RELAYS, time)
        with self.assertRaises(OSError):
            cache.save(PEERS)

    def test_corrupt(self) -> None:
        """Anything but a list this client wrote is refused, with a reason."""
        header = b"p2p-relay peer list 1 saved=1700000000.000\n"
        peer = PEERS[0].to_line() + b"\n"
        for data, fragment in (
            (b"\x00\xffgarbage\n", "not a peer list"),
            (b"", "not a peer list"),
            (b"garbage", "not a peer list"),
            (header[:-1], "truncated"),
            (header + peer[:-1], "truncated"),
            (b"p2p-relay peer list 1 saved=nan\n", "no valid time"),
            (b"p2p-relay peer list 1 saved=soon\n", "no valid time"),
            (header + peer + b"PEER x 1.2.3.4 5 age=0\n", "line 3"),
            (header + b"PEER aaaaaaaaaaaaaaaa evil.example 1 age=0\n", "line 2"),
            (header + b"import os\n", "line 2"),
            (header + peer * (MAX_CACHED_PEERS + 1), "more than"),
            (header + b"\n" * MAX_CACHE_BYTES, "larger than"),
        ):
            self.write(data)
            self.assert_unusable(fragment)

    def test_not_a_regular_file(self) -> None:
        """A symbolic link or a folder in its place is not followed."""
        target = os.path.abspath(self.mktemp())
        self.cache.save(PEERS)
        os.rename(self.cache.path, target)
        os.symlink(target, self.cache.path)
        self.assert_unusable("")
        os.unlink(self.cache.path)
        os.mkdir(self.cache.path)
        self.assert_unusable("not a regular file")
        os.rmdir(self.cache.path)
        os.mkfifo(self.cache.path)
        self.assert_unusable("not a regular file")


def time() -> float:
    return 0.0


class HelperTests(SynchronousTestCase):
    def test_default_folder(self) -> None:
        """Under $XDG_CACHE_HOME, else ~/.cache."""
        set_environment(self, "XDG_CACHE_HOME", "/somewhere/cache")
        self.assertEqual(default_cache_folder(), "/somewhere/cache/p2p-relay")
        set_environment(self, "XDG_CACHE_HOME", None)
        self.assertEqual(
            default_cache_folder(),
            os.path.join(os.path.expanduser("~"), ".cache", "p2p-relay"),
        )

    def test_format_age(self) -> None:
        self.assertEqual(format_age(-5), "0 min")
        self.assertEqual(format_age(59), "0 min")
        self.assertEqual(format_age(12 * 60 + 30), "12 min")
        self.assertEqual(format_age(119 * 60), "119 min")
        self.assertEqual(format_age(5 * 3600), "5 h")
        self.assertEqual(format_age(3 * 86400), "3 days")
