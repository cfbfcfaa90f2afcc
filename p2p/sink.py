"""Where fetched bytes go: verified piece by piece, then to stdout or a file.

A piece's bytes are used only once they hash to that piece's digest in a
piece list that itself matched the content's root (L{p2p.pieces}).  So
stdout can be fed as pieces complete, with no spool file: what reaches it is
always a verified prefix of the content, and memory holds only the pieces in
flight.  With ``-o PATH`` verified pieces are written in place into
``PATH.p2p-part``, renamed to ``PATH`` once complete; a partial file left by
an interrupted run is resumed by the next run for the same content (its
pieces are hashed again, and only those that verify are kept).  A ``PATH``
that exists and is not a regular file (a device, a FIFO, ``/dev/stdout``)
is written through instead, in order, as stdout is (L{ThroughOutput};
L{output_for} tells which).

Pieces are hashed on the reactor thread that receives them and written on
a worker thread (L{SerialWorker}); the receiving side pauses its
connection while too many bytes wait for the writer (L{PieceSink.write}
returns False).  Over plain TCP a piece is received in
place, into a buffer the sink lends (L{PieceSink.lend}) and lends again
once the piece is stored: the client's memory is then the same few
buffers for a file of any size.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import io
import os
import queue
import re
import stat
import struct
import threading
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2p.pieces import (
    Content,
    PieceData,
    PieceList,
    PieceSet,
    hash_piece,
    length_of,
    parts_of,
    root_of,
)
from p2p.regular import read_regular_file

T = TypeVar("T")

PARTIAL_SUFFIX = ".p2p-part"
# The partial file's trailer: what content it holds, so a later run knows
# whether it can resume.  Kept in a small file beside it (like aria2's
# .aria2 control file), removed with it.
STATE_SUFFIX = ".p2p-part.state"
_STATE_MAGIC = b"p2p-relay partial v1\n"

# Bytes of received pieces allowed to wait for the writing thread before
# the connection is paused: enough to keep it busy, small enough to keep
# the client's memory flat.  Over plain TCP the pieces are received in
# place into buffers the sink lends and takes back (L{PieceSink.lend}), so
# this bounds the memory exactly, whatever the file's size: measured on a
# 1 GiB fetch to stdout, peak RSS 50.2 MiB at 2 MiB, 52.2 at 4, 56.4 at 8,
# 60.4 at 12, for 1.7, 2.0, 2.3 and 2.3 GB/s (``-o``: 0.8 GB/s at 2 MiB,
# 1.9 at 8).  (Before, pieces held the received chunks they came in, which
# fragmented the heap: 59-74 MiB at 20 GiB for 2-8 MiB.)
HIGH_WATER_BYTES = 8 * 1024 * 1024
LOW_WATER_BYTES = 4 * 1024 * 1024
# Whole-piece buffers kept for lending again (L{PieceSink.lend}): the
# backlog's worth, and one more for the piece being received.
SPARE_BYTES = HIGH_WATER_BYTES + 1024 * 1024


class SerialWorker:
    """
    Stores pieces on a thread of its own, in submission order, beside the
    reactor thread that receives them and, since it has each piece in hand
    and in its cache, checks them (L{submit_checked}).

    Checking on the reactor thread: BLAKE3 hashes 1 MiB in 0.12-0.16 ms
    here (by hand, and table 8.0), time the reactor can spare, and the bytes just
    received are hashed while still in the receiving core's cache, with no
    hand-over to another thread.  A 1 GiB fetch to /dev/null took 0.37-0.44
    s that way against 0.45-0.54 s with a checking thread between the
    reactor and the storing thread (four alternated runs each, this
    machine), whose hand-overs and turns for the GIL cost more than the
    overlap gained on 2 cores.  Writing stays off the reactor thread: a
    file or a pipe may block.  Results come back to the reactor thread as
    Deferreds.  A daemon thread: it never keeps the process alive after the
    reactor stopped.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self._stores: queue.SimpleQueue = queue.SimpleQueue()
        # Started at the first work: a run whose contents are all stored
        # inline (small files) never starts it (starting threads took about
        # 1 ms of a single small fetch).
        self.started = False

    def _start(self) -> None:
        self.started = True
        threading.Thread(target=self._run_stores, daemon=True, name="p2p-store").start()

    def submit(self, work: Callable[[], T]) -> Deferred[T]:
        """Run C{work} on the storing thread, after everything before it."""
        if not self.started:
            self._start()
        d: Deferred[T] = Deferred()
        self._stores.put((work, d))
        return d

    def submit_checked(
        self, check: Callable[[], bool], work: Callable[[], object]
    ) -> Deferred[bool]:
        """
        Run C{check} now, on the calling (reactor) thread, then, if it
        passed, C{work} on the storing thread; fires with whether it passed
        (at once when it did not, once stored when it did).
        """
        try:
            passed = check()
        except BaseException:
            return fail()
        if not passed:
            return succeed(False)
        return self.submit(work).addCallback(lambda _: True)

    def stop(self) -> None:
        if self.started:
            self._stores.put(None)

    def _run_stores(self) -> None:
        while True:
            item = self._stores.get()
            if item is None:
                return
            work, d = item
            try:
                result = work()
            except BaseException:
                self.reactor.callFromThread(d.errback, Failure())
            else:
                self.reactor.callFromThread(d.callback, result)


