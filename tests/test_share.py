"""Tests for L{p2p.share}: name resolution, and what a peer lists of it.

Every name a client sends is hostile until proven otherwise, so most of this
module is a corpus of names that must never yield a byte from outside the
share folder, tried against L{ShareFolder.open} and, through a real peer
(which answers from its share's index, see L{tests._indexed}), on the wire.
Each test builds its own folder on disk (files, symlinks, FIFOs) in a
temporary directory removed afterwards.  Hashing and staleness are the
index's business: L{tests.test_index}, and L{tests.test_peer} for what a
client sees of them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator

from blake3 import blake3
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.monkey import MonkeyPatcher
from twisted.trial.unittest import SynchronousTestCase

import p2p.index
import p2p.share
from p2p import wire
from p2p.limits import ReadGate
from p2p.peer import PeerFactory
from p2p.pieces import PIECE_SIZE, root_of
from p2p.share import MAX_SYMLINKS, OPENAT2_ATTEMPTS, OpenedFile, ShareFolder
from p2p.wire import Code, WireError
from tests._indexed import indexed, peer_factory, run_inline
from tests._support import descriptors

SECRET = b"TOP SECRET: outside the share folder\n"
A_CONTENT = b"alpha file\n"
B_CONTENT = b"bravo file, in a subfolder\n"
C_CONTENT = b"charlie, two levels down\n"


def temp_dir(case: SynchronousTestCase) -> str:
    """
    A fresh absolute temporary directory, removed when C{case} ends.

    Not C{case.mktemp()}: under pytest that creates relative directories in
    the checkout, which nothing cleans up.
    """
    path = tempfile.mkdtemp(prefix="p2p-test-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def write(path: str, data: bytes) -> str:
    """Create C{path} (and its parents) holding C{data}."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as stream:
        stream.write(data)
    return path


def open_descriptor_count() -> int:
    """
    How many file descriptors this process holds (Linux /proc), leaving
    out the share folders' own (L{tests._support.descriptors}).
    """
    return len(descriptors())


def digests_of(data: bytes) -> bytes:
    """The concatenated BLAKE3 digests of C{data}'s pieces, computed here
    (not with L{p2p.pieces}' hashing)."""
    return b"".join(
        blake3(data[offset : offset + PIECE_SIZE]).digest()
        for offset in range(0, len(data), PIECE_SIZE)
    )


def root_hex(data: bytes) -> str:
    """The root of C{data}, as it goes on the wire."""
    return root_of(len(data), PIECE_SIZE, digests_of(data)).hex()


def read_listing(
    factory: PeerFactory, limit: int | None = None
) -> list[wire.FileEntry]:
    """
    Everything one connection to C{factory}'s peer lists (following
    ``next=`` cursors, C{limit} entries a page), checking that every line
    reads back exactly as it was sent.  The connection is lost afterwards.
    """
    protocol = factory.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    transport.clear()
    request = wire.ListFiles(limit)
    entries: list[wire.FileEntry] = []
    for _ in range(1000):
        protocol.dataReceived(request.to_line() + b"\n")
        lines = transport.value().split(b"\n")
        transport.clear()
        assert lines.pop() == b"", "the answer ends with a line end"
        count, cursor = wire.parse_listing_header(lines[0], wire.MAX_FILES_PER_PAGE)
        assert count == len(lines) - 1, lines[0]
        for line in lines[1:]:
            entry = wire.FileEntry.from_line(line)
            assert entry.to_line() == line, line
            entries.append(entry)
        if cursor is None:
            break
        request = wire.ListFiles(limit, cursor)
    protocol.connectionLost(Failure(ConnectionDone()))
    return entries


@contextlib.contextmanager
def fails_instead_of_hanging(seconds: float = 5.0) -> Iterator[None]:
    """
    Turn a blocking system call that should never block into a test failure.

    No sleeping: a one-shot interval timer interrupts the call only if the
    code under test regressed (say, a FIFO opened without O_NONBLOCK).
    """

    def interrupted(signum, frame):
        raise AssertionError(f"blocked for more than {seconds}s")

    previous = signal.signal(signal.SIGALRM, interrupted)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def build_tree(case: SynchronousTestCase) -> tuple[str, str]:
    """
    Lay out a share folder next to content that must stay private.

    Returns C{(base, root)}: C{root} is the share folder, C{base} its parent,
    which also holds C{outside/secret.txt}, a sibling folder whose name starts
    with the share's name (C{share-evil}, to catch prefix comparisons) and a
    file literally named ``%2e%2e``-nothing.
    """
    base = temp_dir(case)
    root = os.path.join(base, "share")
    write(os.path.join(base, "outside", "secret.txt"), SECRET)
    write(os.path.join(base, "share-evil", "secret.txt"), SECRET)
    write(os.path.join(base, "secret.txt"), SECRET)

    write(os.path.join(root, "a.txt"), A_CONTENT)
    write(os.path.join(root, "sub", "b.txt"), B_CONTENT)
    write(os.path.join(root, "sub", "deeper", "c.txt"), C_CONTENT)
    os.makedirs(os.path.join(root, "empty-dir"))
    write(os.path.join(root, ".secret"), b"hidden at the top\n")
    write(os.path.join(root, "sub", ".x"), b"hidden in a subfolder\n")
    write(os.path.join(root, ".hidden-dir", "h.txt"), b"in a hidden folder\n")

    def link(target: str, name: str) -> None:
        os.symlink(target, os.path.join(root, name))

    link("../outside/secret.txt", "out")  # a file outside
    link(os.path.join(base, "outside", "secret.txt"), "out-absolute")
    link("../outside", "outdir")  # a directory outside
    link("../share-evil/secret.txt", "evil-prefix")
    link("chain2", "chain1")  # chain1 -> chain2 -> chain3 -> outside
    link("chain3", "chain2")
    link("../secret.txt", "chain3")
    link("loop2", "loop1")  # a cycle
    link("loop1", "loop2")
    link("nothing-here.txt", "dangling-in")
    link("../outside/nothing-here.txt", "dangling-out")
    link("sub", "indir")  # a directory inside
    link("a.txt", "inlink")  # a file inside: allowed
    link(".secret", "to-hidden")  # a visible name for a hidden file
    link("/", "root-link")
    link("/dev/zero", "zero-link")  # endless device files, outside
    link("/dev/urandom", "urandom-link")
    os.mkfifo(os.path.join(root, "pipe"))
    link("pipe", "fifo-link")  # a FIFO inside, through a symlink
    return base, root


def require_openat2(case: SynchronousTestCase) -> None:
    """Skip C{case} where openat2 cannot be used (not Linux 5.6+)."""
    probe = tempfile.mkdtemp(prefix="p2p-test-")
    case.addCleanup(shutil.rmtree, probe, True)
    if ShareFolder(probe).resolver != "openat2":
        case.skipTest("openat2 is not available here")


