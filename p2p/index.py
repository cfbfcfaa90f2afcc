"""A persistent index of a peer's share folder: names, content roots, seqs.

Why: hashing a file on the request path made the first GET of a big file
wait for a whole-file hash, and LIST walked the folder on the reactor.  So
the peer indexes its share ahead of time and keeps the result in SQLite: a
restart re-hashes only files whose identity (device, inode, size, mtime_ns,
ctime_ns) changed.  The change time is there because a program can put a
file's modification time back after writing it (``touch -r``, ``rsync``,
``cp -p``): with size and mtime alone such a file kept its old root, even
across restarts, and no client could fetch it from that peer.  Nobody can
set the change time.

Threads.  All file I/O and every SQLite call go through ``run_in_pool`` (the
daemon's own bounded thread pool).  The reactor thread only touches the
in-memory mirror (name -> entry, root -> names, a sorted list of seqs), so a
lookup is O(1) and a page O(log n + limit).  A reactor-side scheduler keeps
at most one hashing *step* (``step_bytes`` of one file) in the pool at a
time, and picks each next step with ``ensure`` jobs first.  A 20 GiB file
being hashed in the background therefore delays a client's small file by
one step at most.  Small files go several to a step (a *batch*, stored in
one transaction), and two batches may run at once, one per pool thread:
their hashing runs outside the GIL, and per-file costs (opening, stat,
commits) overlap with the other batch's hashing.

Never serve a stale hash.  An entry describes the bytes its file had when
it was hashed, named by ``identity``, and the index lags the disk by a
debounce delay or a rescan interval.  So the peer must not trust ``lookup``
alone.  It opens the file, fstat's the descriptor it will read from and asks
``current(name, identity)``.  On ``None`` it calls ``ensure(name)`` and waits
for the fresh entry.  A file modified while it is being served is caught by
the client's piece check.

Change detection: inotify where available, plus a full rescan every
``rescan_interval`` seconds.  Without inotify the rescan is the only
mechanism; with it, the rescan is the safety net for lost events (queue
overflow, trees moved in).  The watches are added one directory at a time
from the scan's directory list.  Twisted's ``recursive=True`` is not used
because it walks and stats every file on the reactor thread.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import itertools
import math
import os
import re
import sqlite3
import stat
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2p import pieces
from p2p.pieces import PIECE_SIZE, Content, PieceList, PieceListMismatch
from p2p.share import TWISTD_FILES, OpenedFile, ShareFolder
from p2p.wire import MAX_NAME_LENGTH, Code, WireError

try:
    from twisted.internet import inotify
except Exception:  # not Linux, or no inotify in libc
    inotify = None  # type: ignore[assignment]

T = TypeVar("T")
Identity = tuple[int, int, int, int, int]
RunInPool = Callable[[Callable[[], Any]], Deferred]

MiB = 1024 * 1024
SCHEMA_VERSION = 2  # 2: identities hold the change time
# What a damaged database file is renamed to (beside it) before a new one.
CORRUPT_SUFFIX = ".corrupt"
# Events arrive in bursts (a copy: CREATE, then CLOSE_WRITE; an unpacked
# archive: hundreds); gather them this long, then re-stat once.
DEBOUNCE_SECONDS = 0.5
# A file that changes under the hasher this many times is left unindexed
# until its next change (a log being appended to would loop forever).
MAX_RESTARTS = 3
# After a file kept changing while hashed (a log being written), requests
# for it are refused this long without hashing it again: each request
# would otherwise cost up to MAX_RESTARTS + 1 hashes of the whole file.
CHANGING_RETRY_SECONDS = 30.0
# How much of a name too long to share the warning shows: enough to find
# it, not a 900-byte log line.
LOGGED_NAME_CHARACTERS = 60
# inotify's Linux ABI values (as in twisted.internet.inotify, which does not
# import on other systems).
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
WATCH_MASK = (
    IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_DELETE
    | IN_CREATE
    | IN_ATTRIB
    | IN_DELETE_SELF
)
# Names a listing line cannot carry: C0 except tab, DEL and C1 (as p2p.wire).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_SCHEMA = """CREATE TABLE files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL, device INTEGER NOT NULL, inode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    piece_size INTEGER NOT NULL, root BLOB NOT NULL, digests BLOB NOT NULL)"""
_UPSERT = """INSERT INTO files
    (name, size, device, inode, mtime_ns, ctime_ns, piece_size, root, digests)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT(name) DO UPDATE SET size = excluded.size,
    device = excluded.device, inode = excluded.inode,
    mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns,
    piece_size = excluded.piece_size,
    root = excluded.root, digests = excluded.digests"""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One indexed file: what its bytes were when hashed, and where it lists."""

    name: str
    content: Content
    identity: Identity
    # Listing position: positive, increasing, never reused within one
    # database; a re-hashed file keeps its seq, so cursors stay valid.
    seq: int


@dataclass
class Progress:
    """How far the hashing of C{name} got; the job updates it after each step."""

    name: str
    done: int
    total: int


class FileChanging(OSError):
    """The file kept changing while it was being hashed."""


class _Halted(Exception):
    """The index was stopped while a scan walked the share."""


def _shareable(name: str, include_hidden: bool) -> bool:
    """
    Whether C{name} may be indexed: what L{ShareFolder.open} accepts (no
    backslash, no hidden component, not twistd's files) and a name a listing
    line can carry (UTF-8, no control characters, not too long).
    """
    return _allowed(name, include_hidden) and not _too_long(name)