class InlineWorker:
    """Runs submitted calls at once (tests, in-memory reactors)."""

    def submit(self, work: Callable[[], T]) -> Deferred[T]:
        return maybeDeferred(work)

    def submit_checked(
        self, check: Callable[[], bool], work: Callable[[], object]
    ) -> Deferred[bool]:
        return maybeDeferred(lambda: bool(check() and (work(), True)[1]))

    def stop(self) -> None:
        pass


_INLINE = InlineWorker()


class Output:
    """Where verified pieces are stored; every method but C{label} runs on
    the worker thread (or, for a content of at most C{inline_bytes}, on the
    reactor thread)."""

    label = "output"
    # Contents this small are checked and stored on the reactor thread:
    # the trips to the writing thread cost more than the work.
    inline_bytes = 0

    def prepare(self, content: Content, pieces: PieceList | None) -> set[int]:
        """Get ready for C{content}; return the pieces already held."""
        return set()

    @property
    def _empty(self) -> bool:
        """Whether the partial file is as this run made it: empty."""
        return self._created and not self._written

    def write_piece(self, offset: int, data: PieceData) -> None:
        raise NotImplementedError

    def room(self) -> int | None:
        """The most bytes this output can take (C{None}: no known bound)."""
        return None

    def finish(self, durable: bool) -> None:
        """Every piece is stored: make the result final."""

    def abandon(self, keep: bool) -> str | None:
        """
        Stop; with C{keep}, leave what can be resumed and return where it
        is (C{None}: nothing kept).
        """
        return None

    # Whether a piece stored can later be replaced (a file's bytes can be
    # written over; a stream's are gone out).
    overwrites = True

    @property
    def restartable(self) -> bool:
        """Whether the output may still start over with other content."""
        return True

    @property
    def resumable(self) -> bool:
        """Whether what is stored would be kept for a later run to resume."""
        return False


class StreamOutput(Output):
    """Verified pieces, in order, to a stream (stdout)."""

    label = "stdout"
    overwrites = False

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.position = 0
        self._waiting: dict[int, bytes] = {}
        self.written = 0
        _widen_pipe(stream)

    def prepare(self, content: Content, pieces: PieceList | None) -> set[int]:
        if self.written:
            # Never again from byte 0 over bytes gone out: the pieces after
            # them would wait for ever, and the run claim a whole file.
            raise OSError(
                errno.EIO, f"{self.written} bytes of another content went out"
            )
        self.position = 0
        self._waiting.clear()
        return set()

    def finish(self, durable: bool) -> None:
        if self._waiting:
            raise OSError(
                errno.EIO,
                f"{len(self._waiting)} verified piece(s) never went out in order",
            )

    def write_piece(self, offset: int, data: PieceData) -> None:
        # Pieces may complete out of order (several sources): hold the ones
        # ahead of the stream until the gap before them is filled.
        if offset < self.position:
            return  # a second copy of a piece already written
        if offset > self.position and isinstance(data, bytearray):
            # Held past this call: a lent buffer is lent again once stored.
            data = bytes(data)
        self._waiting[offset] = data
        while self.position in self._waiting:
            for part in parts_of(self._waiting.pop(self.position)):
                write_all(self.stream, part)
                self.position += len(part)
                self.written += len(part)
        if self.written:
            self.stream.flush()

    @property
    def restartable(self) -> bool:
        return self.written == 0