class ShareTestMixin:
    """
    Builds the standard tree and opens names in it, resolved the way
    C{openat2} says (None: whatever the system offers, True: openat2, False:
    the walk), in every share the test makes with L{folder}.
    """

    openat2: bool | None = None

    def setUp(self) -> None:
        if self.openat2:
            require_openat2(self)
        self.base, self.root = build_tree(self)
        self.share = self.folder()

    def folder(self, root: str | None = None, **options) -> ShareFolder:
        """A share of C{root} (the tree by default), resolving as the class says."""
        return ShareFolder(root or self.root, openat2=self.openat2, **options)

    def read_all(self, opened: OpenedFile) -> bytes:
        """The content of an opened file, closing it."""
        try:
            return os.pread(opened.fd, opened.size + 1, 0)
        finally:
            opened.close()

    def assertRefused(self, name: str, code: Code, share: ShareFolder | None = None):
        """Opening C{name} fails with C{code} (and never returns a file)."""
        share = share or self.share
        before = open_descriptor_count()
        with fails_instead_of_hanging():
            error = self.assertRaises(WireError, share.open, name)
        self.assertEqual((error.code, name), (code, name), f"{name!r}: {error.message}")
        self.assertEqual(open_descriptor_count(), before, f"{name!r} leaked an fd")
        return error


# THE hostile-name corpus.  Each name maps to the code ShareFolder.open must
# give it: 403 for everything the name rules or the real-path check refuse
# (traversal, absolute, Windows separators, NUL, hidden, symlinks leading
# out, directories, FIFOs, devices), 404 for names that are merely absent
# (percent-encoding and look-alike dots are not decoded: they are literal,
# missing names, and therefore harmless).  WireCorpusTests sends every one
# through a real PeerProtocol as well.
HOSTILE_NAMES: dict[str, Code] = {
    # dot-dot, in all spellings
    "..": Code.FORBIDDEN,
    "../secret.txt": Code.FORBIDDEN,
    "../outside/secret.txt": Code.FORBIDDEN,
    "../../etc/passwd": Code.FORBIDDEN,
    "a/../../secret.txt": Code.FORBIDDEN,
    "a.txt/../../secret.txt": Code.FORBIDDEN,
    "sub/../../outside/secret.txt": Code.FORBIDDEN,
    "sub/../a.txt": Code.FORBIDDEN,  # even when it would stay inside
    "../secret.txt ": Code.FORBIDDEN,
    "...": Code.FORBIDDEN,  # hidden: starts with a dot
    "sub/...": Code.FORBIDDEN,
    # absolute paths
    "/etc/passwd": Code.FORBIDDEN,
    "/secret.txt": Code.FORBIDDEN,
    "//etc/passwd": Code.FORBIDDEN,
    "/dev/zero": Code.FORBIDDEN,
    "file:///etc/passwd": Code.FORBIDDEN,
    # Windows separators, drives and UNC paths
    "..\\secret.txt": Code.FORBIDDEN,
    "..\\..\\etc\\passwd": Code.FORBIDDEN,
    "sub\\b.txt": Code.FORBIDDEN,
    "sub\\..\\..\\secret.txt": Code.FORBIDDEN,
    "\\etc\\passwd": Code.FORBIDDEN,
    "C:\\Windows\\win.ini": Code.FORBIDDEN,
    "\\\\server\\share\\secret.txt": Code.FORBIDDEN,
    "C:/Windows/win.ini": Code.NOT_FOUND,
    # percent-encoding and look-alike dots: never decoded
    "%2e%2e/secret.txt": Code.NOT_FOUND,
    "%2E%2E/secret.txt": Code.NOT_FOUND,
    "%2e%2e%2fsecret.txt": Code.NOT_FOUND,
    "%252e%252e/secret.txt": Code.NOT_FOUND,
    "%2fetc%2fpasswd": Code.NOT_FOUND,
    "..%2fsecret.txt": Code.FORBIDDEN,  # hidden: starts with a dot
    "..%5csecret.txt": Code.FORBIDDEN,  # hidden: starts with a dot
    "%2e%2e": Code.NOT_FOUND,
    "\uff0e\uff0e/secret.txt": Code.NOT_FOUND,  # fullwidth full stops
    "\u2024\u2024/secret.txt": Code.NOT_FOUND,  # one-dot leaders
    # empty and dot components
    "sub//b.txt": Code.FORBIDDEN,
    "a.txt/": Code.FORBIDDEN,
    "sub/": Code.FORBIDDEN,
    "./a.txt": Code.FORBIDDEN,
    "sub/./b.txt": Code.FORBIDDEN,
    ".": Code.FORBIDDEN,
    "": Code.FORBIDDEN,
    # NUL
    "a.txt\x00": Code.FORBIDDEN,
    "a.txt\x00.jpg": Code.FORBIDDEN,
    "\x00../secret.txt": Code.FORBIDDEN,
    # overlong names (longer than a component or than a path may be)
    "x" * 300: Code.FORBIDDEN,
    "x" * 901: Code.FORBIDDEN,
    # symlinks, and chains of them, pointing out
    "out": Code.FORBIDDEN,
    "out-absolute": Code.FORBIDDEN,
    "outdir": Code.FORBIDDEN,
    "outdir/secret.txt": Code.FORBIDDEN,
    "evil-prefix": Code.FORBIDDEN,
    "chain1": Code.FORBIDDEN,
    "chain2": Code.FORBIDDEN,
    "chain3": Code.FORBIDDEN,
    "dangling-out": Code.FORBIDDEN,
    "root-link": Code.FORBIDDEN,
    "root-link/etc/passwd": Code.FORBIDDEN,
    "root-link/dev/zero": Code.FORBIDDEN,
    "loop1": Code.FORBIDDEN,
    "loop2": Code.FORBIDDEN,
    # device files, a FIFO, directories: not regular files
    "zero-link": Code.FORBIDDEN,
    "urandom-link": Code.FORBIDDEN,
    "pipe": Code.FORBIDDEN,
    "fifo-link": Code.FORBIDDEN,
    "sub": Code.FORBIDDEN,
    "empty-dir": Code.FORBIDDEN,
    "sub/deeper": Code.FORBIDDEN,
    "indir": Code.FORBIDDEN,
    ".hidden-dir": Code.FORBIDDEN,
    # hidden files, and a visible symlink to one
    ".secret": Code.FORBIDDEN,
    "sub/.x": Code.FORBIDDEN,
    ".hidden-dir/h.txt": Code.FORBIDDEN,
    "to-hidden": Code.FORBIDDEN,
}

# The corpus entries refused only for being hidden, and what they become when
# hidden files are shared (``--include-hidden``): served (the file's bytes),
# or a plain 404 for a literal name that does not exist.  Every other entry
# is refused exactly the same way with hidden files shared.
HIDDEN_ONLY: dict[str, bytes | Code] = {
    "...": Code.NOT_FOUND,
    "sub/...": Code.NOT_FOUND,
    "..%2fsecret.txt": Code.NOT_FOUND,
    "..%5csecret.txt": Code.NOT_FOUND,
    ".secret": b"hidden at the top\n",
    "sub/.x": b"hidden in a subfolder\n",
    ".hidden-dir/h.txt": b"in a hidden folder\n",
    "to-hidden": b"hidden at the top\n",
}