def _allowed(name: str, include_hidden: bool) -> bool:
    """L{_shareable}, whatever C{name}'s length."""
    if "\\" in name or _CONTROL.search(name):
        return False
    parts = name.split("/")
    if not include_hidden and any(part.startswith(".") for part in parts):
        return False
    if len(parts) == 1 and TWISTD_FILES.fullmatch(name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from the file system
        return False
    return True


def _too_long(name: str) -> bool:
    """Whether C{name} is longer than a request or listing line may carry
    (counted in bytes as the file system has them)."""
    return len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_LENGTH


def _identity(info: os.stat_result) -> Identity:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _stat_name(
    share: ShareFolder, name: str, folder_fd: int | None = None
) -> Identity | None:
    """
    (Pool.) The identity of C{name} if it is a servable regular file.

    Looked up relative to its folder, C{folder_fd} (the walk's descriptor)
    or one opened without following symlinks (L{ShareFolder.open_folder}):
    a folder swapped for a symlink cannot pass a file outside the share off
    as one of its own.
    """
    folder, _, filename = name.rpartition("/")
    try:
        if folder_fd is not None:
            info = os.stat(filename, dir_fd=folder_fd, follow_symlinks=False)
        else:
            fd = share.open_folder(folder)
            try:
                info = os.stat(filename, dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
    except OSError:
        return None
    if stat.S_ISREG(info.st_mode):
        return _identity(info)
    if not stat.S_ISLNK(info.st_mode):
        return None  # FIFOs, sockets, devices
    # A symlink: ask the safe-open path where it leads (inside the share, to
    # a regular file) instead of re-implementing its checks.
    try:
        opened = share.open(name)
    except WireError:
        return None
    opened.close()
    return opened.identity


@dataclass
class _ScanResult:
    changed: dict[str, Identity]  # new or changed names, with their identity
    removed: list[str]
    directories: list[str]  # absolute paths, to watch
    files: int = 0
    bytes: int = 0
    # Names longer than the protocol carries (MAX_NAME_LENGTH): the files
    # skipped, the folders not entered (nothing below one could be named),
    # and the first such name met.
    too_long_files: int = 0
    too_long_folders: int = 0
    too_long_first: str = ""

    def skip_too_long(self, name: str, folder: bool) -> None:
        """Count C{name} as too long to share."""
        if folder:
            self.too_long_folders += 1
        else:
            self.too_long_files += 1
        if not self.too_long_first:
            self.too_long_first = name


def _scan(
    share: ShareFolder, snapshot: dict[str, Identity], halted: Callable[[], bool]
) -> _ScanResult:
    """
    (Pool.) Walk the share and compare it with C{snapshot} (ours to consume).
    Directory symlinks are not followed, not even one swapped in for a folder
    while the walk runs (L{ShareFolder.walk}); hidden folders are skipped,
    and so are names too long for the protocol (counted, for a warning): a
    folder is not entered when no name below it could be short enough.
    """
    if not os.path.isdir(share.root):
        # A share folder that went away must not look like one whose files
        # all went: that would empty the database.
        raise OSError(errno.ENOENT, "the share folder is missing", share.root)
    result = _ScanResult({}, [], [])
    for folder, dirnames, filenames, folder_fd in share.walk():
        if halted():
            raise _Halted()
        if not share.include_hidden:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        prefix = folder + "/" if folder else ""
        entered = []
        for dirname in dirnames:
            # The shortest name below: "<folder>/<dirname>/x".
            if _too_long(prefix + dirname + "/x"):
                result.skip_too_long(prefix + dirname, folder=True)
            else:
                entered.append(dirname)
        dirnames[:] = sorted(entered)
        result.directories.append(
            os.path.join(share.root, *folder.split("/")) if folder else share.root
        )
        for filename in sorted(filenames):
            name = prefix + filename
            if not _allowed(name, share.include_hidden):
                continue
            if _too_long(name):
                result.skip_too_long(name, folder=False)
                continue
            identity = _stat_name(share, name, folder_fd)
            if identity is None:
                continue
            result.files += 1
            result.bytes += identity[2]
            if snapshot.pop(name, None) != identity:
                result.changed[name] = identity
    result.removed = list(snapshot)
    return result


def _to_sql(value: int) -> int:
    """Device and inode numbers are unsigned 64-bit; SQLite's are signed."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _from_sql(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


class _Database:
    """
    The SQLite file behind the index.  Every method runs in the pool: one
    connection shared by the pool's threads, serialised by a lock (SQLite
    serialises writers anyway).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        # Per thread: the rows a batch holds back (see batch()).
        self._held = threading.local()
        self._connection: sqlite3.Connection | None = None
        self._meta = {"schema": str(SCHEMA_VERSION), "piece_size": str(PIECE_SIZE)}
        # Where open() moved a damaged database, if it did.
        self.set_aside: str | None = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        connection = self._connection
        if connection is None:
            raise sqlite3.ProgrammingError("the index database is closed")
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def open(self) -> list[IndexEntry]:
        """
        Open (or create) the database and load every entry, by seq.  A
        file that is not a sound SQLite database (damaged, or something
        else written there) is set aside as C{PATH.corrupt} and the index
        starts empty: it holds nothing the share cannot give again, by
        hashing.  C{set_aside} then says where it went.
        """
        with self._lock:
            try:
                rows = self._load()
            except sqlite3.OperationalError:
                raise  # locked, unreadable, no room: not the file's content
            except sqlite3.DatabaseError:
                self.set_aside = self._path + CORRUPT_SUFFIX
                os.replace(self._path, self.set_aside)
                for suffix in ("-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._path + suffix)
                rows = self._load()
        return [
            IndexEntry(
                name,
                Content(root, size, PIECE_SIZE),
                (_from_sql(device), _from_sql(inode), size, mtime_ns, ctime_ns),
                seq,
            )
            for seq, name, size, device, inode, mtime_ns, ctime_ns, root in rows
        ]

    def _load(self) -> list[tuple]:
        self._connection = sqlite3.connect(
            self._path, check_same_thread=False, isolation_level=None
        )
        try:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            return self._connection.execute(
                "SELECT seq, name, size, device, inode, mtime_ns, ctime_ns, root"
                " FROM files ORDER BY seq"
            ).fetchall()
        except BaseException:
            self._connection.close()
            self._connection = None
            raise

    def _migrate(self) -> None:
        with self._transaction() as connection:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS meta"
                " (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            if dict(connection.execute("SELECT key, value FROM meta")) == self._meta:
                return
            # Another schema or piece size: rebuild, but keep the seq counter
            # (DROP TABLE forgets it) so that no seq is ever reused.
            last = 0
            if connection.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
            ).fetchone():
                row = connection.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'files'"
                ).fetchone()
                last = row[0] if row else 0
            connection.execute("DROP TABLE IF EXISTS files")
            connection.execute(_SCHEMA)
            if last:
                connection.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('files', ?)",
                    (last,),
                )
            connection.execute("DELETE FROM meta")
            connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)", self._meta.items()
            )

    @contextlib.contextmanager
    def batch(self) -> Iterator[dict[str, int]]:
        """
        Hold back every L{store} this thread makes meanwhile and write them
        at the end in one transaction (a commit per small file cost about as
        much as hashing it); the context's value then maps each name stored
        to its seq (L{store} returns 0 meanwhile).  The lock is taken only
        for that transaction, so another thread's batch hashes meanwhile.
        """
        pending: list[tuple[str, Content, Identity, bytes]] = []
        seqs: dict[str, int] = {}
        self._held.rows = pending
        try:
            yield seqs
        finally:
            self._held.rows = None
        if pending:
            with self._lock, self._transaction() as connection:
                for row in pending:
                    seqs[row[0]] = self._upsert(connection, *row)

    def store(
        self, name: str, content: Content, identity: Identity, digests: bytes
    ) -> int:
        """Insert or update C{name}'s row (an update keeps its seq); its seq
        (0 inside a L{batch}, which says it at the end)."""
        rows = getattr(self._held, "rows", None)
        if rows is not None:
            rows.append((name, content, identity, digests))
            return 0
        with self._lock, self._transaction() as connection:
            return self._upsert(connection, name, content, identity, digests)

    def _upsert(
        self,
        connection: sqlite3.Connection,
        name: str,
        content: Content,
        identity: Identity,
        digests: bytes,
    ) -> int:
        device, inode, size, mtime_ns, ctime_ns = identity
        connection.execute(
            _UPSERT,
            (
                name,
                size,
                _to_sql(device),
                _to_sql(inode),
                mtime_ns,
                ctime_ns,
                content.piece_size,
                content.root,
                digests,
            ),
        )
        (seq,) = connection.execute(
            "SELECT seq FROM files WHERE name = ?", (name,)
        ).fetchone()
        return int(seq)

    def delete(self, names: list[str]) -> None:
        with self._lock, self._transaction() as connection:
            connection.executemany(
                "DELETE FROM files WHERE name = ?", [(name,) for name in names]
            )

    def digests(self, entry: IndexEntry) -> bytes:
        """
        C{entry}'s piece digests, checked against its root.

        :raise KeyError: when the row is gone or holds other content.
        :raise PieceListMismatch: when the row is corrupt.
        """
        with self._lock:
            if self._connection is None:
                raise KeyError(entry.name)
            row = self._connection.execute(
                "SELECT digests FROM files WHERE name = ? AND root = ?",
                (entry.name, entry.content.root),
            ).fetchone()
        if row is None:
            raise KeyError(entry.name)
        return PieceList.check(entry.content, bytes(row[0])).digests

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


