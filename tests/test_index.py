"""Tests for L{p2p.index}: the persistent index of a peer's share folder.

Everything runs without a running reactor: a Clock for timers, and pool
runners that are either inline (work runs at once) or controllable (works
queue up and the test runs them one at a time, to check the scheduler's
order).  Hashing is counted by wrapping L{p2p.pieces.hash_pieces}, and roots
are checked against an independent BLAKE3 of the bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from typing import Any

from blake3 import blake3
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2p import index as index_module
from p2p import pieces
from p2p.index import (
    CHANGING_RETRY_SECONDS,
    DEBOUNCE_SECONDS,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_ISDIR,
    FileChanging,
    IndexEntry,
    ShareIndex,
)
from p2p.pieces import PIECE_SIZE, PieceList, root_of
from p2p.share import ShareFolder
from p2p.wire import Code, WireError, retry_after
from tests._indexed import StepPool, run_inline
from tests.test_share import temp_dir, write

MIB = 1024 * 1024
RESCAN_SECONDS = 60.0


def pattern(size: int, seed: int = 0) -> bytes:
    """C{size} bytes that differ from piece to piece (and between seeds)."""
    block = bytes((seed + i) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


def expected_root(data: bytes) -> bytes:
    """The root of C{data}, hashed here without L{p2p.pieces.hash_pieces}."""
    digests = b"".join(
        blake3(data[offset : offset + PIECE_SIZE]).digest()
        for offset in range(0, len(data), PIECE_SIZE)
    )
    return root_of(len(data), PIECE_SIZE, digests)


def touch(path: str, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


class IndexCase(SynchronousTestCase):
    """Builds a share folder, counts hashing, makes indexes and stops them."""

    def setUp(self) -> None:
        self.base = temp_dir(self)
        self.root = os.path.join(self.base, "share")
        os.makedirs(self.root)
        self.database = os.path.join(self.base, "index.sqlite")
        self.hashed: list[tuple[int, int, int]] = []  # (size, start, stop)
        self.unreadable_sizes: set[int] = set()
        real = pieces.hash_pieces

        def counting(fd: int, size: int, start: int = 0, stop: Any = None, **kw: Any):
            self.hashed.append((size, start, stop))
            if size in self.unreadable_sizes:
                raise OSError(errno.EIO, "a bad disk block")
            return real(fd, size, start, stop, **kw)

        self.patch(pieces, "hash_pieces", counting)
        self.clock = Clock()

    def path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def put(self, name: str, data: bytes) -> str:
        return write(self.path(name), data)

    def make(
        self, runner: Any = run_inline, reactor: Any = None, **options: Any
    ) -> ShareIndex:
        index = ShareIndex(
            ShareFolder(self.root),
            options.pop("database", self.database),
            self.clock if reactor is None else reactor,
            runner,
            rescan_interval=RESCAN_SECONDS,
            **options,
        )
        self.addCleanup(self.stop, index, runner)
        return index

    def stop(self, index: ShareIndex, runner: Any) -> None:
        d = index.stop()
        if isinstance(runner, StepPool):
            runner.run_all()
        self.successResultOf(d)

    def started(self, **options: Any) -> ShareIndex:
        index = self.make(**options)
        self.successResultOf(index.start())
        return index

    def assertRoot(self, entry: IndexEntry | None, data: bytes) -> None:
        assert entry is not None
        self.assertEqual(entry.content.root, expected_root(data))
        self.assertEqual(entry.content.size, len(data))


class ScanTests(IndexCase):
    def test_indexes_servable_files(self) -> None:
        """Every servable regular file is indexed with the right root;
        hidden names, twistd's files, FIFOs and links leading out are not."""
        files = {
            "empty": b"",
            "one-piece": pattern(PIECE_SIZE),
            "sub/dir/several": pattern(3 * MIB + 5, seed=1),
            "sub/twistd.pid": b"only the top-level one is twistd's\n",
        }
        for name, data in files.items():
            self.put(name, data)
        self.put(".secret", b"hidden")
        self.put(".hidden/inside", b"hidden folder")
        self.put("twistd.pid", b"123\n")
        self.put("twistd.log", b"log\n")
        self.put("back\\slash", b"a name no client can ask for")
        os.mkfifo(self.path("pipe"))
        write(os.path.join(self.base, "outside"), b"secret")
        os.symlink("../outside", self.path("link-out"))
        os.symlink("one-piece", self.path("link-in"))
        os.symlink(self.base, self.path("dir-link"))

        index = self.started()

        self.assertEqual(sorted(index.names()), sorted([*files, "link-in"]))
        self.assertEqual(len(index), 5)
        for name, data in files.items():
            self.assertRoot(index.lookup(name), data)
        self.assertRoot(index.lookup("link-in"), files["one-piece"])
        self.assertEqual(index.lookup("one-piece").content.pieces, 1)
        self.assertEqual(index.lookup("sub/dir/several").content.pieces, 4)
        self.assertFalse(index.indexing)

    def test_start_fires_when_loaded(self) -> None:
        """start() fires once the rows are loaded, before the scan ends."""
        self.put("a", b"alpha")
        pool = StepPool()
        index = self.make(runner=pool)
        d = index.start()
        self.assertNoResult(d)
        pool.run_next()  # open the database
        self.successResultOf(d)
        self.assertTrue(index.indexing)
        self.assertEqual(len(index), 0)
        pool.run_all()
        self.assertEqual(index.names(), ["a"])
        self.assertFalse(index.indexing)

    def test_pending_and_scanning(self) -> None:
        """What STATUS reports: while the first scan runs, the share is
        being scanned; files found and not hashed yet are pending (and not
        listed); once all are hashed, neither."""
        self.put("a", b"alpha")
        self.put("b", pattern(2 * MIB))
        pool = StepPool()
        index = self.make(runner=pool)
        index.start()
        pool.run_next()  # open the database
        self.assertTrue(index.scanning)
        self.assertEqual(index.pending, 0)
        pool.run_next()  # the walk
        self.assertFalse(index.scanning)
        self.assertEqual((index.pending, len(index)), (2, 0))
        pool.run_all()
        self.assertEqual((index.pending, len(index)), (0, 2))
        self.assertFalse(index.scanning)
        # A file changed on disk is pending again until it is hashed; a
        # rescan is not the first walk.
        self.put("a", b"changed")
        touch(self.path("a"), 3_000_000_000)
        self.clock.advance(RESCAN_SECONDS)
        self.assertFalse(index.scanning)
        pool.run_next()  # the rescan's walk
        self.assertEqual(index.pending, 1)
        pool.run_all()
        self.assertEqual(index.pending, 0)

    def test_logs_the_initial_scan(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.put("a", b"alpha")
        self.put("b", pattern(2 * MIB))
        self.started()
        [event] = [e for e in events if "files" in e and "hashed" in e]
        self.assertEqual(
            (event["files"], event["bytes"], event["hashed"], event["reused"]),
            (2, 5 + 2 * MIB, 2, 0),
        )

    def test_unreadable_file_logged_once_per_change(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.put("good", b"fine")
        self.put("bad", b"seven b")
        self.unreadable_sizes.add(7)

        def errors() -> list[str]:
            return [e["name"] for e in events if e.get("log_level") == LogLevel.error]

        index = self.started()
        self.assertEqual((index.names(), errors()), (["good"], ["bad"]))
        self.clock.advance(RESCAN_SECONDS)
        self.assertEqual(errors(), ["bad"])
        self.assertEqual(len(self.hashed), 2)  # not tried again
        touch(self.path("bad"), 3_000_000_000)
        self.clock.advance(RESCAN_SECONDS)
        self.assertEqual(errors(), ["bad", "bad"])
        self.unreadable_sizes.clear()
        touch(self.path("bad"), 4_000_000_000)
        self.clock.advance(RESCAN_SECONDS)
        self.assertRoot(index.lookup("bad"), b"seven b")


class PersistenceTests(IndexCase):
    def test_restart_rehashes_nothing_unchanged(self) -> None:
        self.put("a", b"alpha")
        self.put("sub/b", pattern(3 * MIB))
        first = self.started()
        before = sorted((e.name, e.seq, e.content) for e in first.page(10)[0])
        self.successResultOf(first.stop())
        self.hashed.clear()

        second = self.started()

        self.assertEqual(self.hashed, [])
        after = sorted((e.name, e.seq, e.content) for e in second.page(10)[0])
        self.assertEqual(after, before)

    def test_restart_rehashes_only_changed(self) -> None:
        self.put("a", b"alpha")
        self.put("b", pattern(3 * MIB))
        self.successResultOf(self.started().stop())
        self.hashed.clear()
        touch(self.path("a"), 1_000_000_123)

        second = self.started()

        self.assertEqual(self.hashed, [(5, 0, 1)])
        self.assertEqual(second.lookup("a").identity[3], 1_000_000_123)

    def test_rewrite_with_its_times_put_back_is_hashed_again(self) -> None:
        """
        A file rewritten in place with its size and modification time put
        back (``touch -r``, ``cp -p``, ``rsync``) changed its change time,
        which nobody can set: it is not current, and a restart hashes it
        again instead of keeping its old root for good.
        """
        self.put("a", b"alpha")
        first = self.started()
        before = os.stat(self.path("a"))
        self.put("a", b"alpHa")
        os.utime(self.path("a"), ns=(before.st_atime_ns, before.st_mtime_ns))
        opened = ShareFolder(self.root).open("a")
        self.addCleanup(opened.close)
        self.assertIsNone(first.current("a", opened.identity))
        self.successResultOf(first.stop())
        self.hashed.clear()

        second = self.started()

        self.assertEqual(self.hashed, [(5, 0, 1)])
        self.assertRoot(second.lookup("a"), b"alpHa")

    def test_other_piece_size_rebuilds_without_reusing_seqs(self) -> None:
        self.put("a", b"alpha")
        first = self.started()
        seq = first.lookup("a").seq
        self.successResultOf(first.stop())
        with sqlite3.connect(self.database) as connection:
            connection.execute("UPDATE meta SET value = '1' WHERE key = 'piece_size'")
        connection.close()
        self.hashed.clear()

        second = self.started()

        self.assertEqual(len(self.hashed), 1)
        self.assertGreater(second.lookup("a").seq, seq)

    def test_damaged_database_is_set_aside(self) -> None:
        """
        A database file that is not one (damaged, or overwritten) is moved
        aside, with a warning naming where, and the share indexed again
        from scratch: the peer serves instead of refusing everything.
        """
        self.put("a", b"alpha")
        self.successResultOf(self.started().stop())
        garbage = pattern(8192, seed=3)
        with open(self.database, "wb") as stream:
            stream.write(garbage)
        self.hashed.clear()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        index = self.started()

        self.assertRoot(index.lookup("a"), b"alpha")
        self.assertEqual(self.hashed, [(5, 0, 1)])
        with open(self.database + ".corrupt", "rb") as stream:
            self.assertEqual(stream.read(), garbage)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["path"], self.database + ".corrupt")
        self.successResultOf(index.stop())
        self.assertRoot(self.started().lookup("a"), b"alpha")  # a sound one now

    def test_database_that_cannot_be_opened_fails_start(self) -> None:
        """
        A database that cannot be opened at all (here: a folder in its
        place) fails start(): nothing to set aside, nothing to serve from.
        """
        os.mkdir(self.database)
        index = self.make()
        self.failureResultOf(index.start(), sqlite3.OperationalError)
        self.assertTrue(os.path.isdir(self.database))


class ChangeTests(IndexCase):
    def test_changed_file_keeps_seq(self) -> None:
        """A re-hashed file keeps its seq; its old root is gone."""
        self.put("a", b"first")
        self.put("b", b"other")
        index = self.started()
        changes: list[int] = []
        index.subscribe(lambda: changes.append(len(index)))
        old = index.lookup("a")
        self.put("a", b"second version")

        self.clock.advance(RESCAN_SECONDS)

        new = index.lookup("a")
        self.assertEqual(new.seq, old.seq)
        self.assertRoot(new, b"second version")
        self.assertIsNone(index.by_root(old.content.root))
        self.assertEqual(index.by_root(new.content.root), new)
        # Told twice: when the scan found the change (the name filter covers
        # files on their way into the index), and once it was re-hashed.
        self.assertEqual(changes, [2, 2])

    def test_removed_file_disappears(self) -> None:
        self.put("a", b"alpha")
        self.put("b", b"bravo")
        index = self.started()
        root = index.lookup("a").content.root
        os.remove(self.path("a"))

        self.clock.advance(RESCAN_SECONDS)

        self.assertIsNone(index.lookup("a"))
        self.assertIsNone(index.by_root(root))
        self.assertEqual([e.name for e in index.page(10)[0]], ["b"])
        self.hashed.clear()
        self.successResultOf(index.stop())
        self.assertEqual(self.started().names(), ["b"])
        self.assertEqual(self.hashed, [])

    def test_same_content_twice(self) -> None:
        """by_root finds either holder, and the other after one goes."""
        self.put("a", b"same")
        self.put("b", b"same")
        index = self.started()
        root = expected_root(b"same")
        self.assertIn(index.by_root(root).name, ("a", "b"))
        os.remove(self.path("a"))
        self.clock.advance(RESCAN_SECONDS)
        self.assertEqual(index.by_root(root).name, "b")

    def test_periodic_rescan_finds_new_file(self) -> None:
        index = self.started()
        self.put("late", b"late")
        self.clock.advance(RESCAN_SECONDS - 1)
        self.assertIsNone(index.lookup("late"))
        self.clock.advance(1)
        self.assertRoot(index.lookup("late"), b"late")

    def test_page(self) -> None:
        for name in ("a", "b", "c", "d", "e"):
            self.put(name, name.encode())
        index = self.started()

        first, more = index.page(2)
        self.assertEqual([e.name for e in first], ["a", "b"])
        self.assertTrue(more)
        second, more = index.page(2, after=first[-1].seq)
        self.assertEqual([e.name for e in second], ["c", "d"])
        self.assertTrue(more)
        third, more = index.page(2, after=second[-1].seq)
        self.assertEqual([e.name for e in third], ["e"])
        self.assertFalse(more)
        seqs = [e.seq for e in first + second + third]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(index.page(10, after=seqs[-1]), ([], False))

        self.put("0-added-later", b"new")
        self.clock.advance(RESCAN_SECONDS)
        fourth, more = index.page(2, after=third[-1].seq)
        self.assertEqual([e.name for e in fourth], ["0-added-later"])
        self.assertFalse(more)

    def test_current(self) -> None:
        self.put("a", b"alpha")
        index = self.started()
        entry = index.lookup("a")
        self.assertEqual(index.current("a", entry.identity), entry)
        for field in (3, 4):  # the modification time, the change time
            stale = list(entry.identity)
            stale[field] += 1
            self.assertIsNone(index.current("a", tuple(stale)))
        self.assertIsNone(index.current("nothing", entry.identity))


class EnsureTests(IndexCase):
    def background_big(self, pool: StepPool) -> ShareIndex:
        """An index whose pool holds the first step of a 3-step big file."""
        self.put("big", pattern(3 * MIB))
        index = self.make(runner=pool, step_bytes=MIB)
        index.start()
        pool.run_next()  # load
        pool.run_next()  # scan: queues "big" and starts its first step
        self.assertEqual(len(pool.pending), 1)
        return index

    def test_priority_over_background(self) -> None:
        pool = StepPool()
        index = self.background_big(pool)
        self.put("small", b"small")
        d, progress = index.ensure("small")
        pool.run_next()  # big's first step, already in the pool
        self.assertNoResult(d)
        pool.run_next()  # small, ahead of big's other steps
        self.assertRoot(self.successResultOf(d), b"small")
        self.assertEqual((progress.done, progress.total), (5, 5))
        self.assertIsNone(index.lookup("big"))
        pool.run_all()
        self.assertEqual(
            self.hashed,
            [(3 * MIB, 0, 1), (5, 0, 1), (3 * MIB, 1, 2), (3 * MIB, 2, 3)],
        )
        self.assertRoot(index.lookup("big"), pattern(3 * MIB))

    def test_smaller_request_first(self) -> None:
        """
        Of the files clients asked for, the one with least left to hash goes
        first: a small file asked for while a big one is being hashed waits
        for one step, not for the whole big file (whose client may be gone).
        """
        pool = StepPool()
        index = self.idle(pool, step_bytes=MIB)
        self.put("big", pattern(3 * MIB))
        self.put("small", b"small")
        big, _ = index.ensure("big", 3 * MIB)
        pool.run_next()  # big's first step
        small, _ = index.ensure("small", 5)
        pool.run_next()  # big's second step, already in the pool
        self.assertNoResult(small)
        pool.run_next()  # small, ahead of big's last step
        self.assertRoot(self.successResultOf(small), b"small")
        self.assertNoResult(big)
        pool.run_all()
        self.assertRoot(self.successResultOf(big), pattern(3 * MIB))
        self.assertEqual(
            self.hashed,
            [(3 * MIB, 0, 1), (3 * MIB, 1, 2), (5, 0, 1), (3 * MIB, 2, 3)],
        )

    def idle(self, pool: StepPool, **options: Any) -> ShareIndex:
        """A started index, with its scan of the (empty) folder done."""
        index = self.make(runner=pool, **options)
        index.start()
        pool.run_all()
        return index

    def keep_changing(self, index: ShareIndex, pool: StepPool, name: str) -> None:
        """Ask for a 3-step file C{name} and change it after every step
        until its hashing gives up (FileChanging)."""
        self.put(name, pattern(3 * MIB))
        d, _ = index.ensure(name)
        for mtime in range(1, 10):
            if d.called:
                break
            pool.run_next()
            touch(self.path(name), mtime * 1_000_000_000)
        self.failureResultOf(d, FileChanging)

    def test_progress_per_step(self) -> None:
        pool = StepPool()
        index = self.idle(pool, step_bytes=MIB)
        self.put("big", pattern(3 * MIB))
        d, progress = index.ensure("big")
        self.assertEqual((progress.done, progress.total), (0, 0))
        seen = []
        while not d.called:
            pool.run_next()
            seen.append((progress.done, progress.total))
        self.assertEqual(seen, [(MIB, 3 * MIB), (2 * MIB, 3 * MIB), (3 * MIB, 3 * MIB)])
        self.assertRoot(self.successResultOf(d), pattern(3 * MIB))

    def test_promotes_background_job(self) -> None:
        """ensure() of the file being hashed in the background joins its job."""
        pool = StepPool()
        index = self.background_big(pool)
        d, progress = index.ensure("big")
        pool.run_all()
        self.assertRoot(self.successResultOf(d), pattern(3 * MIB))
        self.assertEqual(len(self.hashed), 3)

    def test_shared_job(self) -> None:
        pool = StepPool()
        self.put("a", b"alpha")
        index = self.make(runner=pool)
        index.start()
        pool.run_next()
        first, progress1 = index.ensure("a")
        second, progress2 = index.ensure("a")
        self.assertIs(progress1, progress2)
        pool.run_all()
        self.assertIs(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(self.hashed, [(5, 0, 1)])

    def test_up_to_date_needs_no_hashing(self) -> None:
        self.put("a", b"alpha")
        index = self.started()
        self.hashed.clear()
        d, progress = index.ensure("a")
        self.assertIs(self.successResultOf(d), index.lookup("a"))
        self.assertEqual(self.hashed, [])
        self.assertEqual((progress.done, progress.total), (5, 5))

    def test_stale_entry_rehashed(self) -> None:
        """A file changed since its entry: ensure() hashes it before the
        rescan would, keeping its seq."""
        self.put("a", b"alpha")
        index = self.started()
        old = index.lookup("a")
        self.put("a", b"alpha, version two")
        self.assertIsNone(index.current("a", ShareFolder(self.root).open("a").identity))
        d, _ = index.ensure("a")
        new = self.successResultOf(d)
        self.assertRoot(new, b"alpha, version two")
        self.assertEqual(new.seq, old.seq)
        self.assertIs(index.lookup("a"), new)

    def test_name_through_a_symlinked_folder_is_refused_before_hashing(
        self,
    ) -> None:
        """
        A name through a symlink to a folder (which the index never
        enters) fails with 404 at once, before any byte is hashed: asked
        again, or as another alias (``self/self/...``), it costs a few
        syscalls, not a hash of the file.
        """
        self.put("d/big", pattern(3 * MIB))
        os.symlink("d", self.path("link"))
        os.symlink(".", self.path("self"))
        index = self.started()
        self.hashed.clear()
        for name in ("link/big", "link/big", "self/d/big", "self/self/link/big"):
            d, _ = index.ensure(name)
            self.assertEqual(
                self.failureResultOf(d, WireError).value.code, Code.NOT_FOUND, name
            )
        self.assertEqual(self.hashed, [])
        self.assertEqual(sorted(e.name for e in index.page(10)[0]), ["d/big"])

    def test_file_that_kept_changing_is_refused_for_a_while(self) -> None:
        """
        After a file kept changing while hashed (a log being written), a
        request for it within CHANGING_RETRY_SECONDS gets 503 with a
        retry-after at once, without hashing it again; after that, it is
        hashed again (and indexed, once it holds still).
        """
        pool = StepPool()
        index = self.idle(pool, step_bytes=MIB)
        self.keep_changing(index, pool, "log")
        self.hashed.clear()
        self.clock.advance(CHANGING_RETRY_SECONDS - 10)

        d, _ = index.ensure("log")

        error = self.failureResultOf(d, WireError).value
        self.assertEqual(error.code, Code.UNAVAILABLE)
        self.assertEqual(retry_after(error.message), 10)
        self.assertEqual((self.hashed, pool.pending), ([], []))
        self.clock.advance(10)
        d, _ = index.ensure("log")
        pool.run_all()
        self.assertRoot(self.successResultOf(d), pattern(3 * MIB))

    def test_missing_and_refused(self) -> None:
        self.put(".hidden", b"no")
        index = self.started()
        d, _ = index.ensure("nothing")
        self.assertEqual(self.failureResultOf(d, WireError).value.code, Code.NOT_FOUND)
        d, _ = index.ensure(".hidden")
        self.assertEqual(self.failureResultOf(d, WireError).value.code, Code.FORBIDDEN)
        self.assertEqual(len(index), 0)

    def test_not_ready(self) -> None:
        index = self.make()
        d, _ = index.ensure("a")
        self.assertEqual(
            self.failureResultOf(d, WireError).value.code, Code.UNAVAILABLE
        )

    def test_change_while_hashing_restarts(self) -> None:
        pool = StepPool()
        index = self.idle(pool, step_bytes=MIB)
        self.put("big", pattern(3 * MIB))
        d, _ = index.ensure("big")
        pool.run_next()  # the first MiB of the old bytes
        new = pattern(3 * MIB, seed=7)
        self.put("big", new)
        touch(self.path("big"), 2_000_000_000)
        pool.run_all()
        self.assertRoot(self.successResultOf(d), new)
        self.assertRoot(index.lookup("big"), new)
        self.assertEqual([start for _, start, _ in self.hashed], [0, 0, 1, 2])

    def test_gives_up_on_a_file_that_keeps_changing(self) -> None:
        pool = StepPool()
        index = self.idle(pool, step_bytes=MIB)
        self.keep_changing(index, pool, "big")
        self.assertIsNone(index.lookup("big"))


class DigestTests(IndexCase):
    def test_from_database_then_cache(self) -> None:
        data = pattern(3 * MIB)
        self.put("big", data)
        self.successResultOf(self.started().stop())
        pool = StepPool()
        index = self.make(runner=pool)
        index.start()
        pool.run_next()  # load
        entry = index.lookup("big")
        d = index.piece_digests(entry)
        self.assertNoResult(d)
        pool.run_all()
        digests = self.successResultOf(d)
        self.assertEqual(PieceList.check(entry.content, digests).digests, digests)
        again = index.piece_digests(entry)
        self.assertEqual(pool.pending, [])
        self.assertEqual(self.successResultOf(again), digests)

    def test_fresh_hash_is_cached(self) -> None:
        self.put("a", pattern(2 * MIB))
        pool = StepPool()
        index = self.make(runner=pool)
        index.start()
        pool.run_all()
        d = index.piece_digests(index.lookup("a"))
        self.assertEqual(pool.pending, [])
        self.assertEqual(len(self.successResultOf(d)), 64)

    def test_cache_is_bounded(self) -> None:
        self.put("big", pattern(3 * MIB))  # 96 bytes of digests
        pool = StepPool()
        index = self.make(runner=pool, max_cached_piece_bytes=64)
        index.start()
        pool.run_all()
        for _ in range(2):
            d = index.piece_digests(index.lookup("big"))
            self.assertEqual(len(pool.pending), 1)
            pool.run_all()
            self.assertEqual(len(self.successResultOf(d)), 96)

    def indexed_on_pool(
        self, size: int, cache_bytes: int
    ) -> tuple[ShareIndex, StepPool, IndexEntry]:
        """An index of one file of C{size} bytes, on a pool the test runs."""
        self.put("big", pattern(size))
        pool = StepPool()
        index = self.make(runner=pool, max_cached_piece_bytes=cache_bytes)
        index.start()
        pool.run_all()
        return index, pool, index.lookup("big")

    def test_one_read_for_callers_at_once(self) -> None:
        """
        Connections asking at once for a list not in the cache (a cold
        start, or one over the cache's bound) share one read of the
        database and one copy of the list.
        """
        index, pool, entry = self.indexed_on_pool(3 * MIB, cache_bytes=0)
        calls = [index.piece_digests(entry) for _ in range(3)]
        self.assertEqual(len(pool.pending), 1)
        pool.run_all()
        first, *others = [self.successResultOf(d) for d in calls]
        for other in others:
            self.assertIs(other, first)

    def test_held_list_is_never_copied(self) -> None:
        """
        A list over the cache's bound (a 512 GiB file's is 16 MiB) is not
        cached, but while a connection holds it, others get that same copy
        without reading it again: memory grows with the contents being
        served, never with the connections.  Once nobody holds it, it is
        read again.
        """
        index, pool, entry = self.indexed_on_pool(3 * MIB, cache_bytes=64)
        d = index.piece_digests(entry)  # 96 bytes
        pool.run_all()
        held = self.successResultOf(d)
        again = self.successResultOf(index.piece_digests(entry))
        self.assertIs(again, held)
        self.assertEqual(pool.pending, [])
        del held, again
        d = index.piece_digests(entry)
        self.assertEqual(len(pool.pending), 1)
        pool.run_all()
        self.assertEqual(len(self.successResultOf(d)), 96)

    def test_failed_read_fails_every_caller(self) -> None:
        """A list that cannot be read fails every caller that waited for it."""
        index, pool, entry = self.indexed_on_pool(2 * MIB, cache_bytes=0)
        calls = [index.piece_digests(entry) for _ in range(2)]

        def unreadable(entry: IndexEntry) -> bytes:
            raise KeyError(entry.name)

        index._database.digests = unreadable
        pool.run_all()
        for d in calls:
            self.failureResultOf(d, KeyError)

    def test_gone(self) -> None:
        self.put("a", b"alpha")
        index = self.started(max_cached_piece_bytes=0)
        entry = index.lookup("a")
        os.remove(self.path("a"))
        self.clock.advance(RESCAN_SECONDS)
        self.failureResultOf(index.piece_digests(entry), KeyError)


class StopTests(IndexCase):
    def test_stop_leaves_nothing_behind(self) -> None:
        self.put("a", b"alpha")
        index = self.started()
        self.assertTrue(self.clock.getDelayedCalls())
        self.successResultOf(index.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        d, _ = index.ensure("a")
        self.failureResultOf(d, WireError)
        self.assertIsNone(index._database._connection)

    def test_stop_waits_for_the_step_in_flight(self) -> None:
        pool = StepPool()
        self.put("big", pattern(3 * MIB))
        index = self.make(runner=pool, step_bytes=MIB)
        index.start()
        pool.run_next()
        waiting, _ = index.ensure("big")
        pool.run_next()  # first step
        pool.run_next()  # second step starts... and is in the pool now
        stopped = index.stop()
        self.failureResultOf(waiting, CancelledError)
        self.assertNoResult(stopped)
        pool.run_all()
        self.successResultOf(stopped)
        self.assertEqual(len(self.hashed), 2)  # no step after stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_before_loaded(self) -> None:
        pool = StepPool()
        index = self.make(runner=pool)
        started = index.start()
        stopped = index.stop()
        pool.run_all()
        self.successResultOf(started)
        self.successResultOf(stopped)
        self.assertEqual(len(index), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class NotifyTests(IndexCase):
    """The debounced handling behind the inotify callback."""

    def notify(self, index: ShareIndex, name: str, mask: int) -> None:
        index._notified(FilePath(self.path(name).encode()), mask)

    def test_changed_and_deleted_files(self) -> None:
        self.put("a", b"alpha")
        self.put("b", b"bravo")
        index = self.started()
        self.put("a", b"alpha, changed")
        self.put("c", b"charlie")
        os.remove(self.path("b"))
        self.notify(index, "a", IN_CLOSE_WRITE)
        self.notify(index, "c", IN_CREATE)  # ignored: its CLOSE_WRITE follows
        self.notify(index, "b", IN_DELETE)
        self.assertTrue(index.indexing)
        self.clock.advance(DEBOUNCE_SECONDS - 0.1)
        self.assertRoot(index.lookup("a"), b"alpha")
        self.clock.advance(0.1)
        self.assertRoot(index.lookup("a"), b"alpha, changed")
        self.assertIsNone(index.lookup("b"))
        self.assertIsNone(index.lookup("c"))
        self.notify(index, "c", IN_CLOSE_WRITE)
        self.clock.advance(DEBOUNCE_SECONDS)
        self.assertRoot(index.lookup("c"), b"charlie")

    def test_folder_events_mean_rescan(self) -> None:
        index = self.started()
        self.put("new/a", b"alpha")
        self.notify(index, "new", IN_CREATE | IN_ISDIR)
        self.clock.advance(DEBOUNCE_SECONDS)
        self.assertRoot(index.lookup("new/a"), b"alpha")
        shutil.rmtree(self.path("new"))
        self.notify(index, "new", IN_DELETE_SELF)
        self.clock.advance(DEBOUNCE_SECONDS)
        self.assertEqual(len(index), 0)

    def test_hidden_and_outside_ignored(self) -> None:
        index = self.started()
        self.put(".hidden", b"no")
        self.notify(index, ".hidden", IN_CLOSE_WRITE)
        index._notified(FilePath(self.base.encode()), IN_CLOSE_WRITE)
        self.clock.advance(DEBOUNCE_SECONDS)
        self.assertEqual(len(index), 0)
        self.assertEqual(self.hashed, [])

    def test_real_inotify(self) -> None:
        """With a reactor that can watch descriptors, a real inotify fd
        reports a new file; the test reads it by hand."""
        if index_module.inotify is None:
            raise self.skipTest("no inotify here")
        reactor = MemoryReactorClock()
        self.put("sub/a", b"alpha")
        index = self.make(reactor=reactor)
        self.successResultOf(index.start())
        [notifier] = reactor.getReaders()
        self.put("sub/b", b"bravo")
        notifier.doRead()
        reactor.advance(DEBOUNCE_SECONDS)
        self.assertRoot(index.lookup("sub/b"), b"bravo")
        self.successResultOf(index.stop())
        reactor.advance(0)  # the notifier's connectionLost
        self.assertEqual(reactor.getReaders(), [])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_real_inotify_new_folder(self) -> None:
        """
        A folder made after the start is watched by the rescan its creation
        starts (Twisted's autoAdd is off: it would follow a folder swapped
        for a symlink): files written in it later are indexed too.
        """
        if index_module.inotify is None:
            raise self.skipTest("no inotify here")
        reactor = MemoryReactorClock()
        self.put("a", b"alpha")
        index = self.make(reactor=reactor)
        self.successResultOf(index.start())
        [notifier] = reactor.getReaders()
        self.put("new/b", b"bravo")
        notifier.doRead()
        reactor.advance(DEBOUNCE_SECONDS)
        self.assertRoot(index.lookup("new/b"), b"bravo")
        self.put("new/c", b"charlie")
        notifier.doRead()
        reactor.advance(DEBOUNCE_SECONDS)
        self.assertRoot(index.lookup("new/c"), b"charlie")
        self.successResultOf(index.stop())
        reactor.advance(0)


class ServableNamesTests(IndexCase):
    """What the peer announces: indexed names and names on their way."""

    def test_queued_names_are_servable(self) -> None:
        self.put("a", b"alpha")
        self.put("b", b"bravo")
        runner = StepPool()
        index = self.make(runner)
        index.start()
        runner.run_next()  # the database is loaded
        scanned = index.when_scanned()
        self.assertNoResult(scanned)
        runner.run_next()  # the scan: both files queued, none hashed yet
        self.successResultOf(scanned)
        self.assertEqual(index.names(), [])
        self.assertEqual(sorted(index.servable_names()), ["a", "b"])
        self.successResultOf(index.when_scanned())

    def test_when_idle(self) -> None:
        """when_idle fires once the scan and every hashing step are done."""
        self.put("a", b"alpha")
        runner = StepPool()
        index = self.make(runner)
        index.start()
        idle = index.when_idle()
        runner.run_next()  # the database is loaded
        runner.run_next()  # the scan: one file queued
        self.assertNoResult(idle)
        runner.run_all()  # hashed
        self.successResultOf(idle)
        self.successResultOf(index.when_idle())

    def test_small_files_share_a_pool_call(self) -> None:
        """
        Small files are hashed several to a pool call (one step's bytes at
        most), not one call each; every one is indexed all the same.
        """
        for number in range(10):
            self.put(f"f{number}", pattern(1000, seed=number))
        runner = StepPool()
        index = self.make(runner, step_bytes=4 * MIB)
        index.start()
        runner.run_next()  # the database is loaded
        runner.run_next()  # the scan: ten files queued
        runner.run_next()  # one pool call hashes them all
        self.assertEqual(runner.pending, [])
        self.assertEqual(len(index), 10)
        for number in range(10):
            self.assertRoot(index.lookup(f"f{number}"), pattern(1000, seed=number))
        self.successResultOf(index.when_idle())

    def test_batch_beside_a_big_file(self) -> None:
        """
        While a big file is hashed in the background, small files are
        hashed beside it, on the pool's other thread: a new peer lists its
        small files before its big one is done.
        """
        self.put("a-big", pattern(3 * MIB))
        for number in range(3):
            self.put(f"b{number}", pattern(1000, seed=number))
        runner = StepPool()
        index = self.make(runner, step_bytes=MIB)
        index.start()
        runner.run_next()  # the database is loaded
        runner.run_next()  # the scan: the big file's step starts
        self.assertEqual(len(runner.pending), 2)  # and a batch beside it
        runner.run_next()  # the big file's first step
        runner.run_next()  # the batch
        self.assertEqual(sorted(index.names()), ["b0", "b1", "b2"])
        runner.run_all()
        self.assertRoot(index.lookup("a-big"), pattern(3 * MIB))

    def test_two_batches_at_once(self) -> None:
        """
        Two batches of small files may run at once, on the pool's two
        threads; each stores its rows in one transaction at its end, and
        every file gets its own seq.
        """
        for number in range(20):
            self.put(f"f{number:02}", pattern(100 * 1024, seed=number))
        runner = StepPool()
        index = self.make(runner, step_bytes=MIB)  # a batch: 10 such files
        index.start()
        runner.run_next()  # the database is loaded
        runner.run_next()  # the scan: twenty files queued
        self.assertEqual(len(runner.pending), 2)  # two batches at once
        runner.run_all()
        self.assertEqual(len(index), 20)
        seqs = [index.lookup(f"f{number:02}").seq for number in range(20)]
        self.assertEqual(len(set(seqs)), 20)
        self.assertNotIn(0, seqs)
        for number in range(20):
            self.assertRoot(
                index.lookup(f"f{number:02}"), pattern(100 * 1024, seed=number)
            )
