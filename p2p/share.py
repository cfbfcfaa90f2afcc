"""A peer's share folder: safe name resolution.

Every name a client sends is untrusted.  ``ShareFolder.open`` accepts only
plain relative names, resolves them *beneath* the folder (symlinks included,
whatever is renamed or swapped meanwhile), opens them without blocking on
FIFOs, and accepts only regular files.  What the folder holds, and the root
of each file's content, is the share index's business
(L{p2p.index.ShareIndex}): it walks the folder with L{ShareFolder.walk},
hashes in its own pool, and opens every file it hashes through ``open``, so
one set of rules decides what can ever be read.

Why not ``realpath()`` then ``open()``: a folder on the way can be swapped
for a symlink between the two calls, and ``O_NOFOLLOW`` only guards the last
component, so a name checked inside the folder was opened outside it.  Every
lookup now starts from a descriptor of the folder, opened once:

* on Linux 5.6 and later, one ``openat2(2)`` call with ``RESOLVE_BENEATH``:
  the kernel follows symlinks but fails (``EXDEV``) on any step out of the
  folder, absolute symlinks included;
* elsewhere, a walk one component at a time (``openat`` with
  ``O_NOFOLLOW | O_DIRECTORY`` relative to the folder above), reading each
  symlink met on the way and resolving it against the descriptors already
  held, with the same rules.

Which one a folder uses is decided once, when it is created, by a probe
that names the folder itself: a lookup error never makes the peer fall back
to the other (an attacker could provoke it).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import stat
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from p2p.wire import Code, WireError

# twistd's pid file and (rotated) log files, at the top of the share.
TWISTD_FILES = re.compile(r"twistd\.pid|twistd\.log(\.[0-9_]+)?")

# Symlinks followed in one lookup, at most: Linux's own limit (MAXSYMLINKS),
# so that both ways of resolving refuse the same chains.
MAX_SYMLINKS = 40
# openat2 answers EAGAIN when a rename elsewhere raced with a ".." in a
# symlink's target; it succeeds when retried.  A bounded number of times: a
# folder renamed in a loop must not keep a request (on the reactor thread)
# spinning.
OPENAT2_ATTEMPTS = 16

# openat2's number: 437 in the table shared by x86_64 and aarch64 (checked
# there); other machines use the walk.
_OPENAT2_NUMBERS = {"x86_64": 437, "aarch64": 437}
# linux/openat2.h
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
# A file to serve: never block (a FIFO), never become our terminal.
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# A folder on the way (walk): a symlink or anything but a folder fails.
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What openat/O_NOFOLLOW answers for a symlink: ELOOP (Linux), ENOTDIR with
# O_DIRECTORY (Linux), EMLINK (FreeBSD), EFTYPE (NetBSD).
_MAYBE_SYMLINK = {
    errno.ELOOP,
    errno.ENOTDIR,
    errno.EMLINK,
    getattr(errno, "EFTYPE", errno.ELOOP),
}


class _OpenHow(ctypes.Structure):
    """struct open_how (linux/openat2.h)."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


OpenAt2 = Callable[[int, bytes, int, int], int]