class _DigestCache:
    """
    Piece digests by root: the most recently used, bounded in bytes, and
    besides them every list a connection still holds (weakly), so that
    one content's list is never in memory twice, however many connections
    stream it and however large it is.  Lists are handed out as read-only
    memoryviews, which (unlike bytes) can be referred to weakly: a list
    stays known here exactly as long as somebody holds its view.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._bytes = 0
        self._items: OrderedDict[bytes, memoryview] = OrderedDict()
        self._held: weakref.WeakValueDictionary[bytes, memoryview] = (
            weakref.WeakValueDictionary()
        )

    def get(self, root: bytes) -> memoryview | None:
        digests = self._items.get(root)
        if digests is not None:
            self._items.move_to_end(root)
            return digests
        return self._held.get(root)

    def put(self, root: bytes, digests: bytes | memoryview) -> memoryview:
        """The one view of C{root}'s list: the one known, else C{digests}."""
        known = self.get(root)
        if known is not None:
            return known
        view = memoryview(digests).toreadonly()
        self._held[root] = view
        if len(view) <= self._limit:
            self._items[root] = view
            self._bytes += len(view)
            while self._bytes > self._limit:
                self._bytes -= len(self._items.popitem(last=False)[1])
        return view


def _left_to_hash(job: _HashJob) -> int:
    """Bytes of C{job}'s file still to hash, as far as it is known."""
    return max(0, (job.size or job.progress.total) - job.hashed)


class _HashJob:
    """
    One file on its way into the index, C{per_step} pieces per pool call.

    The reactor owns C{priority}, C{waiters} and C{progress}.  The rest
    belongs to L{step}: the scheduler runs one step at a time, in order, and
    reads the results between steps.
    """

    def __init__(
        self,
        name: str,
        known: IndexEntry | None,
        expected: Identity | None,
        share: ShareFolder,
        database: _Database,
        per_step: int,
    ) -> None:
        self.name = name
        self.known = known  # the mirror's entry when the job was made
        self.expected = expected  # the identity the scan saw, if any
        self.priority = False
        self.waiters: list[Deferred[IndexEntry]] = []
        self.progress = Progress(name, 0, expected[2] if expected else 0)
        self.identity: Identity | None = None
        self.size = 0
        self.restarts = 0
        self.digests = b""
        self._share = share
        self._database = database
        self._per_step = per_step
        self._opened: OpenedFile | None = None
        self._next = 0
        self._hashed = bytearray()

    @property
    def hashed(self) -> int:
        return min(self.size, self._next * PIECE_SIZE)

    def close(self) -> None:
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def step(self) -> IndexEntry | None:
        """(Pool.) Hash the next pieces; the new entry after the last step."""
        try:
            return self._step()
        except BaseException:
            self.close()
            raise

    def _step(self) -> IndexEntry | None:
        if self._opened is None:
            self._opened = self._share.open(self.name)  # WireError 403/404
            self.identity, self.size = self._opened.identity, self._opened.size
            if self.known is not None and self.known.identity == self.identity:
                self.close()
                return self.known  # up to date: nothing to hash
        fd = self._opened.fd
        count = pieces.piece_count(self.size)
        stop = min(count, self._next + self._per_step)
        if _identity(os.fstat(fd)) != self.identity:
            return self._restart()
        try:
            # Looked up at each call so that tests can count the hashing.
            for digest in pieces.hash_pieces(fd, self.size, self._next, stop):
                self._hashed += digest
        except OSError:
            # A file that shrank fails the read with EIO: a change, not a fault.
            if _identity(os.fstat(fd)) == self.identity:
                raise
            return self._restart()
        self._next = stop
        if stop < count:
            return None
        # Changed in place (fstat), or replaced or removed (stat of the path).
        if _identity(os.fstat(fd)) != self.identity or self._path() != self.identity:
            return self._restart()
        self.close()
        self.digests = bytes(self._hashed)
        root = pieces.root_of(self.size, PIECE_SIZE, self.digests)
        content = Content(root, self.size, PIECE_SIZE)
        assert self.identity is not None
        seq = self._database.store(self.name, content, self.identity, self.digests)
        return IndexEntry(self.name, content, self.identity, seq)

    def _path(self) -> Identity:
        # Looked up the safe way (never through a folder swapped for a
        # symlink): a file that is gone, or no longer a servable file, is
        # "not found".
        identity = _stat_name(self._share, self.name)
        if identity is None:
            raise WireError(Code.NOT_FOUND, "no such file")
        return identity

    def _restart(self) -> None:
        self.close()
        self.restarts += 1
        if self.restarts > MAX_RESTARTS:
            raise FileChanging(errno.EAGAIN, "the file kept changing while hashed")
        self._next = 0
        self._hashed = bytearray()