def write_all(stream: BinaryIO, data: bytes | bytearray | memoryview) -> None:
    """
    Write every byte of C{data} to C{stream}.  A raw stream (stdout under
    ``python -u`` or ``PYTHONUNBUFFERED``, a ``FileIO``) may write only part
    of a buffer, on a pipe interrupted by a signal say; a buffered one
    writes it all.  A non-blocking one that would block is an error.
    """
    view = memoryview(data)
    while view:
        written = stream.write(view)
        if written is None:
            raise BlockingIOError(errno.EAGAIN, "the output would block")
        view = view[written:]


# Linux's F_SETPIPE_SZ (fcntl.F_SETPIPE_SZ from Python 3.10 on Linux).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_BYTES = 1024 * 1024


def _widen_pipe(stream: object) -> None:
    """
    Give a pipe on C{stream} a 1 MiB buffer (Linux; the default is 64 KiB,
    the unprivileged maximum 1 MiB): a piece then passes to the reader in
    one write instead of sixteen, with as many fewer wake-ups on both
    sides (4 GiB into a Python reader, three runs each on a busy machine:
    a median of 11.5 s, against 14.9 s).  Anything else is left alone.
    """
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError, ValueError):
        pass


class FileOutput(Output):
    """
    Verified pieces written in place into C{path}.p2p-part, renamed to
    C{path} when complete.  A partial file of the same content left by an
    earlier run is resumed: its pieces are hashed again and those that
    verify are kept.

    The partial file is locked (``flock``) from L{lock} to the end, so two
    runs with the same target never write into each other: the second
    fails at once with C{EBUSY}.  The lock is on the file then at the
    partial path: one renamed into place (or removed) by the run that held
    it is never taken over by a run that opened it before.
    """

    # A regular file takes a small content's bytes at once, like the open()
    # and flock() done on the reactor thread already.  Measured on the
    # 1,000 x 4 KiB benchmark (bench/small_files.py): see docs/performance.rst.
    inline_bytes = 256 * 1024

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = path
        self.partial = path + PARTIAL_SUFFIX
        self.state = path + STATE_SUFFIX
        self._fd: int | None = None
        # Whether this run created the partial file (rather than finding an
        # earlier run's to resume).
        self._created = False
        # Whether anything was written into it, and whether the content
        # being assembled is one piece going into it while it was empty.
        self._written = False
        self._from_empty = False
        # Whether a state file (what makes the partial file resumable) is
        # there: none for a content of one piece, which has nothing to
        # resume (it saves three file-system operations per small file).
        self._stated = False
        self.content: Content | None = None
        # Read once, here on the reactor thread: reading the umask means
        # setting it, which must not race with the worker creating files.
        self._mode = 0o666 & ~_umask()

    def lock(self) -> None:
        """
        Open and lock the partial file (creating it, empty, if needed).

        :raise OSError: C{EBUSY} when another run holds it; any error
            opening it (a missing folder, no permission).
        """
        if self._fd is not None:
            return
        # Never through a symbolic link planted at the partial path.
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(_LOCK_ATTEMPTS):
            try:
                fd = os.open(self.partial, flags | os.O_CREAT | os.O_EXCL, 0o666)
                created = True
            except FileExistsError:
                fd = os.open(self.partial, flags)  # an earlier run's: resumable
                created = False
            try:
                held = os.fstat(fd)
                if not stat.S_ISREG(held.st_mode):
                    raise OSError(errno.EINVAL, f"{self.partial} is not a file")
                _lock(fd, self.partial)
                # (Locking changes neither the device nor the inode.)
                if _same_file(self.partial, held):
                    self._fd, self._created = fd, created
                    return
            except BaseException:
                os.close(fd)
                raise
            # The run that held it renamed or removed it since we opened it:
            # what we locked is not the partial file any more.
            os.close(fd)
        raise OSError(errno.EBUSY, f"another p2p keeps replacing {self.partial}")

    def prepare(self, content: Content, pieces: PieceList | None) -> set[int]:
        self.lock()
        assert self._fd is not None
        # Made empty by this run, nothing written into it yet, for one
        # piece: nothing to resume or cut (an earlier run's state file, if
        # any, is replaced or removed by a content of several pieces).
        self._from_empty = self._empty
        if self._from_empty and content.pieces == 1:
            self.content = content
            return set()
        self._from_empty = False
        held = self._resumable(content, pieces)
        length = os.fstat(self._fd).st_size
        if not held and length:
            os.ftruncate(self._fd, 0)
        elif length > content.size:
            os.ftruncate(self._fd, content.size)
        if content.pieces > 1:
            self._write_state(content)
            self._stated = True
        elif self._stated:
            _unlink(self.state)  # an earlier run's, of another content
            self._stated = False
        self.content = content
        return held

    def _resumable(self, content: Content, pieces: PieceList | None) -> set[int]:
        """The pieces of an earlier partial file of C{content} that verify."""
        assert self._fd is not None
        try:
            recorded = read_regular_file(self.state, 256)
        except OSError:
            return set()  # none, or not ours (a FIFO, a link): replaced
        self._stated = True  # an earlier run's, removed when done
        if recorded != _state_record(content):
            return set()
        held = set()
        length = os.fstat(self._fd).st_size
        for index in range(content.pieces):
            offset, size = content.span(index)
            if offset + size > length:
                break
            data = os.pread(self._fd, size, offset)
            if _verifies(content, pieces, index, data):
                held.add(index)
        return held

    def room(self) -> int | None:
        """Free space of the target's file system, plus what an earlier
        partial file already holds (it is reused or replaced)."""
        try:
            stats = os.statvfs(os.path.dirname(self.path) or os.curdir)
        except OSError:
            return None
        if self._empty:
            held = 0
        else:
            try:
                held = os.stat(self.partial).st_size
            except OSError:
                held = 0
        return stats.f_bavail * stats.f_frsize + held

    def _write_state(self, content: Content) -> None:
        temporary = self.state + ".new"
        # Ours to replace, whatever is there: a FIFO left (or planted) there
        # would block an open for writing for ever; created afresh, never
        # opened through a link.
        _unlink(temporary)
        fd = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o666,
        )
        with open(fd, "wb") as stream:
            stream.write(_state_record(content))
        os.replace(temporary, self.state)

    def write_piece(self, offset: int, data: PieceData) -> None:
        assert self._fd is not None
        self._written = True
        buffers = list(parts_of(data))
        while buffers:
            written = os.pwritev(self._fd, buffers, offset)
            offset += written
            # A short write (rare: a signal, a full disk next time): drop
            # what went out and go on with the rest.
            while buffers and written >= len(buffers[0]):
                written -= len(buffers[0])
                buffers.pop(0)
            if buffers and written:
                buffers[0] = memoryview(buffers[0])[written:]

    def finish(self, durable: bool) -> None:
        assert self._fd is not None and self.content is not None
        if not self._from_empty:
            # An earlier content's or run's bytes may lie past the end; one
            # piece written into an empty file is whole.
            os.ftruncate(self._fd, self.content.size)
        if durable:
            os.fsync(self._fd)
        if not self._created:
            os.fchmod(self._fd, self._mode)  # created: its mode is this already
        # Renamed while still locked: no other run can slip in between.
        os.replace(self.partial, self.path)
        if self._stated:
            _unlink(self.state)
        self._close()

    @property
    def resumable(self) -> bool:
        """Whether the partial file holds a known content a later run can
        resume (one of several pieces: a state file says which)."""
        return self.content is not None and self._stated

    def abandon(self, keep: bool) -> str | None:
        """
        Keep the partial file only if it can be resumed (its content is
        known); otherwise leave nothing behind.  One that an earlier run
        left, and this run never got to (no peer described the content),
        stays as it was, for a later run to resume.
        """
        if self._fd is not None and self.content is None and not self._created:
            self._close()
            return self.partial if keep else None
        if keep and self.resumable and self._fd is not None:
            self._close()
            return self.partial
        if self._fd is not None:
            self._remove()
        self._close()
        return None

    def _remove(self) -> None:
        _unlink(self.partial)
        _unlink(self.state)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