class NameResolutionTests(ShareTestMixin, SynchronousTestCase):
    """L{ShareFolder.open} serves regular files inside the folder only."""

    def test_plain_file(self) -> None:
        """A plain name opens the file; size and content are exact."""
        opened = self.share.open("a.txt")
        self.assertEqual(opened.name, "a.txt")
        self.assertEqual(opened.size, len(A_CONTENT))
        self.assertEqual(self.read_all(opened), A_CONTENT)

    def test_nested_file(self) -> None:
        """Slash-separated names reach files in subfolders."""
        self.assertEqual(self.read_all(self.share.open("sub/b.txt")), B_CONTENT)
        self.assertEqual(self.read_all(self.share.open("sub/deeper/c.txt")), C_CONTENT)

    def test_symlink_inside(self) -> None:
        """A symlink to a file inside the folder is served with its content."""
        self.assertEqual(self.read_all(self.share.open("inlink")), A_CONTENT)

    def test_symlinked_directory_inside(self) -> None:
        """A name through a symlink to a folder inside the share is served."""
        self.assertEqual(self.read_all(self.share.open("indir/b.txt")), B_CONTENT)

    def test_hostile_corpus(self) -> None:
        """
        Every hostile name is refused with its expected code, leaks no
        descriptor, and never yields a file (let alone outside content).
        """
        for name, code in HOSTILE_NAMES.items():
            self.assertRefused(name, code)

    def test_hostile_corpus_with_hidden_files_allowed(self) -> None:
        """
        Allowing hidden files relaxes nothing else in the corpus: the
        hidden-only refusals are served or become plain 404s.
        """
        share = self.folder(include_hidden=True)
        for name, code in HOSTILE_NAMES.items():
            expected = HIDDEN_ONLY.get(name, code)
            if isinstance(expected, bytes):
                self.assertEqual(self.read_all(share.open(name)), expected, name)
            else:
                self.assertRefused(name, expected, share)

    def test_absolute_name_of_a_file_inside(self) -> None:
        """The absolute path of a shared file is refused all the same."""
        self.assertRefused(os.path.join(self.root, "a.txt"), Code.FORBIDDEN)

    def test_missing(self) -> None:
        """A missing name is 404, a dangling symlink inside too."""
        self.assertRefused("no-such-file.txt", Code.NOT_FOUND)
        self.assertRefused("sub/missing/deeper.txt", Code.NOT_FOUND)
        self.assertRefused("dangling-in", Code.NOT_FOUND)

    def test_directory(self) -> None:
        """Directories, and symlinks to them, are not files: 403."""
        for name in ("sub", "empty-dir", "sub/deeper", "indir"):
            self.assertRefused(name, Code.FORBIDDEN)

    def test_fifo(self) -> None:
        """A FIFO without a writer is refused at once instead of blocking."""
        error = self.assertRefused("pipe", Code.FORBIDDEN)
        self.assertIn("not a regular file", error.message)

    def test_fifo_through_symlink(self) -> None:
        """A symlink to a FIFO is refused without blocking, too."""
        self.assertRefused("fifo-link", Code.FORBIDDEN)

    def test_device_inside(self) -> None:
        """
        A device node inside the folder (/dev/zero's numbers) is not a
        regular file: refused, even with hidden files shared.  Skipped where
        the process may not create device nodes.
        """
        path = os.path.join(self.root, "zero-device")
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
        except OSError:
            self.skipTest("cannot create device nodes here")
        self.assertRefused("zero-device", Code.FORBIDDEN)
        share = self.folder(include_hidden=True)
        self.assertRefused("zero-device", Code.FORBIDDEN, share)

    def test_hidden_refused_by_default(self) -> None:
        """Names with a component starting with a dot are not shared."""
        for name in (".secret", "sub/.x", ".hidden-dir/h.txt", ".hidden-dir"):
            self.assertRefused(name, Code.FORBIDDEN)

    def test_symlink_to_hidden_refused_by_default(self) -> None:
        """A visible symlink cannot expose a hidden file."""
        self.assertRefused("to-hidden", Code.FORBIDDEN)

    def test_hidden_served_when_included(self) -> None:
        """With C{include_hidden} hidden files and links to them are served."""
        share = self.folder(include_hidden=True)
        self.assertEqual(self.read_all(share.open(".secret")), b"hidden at the top\n")
        self.assertEqual(
            self.read_all(share.open("sub/.x")), b"hidden in a subfolder\n"
        )
        self.assertEqual(
            self.read_all(share.open(".hidden-dir/h.txt")), b"in a hidden folder\n"
        )
        self.assertEqual(self.read_all(share.open("to-hidden")), b"hidden at the top\n")

    def test_name_starting_with_two_dots(self) -> None:
        """
        A file whose name merely starts with ``..`` (``..notes``) is inside
        the folder: with hidden files included it is served, not mistaken
        for a path leading outside.
        """
        write(os.path.join(self.root, "..notes"), b"dots\n")
        share = self.folder(include_hidden=True)
        self.assertEqual(self.read_all(share.open("..notes")), b"dots\n")
        self.assertRefused("..notes", Code.FORBIDDEN)  # hidden by default

    def test_root_given_through_symlink(self) -> None:
        """A share folder named through a symlink still confines names."""
        alias = os.path.join(self.base, "alias")
        os.symlink(self.root, alias)
        share = self.folder(alias)
        self.assertEqual(self.read_all(share.open("a.txt")), A_CONTENT)
        self.assertRefused("out", Code.FORBIDDEN, share)
        self.assertRefused("../outside/secret.txt", Code.FORBIDDEN, share)

    def test_not_a_directory(self) -> None:
        """A share folder that is not a directory is refused up front."""
        self.assertRaises(ValueError, ShareFolder, os.path.join(self.root, "a.txt"))
        self.assertRaises(ValueError, ShareFolder, os.path.join(self.base, "nope"))

    def test_unreadable_file(self) -> None:
        """A file the process cannot open is 403 (skipped when running as root)."""
        path = write(os.path.join(self.root, "locked.txt"), b"locked\n")
        os.chmod(path, 0)
        if os.access(path, os.R_OK):
            self.skipTest("running as root: every file is readable")
        self.assertRefused("locked.txt", Code.FORBIDDEN)

    def test_opened_file_close_is_idempotent(self) -> None:
        """Closing an L{OpenedFile} twice is harmless; the fd is released."""
        opened = self.share.open("a.txt")
        fd = opened.fd
        opened.close()
        opened.close()
        self.assertEqual(opened.fd, -1)
        self.assertRaises(OSError, os.fstat, fd)


class NameResolutionWalkTests(NameResolutionTests):
    """The same, with names resolved by the walk (as where openat2 is missing)."""

    openat2 = False


