"""A peer's share folder: safe name resolution, listing and cached digests.

Every name a client sends is untrusted.  ``ShareFolder.open`` accepts only
plain relative names whose real path stays inside the folder, opens them
without following a final symlink and without blocking on FIFOs, and accepts
only regular files.  Hashing runs through an injected ``run_blocking`` so the
daemon can push it to a thread while tests run it inline.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from p2p import wire
from p2p.wire import Code, WireError

T = TypeVar("T")
RunBlocking = Callable[[Callable[[], T]], "Deferred[T]"]

HASH_CHUNK_BYTES = 1024 * 1024
MAX_LISTED_FILES = 10_000
MAX_CACHED_DIGESTS = 4096
# twistd's pid file and (rotated) log files, at the top of the share.
TWISTD_FILES = re.compile(r"twistd\.pid|twistd\.log(\.[0-9_]+)?")


def run_inline(work: Callable[[], T]) -> Deferred[T]:
    """Run C{work} now; for tests and small files."""
    return maybeDeferred(work)


@dataclass
class OpenedFile:
    """A file opened for serving: the descriptor is ours to close."""

    name: str
    fd: int
    size: int
    identity: tuple[int, int, int, int]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _hash_descriptor(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    position = 0
    while position < size:
        chunk = os.pread(fd, min(HASH_CHUNK_BYTES, size - position), position)
        if not chunk:
            raise OSError(errno.EIO, "file shrank while it was being hashed")
        digest.update(chunk)
        position += len(chunk)
    return digest.hexdigest()


class ShareFolder:
    """
    The files one peer serves.

    :param root: the folder; only files inside it are ever read.
    :param run_blocking: runs a blocking callable and returns a Deferred of its
        result (e.g. a thread pool); inline by default.
    :param include_hidden: also serve names with a component starting with
        a dot.
    """

    def __init__(
        self,
        root: str,
        run_blocking: RunBlocking = run_inline,
        include_hidden: bool = False,
    ) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise ValueError(f"share folder {root!r} is not a directory")
        self.run_blocking = run_blocking
        self.include_hidden = include_hidden
        self._digests: dict[tuple[int, int, int, int], str] = {}

    def _check_name(self, name: str) -> list[str]:
        if "\\" in name or "\x00" in name:
            raise WireError(Code.FORBIDDEN, "name must not contain \\ or NUL")
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise WireError(
                Code.FORBIDDEN, "name must be relative, without . or .. or //"
            )
        if not self.include_hidden and any(p.startswith(".") for p in parts):
            raise WireError(Code.FORBIDDEN, "hidden files are not shared")
        if len(parts) == 1 and TWISTD_FILES.fullmatch(parts[0]):
            # twistd writes these into its working folder, which is the
            # default share: a peer must not hand out its own pid and logs.
            raise WireError(Code.FORBIDDEN, "twistd's own files are not shared")
        return parts

    def _inside(self, path: str) -> str | None:
        """The share-relative form of real path C{path}, or None if outside."""
        relative = os.path.relpath(path, self.root)
        # Compare whole components: "..notes" is a file inside the folder.
        if relative in (os.curdir, os.pardir) or relative.startswith(
            os.pardir + os.sep
        ):
            return None
        return relative

    def open(self, name: str) -> OpenedFile:
        """
        Open C{name} for serving.

        :raise WireError: 403 for names that escape the folder or are not
            regular files, 404 for missing files.
        """
        self._check_name(name)
        real = os.path.realpath(os.path.join(self.root, *name.split("/")))
        relative = self._inside(real)
        if relative is None:
            raise WireError(Code.FORBIDDEN, "name leads outside the share folder")
        if not self.include_hidden:
            self._check_name(relative.replace(os.sep, "/"))
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(real, flags)
        except FileNotFoundError:
            raise WireError(Code.NOT_FOUND, "no such file") from None
        except OSError as e:
            # ELOOP: a symlink swapped in after realpath; EACCES; ENXIO (a
            # socket); anything else unreadable.
            raise WireError(Code.FORBIDDEN, f"cannot open: {e.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise WireError(Code.FORBIDDEN, "not a regular file")
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        return OpenedFile(name, fd, info.st_size, identity)

    def digest(self, opened: OpenedFile) -> Deferred[str]:
        """The SHA-256 of C{opened}, from the cache when the file is unchanged."""
        cached = self._digests.get(opened.identity)
        if cached is not None:
            return succeed(cached)
        # The hasher gets its own descriptor: the connection may close (and
        # close opened.fd) while the hash is still being computed.
        fd = os.dup(opened.fd)

        def work() -> str:
            try:
                return _hash_descriptor(fd, opened.size)
            finally:
                os.close(fd)

        d = self.run_blocking(work)
        d.addCallback(self._remember, opened.identity)
        return d

    def _remember(self, digest: str, identity: tuple[int, int, int, int]) -> str:
        if len(self._digests) >= MAX_CACHED_DIGESTS:
            del self._digests[next(iter(self._digests))]
        self._digests[identity] = digest
        return digest

    def list(self) -> list[wire.FileEntry]:
        """Regular files in the folder (recursively), sorted; the walk stops
        at 10,000 files so a huge tree cannot stall the peer."""
        entries = []
        for directory, dirnames, filenames in os.walk(self.root):
            if not self.include_hidden:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            dirnames.sort()
            for filename in filenames:
                path = os.path.join(directory, filename)
                name = os.path.relpath(path, self.root).replace(os.sep, "/")
                entry = self._entry(name)
                if entry is not None:
                    entries.append(entry)
                    if len(entries) >= MAX_LISTED_FILES:
                        return sorted(entries, key=lambda entry: entry.name)
        return sorted(entries, key=lambda entry: entry.name)

    def names(self) -> list[str]:
        """
        The names a client may ask for, for the relay's name filter (see
        L{p2p.hints}): a cheap walk that opens no file, so it may include
        a few names L{open} would refuse (a symlink leading out, a FIFO);
        harmless, since a filter is only a hint.  Hidden and twistd's own
        files are left out as L{open} refuses them, and the walk stops at
        10,000 names like L{list}.
        """
        names: list[str] = []
        for directory, dirnames, filenames in os.walk(self.root):
            if not self.include_hidden:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            dirnames.sort()
            # One relpath per folder, not per file: this runs on the
            # reactor thread at every renewal (walk and filter: about 5 ms per
            # 1,000 files, 55 ms at the 10,000 cap).
            folder = os.path.relpath(directory, self.root)
            prefix = "" if folder == os.curdir else folder.replace(os.sep, "/") + "/"
            for filename in sorted(filenames):
                if "\\" in filename or (
                    not self.include_hidden and filename.startswith(".")
                ):
                    continue
                if not prefix and TWISTD_FILES.fullmatch(filename):
                    continue
                names.append(prefix + filename)
                if len(names) >= MAX_LISTED_FILES:
                    return names
        return names

    def _entry(self, name: str) -> wire.FileEntry | None:
        try:
            opened = self.open(name)
        except WireError:
            return None
        opened.close()
        entry = wire.FileEntry(opened.size, name)
        try:
            # Round-trip through the client's parser: one unparseable line
            # (a control character, an over-long name) would make the whole
            # listing unreadable for every client.
            if wire.FileEntry.from_line(entry.to_line()) != entry:
                return None
        except (ValueError, UnicodeEncodeError, WireError):
            return None  # a name the protocol cannot carry
        return entry