# Opening and locking the partial file again, when another run renamed it
# between our open and our lock: once is the normal worst case.
_LOCK_ATTEMPTS = 5


def _lock(fd: int, path: str) -> None:
    """Lock C{fd} for this run, or fail with C{EBUSY} at once."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(
            errno.EBUSY, f"another p2p is already writing it ({path} is locked)"
        ) from None


def _same_file(path: str, held: os.stat_result) -> bool:
    """Whether C{path} still names the file whose C{fstat} is C{held}."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class ThroughOutput(StreamOutput):
    """
    Verified pieces, in order, written through an existing target that is
    not a regular file: a character or block device (``/dev/null``), a
    FIFO, a symbolic link to one, or a link to a file descriptor
    (``/dev/stdout``, ``/proc/self/fd/N``).  As curl's ``-o`` does, the
    target is opened for writing and never replaced: no partial file, no
    rename, no resume.

    A link to one of this process's own descriptors is written through a
    duplicate of it (``-o /dev/stdout`` is stdout, appending included);
    anything else is opened, and locked (``flock``) like a partial file,
    so two runs never interleave their pieces in one target: the second
    fails at once with C{EBUSY}.
    """

    def __init__(self, path: str, descriptor: int | None = None) -> None:
        self.path = path
        self.label = path
        self.descriptor = descriptor
        self.position = 0
        self._waiting: dict[int, bytes] = {}
        self.written = 0
        self._fd: int | None = None
        self._size: int | None = None
        self.stream: io.FileIO | None = None  # type: ignore[assignment]

    def open(self, blocking: bool = True) -> bool:
        """
        Open and lock the target (once).  A FIFO nobody reads yet cannot
        be opened without waiting for a reader: without C{blocking} that
        returns False, with it the call waits (as curl's does).

        :raise OSError: C{EBUSY} when another run holds it; any error
            opening it.
        """
        if self._fd is not None:
            return True
        if self.descriptor is not None:
            fd = os.dup(self.descriptor)
        else:
            flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY
            try:
                fd = os.open(self.path, flags | (0 if blocking else os.O_NONBLOCK))
            except OSError as e:
                if e.errno == errno.ENXIO and not blocking:
                    return False  # a FIFO without a reader
                raise
            try:
                if not blocking:
                    mode = fcntl.fcntl(fd, fcntl.F_GETFL)
                    fcntl.fcntl(fd, fcntl.F_SETFL, mode & ~os.O_NONBLOCK)
                _lock(fd, self.path)
                if stat.S_ISBLK(os.fstat(fd).st_mode):
                    self._size = os.lseek(fd, 0, os.SEEK_END)
                    os.lseek(fd, 0, os.SEEK_SET)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd
        self.stream = io.FileIO(fd, "wb", closefd=False)
        _widen_pipe(self.stream)
        return True

    def prepare(self, content: Content, pieces: PieceList | None) -> set[int]:
        self.open()
        return super().prepare(content, pieces)

    def room(self) -> int | None:
        """A block device's size; nothing else has a known bound."""
        return self._size

    def finish(self, durable: bool) -> None:
        assert self._fd is not None
        super().finish(durable)
        if durable:
            try:
                os.fsync(self._fd)
            except OSError as e:
                # A FIFO, a terminal or /dev/null has nothing to flush.
                if e.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):
                    raise
        self._close()

    def abandon(self, keep: bool) -> str | None:
        self._close()
        return None

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