# -- symlinks and swapped folders (issue 9) ----------------------------------

INSIDE = b"the file inside the share\n"


class HookedOS:
    """
    Stands in for the C{os} module of L{p2p.share} and L{p2p.index} (and
    for openat2): C{hook(name)} runs just before each file-system call,
    which C{calls} records by name.  A hook can swap a folder at any step
    of a lookup, deterministically, or make a call fail.  Everything else
    is the real C{os}.
    """

    CALLS = frozenset({"open", "readlink", "stat", "lstat", "fstat", "scandir"})

    def __init__(self, hook) -> None:
        self.hook = hook
        self.calls: list[str] = []

    def _wrap(self, name: str, function):
        def call(*args, **kwargs):
            self.calls.append(name)
            self.hook(name)
            return function(*args, **kwargs)

        return call

    def __getattr__(self, name: str):
        value = getattr(os, name)
        return self._wrap(name, value) if name in self.CALLS else value

    def run(self, function, *args, **kwargs):
        """C{function(*args, **kwargs)} with the modules' calls routed here."""
        patcher = MonkeyPatcher((p2p.share, "os", self), (p2p.index, "os", self))
        if p2p.share._openat2 is not None:
            openat2 = self._wrap("openat2", p2p.share._openat2)
            patcher.addPatch(p2p.share, "_openat2", openat2)
        return patcher.runWithPatches(function, *args, **kwargs)


def swap_at(step: int, swap):
    """A L{HookedOS} that runs C{swap()} before its C{step}-th call (from 0)."""
    hooked = HookedOS(lambda name: swap() if len(hooked.calls) == step + 1 else None)
    return hooked


def fail(calls: str, code: int, times: int = 1_000_000):
    """A L{HookedOS} whose first C{times} calls named C{calls} fail with C{code}."""
    failed = []

    def hook(name: str) -> None:
        if name == calls and len(failed) < times:
            failed.append(name)
            raise OSError(code, os.strerror(code))

    return HookedOS(hook)


def swap_tree(case: SynchronousTestCase, absolute: bool = False):
    """
    A share whose folder C{e} holds C{secret.txt} (L{INSIDE}) and
    C{inside-only.txt}, beside a folder outside holding another
    C{secret.txt} (L{SECRET}) and C{only-outside.txt}, and a symlink to
    that outside folder (relative or C{absolute}), hidden in the share.
    Returns C{(root, swap, outside)}: C{swap()} exchanges C{e} and the
    symlink by three renames (so C{e} is a folder, missing, or the link).
    """
    base = temp_dir(case)
    root = os.path.join(base, "share")
    outside = os.path.join(base, "outside")
    write(os.path.join(root, "e", "secret.txt"), INSIDE)
    write(os.path.join(root, "e", "inside-only.txt"), INSIDE)
    write(os.path.join(root, "top.txt"), A_CONTENT)
    write(os.path.join(outside, "secret.txt"), SECRET)
    write(os.path.join(outside, "only-outside.txt"), SECRET)
    link = os.path.join(root, ".e-link")
    os.symlink(outside if absolute else "../outside", link)
    folder, spare = os.path.join(root, "e"), os.path.join(root, ".e-spare")

    def swap() -> None:
        os.rename(folder, spare)
        os.rename(link, folder)
        os.rename(spare, link)

    return root, swap, outside