def _find_openat2() -> OpenAt2 | None:
    """
    openat2(dir_fd, path, flags, resolve) -> fd through libc's syscall(2)
    (there is no glibc wrapper, nor an ``os.openat2``), or None where the
    system cannot have it.  It raises OSError like ``os.open``.
    """
    number = _OPENAT2_NUMBERS.get(platform.machine())
    if not sys.platform.startswith("linux") or number is None:
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    size = ctypes.c_size_t(ctypes.sizeof(_OpenHow))

    def openat2(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
        how = _OpenHow(flags, 0, resolve)
        # ctypes releases the GIL for the call: other threads run meanwhile.
        fd = syscall(
            ctypes.c_long(number), ctypes.c_int(dir_fd), path, ctypes.byref(how), size
        )
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return int(fd)

    return openat2


_openat2 = _find_openat2()


@dataclass
class OpenedFile:
    """A file opened for serving: the descriptor is ours to close."""

    name: str
    fd: int
    size: int
    # (device, inode, size, mtime_ns, ctime_ns): what the index compares.
    identity: tuple[int, int, int, int, int]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _refusal(error: OSError) -> WireError:
    """The documented answer to a lookup that failed with C{error}."""
    if error.errno == errno.ENOENT:
        return WireError(Code.NOT_FOUND, "no such file")
    if error.errno == errno.EXDEV:
        # openat2: a "..", an absolute symlink or a mount leads out.
        return WireError(Code.FORBIDDEN, "name leads outside the share folder")
    if error.errno == errno.ELOOP:
        return WireError(Code.FORBIDDEN, "too many symlinks, or a symlink loop")
    # ENOTDIR, EACCES, ENXIO (a socket), ENAMETOOLONG, EAGAIN at every try...
    return WireError(Code.FORBIDDEN, f"cannot open: {error.strerror}")


class ShareFolder:
    """
    The files one peer serves.

    The folder is opened once, here, and every lookup starts from that
    descriptor: moving the folder later changes nothing, replacing it (a
    new folder under the same path) needs a restart.

    :param root: the folder; only files inside it are ever read.
    :param include_hidden: also serve names with a component starting with
        a dot.
    :param openat2: resolve names with openat2 (True) or by walking them
        (False); None (the default) asks the kernel once, here.  For tests.
    """

    def __init__(
        self, root: str, include_hidden: bool = False, openat2: bool | None = None
    ) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise ValueError(f"share folder {root!r} is not a directory")
        self.include_hidden = include_hidden
        try:
            self._root_fd = os.open(self.root, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ValueError(f"share folder {root!r}: {e.strerror}") from None
        weakref.finalize(self, os.close, self._root_fd)
        if openat2 is None:
            openat2 = self._probe_openat2()
        elif openat2 and _openat2 is None:
            raise ValueError("openat2 is not available on this system")
        #: How names are resolved: ``"openat2"`` or ``"walk"``.
        self.resolver = "openat2" if openat2 else "walk"

    def _probe_openat2(self) -> bool:
        """Whether openat2 works here: kernel older than 5.6 (ENOSYS), or a
        seccomp filter (EPERM), or not Linux at all mean the walk.  The name
        is the folder itself, so nothing in the share can sway the answer."""
        if _openat2 is None:
            return False
        try:
            fd = _openat2(
                self._root_fd,
                b".",
                _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
            )
        except OSError:
            return False
        os.close(fd)
        return True

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

    def open(self, name: str) -> OpenedFile:
        """
        Open C{name} for serving.

        Relative symlinks are followed while they stay inside the folder;
        absolute ones are refused wherever they point, and so, unless hidden
        files are shared, is a symlink that leads to a hidden file or to
        twistd's files.

        :raise WireError: 403 for names that escape the folder or are not
            regular files (or cannot be opened), 404 for missing files.
            Never an OSError.
        """
        parts = self._check_name(name)
        try:
            if self.resolver == "openat2":
                fd = self._open_beneath(name)
            else:
                fd = self._open_walking(parts)
        except OSError as e:
            raise _refusal(e) from None
        except UnicodeEncodeError:  # not from the wire, which is UTF-8
            raise WireError(Code.FORBIDDEN, "name cannot be encoded") from None
        try:
            info = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise _refusal(e) from None
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise WireError(Code.FORBIDDEN, "not a regular file")
        # As the index's (p2p.index._identity): change time included.
        identity = (
            info.st_dev,
            info.st_ino,
            info.st_size,
            info.st_mtime_ns,
            info.st_ctime_ns,
        )
        return OpenedFile(name, fd, info.st_size, identity)

    # -- openat2 ---------------------------------------------------------------

    def _openat2_retrying(self, path: bytes, resolve: int) -> int:
        assert _openat2 is not None
        for _ in range(OPENAT2_ATTEMPTS - 1):
            try:
                return _openat2(self._root_fd, path, _FILE_FLAGS, resolve)
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise
        return _openat2(self._root_fd, path, _FILE_FLAGS, resolve)

    def _open_beneath(self, name: str) -> int:
        """(openat2) A descriptor of C{name}, resolved beneath the folder."""
        path = os.fsencode(name)
        beneath = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
        try:
            # Most names hold no symlink: then the path is the name, whose
            # every component _check_name has already seen.
            return self._openat2_retrying(path, beneath | RESOLVE_NO_SYMLINKS)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
        # A symlink on the way: the kernel follows it, still beneath the
        # folder (not a fallback: the same guarantee, more work).
        fd = self._openat2_retrying(path, beneath)
        if not self.include_hidden:
            try:
                self._check_landing(fd)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _check_landing(self, fd: int) -> None:
        """
        (openat2) Refuse the file behind C{fd}, reached through a symlink,
        if its own name is not one we serve (a hidden file, twistd's files):
        a visible link must not expose what its target's name hides.  The
        kernel says where the descriptor is, relative to where the folder's
        is now (Linux /proc).
        """
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
            root = os.readlink(f"/proc/self/fd/{self._root_fd}")
        except OSError:
            raise WireError(
                Code.FORBIDDEN, "cannot tell where a symlink leads (no /proc)"
            ) from None
        if where == root:
            return  # the folder itself ("here" -> "."): not a regular file
        prefix = root.rstrip("/") + "/"
        if not where.startswith(prefix):
            raise WireError(Code.FORBIDDEN, "name leads outside the share folder")
        self._check_name(where[len(prefix) :])

    # -- the walk --------------------------------------------------------------

    def _open_walking(self, parts: list[str]) -> int:
        """
        (walk) A descriptor of the file C{parts} names, found one component
        at a time from the folder's descriptor.  Symlinks met on the way are
        read (relative to the folder holding them) and their targets
        resolved the same way: an absolute target, or a ``..`` above the
        share folder, is refused.  ``..`` goes back to a descriptor we hold,
        never asks the file system, so a folder moved meanwhile cannot lead
        out.
        """
        held: list[tuple[str, int]] = []  # the folders below the root, in order
        pending = deque(parts)
        links = 0
        try:
            while pending:
                part = pending.popleft()
                if part in ("", "."):
                    continue  # only from a symlink's target ("a//b", "./a")
                if part == "..":
                    if not held:
                        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
                    os.close(held.pop()[1])
                    continue
                parent = held[-1][1] if held else self._root_fd
                last = not pending
                flags = _FILE_FLAGS | os.O_NOFOLLOW if last else _FOLDER_FLAGS
                try:
                    fd = os.open(part, flags, dir_fd=parent)
                except OSError as e:
                    if e.errno not in _MAYBE_SYMLINK:
                        raise
                    try:
                        target = os.readlink(part, dir_fd=parent)
                    except OSError:
                        raise e from None  # not a symlink: a file, say
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
                    if target.startswith("/"):
                        # As openat2's RESOLVE_BENEATH: even one that would
                        # land inside the share folder.
                        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV)) from None
                    pending.extendleft(reversed(target.split("/")))
                    continue
                if last:
                    if links and not self.include_hidden:
                        self._check_resolved(fd, [name for name, _ in held] + [part])
                    return fd
                held.append((part, fd))
            # The name ended on a folder ("here" -> ".", "up" -> "sub/..").
            raise WireError(Code.FORBIDDEN, "not a regular file")
        finally:
            for _, fd in held:
                os.close(fd)

    def _check_resolved(self, fd: int, resolved: list[str]) -> None:
        """(walk) What L{_check_landing} does, for a path we resolved."""
        try:
            self._check_name("/".join(resolved))
        except WireError:
            os.close(fd)
            raise

    # -- listing ---------------------------------------------------------------

    def open_folder(self, folder: str) -> int:
        """
        (Blocking.) A descriptor of C{folder} (``""``: the share folder,
        else a share-relative name such as ``"a/b"``) for lookups relative
        to it, the caller's to close.  Opened one component at a time with
        ``O_NOFOLLOW | O_DIRECTORY``: no symlink is followed, so whatever is
        swapped meanwhile, the folder is inside the share.

        :raise OSError: when a component is missing, not a folder, or a
            symlink.
        """
        fd = os.open(".", _FOLDER_FLAGS, dir_fd=self._root_fd)
        for part in folder.split("/") if folder else []:
            try:
                if part in ("", ".", ".."):
                    raise OSError(errno.EINVAL, f"not a folder name: {folder!r}")
                child = os.open(part, _FOLDER_FLAGS, dir_fd=fd)
            finally:
                os.close(fd)
            fd = child
        return fd

    def walk(self) -> Iterator[tuple[str, list[str], list[str], int]]:
        """
        (Blocking.) Walk the folder top-down, like ``os.fwalk``: yield
        ``(folder, dirnames, filenames, dir_fd)`` for the share folder
        (``folder`` is ``""``) and each folder below it (``"a/b"``).

        Each folder is opened relative to its parent's descriptor with
        ``O_NOFOLLOW | O_DIRECTORY``, so a folder swapped for a symlink while
        the walk runs is skipped, never followed: nothing outside the share
        is ever listed.  Symlinks to folders appear in C{dirnames} (as
        ``os.walk`` puts them) and are never entered.  Remove names from
        C{dirnames} to skip those folders.  C{dir_fd} holds the folder
        listed until the next step; look its names up relative to it.

        Any depth works: the walk keeps its own stack (a recursion, one
        Python frame per folder, failed at about a thousand levels and took
        the whole scan with it), and holds at most L{WALK_DESCRIPTORS}
        folder descriptors besides the share folder's (one per level ran
        into the descriptor limit).

        :raise OSError: if the share folder itself was removed.
        """
        top = self.open_folder("")
        try:
            if os.fstat(top).st_nlink == 0:
                # Listing a removed folder would say every file went.
                raise OSError(errno.ENOENT, "the share folder was removed", self.root)
            yield from _walk_below(top)
        finally:
            os.close(top)