# Most small files hashed in one pool call.
MAX_BATCH_FILES = 64


def _run_batch(
    database: _Database, batch: list[_HashJob]
) -> list[tuple[_HashJob, object]]:
    """(Pool.) One step of each job, their rows stored in one transaction;
    a job's exception is its outcome."""
    results: list[tuple[_HashJob, object]] = []
    try:
        with database.batch() as seqs:
            for job in batch:
                try:
                    results.append((job, job.step()))
                except BaseException:
                    results.append((job, Failure()))
    except BaseException:
        # The rows could not be written (a full disk): none was indexed.
        failure = Failure()
        for job in batch:
            job.close()
        return [(job, failure) for job in batch]
    # The rows were written at the end: give each new entry its seq.
    return [
        (job, dataclasses.replace(outcome, seq=seqs[outcome.name]))
        if isinstance(outcome, IndexEntry) and outcome.seq == 0
        else (job, outcome)
        for job, outcome in results
    ]


class ShareIndex:
    """
    The index of one share folder: an in-memory mirror on the reactor thread,
    a SQLite file and a hashing scheduler in the pool (see the module
    docstring for the threading and freshness contracts).

    :param share: the folder; files are opened through L{ShareFolder.open}.
    :param database: path of the SQLite file (``":memory:"`` in tests).
    :param reactor: for timers (a Clock in tests); inotify is used only if it
        also provides C{IReactorFDSet}.
    :param run_in_pool: runs a callable off the reactor thread and returns a
        Deferred of its result, e.g. C{deferToThreadPool} on a dedicated pool.
    :param rescan_interval: seconds between full rescans.
    :param watch: use inotify when available.
    :param step_bytes: bytes of one file hashed per pool call.
    :param max_cached_piece_bytes: bound of the piece-digest cache.
    """

    log = Logger()

    def __init__(
        self,
        share: ShareFolder,
        database: str,
        reactor: IReactorTime,
        run_in_pool: RunInPool,
        rescan_interval: float = 60.0,
        watch: bool = True,
        step_bytes: int = 64 * MiB,
        max_cached_piece_bytes: int = 16 * MiB,
    ) -> None:
        self._share = share
        self.database_path = database
        self._database = _Database(database)
        self._reactor = reactor
        self._run = run_in_pool
        self._rescan_interval = rescan_interval
        self._watch = (
            watch and inotify is not None and IReactorFDSet.providedBy(reactor)
        )
        self._per_step = max(1, step_bytes // PIECE_SIZE)
        self._step_bytes = self._per_step * PIECE_SIZE
        # Files that take one step: a batch of them shares a pool call.
        self._small_bytes = self._step_bytes // 4
        self._cache = _DigestCache(max_cached_piece_bytes)
        # Roots whose piece list is being read, and who waits for it.
        self._loading: dict[bytes, list[Deferred[memoryview]]] = {}
        # The mirror.  _identities duplicates the entries' identities so that
        # a scan's snapshot is one C-level dict copy.
        self._entries: dict[str, IndexEntry] = {}
        self._identities: dict[str, Identity] = {}
        # Names by root, each an insertion-ordered set (a dict): removing
        # one of many names of one content is O(1), not a search.
        self._roots: dict[bytes, dict[str, None]] = {}
        self._seqs: list[int] = []
        self._by_seq: dict[int, IndexEntry] = {}
        # The scheduler.  _queue may hold stale names; _queued is the truth.
        self._jobs: dict[str, _HashJob] = {}
        self._priority: deque[_HashJob] = deque()
        self._background: _HashJob | None = None
        self._queue: deque[str] = deque()
        self._queued: dict[str, Identity] = {}
        self._failed: dict[str, Identity] = {}  # logged once per identity
        # Names whose hashing failed as FileChanging, and when (ensure()).
        self._changing: dict[str, float] = {}
        self._kicking = False
        # Pool calls hashing now (one; two when both are batches of small
        # files), and how many of them are batches.
        self._steps = self._batching = 0
        # Scans and change detection.
        self._scanning = self._rescan_again = False
        self._scans = self._scan_failures = 0
        # What the last warning about names too long said (files, folders):
        # a rescan that finds the same says nothing.
        self._too_long_warned = (0, 0)
        self._scan_waiters: list[Deferred[None]] = []
        self._idle_waiters: list[Deferred[None]] = []
        self._scan_call: IDelayedCall | None = None
        self._refresh_call: IDelayedCall | None = None
        self._refreshing = 0
        self._dirty: set[str] = set()
        self._notifier: Any = None
        self._watched: set[str] = set()
        self._subscribers: list[Callable[[], None]] = []
        self._initial: dict[str, float] | None = None
        self._started_at = 0.0
        # Lifecycle: pool calls in flight, for stop().
        self._busy = 0
        self._drained: list[Deferred[None]] = []
        self._started = self._ready = self._halted = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Load the database, then scan; fires once the rows are loaded."""
        if self._started:
            raise RuntimeError("the share index was already started")
        self._started = True
        self._started_at = self._reactor.seconds()
        d = self._in_pool(self._database.open)
        d.addCallback(self._loaded)
        return d

    def _loaded(self, entries: list[IndexEntry]) -> None:
        if self._halted:
            return
        if self._database.set_aside is not None:
            self.log.warn(
                "the index database was damaged: moved to {path}; "
                "indexing the share again",
                path=self._database.set_aside,
            )
        for entry in entries:
            self._put(entry)
        self._ready = True
        if entries:
            self._notify()
        self._start_scan()

    def stop(self) -> Deferred[None]:
        """
        Stop timers and watching, let the pool calls in flight end, then
        close the database.  Pending L{ensure} callers get CancelledError.
        """
        self._halted, self._ready = True, False
        for call in (self._scan_call, self._refresh_call):
            if call is not None and call.active():
                call.cancel()
        self._scan_call = self._refresh_call = None
        self._drop_notifier(close=True)
        jobs = list(self._jobs.values())
        self._priority.clear()
        self._queue.clear()
        self._queued.clear()
        self._dirty.clear()
        self._background = None
        for job in jobs:
            waiters, job.waiters = job.waiters, []
            for waiter in waiters:
                waiter.errback(Failure(CancelledError("the share index stopped")))

        def close() -> None:
            for job in jobs:
                job.close()
            self._database.close()

        d: Deferred[None] = Deferred()
        if self._busy:
            self._drained.append(d)
        else:
            d.callback(None)
        d.addCallback(lambda _: self._run(close))
        return d

    def _in_pool(self, work: Callable[[], T]) -> Deferred[T]:
        self._busy += 1
        d = self._run(work)
        d.addBoth(self._pool_done)
        return d

    def _pool_done(self, result: T) -> T:
        self._busy -= 1
        if not self._busy:
            drained, self._drained = self._drained, []
            for waiter in drained:
                waiter.callback(None)
        return result

    # -- reading the mirror (reactor thread) ---------------------------------

    def lookup(self, name: str) -> IndexEntry | None:
        return self._entries.get(name)

    def by_root(self, root: bytes) -> IndexEntry | None:
        """Any entry with content C{root}."""
        names = self._roots.get(root)
        return self._entries[next(iter(names))] if names else None

    def holders(self, root: bytes, limit: int) -> list[IndexEntry]:
        """
        At most C{limit} entries with content C{root}, in their order (see
        L{set_back}): a content held under 80,000 names costs a request
        what one held under C{limit} does.
        """
        names = self._roots.get(root)
        if not names:
            return []
        return [self._entries[name] for name in itertools.islice(names, limit)]

    def set_back(self, entry: IndexEntry) -> None:
        """Put C{entry} last among the holders of its content (it turned
        out stale): the next request tries the others first."""
        names = self._roots.get(entry.content.root)
        if names is not None and entry.name in names:
            del names[entry.name]
            names[entry.name] = None

    def current(self, name: str, identity: Identity) -> IndexEntry | None:
        """C{name}'s entry if it was hashed from the file with C{identity}."""
        entry = self._entries.get(name)
        return entry if entry is not None and entry.identity == identity else None

    def page(self, limit: int, after: int = 0) -> tuple[list[IndexEntry], bool]:
        """Up to C{limit} entries with seq > C{after}, by seq; and whether
        more follow."""
        start = bisect.bisect_right(self._seqs, after)
        seqs = self._seqs[start : start + max(0, limit)]
        more = start + len(seqs) < len(self._seqs)
        return [self._by_seq[seq] for seq in seqs], more

    def names(self) -> list[str]:
        """The names indexed so far."""
        return list(self._entries)

    def servable_names(self) -> list[str]:
        """
        The names indexed or on their way into the index: every file a
        client may ask for (one not indexed yet is indexed at once, see
        L{ensure}), as announced in the relay's name filter.
        """
        names = dict.fromkeys(self._entries)
        names.update(dict.fromkeys(self._queued))
        names.update(dict.fromkeys(self._jobs))
        return list(names)

    def when_scanned(self) -> Deferred[None]:
        """
        Fires once the first scan of the share is done (or failed), when
        L{servable_names} knows every file.  A new Deferred per call, so a
        caller may cancel its own.
        """
        d: Deferred[None] = Deferred()
        if self._scans or self._scan_failures:
            d.callback(None)
        else:
            self._scan_waiters.append(d)
        return d

    def _scan_done(self) -> None:
        waiters, self._scan_waiters = self._scan_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def indexing(self) -> bool:
        """Whether a scan, a refresh or a hash job is pending or running."""
        return bool(
            self._scanning
            or self._refreshing
            or self._dirty
            or self._jobs
            or self._queued
        )

    @property
    def pending(self) -> int:
        """Files found on disk, new or changed, that wait to be hashed or
        are being hashed: ``LIST`` does not list them yet, or lists what
        they were."""
        # Disjoint: a name leaves _queued when its job is made, and
        # _queue_hash never queues a name that has a job.  O(1): STATUS
        # asks for it, and 200,000 files may wait.
        return len(self._queued) + len(self._jobs)

    @property
    def scanning(self) -> bool:
        """Whether the first walk of the share is still running: files not
        found yet may come.  (A later rescan, every C{rescan_interval},
        finds changes, which then count as L{pending}: a peer that is
        merely rescanning is not said to be incomplete.)"""
        return not (self._scans or self._scan_failures)

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call C{callback} (reactor thread) after entries change."""
        self._subscribers.append(callback)

    def piece_digests(self, entry: IndexEntry) -> Deferred[memoryview]:
        """
        C{entry}'s concatenated piece digests (KeyError if it is gone), as
        a read-only view shared by every caller: one read of the database
        per content, however many connections ask for it at once.
        """
        root = entry.content.root
        cached = self._cache.get(root)
        if cached is not None:
            return succeed(cached)
        if not self._ready:
            return fail(KeyError(entry.name))
        waiter: Deferred[memoryview] = Deferred()
        waiters = self._loading.get(root)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._loading[root] = [waiter]
        d = self._in_pool(lambda: self._database.digests(entry))
        d.addCallbacks(
            self._got_digests,
            self._bad_digests,
            callbackArgs=(entry,),
            errbackArgs=(entry,),
        )
        d.addBoth(self._digests_loaded, root)
        return waiter

    def _digests_loaded(self, result: object, root: bytes) -> None:
        for waiter in self._loading.pop(root, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _got_digests(self, digests: bytes, entry: IndexEntry) -> memoryview:
        return self._cache.put(entry.content.root, digests)

    def _bad_digests(self, failure: Failure, entry: IndexEntry) -> None:
        failure.trap(PieceListMismatch)
        self.log.error("corrupt index row for {name}; re-hashing", name=entry.name)
        if self._remove([entry.name]):
            self._start_scan()
        raise KeyError(entry.name)

    # -- the mirror (reactor thread) -----------------------------------------

    def _put(self, entry: IndexEntry) -> None:
        old = self._entries.get(entry.name)
        if old is not None:
            self._unlink(old, keep_seq=old.seq == entry.seq)
        self._entries[entry.name] = entry
        self._identities[entry.name] = entry.identity
        self._roots.setdefault(entry.content.root, {})[entry.name] = None
        if entry.seq not in self._by_seq:
            if not self._seqs or entry.seq > self._seqs[-1]:
                self._seqs.append(entry.seq)
            else:
                bisect.insort(self._seqs, entry.seq)
        self._by_seq[entry.seq] = entry

    def _unlink(self, entry: IndexEntry, keep_seq: bool = False) -> None:
        names = self._roots[entry.content.root]
        del names[entry.name]
        if not names:
            del self._roots[entry.content.root]
        if not keep_seq:
            del self._by_seq[entry.seq]
            del self._seqs[bisect.bisect_left(self._seqs, entry.seq)]

    def _remove(self, names: list[str]) -> bool:
        """Forget C{names} (mirror, queue, DB); whether any was indexed."""
        gone = []
        for name in names:
            self._queued.pop(name, None)
            self._failed.pop(name, None)
            entry = self._entries.pop(name, None)
            if entry is not None:
                del self._identities[name]
                self._unlink(entry)
                gone.append(name)
        if gone:
            d = self._in_pool(lambda: self._database.delete(gone))
            d.addErrback(self._unexpected, "deleting index rows")
            self._notify()
        return bool(gone)

    def _notify(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                self.log.failure(
                    "index subscriber {callback!r} failed", callback=callback
                )

    def _unexpected(self, failure: Failure, what: str) -> None:
        self.log.failure("share index: {what} failed", failure, what=what)

    # -- hashing -------------------------------------------------------------

    def ensure(self, name: str, size: int = 0) -> tuple[Deferred[IndexEntry], Progress]:
        """
        Index C{name} ahead of the background queue.  Fires with the fresh
        entry (at once if the entry matches a fresh fstat), or fails with the
        WireError (403/404) of L{ShareFolder.open}, an OSError, or
        WireError 503 before start() or after stop().  Callers for the
        same name share one job and its live L{Progress}.  C{size}, the
        file's size if the caller knows it, orders the requested files
        until the job knows it itself.
        """
        if not self._ready:
            error = WireError(Code.UNAVAILABLE, "the share index is not ready")
            return fail(error), Progress(name, 0, 0)
        job = self._jobs.get(name)
        if job is None:
            refusal = self.refusal(name)
            if refusal is not None:
                if refusal.code == Code.NOT_FOUND and name in self._entries:
                    self._remove([name])  # gone, or no longer servable
                return fail(refusal), Progress(name, 0, 0)
            self._queued.pop(name, None)
            job = self._new_job(name, None)
            job.progress.total = size
        if not job.priority:
            job.priority = True
            if self._background is job:
                self._background = None
            self._priority.append(job)
        d: Deferred[IndexEntry] = Deferred()
        job.waiters.append(d)
        self._kick()
        return d, job.progress

    def refusal(self, name: str) -> WireError | None:
        """
        Why a request for C{name} must not start hashing it, if it must
        not: a name the index would never hold (missing, or through a
        symlinked folder, which the index never enters), found by a few
        syscalls before any byte is hashed rather than by the job after it
        hashed them all, as a client could ask for any number of such
        aliases of one big file; or a file that kept changing while hashed
        a moment ago.
        """
        changed_at = self._changing.get(name)
        if changed_at is not None:
            wait = changed_at + CHANGING_RETRY_SECONDS - self._reactor.seconds()
            if wait > 0:
                return WireError(
                    Code.UNAVAILABLE,
                    "the file keeps changing while it is indexed; "
                    f"retry-after={math.ceil(wait)}",
                )
            del self._changing[name]
        if _stat_name(self._share, name) is None:
            return WireError(Code.NOT_FOUND, "no such file")
        return None

    def _queue_hash(self, name: str, identity: Identity) -> None:
        if identity in (self._identities.get(name), self._failed.get(name)):
            return
        if name in self._jobs:
            return  # its own checks see a change made while it runs
        if name not in self._queued:
            self._queue.append(name)
        self._queued[name] = identity

    def _new_job(self, name: str, expected: Identity | None) -> _HashJob:
        job = _HashJob(
            name,
            self._entries.get(name),
            expected,
            self._share,
            self._database,
            self._per_step,
        )
        self._jobs[name] = job
        return job

    def _next_job(self) -> _HashJob | None:
        if self._priority:
            # The requested file with the least left to hash goes first (the
            # oldest among equals): a request for a small file waits for
            # one step at most, never for a big file requested before it
            # (whose client may have left).  Ties and unknown sizes keep
            # the order of the requests.
            return min(self._priority, key=_left_to_hash)
        while self._background is None and self._queue:
            name = self._queue.popleft()
            expected = self._queued.pop(name, None)
            if expected is not None and name not in self._jobs:
                self._background = self._new_job(name, expected)
        return self._background

    def _kick(self) -> None:
        """Start the next step unless one runs; a loop, not recursion, so an
        inline runner hashes a whole share without a deep stack."""
        if self._kicking:
            return
        self._kicking = True
        try:
            while not self._halted:
                if not self._steps:
                    job = self._next_job()
                elif self._steps == 1 and not self._priority:
                    # A batch of small files or a step of a big background
                    # file runs: a batch of small files may run beside it on
                    # the pool's other thread (each hashes off the GIL), so
                    # a share's small files are not all listed only once its
                    # big file is hashed.
                    job = self._next_small()
                else:
                    job = None
                if job is None:
                    break
                self._steps += 1
                if job.priority or not self._small(job):
                    d = self._in_pool(job.step)
                    d.addCallbacks(
                        self._stepped,
                        self._step_failed,
                        callbackArgs=(job,),
                        errbackArgs=(job,),
                    )
                else:
                    batch = self._small_batch(job)
                    self._batching += 1
                    d = self._in_pool(
                        lambda batch=batch: _run_batch(self._database, batch)
                    )
                    d.addCallback(self._batch_stepped)
                    d.addBoth(self._batch_ended)
                d.addBoth(self._step_ended)
        finally:
            self._kicking = False

    def _small(self, job: _HashJob) -> bool:
        """Whether C{job} is a file small enough to share a pool call."""
        return job.expected is not None and job.expected[2] <= self._small_bytes

    def _small_batch(self, first: _HashJob) -> list[_HashJob]:
        """
        C{first} and the next small background files, up to one step's
        bytes: hashed in one pool call, so that a share of small files does
        not pay two thread hand-offs per file (measured: about as long as
        hashing a 1 MiB file).  A priority request waits for one step at
        most, as before.
        """
        batch, total = [first], first.expected[2] if first.expected else 0
        while len(batch) < MAX_BATCH_FILES:
            job = self._next_small(self._step_bytes - total)
            if job is None:
                break
            assert job.expected is not None
            batch.append(job)
            total += job.expected[2]
        return batch

    def _next_small(self, room: int | None = None) -> _HashJob | None:
        """A new job for the next queued file if it is small (and at most
        C{room} bytes): never the background job, which is in a batch."""
        while self._queue:
            name = self._queue[0]
            expected = self._queued.get(name)
            if expected is None or name in self._jobs:
                self._queue.popleft()  # stale
                self._queued.pop(name, None)
                continue
            if expected[2] > self._small_bytes or (
                room is not None and expected[2] > room
            ):
                return None
            self._queue.popleft()
            self._queued.pop(name)
            return self._new_job(name, expected)
        return None

    def _batch_ended(self, result: T) -> T:
        self._batching -= 1
        return result

    def _batch_stepped(self, results: list[tuple[_HashJob, object]]) -> None:
        for job, outcome in results:
            if isinstance(outcome, Failure):
                self._step_failed(outcome, job)
            elif outcome is None and job is not self._background:
                # It grew past one step meanwhile: hash it on its own.
                self._finish(job)
                job.close()
                if job.expected is not None:
                    self._queue_hash(job.name, job.expected)
            else:
                self._stepped(outcome, job)  # type: ignore[arg-type]

    def _step_ended(self, result: object) -> None:
        if isinstance(result, Failure):
            self._unexpected(result, "a hashing step")
        self._steps -= 1
        self._kick()
        self._work_ended()

    def _finish(self, job: _HashJob) -> list[Deferred[IndexEntry]]:
        self._jobs.pop(job.name, None)
        if job.priority and job in self._priority:
            self._priority.remove(job)
        if self._background is job:
            self._background = None
        waiters, job.waiters = job.waiters, []
        return waiters

    def _stepped(self, entry: IndexEntry | None, job: _HashJob) -> None:
        done = job.hashed if entry is None else job.size
        job.progress.total, job.progress.done = job.size, done
        if entry is None:
            return
        waiters = self._finish(job)
        self._failed.pop(job.name, None)
        self._changing.pop(job.name, None)
        if entry is not job.known:
            self._cache.put(entry.content.root, job.digests)
            self._put(entry)
            if self._initial is not None:
                self._initial["hashed"] += 1
            self._notify()
        for waiter in waiters:
            waiter.callback(entry)

    def _step_failed(self, failure: Failure, job: _HashJob) -> None:
        waiters = self._finish(job)
        error = failure.value
        if job.name in self._entries:
            self._remove([job.name])  # it no longer describes a readable file
        if not isinstance(error, (WireError, OSError)):
            self._unexpected(failure, "hashing a file")
        elif not (isinstance(error, WireError) and error.code == Code.NOT_FOUND):
            # Unreadable: log it once, and leave it out of the background
            # queue until its identity changes (ensure() still retries).
            if isinstance(error, FileChanging):
                self._changing[job.name] = self._reactor.seconds()
            identity = job.identity or job.expected
            if identity is not None and self._failed.get(job.name) != identity:
                if not waiters:
                    self.log.error(
                        "cannot index {name}: {error}", name=job.name, error=error
                    )
                self._failed[job.name] = identity
        for waiter in waiters:
            waiter.errback(failure)

    def when_idle(self) -> Deferred[None]:
        """
        Fires once nothing is being scanned or hashed (at once if so now):
        every file found so far is indexed.  A new Deferred per call.
        """
        d: Deferred[None] = Deferred()
        if self._ready and not self.indexing:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    def _work_ended(self) -> None:
        """A scan, a refresh or a hashing step ended: wake L{when_idle}'s
        waiters if nothing is left to do, and log the first scan's end."""
        if self._idle_waiters and self._ready and not self.indexing:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)
        self._log_initial()

    def _log_initial(self) -> None:
        if self._initial is None or self._scanning or self._jobs or self._queued:
            return
        stats, self._initial = self._initial, None
        self.log.info(
            "indexed the share: {files} files, {bytes} bytes in {seconds:.1f} s"
            " ({hashed} hashed, {reused} reused from the database)",
            files=int(stats["files"]),
            bytes=int(stats["bytes"]),
            hashed=int(stats["hashed"]),
            reused=int(stats["reused"]),
            seconds=self._reactor.seconds() - self._started_at,
        )

    # -- scanning ----------------------------------------------------------

    def _schedule_scan(self, delay: float) -> None:
        if self._halted:
            return
        when = self._reactor.seconds() + delay
        if self._scan_call is not None and self._scan_call.active():
            if self._scan_call.getTime() <= when:
                return
            self._scan_call.cancel()
        self._scan_call = self._reactor.callLater(delay, self._start_scan)

    def _start_scan(self) -> None:
        if self._scan_call is not None and self._scan_call.active():
            self._scan_call.cancel()
        self._scan_call = None
        if self._halted:
            return
        if self._scanning:
            self._rescan_again = True
            return
        self._scanning = True
        snapshot = dict(self._identities)
        snapshot.update(self._failed)
        d = self._in_pool(lambda: _scan(self._share, snapshot, lambda: self._halted))
        d.addCallbacks(self._scanned, self._scan_failed)
        d.addBoth(self._scan_ended)

    def _scanned(self, result: _ScanResult) -> None:
        if self._halted:
            return
        self._remove(result.removed)
        for name, identity in result.changed.items():
            self._queue_hash(name, identity)
        if not self._scans:
            self._initial = {
                "files": result.files,
                "bytes": result.bytes,
                "hashed": 0,
                "reused": result.files - len(result.changed),
            }
        self._scans += 1
        self._warn_too_long(result)
        if result.changed or result.removed:
            self._notify()
        self._scan_done()
        self._watch_directories(result.directories)
        self._kick()

    def _warn_too_long(self, result: _ScanResult) -> None:
        """Say which names a scan skipped for their length (once, until
        that changes): no client could ask for them."""
        counts = (result.too_long_files, result.too_long_folders)
        if counts == self._too_long_warned:
            return
        self._too_long_warned = counts
        if counts == (0, 0):
            return
        self.log.warn(
            "names too long for the protocol ({limit} bytes) are not shared:"
            " {files} files skipped, {folders} folders not entered (the first"
            " begins {start!r})",
            files=result.too_long_files,
            folders=result.too_long_folders,
            limit=MAX_NAME_LENGTH,
            start=result.too_long_first[:LOGGED_NAME_CHARACTERS],
        )

    def _scan_failed(self, failure: Failure) -> None:
        self._scan_failures += 1
        self._scan_done()
        if failure.check(_Halted):
            return
        if failure.check(OSError):
            self.log.error("cannot scan the share: {error}", error=failure.value)
        else:
            self._unexpected(failure, "scanning the share")

    def _scan_ended(self, ignored: object) -> None:
        self._scanning = False
        if self._rescan_again:
            self._rescan_again = False
            self._start_scan()
        else:
            self._schedule_scan(self._rescan_interval)
        self._work_ended()

    # -- inotify -------------------------------------------------------------

    def _watch_directories(self, directories: list[str]) -> None:
        if not self._watch or self._halted:
            return
        if self._notifier is None:
            try:
                self._notifier = inotify.INotify(self._reactor)
                self._notifier.startReading()
            except Exception:
                self.log.failure("inotify is unavailable; rescanning only")
                self._watch, self._notifier = False, None
                return
            self._watched = set()
        warned = False
        for directory in set(directories) - self._watched:
            try:
                self._notifier.watch(
                    FilePath(directory),
                    # Never through a symlink (a folder swapped for one
                    # would have us watch outside the share); new folders
                    # are watched by the rescan their creation starts.
                    mask=WATCH_MASK | IN_DONT_FOLLOW | IN_ONLYDIR,
                    autoAdd=False,
                    callbacks=[self._on_event],
                )
            except inotify.INotifyError as error:
                # Gone since the walk, or the kernel's limit on watches.
                if not warned:
                    self.log.warn(
                        "not watching every folder ({error}); the"
                        " rescan finds changes there",
                        error=error,
                    )
                    warned = True
                continue
            self._watched.add(directory)

    def _drop_notifier(self, close: bool) -> None:
        if self._notifier is not None and close:
            self._notifier.loseConnection()
        self._notifier = None
        self._watched = set()

    def _on_event(self, ignored: object, path: FilePath[Any], mask: int) -> None:
        self._notified(path, mask)

    def _notified(self, path: FilePath[Any], mask: int) -> None:
        """
        An inotify event: gather file names for a debounced re-stat; a
        folder that appeared, moved or went means a (debounced) full rescan.
        """
        if self._halted:
            return
        if mask & IN_DELETE_SELF:
            # Twisted closes the whole notifier after any DELETE_SELF; the
            # rescan builds a new one.
            self._drop_notifier(close=False)
            self._schedule_scan(DEBOUNCE_SECONDS)
            return
        if mask & IN_ISDIR:
            if mask & (IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE):
                self._schedule_scan(DEBOUNCE_SECONDS)
            return
        if mask & IN_CREATE and not mask & IN_CLOSE_WRITE:
            return  # still being written: its CLOSE_WRITE follows
        relative = os.path.relpath(os.fsdecode(path.path), self._share.root)
        if relative == os.curdir or relative.split(os.sep)[0] == os.pardir:
            return
        self._dirty.add(relative.replace(os.sep, "/"))
        if self._refresh_call is None:
            self._refresh_call = self._reactor.callLater(
                DEBOUNCE_SECONDS, self._refresh
            )

    def _refresh(self) -> None:
        self._refresh_call = None
        names, self._dirty = self._dirty, set()
        share = self._share

        def restat() -> dict[str, Identity | None]:
            return {
                name: _stat_name(share, name)
                if _shareable(name, share.include_hidden)
                else None
                for name in names
            }

        self._refreshing += 1
        d = self._in_pool(restat)
        d.addCallback(self._refreshed)
        d.addErrback(self._unexpected, "re-reading changed files")
        d.addBoth(self._refresh_ended)

    def _refreshed(self, identities: dict[str, Identity | None]) -> None:
        if self._halted:
            return
        self._remove([name for name, found in identities.items() if found is None])
        for name, identity in identities.items():
            if identity is not None:
                self._queue_hash(name, identity)
        self._kick()

    def _refresh_ended(self, ignored: object) -> None:
        self._refreshing -= 1
        self._work_ended()