class SymlinkTests(ShareTestMixin, SynchronousTestCase):
    """
    Symlinks, resolved with openat2: followed while relative and inside
    the share, refused otherwise; a folder swapped for a symlink to a
    folder outside, at any step of a lookup, never opens a file there.
    """

    openat2: bool | None = True

    def setUp(self) -> None:
        super().setUp()

        def link(target: str, name: str) -> None:
            os.symlink(target, os.path.join(self.root, *name.split("/")))

        link("../../a.txt", "sub/deeper/up")  # a ".." that stays inside
        link("../sub/deeper", "sub/down")
        link(os.path.join(self.root, "a.txt"), "abs-inside")
        link(os.path.join(self.root, "sub"), "abs-dir")
        link(os.path.join(self.base, "outside"), "outdir-abs")
        link("self", "self")
        link(".", "here")
        link(".hidden-dir", "hid")
        link("twistd.log", "log")
        write(os.path.join(self.root, "twistd.log"), b"the peer's own log\n")

    def test_symlinked_folder_to_outside(self) -> None:
        """A name through a symlink to a folder outside is refused, whether
        the link is relative or absolute and the file exists there or not."""
        for name in (
            "outdir/secret.txt",
            "outdir-abs/secret.txt",
            "outdir/missing.txt",
            "outdir-abs/missing.txt",
        ):
            self.assertRefused(name, Code.FORBIDDEN)

    def test_relative_symlinks_inside(self) -> None:
        """Relative symlinks that stay inside are followed, a ".." in their
        target included."""
        self.assertEqual(self.read_all(self.share.open("sub/deeper/up")), A_CONTENT)
        self.assertEqual(self.read_all(self.share.open("sub/down/c.txt")), C_CONTENT)
        self.assertEqual(self.read_all(self.share.open("indir/b.txt")), B_CONTENT)
        self.assertEqual(self.read_all(self.share.open("here/a.txt")), A_CONTENT)
        error = self.assertRefused("here", Code.FORBIDDEN)  # the folder itself
        self.assertEqual(error.message, "not a regular file")

    def test_absolute_symlink_refused(self) -> None:
        """An absolute symlink is refused even when it points inside."""
        self.assertRefused("abs-inside", Code.FORBIDDEN)
        self.assertRefused("abs-dir/b.txt", Code.FORBIDDEN)

    def test_symlink_loops(self) -> None:
        """
        Loops are 403, never a hang.  40 symlinks in one lookup are
        followed, a 41st is not: Linux's own limit, whichever way names are
        resolved.
        """
        for name in ("self", "loop1", "loop2", "self/a.txt"):
            self.assertRefused(name, Code.FORBIDDEN)
        many = "here/" * MAX_SYMLINKS + "a.txt"
        self.assertEqual(self.read_all(self.share.open(many)), A_CONTENT)
        self.assertRefused("here/" + many, Code.FORBIDDEN)

    def test_symlink_to_a_name_not_shared(self) -> None:
        """
        As when names were resolved with realpath(): by default a visible
        symlink, to a file or through a folder, cannot reach a hidden file
        or twistd's files; with hidden files shared, the hidden one is.
        """
        for name in ("to-hidden", "hid/h.txt", "log"):
            self.assertRefused(name, Code.FORBIDDEN)
        share = self.folder(include_hidden=True)
        self.assertEqual(
            self.read_all(share.open("hid/h.txt")), b"in a hidden folder\n"
        )

    def test_failing_calls_are_wire_errors(self) -> None:
        """
        Whatever a file-system call answers, open() raises a WireError
        (403 but for a missing file) and leaks no descriptor: the lookup
        failing, or the fstat of what it opened.
        """
        lookup = "openat2" if self.share.resolver == "openat2" else "open"
        for call, code, expected in (
            (lookup, errno.EIO, Code.FORBIDDEN),
            (lookup, errno.ENOENT, Code.NOT_FOUND),
            (lookup, errno.EACCES, Code.FORBIDDEN),
            ("fstat", errno.EIO, Code.FORBIDDEN),
        ):
            before = open_descriptor_count()
            error = fail(call, code).run(
                self.assertRaises, WireError, self.share.open, "sub/b.txt"
            )
            self.assertEqual(error.code, expected, (call, code))
            self.assertEqual(open_descriptor_count(), before, (call, code))

    def assertNeverOutside(self, absolute: bool, swapped_first: bool) -> set:
        """
        Open C{e/secret.txt} of a L{swap_tree} once for each step of the
        lookup, swapping C{e} (a folder, or first the symlink) just before
        that step; each time the answer must be the file inside or a
        refusal.  Returns the set of answers.
        """
        answers: set[bytes | Code] = set()
        for step in range(100):
            root, swap, _ = swap_tree(self, absolute)
            share = self.folder(root)
            if swapped_first:
                swap()
            hooked = swap_at(step, swap)
            try:
                answer: bytes | Code = self.read_all(
                    hooked.run(share.open, "e/secret.txt")
                )
            except WireError as error:
                answer = error.code
            self.assertIn(answer, (INSIDE, Code.FORBIDDEN, Code.NOT_FOUND), step)
            answers.add(answer)
            if len(hooked.calls) <= step:
                return answers  # the lookup ended before this step: all done
        self.fail("the lookup never ended")

    def test_folder_swapped_at_every_step(self) -> None:
        """
        The attack of issue 9, step by step: whichever call of the lookup
        the swap precedes, the file outside is never opened (realpath()
        then open() opened it when the swap came between the two).  Both
        outcomes are reached: the swap is not simply missed.
        """
        for absolute in (False, True):
            for swapped_first in (False, True):
                answers = self.assertNeverOutside(absolute, swapped_first)
                self.assertIn(INSIDE, answers)
                self.assertIn(Code.FORBIDDEN, answers)

    def test_scan_never_lists_a_swapped_folder(self) -> None:
        """
        The index's walk, with the folder swapped before any one of its
        calls: nothing of the folder outside is listed (a name only it
        holds) or taken for a file inside (its identity).  The folder inside
        is listed when the swap comes late enough.
        """
        listed = []
        for step in range(1000):
            root, swap, outside = swap_tree(self)
            share = self.folder(root)
            outsiders = {
                p2p.index._identity(os.stat(os.path.join(outside, name)))
                for name in os.listdir(outside)
            }
            hooked = swap_at(step, swap)
            result = hooked.run(p2p.index._scan, share, {}, lambda: False)
            names = set(result.changed)
            self.assertLessEqual(
                names, {"top.txt", "e/secret.txt", "e/inside-only.txt"}, step
            )
            self.assertFalse(outsiders & set(result.changed.values()), step)
            listed.append("e/secret.txt" in names)
            if len(hooked.calls) <= step:
                self.assertIn(False, listed)
                self.assertIn(True, listed)
                return
        self.fail("the scan never ended")

    def test_restat_through_a_swapped_folder(self) -> None:
        """
        A changed name (inotify) is looked up again without following a
        folder swapped for a symlink: no identity of a file outside.
        """
        root, swap, outside = swap_tree(self)
        share = self.folder(root)
        inside = p2p.index._stat_name(share, "e/secret.txt")
        self.assertEqual(inside, share.open("e/secret.txt").identity)
        swap()
        self.assertIsNone(p2p.index._stat_name(share, "e/secret.txt"))
        self.assertIsNone(p2p.index._stat_name(share, "e/only-outside.txt"))


class SymlinkWalkTests(SymlinkTests):
    """The same, resolved by the walk (as where openat2 is missing)."""

    openat2 = False


class OpenAt2Tests(ShareTestMixin, SynchronousTestCase):
    """What is particular to openat2: retries, no downgrade, the probe."""

    openat2: bool | None = True

    def test_used_where_available(self) -> None:
        """On Linux 5.6+ (x86_64, aarch64) a share uses openat2 by default."""
        release = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
        if platform.machine() not in ("x86_64", "aarch64") or release < (5, 6):
            self.skipTest("not Linux 5.6+ on x86_64 or aarch64")
        self.assertEqual(ShareFolder(self.root).resolver, "openat2")

    def test_eagain_retried(self) -> None:
        """EAGAIN (a rename raced with a "..") is retried, a bounded number
        of times; then the name is refused."""
        hooked = fail("openat2", errno.EAGAIN, times=OPENAT2_ATTEMPTS - 1)
        self.assertEqual(self.read_all(hooked.run(self.share.open, "a.txt")), A_CONTENT)
        hooked = fail("openat2", errno.EAGAIN)
        error = hooked.run(self.assertRaises, WireError, self.share.open, "a.txt")
        self.assertEqual(error.code, Code.FORBIDDEN)
        self.assertEqual(hooked.calls, ["openat2"] * OPENAT2_ATTEMPTS)

    def test_no_downgrade(self) -> None:
        """
        Once openat2 is chosen, no error of a lookup (even ENOSYS) makes the
        share resolve that name another way: it is refused, and nothing else
        is opened.
        """
        for code in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EXDEV):
            hooked = fail("openat2", code)
            error = hooked.run(
                self.assertRaises, WireError, self.share.open, "sub/b.txt"
            )
            self.assertEqual(error.code, Code.FORBIDDEN)
            self.assertEqual(hooked.calls, ["openat2"])

    def test_probe(self) -> None:
        """
        The choice is made once, when the share is created, with a lookup
        of the folder itself: no openat2 (ENOSYS: Linux before 5.6; EPERM:
        a seccomp filter) means the walk.
        """
        for code in (errno.ENOSYS, errno.EPERM):
            share = fail("openat2", code).run(ShareFolder, self.root)
            self.assertEqual(share.resolver, "walk")
            self.assertEqual(self.read_all(share.open("sub/b.txt")), B_CONTENT)
        patcher = MonkeyPatcher((p2p.share, "_openat2", None))
        self.assertEqual(
            patcher.runWithPatches(ShareFolder, self.root).resolver, "walk"
        )
        self.assertRaises(
            ValueError, patcher.runWithPatches, ShareFolder, self.root, openat2=True
        )

    def test_symlink_without_proc(self) -> None:
        """
        Where the kernel cannot say where a symlink led (no /proc), names
        through symlinks are refused unless hidden files are shared (no
        name to check then); names without a symlink are unaffected.
        """
        hooked = fail("readlink", errno.ENOENT)
        error = hooked.run(self.assertRaises, WireError, self.share.open, "inlink")
        self.assertEqual(error.code, Code.FORBIDDEN)
        self.assertEqual(self.read_all(hooked.run(self.share.open, "a.txt")), A_CONTENT)
        share = self.folder(include_hidden=True)
        self.assertEqual(self.read_all(hooked.run(share.open, "inlink")), A_CONTENT)