class OutputRefused(Exception):
    """An ``-o`` target the client will not write (the message says why)."""


# /proc/PID/fd/N and /proc/PID/task/TID/fd/N: where /dev/stdout, /dev/fd/N,
# /proc/self/fd/N and /proc/thread-self/fd/N lead.
_DESCRIPTOR_LINK = re.compile(r"/proc/(?P<pid>\d+)(?:/task/\d+)?/fd/(?P<fd>\d+)")
# As the kernel's own bound on a chain of links (MAXSYMLINKS).
_MAX_LINKS = 40


def output_for(path: str) -> FileOutput | ThroughOutput:
    """
    The output for ``-o PATH`` (a path that is not a folder):

    * nothing there, or a regular file: L{FileOutput} (a partial file,
      renamed over PATH once complete);
    * a character or block device, a FIFO, a symbolic link to one, or a
      link to a file descriptor (``/dev/stdout``): L{ThroughOutput};
    * a symbolic link to a regular file, or to nothing: refused.  Writing
      the file it points to would follow a link someone may have planted
      (in ``/tmp``, say) to a file of yours; replacing the link would lose
      it.  Name the file itself.

    :raise OutputRefused: for what is refused (and a socket).
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return FileOutput(path)
    except OSError:
        return FileOutput(path)  # its lock() reports the error
    if stat.S_ISREG(info.st_mode):
        return FileOutput(path)
    if stat.S_ISLNK(info.st_mode):
        link = _descriptor_link(path)
        if link is not None:
            pid, descriptor = link
            return ThroughOutput(path, descriptor if pid == os.getpid() else None)
        try:
            info = os.stat(path)
        except OSError:
            raise OutputRefused("a symbolic link to nothing") from None
        if stat.S_ISREG(info.st_mode):
            raise OutputRefused(
                "a symbolic link to a regular file (give the file's own path)"
            )
    if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        return ThroughOutput(path)
    if stat.S_ISFIFO(info.st_mode):
        return ThroughOutput(path)
    raise OutputRefused("not a regular file, a device or a FIFO")


def _descriptor_link(path: str) -> tuple[int, int] | None:
    """
    The (process, descriptor) a chain of symbolic links from C{path}
    reaches through ``/proc/PID/fd/N``, if it does.
    """
    for _ in range(_MAX_LINKS):
        folder, name = os.path.split(os.path.abspath(path))
        full = os.path.join(os.path.realpath(folder), name)
        match = _DESCRIPTOR_LINK.fullmatch(full)
        if match is not None:
            return int(match["pid"]), int(match["fd"])
        try:
            target = os.readlink(full)
        except OSError:
            return None  # not a link (any more)
        path = os.path.join(os.path.dirname(full), target)
    return None


def _state_record(content: Content) -> bytes:
    return (
        _STATE_MAGIC
        + content.root
        + struct.pack(">QI", content.size, content.piece_size)
    )


def _verifies(
    content: Content, pieces: PieceList | None, index: int, data: PieceData
) -> bool:
    """Whether C{data} is piece C{index} of C{content}."""
    if pieces is not None:
        return pieces.verify(index, data)
    # One piece (or none): the root itself covers the piece's digest.
    if content.pieces > 1 or length_of(data) != content.span(index)[1]:
        return False
    digests = hash_piece(data) if content.size else b""
    return root_of(content.size, content.piece_size, digests) == content.root


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@functools.cache
def _umask() -> int:
    """The process's umask, read once (reading it means setting it: first
    called on the reactor thread, before any worker creates a file)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ContentMismatch(ValueError):
    """A peer offered other content than the one being assembled."""