# Folder descriptors a walk holds at once below the share folder, at most:
# the deepest folders on its way down.  Coming back up to a folder whose
# descriptor went, for its next subfolder, the walk opens it again from the
# deepest one it still holds, one component at a time without following
# symlinks (as open_folder does).
WALK_DESCRIPTORS = 32


@dataclass
class _Level:
    """One folder on a walk's way down, and how far through it the walk is."""

    folder: str  # share-relative; "" for the share folder
    name: str  # its last component (its name in the folder above)
    fd: int | None  # None once closed to keep within WALK_DESCRIPTORS
    dirnames: list[str]  # the list yielded: the caller may prune it
    next: int = 0  # the index in dirnames of the next subfolder to enter


def _list(fd: int) -> tuple[list[str], list[str]]:
    """The names of the subfolders and of the other entries in C{fd}."""
    dirnames: list[str] = []
    filenames: list[str] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            (dirnames if is_dir else filenames).append(entry.name)
    return dirnames, filenames


def _walk_below(top: int) -> Iterator[tuple[str, list[str], list[str], int]]:
    """
    The walk of L{ShareFolder.walk} from C{top} (the caller's descriptor of
    the share folder, which is never closed here), depth first, a folder
    before what it holds and its subfolders in the order of its
    C{dirnames} as the caller left them.
    """
    dirnames, filenames = _list(top)
    way = [_Level("", "", top, dirnames)]
    held = 0  # descriptors held below the share folder, on the way
    try:
        yield "", dirnames, filenames, top
        while way:
            level = way[-1]
            if level.next >= len(level.dirnames):
                way.pop()
                if level.fd is not None and way:
                    os.close(level.fd)  # (not the share folder's: way[0])
                    held -= 1
                continue
            dirname = level.dirnames[level.next]
            level.next += 1
            if level.fd is None:
                reopened = _reopen(way)
                if reopened is None:
                    # Moved or removed since it was listed: what it held
                    # now is for the next scan to find.
                    level.next = len(level.dirnames)
                    continue
                level.fd = reopened
                held += 1
            try:
                child = os.open(dirname, _FOLDER_FLAGS, dir_fd=level.fd)
            except OSError:
                continue  # a symlink, or gone or unreadable since it was listed
            held += 1
            folder = f"{level.folder}/{dirname}" if level.folder else dirname
            way.append(_Level(folder, dirname, child, []))
            while held > WALK_DESCRIPTORS:
                # Let go of the shallowest: the walk needs it again only
                # once everything below it is done, if it has more
                # subfolders.
                shallowest = next(lv for lv in way[1:] if lv.fd is not None)
                fd, shallowest.fd = shallowest.fd, None
                os.close(fd)
                held -= 1
            way[-1].dirnames, filenames = _list(child)
            yield folder, way[-1].dirnames, filenames, child
    finally:
        for level in way[1:]:
            if level.fd is not None:
                os.close(level.fd)


def _reopen(way: list[_Level]) -> int | None:
    """
    A new descriptor of the last folder on C{way}, opened from the deepest
    folder above it whose descriptor is still held (the share folder's, at
    worst), one component at a time with ``O_NOFOLLOW | O_DIRECTORY``: a
    folder swapped for a symlink meanwhile is never followed.  C{None} if a
    component is no longer a folder there.
    """
    start = max(i for i, level in enumerate(way) if level.fd is not None)
    fd = way[start].fd
    assert fd is not None
    opened: int | None = None  # ours to close, unlike way[start].fd
    try:
        for level in way[start + 1 :]:
            child = os.open(level.name, _FOLDER_FLAGS, dir_fd=fd)
            if opened is not None:
                os.close(opened)
            opened = fd = child
    except OSError:
        if opened is not None:
            os.close(opened)
        return None
    return opened