# Hostile names that only exist as bytes on the wire: overlong UTF-8 dots and
# slashes, bytes that are not UTF-8 at all, terminal escapes.  The peer
# refuses them before any file-system lookup (400).
HOSTILE_WIRE_NAMES: list[bytes] = [
    b"\xc0\xae\xc0\xae/secret.txt",
    b"..\xc0\xafsecret.txt",
    b"\xe0\x80\xae\xe0\x80\xae/secret.txt",
    b"\xff\xfe../secret.txt",
    b"../secret.txt\x1b[2J",
    b"a.txt\x7f",
    b"\xc2\x85../secret.txt",
]


class WireCorpusTests(SynchronousTestCase):
    """
    The hostile-name corpus, sent as requests to a real L{PeerProtocol}
    over a StringTransport, one connection per request (the error budget
    would close a shared one after ten refusals).
    """

    def setUp(self) -> None:
        self.base, self.root = build_tree(self)
        self.clock = Clock()
        self.factories: dict[ShareFolder, PeerFactory] = {}
        self.secrets = [SECRET]
        with open("/etc/passwd", "rb") as stream:
            self.secrets.append(stream.read(64))

    def factory_for(self, share: ShareFolder) -> PeerFactory:
        """One peer (and one index of the tree) per share and test: the
        index's own clock keeps its rescan timer out of C{self.clock}."""
        if share not in self.factories:
            self.factories[share] = peer_factory(
                self, share, self.clock, 30.0, index_clock=Clock()
            )
        return self.factories[share]

    def serve(self, share: ShareFolder, request: bytes) -> tuple[bytes, bool]:
        """
        The peer's whole answer to one request line (banner removed), and
        whether it left a producer (a transfer) behind.  The connection is
        lost afterwards; no timer may remain.
        """
        factory = self.factory_for(share)
        protocol = factory.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.clear()
        protocol.dataReceived(request)
        # A file producer; not the read gate a StringTransport gets after
        # any answer (it cannot say whether it sent it).
        producing = transport.producer is not None and not isinstance(
            transport.producer, ReadGate
        )
        # Pull the file out as a socket would, if one is being sent.
        for _ in range(100):
            if transport.producer is None or isinstance(transport.producer, ReadGate):
                break
            transport.producer.resumeProducing()
        protocol.connectionLost(Failure(ConnectionDone()))
        # No timer is left but the refusal log's summary, due once its
        # minute is over (the corpus is a flood of refusals).
        summary = factory.policy.refusals.summarise
        self.assertEqual(
            [call for call in self.clock.getDelayedCalls() if call.func != summary],
            [],
        )
        self.assertEqual(factory.limits.total, 0)
        return transport.value(), producing

    def requests(self):
        """(label, request line) for every corpus name, as GET and RANGE."""
        names = [name.encode("utf-8") for name in HOSTILE_NAMES]
        for name in names + HOSTILE_WIRE_NAMES:
            yield name, b"GET " + name + b"\n"
            yield name, b"RANGE 0 100 " + name + b"\r\n"

    def assertRefusedOnWire(self, share: ShareFolder, label, request) -> None:
        before = open_descriptor_count()
        with fails_instead_of_hanging():
            reply, producing = self.serve(share, request)
        for secret in self.secrets:
            self.assertNotIn(secret, reply, label)
        self.assertRegex(reply, rb"\AERR (400|403|404) [^\n]+\n\Z", label)
        self.assertFalse(producing, label)
        self.assertEqual(open_descriptor_count(), before, f"{label!r} leaked an fd")

    def test_corpus(self) -> None:
        """
        Every hostile name gets one ERR 400, 403 or 404 line and nothing
        else: never OK, no byte of a file outside the share, no hang (the
        FIFO), no descriptor left open, no exception logged.
        """
        self.assertGreaterEqual(len(HOSTILE_NAMES) + len(HOSTILE_WIRE_NAMES), 40)
        share = ShareFolder(self.root)
        for label, request in self.requests():
            self.assertRefusedOnWire(share, label, request)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_corpus_with_hidden_files(self) -> None:
        """
        With hidden files shared (``--include-hidden``) the hidden files in
        the corpus are served, and nothing else is: every other name is
        refused as before, non-regular files included.
        """
        share = ShareFolder(self.root, include_hidden=True)
        for label, request in self.requests():
            expected = HIDDEN_ONLY.get(label.decode("utf-8", "replace"))
            if isinstance(expected, bytes):
                with fails_instead_of_hanging():
                    reply, _ = self.serve(share, request)
                line, _, content = reply.partition(b"\n")
                header = wire.FileHeader.from_line(line)
                self.assertEqual(header.root, root_hex(expected), label)
                self.assertEqual(content, expected, label)
            else:
                self.assertRefusedOnWire(share, label, request)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_device_node_inside(self) -> None:
        """
        A device node inside the share is refused on the wire too (skipped
        where the process may not create device nodes).
        """
        try:
            os.mknod(
                os.path.join(self.root, "zero-device"),
                stat.S_IFCHR | 0o600,
                os.makedev(1, 5),
            )
        except OSError:
            self.skipTest("cannot create device nodes here")
        for share in (
            ShareFolder(self.root),
            ShareFolder(self.root, include_hidden=True),
        ):
            self.assertRefusedOnWire(share, "zero-device", b"GET zero-device\n")