class PieceSink:
    """
    Assembles one content from verified pieces into an L{Output}.

    The receiving protocol calls L{begin} with the content a peer
    described, then L{write} with each whole piece it received; L{write}
    queues the piece for the worker, which verifies it and stores it if it
    is good.  L{settled} fires once the worker caught up, with the indexes
    of the pieces that failed verification since the last call.
    """

    log = Logger()

    def __init__(
        self,
        output: Output,
        worker: SerialWorker | InlineWorker | None = None,
        durable: bool = False,
        expected_root: str | None = None,
        max_size: int | None = None,
        on_progress: Callable[[], object] = lambda: None,
    ) -> None:
        self.output = output
        self.max_size = max_size
        # Told whenever C{received} changes (a progress bar's cue).
        self._on_progress = on_progress
        # The content the user asked for by root (p2p get ROOT, --expect):
        # no other is ever taken.
        self.expected_root = expected_root
        self.worker = worker or InlineWorker()
        self.durable = durable
        self.content: Content | None = None
        self.pieces: PieceList | None = None
        self.done = PieceSet()
        self.received = 0  # verified bytes stored
        # Of those, the ones an earlier run had stored (resumed, not fetched).
        self.resumed = 0
        self._failed: list[int] = []
        self._backlog = 0
        self._drained: Deferred[None] | None = None
        self._prepared: list[Deferred[None]] | None = None
        self._error: BaseException | None = None
        # Buffers lent to receivers (L{lend}), by id, and whole-piece ones
        # back from the workers, ready to lend again.
        self._lent: dict[int, bytearray] = {}
        self._spare: list[bytearray] = []
        # Whether this content is small enough to store on the reactor
        # thread (L{Output.inline_bytes}); decided once, at L{begin}.
        self._inline = False
        self._threaded = False
        # Whether a verified piece was handed to the output, known here on
        # the reactor thread (the storing thread may not have written it
        # yet): a stream handed one can no longer start over.
        self._handed = False

    # -- the content -------------------------------------------------------

    def continues(self, root: str) -> bool:
        """Whether content C{root} is the one being assembled (or, before
        any, the one expected, if any)."""
        if self.content is not None:
            return self.content.root_hex == root
        return self.expected_root is None or self.expected_root == root

    def begin(self, content: Content, pieces: PieceList | None) -> Deferred[None]:
        """
        Assemble C{content} (its piece list when it has more than one
        piece).  The first call prepares the output (resuming what it
        holds); later ones must describe the same content.

        :raise ContentMismatch: for other content.
        """
        if not self.continues(content.root_hex):
            raise ContentMismatch("other content than the one expected")
        if self.content is not None:
            if content != self.content:
                raise ContentMismatch("other content than the one being assembled")
            if self.pieces is None and pieces is not None:
                self.pieces = pieces
            if self._prepared is None:
                return succeed(None)
            waiter: Deferred[None] = Deferred()
            self._prepared.append(waiter)
            return waiter
        self.content = content
        self.pieces = pieces
        self._prepared = []
        # Never back from the thread: work queued there keeps its order.
        self._inline = not self._threaded and content.size <= self.output.inline_bytes
        d = self._submit(lambda: self.output.prepare(content, pieces))

        def held(indexes: set[int]) -> None:
            self.done |= indexes
            self.resumed = sum(content.span(index)[1] for index in indexes)
            self.received += self.resumed
            self._progressed()

        def tell_waiters(result: object) -> object:
            waiters, self._prepared = self._prepared or [], None
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            return result

        d.addCallback(held)
        d.addBoth(tell_waiters)
        return d

    def _progressed(self) -> None:
        try:
            self._on_progress()
        except Exception:
            # Only a display: its bug must not stop the pieces.
            self.log.failure("progress report failed")

    def refusal(self, size: int) -> str | None:
        """
        Why a content of C{size} bytes cannot be taken (bigger than
        C{max_size}, or than the room left on the target's file system),
        or C{None} when it can.
        """
        if self.max_size is not None and size > self.max_size:
            return f"{size} bytes is more than --max-size ({self.max_size})"
        room = self.output.room()
        if room is not None and size > room:
            return f"{size} bytes would not fit in {self.output.label} ({room} free)"
        return None

    def reset(self) -> None:
        """Forget the content (only while the output is restartable)."""
        self.content = None
        self.pieces = None
        self._handed = False
        self._spare.clear()
        self.done.clear()
        self.received = 0
        self.resumed = 0
        self._progressed()

    @property
    def restartable(self) -> bool:
        """
        Whether the output may start over with other content.  Judged by
        what was handed to it, not by what its thread wrote so far: a
        stream's first piece, verified and queued but not yet written when
        the peer broke, let a run start over and then wait for ever for
        bytes before the ones that went out (it claimed the whole file with
        1 MiB of 64 on stdout).
        """
        if self._handed and not self.output.overwrites:
            return False
        return self.output.restartable

    @property
    def keeps_work(self) -> bool:
        """Whether starting over would throw away verified pieces that a
        later run could resume (a partial file's): never worth it."""
        return bool(self.done) and self.output.resumable

    @property
    def complete(self) -> bool:
        return self.content is not None and len(self.done) == self.content.pieces

    def missing(self) -> list[int]:
        """The pieces still to fetch, in order."""
        assert self.content is not None
        return [i for i in range(self.content.pieces) if i not in self.done]

    def first_missing(self) -> int:
        """The first piece still to fetch (the content is not complete)."""
        assert self.content is not None
        index = self.done.first_missing(self.content.pieces)
        assert index is not None, "the content is complete"
        return index

    # -- pieces --------------------------------------------------------------

    def lend(self, index: int) -> bytearray:
        """
        A buffer of piece C{index}'s length, for a receiver to fill and
        hand back through L{write}: once the piece is stored (or failed),
        a whole piece's buffer is lent again.  A large download then runs
        in the same few buffers (the backlog's worth, plus the one being
        filled), whatever the file's size.
        """
        assert self.content is not None
        length = self.content.span(index)[1]
        spare = self._spare
        if spare and length == len(spare[-1]):
            buffer = spare.pop()
        else:
            buffer = bytearray(length)
        self._lent[id(buffer)] = buffer
        return buffer

    def take_back(self, data: PieceData) -> None:
        """
        Take back C{data} if it is a buffer L{lend} gave (a receiver that
        stopped before filling it, or the workers done with it); anything
        else is left alone.
        """
        if self._lent.get(id(data)) is not data:
            return
        del self._lent[id(data)]
        size = self.content.piece_size if self.content is not None else 0
        if len(data) == size and (len(self._spare) + 1) * size <= SPARE_BYTES:
            self._spare.append(data)  # type: ignore[arg-type]

    def write(
        self,
        index: int,
        data: PieceData,
        on_bad: Callable[[int], object] | None = None,
        on_good: Callable[[int], object] | None = None,
    ) -> bool:
        """
        Queue piece C{index} for verification and storage; False when the
        caller should pause its input until L{when_drained} fires.  A piece
        that fails verification is dropped and reported to C{on_bad} (or,
        without one, by L{settled}).  One that is stored, and is the first
        copy of its piece to be, is reported to C{on_good} with its size:
        what its sender contributed, even if it breaks afterwards.

        :raise OSError: an earlier store failed (the output is unusable).
        """
        if self._error is not None:
            raise self._error
        content = self.content
        assert content is not None
        offset = content.span(index)[0]
        size = length_of(data)
        self._backlog += size
        pieces = self.pieces

        def check() -> bool:
            good = _verifies(content, pieces, index, data)
            if good:
                self._handed = True
            return good

        d = self._worker().submit_checked(
            check, lambda: self.output.write_piece(offset, data)
        )
        d.addCallbacks(
            self._stored,
            self._store_failed,
            (index, data, on_bad, on_good, content),
            None,
            (data,),
        )
        return self._backlog < HIGH_WATER_BYTES

    def _stored(
        self,
        good: bool,
        index: int,
        data: PieceData,
        on_bad: Callable[[int], object] | None,
        on_good: Callable[[int], object] | None,
        content: Content,
    ) -> None:
        size = length_of(data)
        self._released(size)
        self.take_back(data)
        if content is not self.content:
            # A piece of the content the sink had before it started over
            # (reset): never a piece of the one it assembles now.
            return
        if good:
            if index not in self.done:
                self.done.add(index)
                self.received += size
                self._progressed()
                if on_good is not None:
                    on_good(size)
        elif on_bad is not None:
            on_bad(index)
        else:
            self._failed.append(index)

    def _store_failed(self, failure: Failure, data: PieceData) -> None:
        self._released(length_of(data))
        self.take_back(data)
        if self._error is None:
            self._error = failure.value

    def _released(self, size: int) -> None:
        self._backlog -= size
        ready = self._drained
        if ready is not None and self._backlog < LOW_WATER_BYTES:
            self._drained = None
            ready.callback(None)

    def when_drained(self) -> Deferred[None]:
        """Fires once the worker's backlog is low again."""
        if self._backlog < LOW_WATER_BYTES:
            return succeed(None)
        if self._drained is None:
            self._drained = Deferred()
        d: Deferred[None] = Deferred()
        self._drained.addCallback(lambda _: d.callback(None))
        return d

    def settled(self) -> Deferred[list[int]]:
        """
        Fires when every piece queued so far is verified and stored, with
        the indexes of those that failed verification (since the last call);
        fails with the C{OSError} of a failed store.
        """
        d = self._submit(lambda: None)

        def report(_: None) -> list[int]:
            if self._error is not None:
                raise self._error
            failed, self._failed = self._failed, []
            return failed

        d.addCallback(report)
        return d

    def finish(self) -> Deferred[None]:
        """Make the complete content final (rename the partial file)."""
        return self._submit(lambda: self.output.finish(self.durable))

    def abandon(self, keep: bool = False) -> Deferred[str | None]:
        """Stop; with C{keep}, leave a resumable partial file if any."""
        d = self._submit(lambda: self.output.abandon(keep))
        d.addBoth(self._stop_worker)
        return d

    def _stop_worker(self, result: object) -> object:
        self.worker.stop()
        return result

    def _worker(self) -> SerialWorker | InlineWorker:
        # Inline too while no content has come and nothing went to the
        # thread (a peer that refused at once, a name found nowhere): there
        # is nothing queued to wait for and at most an empty file to remove,
        # and asking the thread would start it for nothing.
        if self._inline or (self.content is None and not self._threaded):
            return _INLINE
        self._threaded = True
        return self.worker

    def _submit(self, work: Callable[[], T]) -> Deferred[T]:
        return self._worker().submit(work)