class ListingTests(SynchronousTestCase):
    """
    What a peer lists of the hostile tree (``LIST``, from its index): the
    files a client may fetch, each once, with its size and root, and
    nothing else.  The order is the order the index first met the files
    (protocol.rst), so these tests compare sets.
    """

    def setUp(self) -> None:
        self.base, self.root = build_tree(self)

    def listed(
        self, root: str | None = None, include_hidden: bool = False, **options
    ) -> list[wire.FileEntry]:
        """What a fresh peer of C{root} (the tree by default) lists."""
        share = ShareFolder(root or self.root, include_hidden=include_hidden)
        factory = peer_factory(self, share, Clock(), 30.0, index_clock=Clock())
        entries = read_listing(factory, **options)
        names = [entry.name for entry in entries]
        self.assertEqual(len(names), len(set(names)), "each file once")
        return entries

    def test_listing(self) -> None:
        """
        Regular files only, recursively, with their sizes and roots; hidden
        names, symlinks leading out, dangling links, FIFOs, loops and
        directories (even symlinked ones) are skipped.  A symlink to a file
        inside is a name of its own for the same content.
        """
        self.assertEqual(
            set(self.listed()),
            {
                wire.FileEntry(len(A_CONTENT), root_hex(A_CONTENT), "a.txt"),
                wire.FileEntry(len(A_CONTENT), root_hex(A_CONTENT), "inlink"),
                wire.FileEntry(len(B_CONTENT), root_hex(B_CONTENT), "sub/b.txt"),
                wire.FileEntry(len(C_CONTENT), root_hex(C_CONTENT), "sub/deeper/c.txt"),
            },
        )

    def test_listing_with_hidden(self) -> None:
        """With C{include_hidden}, hidden files and folders are listed too."""
        self.assertEqual(
            {entry.name for entry in self.listed(include_hidden=True)},
            {
                ".hidden-dir/h.txt",
                ".secret",
                "a.txt",
                "inlink",
                "sub/.x",
                "sub/b.txt",
                "sub/deeper/c.txt",
                "to-hidden",
            },
        )

    def test_every_listed_name_opens(self) -> None:
        """Whatever is listed can be opened under exactly that name, and
        holds the size and content the listing says."""
        for include_hidden in (False, True):
            share = ShareFolder(self.root, include_hidden=include_hidden)
            for entry in self.listed(include_hidden=include_hidden):
                opened = share.open(entry.name)
                try:
                    data = os.pread(opened.fd, opened.size + 1, 0)
                finally:
                    opened.close()
                self.assertEqual(len(data), entry.size, entry.name)
                self.assertEqual(root_hex(data), entry.root, entry.name)

    def test_listing_fifo_does_not_hang(self) -> None:
        """Listing a folder with FIFOs returns (the FIFOs are skipped)."""
        os.mkfifo(os.path.join(self.root, "sub", "another-pipe"))
        with fails_instead_of_hanging():
            names = [entry.name for entry in self.listed()]
        self.assertNotIn("pipe", names)
        self.assertNotIn("sub/another-pipe", names)

    def test_listing_leaks_no_descriptor(self) -> None:
        """Indexing and listing open and close each file."""
        before = open_descriptor_count()
        self.listed()
        self.assertEqual(open_descriptor_count(), before)

    def test_empty_folder(self) -> None:
        """An empty folder lists nothing."""
        self.assertEqual(self.listed(temp_dir(self)), [])

    def test_listing_across_folders(self) -> None:
        """Files are listed by their whole share-relative name, across
        folders, each once."""
        root = temp_dir(self)
        for name in ("b", "a/z", "a-b", "A", "a/b/c", "ab"):
            write(os.path.join(root, *name.split("/")), name.encode())
        self.assertEqual(
            {(entry.name, entry.root) for entry in self.listed(root)},
            {
                (name, root_hex(name.encode()))
                for name in ("b", "a/z", "a-b", "A", "a/b/c", "ab")
            },
        )

    def test_listing_skips_names_the_wire_cannot_carry(self) -> None:
        """
        A name a client could not parse back (control characters, a name
        longer than the protocol allows, one with a newline) is left out:
        listing it would make the whole listing unreadable to every client.
        (L{read_listing} checks that every line reads back as sent.)
        """
        root = temp_dir(self)
        write(os.path.join(root, "good.txt"), b"ok")
        write(os.path.join(root, "escape\x1bname"), b"x")
        write(os.path.join(root, "new\nline"), b"x")
        write(os.path.join(root, "bell\x07"), b"x")
        write(os.path.join(root, "c1\x85"), b"x")
        write(os.path.join(root, "tab\there"), b"tab is legal")
        long_parts = ["d" * 200] * 4 + ["f" * 150]  # about 950 bytes
        write(os.path.join(root, *long_parts), b"too long to name")
        self.assertEqual(
            {entry.name for entry in self.listed(root)}, {"good.txt", "tab\there"}
        )

    def test_listing_skips_undecodable_names(self) -> None:
        """A file name that is not UTF-8 is skipped, not a crash."""
        root = temp_dir(self)
        write(os.path.join(root, "fine"), b"1")
        with open(os.path.join(os.fsencode(root), b"latin1-\xe9"), "wb") as f:
            f.write(b"2")
        self.assertEqual([entry.name for entry in self.listed(root)], ["fine"])

    def test_pages(self) -> None:
        """A page holds at most ``limit=`` files; followed through their
        cursors, the pages list exactly what one page does."""
        everything = self.listed()
        self.assertEqual(self.listed(limit=1), everything)
        self.assertEqual(self.listed(limit=3), everything)


class RunInlineTests(SynchronousTestCase):
    """L{tests._indexed.run_inline}: a pool runner without threads."""

    def test_run_inline(self) -> None:
        """C{run_inline} turns a result or an exception into a fired Deferred."""
        self.assertEqual(self.successResultOf(run_inline(lambda: "x")), "x")
        self.failureResultOf(run_inline(lambda: 1 / 0), ZeroDivisionError)


class TwistdFilesTests(SynchronousTestCase):
    """twistd's own pid and log files in the share root are never served."""

    def test_not_served_or_listed(self) -> None:
        root = temp_dir(self)
        for name in ("twistd.pid", "twistd.log", "twistd.log.1", "ok.txt"):
            with open(os.path.join(root, name), "w") as stream:
                stream.write("x")
        share = ShareFolder(root)
        for name in ("twistd.pid", "twistd.log", "twistd.log.1"):
            with self.assertRaises(WireError) as caught:
                share.open(name)
            self.assertEqual(caught.exception.code, Code.FORBIDDEN)
        factory = peer_factory(self, share, Clock(), 30.0, index_clock=Clock())
        self.assertEqual(
            read_listing(factory), [wire.FileEntry(1, root_hex(b"x"), "ok.txt")]
        )


# Deep enough that a walk recursing once per folder failed (RecursionError),
# and that one descriptor per level would pass a soft limit of 1024.
DEEP_LEVELS = 2000


def nest(case: SynchronousTestCase, parent: str, levels: int) -> list[str]:
    """
    Make C{levels} folders named C{d}, each inside the one before, in
    C{parent}; return their paths relative to C{parent} (C{"d"},
    C{"d/d"}, ...).  Made through descriptors (the paths pass PATH_MAX),
    and removed when C{case} ends by L{unnest}: C{shutil.rmtree} and
    trial's own clean-up recurse once per level.
    """
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    case.addCleanup(unnest, parent)
    return ["/".join(["d"] * level) for level in range(1, levels + 1)]


def write_at(parent: str, folder: str, name: str, data: bytes) -> None:
    """Write C{data} to C{folder/name} below C{parent}, however deep."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in folder.split("/"):
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=fd)
        try:
            os.write(out, data)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def unnest(parent: str) -> None:
    """Remove what L{nest} made in C{parent} a level at a time, without
    recursing: each level's C{d} is moved up before the level goes."""
    top = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            try:
                fd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
            except FileNotFoundError:
                return
            moved = False
            try:
                for name in os.listdir(fd):
                    if name == "d":
                        os.rename("d", "d.next", src_dir_fd=fd, dst_dir_fd=top)
                        moved = True
                    else:
                        os.unlink(name, dir_fd=fd)
            finally:
                os.close(fd)
            os.rmdir("d", dir_fd=top)
            if not moved:
                return
            os.rename("d.next", "d", src_dir_fd=top, dst_dir_fd=top)
    finally:
        os.close(top)


def sorted_walk(
    share: ShareFolder, check: Callable[[str], None] = lambda folder: None
) -> list[tuple[str, list[str], list[str]]]:
    """C{share}'s walk, its subfolders entered in name order (as the index
    walks it), calling C{check} at each folder."""
    seen = []
    for folder, dirnames, filenames, _ in share.walk():
        dirnames.sort()
        seen.append((folder, list(dirnames), sorted(filenames)))
        check(folder)
    return seen


def too_long_warnings(events: list[dict]) -> list[dict]:
    """The index's warnings, among C{events}, about names too long to share."""
    return [e for e in events if "too long for the protocol" in e["log_format"]]


class DeepTreeTests(SynchronousTestCase):
    """
    A share however deep: the walk keeps its own stack and a bounded
    number of folder descriptors, and the index shares what the protocol
    can name, warning about the rest, instead of failing every scan (and
    then listing nothing, as if the share were empty and indexed).
    """

    def setUp(self) -> None:
        self.root = temp_dir(self)
        write(os.path.join(self.root, "top.txt"), b"at the top")
        write(os.path.join(self.root, "sibling", "s.txt"), b"beside the deep one")
        os.mkdir(os.path.join(self.root, "deep"))
        self.levels = nest(self, os.path.join(self.root, "deep"), DEEP_LEVELS)
        write_at(self.root, "deep/" + self.levels[-1], "bottom.txt", b"deepest")

    def test_walk_any_depth(self) -> None:
        """Every folder is walked, top-down, the deepest included, and no
        more than WALK_DESCRIPTORS folders below the share's are open."""
        before = descriptors()
        most = len(before) + p2p.share.WALK_DESCRIPTORS + 1  # + the share's
        share = ShareFolder(self.root)

        def check(folder: str) -> None:
            if folder.count("/") % 97 == 0:  # /proc is slow to read 2,000 times
                self.assertLessEqual(len(descriptors()), most, folder)

        seen = sorted_walk(share, check)
        deep = ["deep/" + level for level in self.levels]
        self.assertEqual(
            [folder for folder, _, _ in seen], ["", "deep", *deep, "sibling"]
        )
        self.assertEqual(seen[0], ("", ["deep", "sibling"], ["top.txt"]))
        self.assertEqual(seen[-2], (deep[-1], [], ["bottom.txt"]))
        self.assertEqual(seen[-1], ("sibling", [], ["s.txt"]))
        self.assertEqual(descriptors(), before)

    def test_walk_left_midway(self) -> None:
        """A walk left deep down (a scan halted) closes what it held."""
        before = descriptors()
        walk = ShareFolder(self.root).walk()
        for folder, _, _, _ in walk:
            if folder.count("/") == DEEP_LEVELS // 2:
                break
        walk.close()
        self.assertEqual(descriptors(), before)

    def test_scan_of_a_deep_tree(self) -> None:
        """
        The index lists the files at the top, under the sibling folder and
        as deep as a name can be; names past the protocol's 900 bytes are
        skipped, a folder whose every name would be is not entered, and a
        warning says so, once.
        """
        # "deep/" + "d/" * 420 is 844 bytes: a 65-byte file name there is
        # too long; at 440 levels, "ok.txt" makes 891.
        long_name = "long-" + "x" * 60
        write_at(self.root, "deep/" + self.levels[419], long_name, b"too long")
        write_at(self.root, "deep/" + self.levels[439], "ok.txt", b"just fits")
        write_at(self.root, "deep/" + self.levels[9], "mid.txt", b"ten down")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        share = ShareFolder(self.root)
        index = indexed(self, share, clock)
        factory = PeerFactory(share, index, Clock(), 30.0)
        ok = f"deep/{self.levels[439]}/ok.txt"
        self.assertEqual(len(ok.encode()), 891)
        self.assertEqual(
            {(entry.name, entry.root) for entry in read_listing(factory)},
            {
                ("top.txt", root_hex(b"at the top")),
                ("sibling/s.txt", root_hex(b"beside the deep one")),
                (f"deep/{self.levels[9]}/mid.txt", root_hex(b"ten down")),
                (ok, root_hex(b"just fits")),
            },
        )
        self.assertEqual((index.pending, index.scanning), (0, False))
        (warning,) = [
            e for e in events if "too long for the protocol" in e.get("log_format", "")
        ]
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual((warning["files"], warning["folders"]), (1, 1))
        self.assertTrue(warning["start"].startswith("deep/d/d/"))
        self.assertEqual(len(warning["start"]), p2p.index.LOGGED_NAME_CHARACTERS)
        self.assertFalse(self.flushLoggedErrors())
        # A rescan finds the same: no second warning.
        clock.advance(3600)
        warnings = [
            e for e in events if "too long for the protocol" in e.get("log_format", "")
        ]
        self.assertEqual(len(warnings), 1)


class WalkReopenTests(SynchronousTestCase):
    """With fewer descriptors than levels the walk opens folders again on
    its way back up: in the same order, and never through a symlink."""

    def setUp(self) -> None:
        self.patch(p2p.share, "WALK_DESCRIPTORS", 1)
        self.base = temp_dir(self)
        self.root = os.path.join(self.base, "share")
        for name in ("a/x/x1/f", "a/x/x2/f", "a/y/f", "a/z/z1/z2/f", "b/f", "c/skip/f"):
            write(os.path.join(self.root, *name.split("/")), name.encode())
        write(os.path.join(self.base, "outside", "y", "SECRET"), SECRET)

    def test_same_order_as_os_walk(self) -> None:
        """Folder after folder as os.walk goes, pruned subfolders skipped."""
        expected = []
        for path, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d != "skip")
            folder = os.path.relpath(path, self.root)
            expected.append(("" if folder == "." else folder, dirnames, filenames))
        seen = []
        before = descriptors()
        for folder, dirnames, filenames, _ in ShareFolder(self.root).walk():
            dirnames[:] = sorted(d for d in dirnames if d != "skip")
            seen.append((folder, list(dirnames), filenames))
        self.assertEqual(seen, expected)
        self.assertEqual(descriptors(), before)

    def test_folder_swapped_for_a_symlink(self) -> None:
        """
        A folder the walk let go of, swapped for a symlink to outside
        before the walk comes back for its next subfolder, is not
        followed: what it had left is skipped.
        """
        before = descriptors()

        def swap(folder: str) -> None:
            if folder == "a/x/x2":
                os.rename(os.path.join(self.root, "a"), os.path.join(self.base, "a"))
                os.symlink("../outside", os.path.join(self.root, "a"))

        seen = sorted_walk(ShareFolder(self.root), swap)
        self.assertEqual(
            [folder for folder, _, _ in seen],
            ["", "a", "a/x", "a/x/x1", "a/x/x2", "b", "c", "c/skip"],
        )
        self.assertNotIn("SECRET", [name for _, _, names in seen for name in names])
        self.assertEqual(descriptors(), before)
