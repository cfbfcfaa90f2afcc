"""Tests for L{p2p.share}: name resolution, listing and cached digests.

Every name a client sends is hostile until proven otherwise, so most of this
module is a corpus of names that must never yield a byte from outside the
share folder.  Each test builds its own folder on disk (files, symlinks,
FIFOs) in a temporary directory removed afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import share as share_module
from p2p import wire
from p2p.peer import PeerFactory
from p2p.share import OpenedFile, ShareFolder, run_inline
from p2p.wire import Code, WireError

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
    """How many file descriptors this process holds (Linux /proc)."""
    return len(os.listdir("/proc/self/fd"))


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


class CountingRunner:
    """A C{run_blocking} that runs inline and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, work: Callable[[], str]) -> Deferred[str]:
        self.calls += 1
        return run_inline(work)


class DeferredRunner:
    """A C{run_blocking} that holds the work until the test runs it."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], str], Deferred[str]]] = []

    def __call__(self, work: Callable[[], str]) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.pending.append((work, d))
        return d

    def run_all(self) -> None:
        pending, self.pending = self.pending, []
        for work, d in pending:
            try:
                result = work()
            except Exception as e:
                d.errback(e)
            else:
                d.callback(result)


class ShareTestMixin:
    """Builds the standard tree and opens names in it."""

    def setUp(self) -> None:
        self.base, self.root = build_tree(self)
        self.share = ShareFolder(self.root)

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
        share = ShareFolder(self.root, include_hidden=True)
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
        share = ShareFolder(self.root, include_hidden=True)
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
        share = ShareFolder(self.root, include_hidden=True)
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
        share = ShareFolder(self.root, include_hidden=True)
        self.assertEqual(self.read_all(share.open("..notes")), b"dots\n")
        self.assertRefused("..notes", Code.FORBIDDEN)  # hidden by default

    def test_root_given_through_symlink(self) -> None:
        """A share folder named through a symlink still confines names."""
        alias = os.path.join(self.base, "alias")
        os.symlink(self.root, alias)
        share = ShareFolder(alias)
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
        self.secrets = [SECRET]
        with open("/etc/passwd", "rb") as stream:
            self.secrets.append(stream.read(64))

    def serve(self, share: ShareFolder, request: bytes) -> tuple[bytes, bool]:
        """
        The peer's whole answer to one request line (banner removed), and
        whether it left a producer (a transfer) behind.  The connection is
        lost afterwards; no timer may remain.
        """
        factory = PeerFactory(share, self.clock, 30.0)
        protocol = factory.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.clear()
        protocol.dataReceived(request)
        producing = transport.producer is not None
        # Pull the file out as a socket would, if one is being sent.
        for _ in range(100):
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(factory.limits.total, 0)
        return transport.value(), producing

    def requests(self):
        """(label, request line) for every corpus name, as GET and RESUME."""
        names = [name.encode("utf-8") for name in HOSTILE_NAMES]
        for name in names + HOSTILE_WIRE_NAMES:
            yield name, b"GET " + name + b"\n"
            yield name, b"RESUME 0 " + name + b"\r\n"

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
                self.assertTrue(line.startswith(b"OK "), label)
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


class ListingTests(ShareTestMixin, SynchronousTestCase):
    """L{ShareFolder.list}: recursive, sorted, safe."""

    def test_listing(self) -> None:
        """
        Regular files only, recursively, sorted by name; hidden names,
        symlinks leading out, dangling links, FIFOs, loops and directories
        (even symlinked ones) are skipped.
        """
        self.assertEqual(
            self.share.list(),
            [
                wire.FileEntry(len(A_CONTENT), "a.txt"),
                wire.FileEntry(len(A_CONTENT), "inlink"),
                wire.FileEntry(len(B_CONTENT), "sub/b.txt"),
                wire.FileEntry(len(C_CONTENT), "sub/deeper/c.txt"),
            ],
        )

    def test_listing_with_hidden(self) -> None:
        """With C{include_hidden}, hidden files and folders are listed too."""
        share = ShareFolder(self.root, include_hidden=True)
        self.assertEqual(
            [entry.name for entry in share.list()],
            [
                ".hidden-dir/h.txt",
                ".secret",
                "a.txt",
                "inlink",
                "sub/.x",
                "sub/b.txt",
                "sub/deeper/c.txt",
                "to-hidden",
            ],
        )

    def test_every_listed_name_opens(self) -> None:
        """Whatever is listed can be opened under exactly that name."""
        for share in (self.share, ShareFolder(self.root, include_hidden=True)):
            for entry in share.list():
                opened = share.open(entry.name)
                self.assertEqual(opened.size, entry.size)
                opened.close()

    def test_listing_fifo_does_not_hang(self) -> None:
        """Listing a folder with FIFOs returns (the FIFOs are skipped)."""
        os.mkfifo(os.path.join(self.root, "sub", "another-pipe"))
        with fails_instead_of_hanging():
            names = [entry.name for entry in self.share.list()]
        self.assertNotIn("pipe", names)
        self.assertNotIn("sub/another-pipe", names)

    def test_listing_leaks_no_descriptor(self) -> None:
        """Listing opens and closes each file."""
        before = open_descriptor_count()
        self.share.list()
        self.assertEqual(open_descriptor_count(), before)

    def test_empty_folder(self) -> None:
        """An empty folder lists nothing."""
        self.assertEqual(ShareFolder(temp_dir(self)).list(), [])

    def test_listing_is_sorted_by_full_name(self) -> None:
        """Files sort by their whole share-relative name, across folders."""
        root = temp_dir(self)
        for name in ("b", "a/z", "a-b", "A", "a/b/c", "ab"):
            write(os.path.join(root, *name.split("/")), name.encode())
        names = [entry.name for entry in ShareFolder(root).list()]
        self.assertEqual(names, sorted(names))
        self.assertEqual(set(names), {"b", "a/z", "a-b", "A", "a/b/c", "ab"})

    def test_listing_skips_names_the_wire_cannot_carry(self) -> None:
        """
        A name a client could not parse back (control characters, a name
        longer than the protocol allows, one with a newline) is left out:
        listing it would make the whole listing unreadable to every client.
        """
        root = temp_dir(self)
        write(os.path.join(root, "good.txt"), b"ok")
        write(os.path.join(root, "escape\x1bname"), b"x")
        write(os.path.join(root, "new\nline"), b"x")
        write(os.path.join(root, "bell\x07"), b"x")
        write(os.path.join(root, "tab\there"), b"tab is legal")
        long_parts = ["d" * 200] * 4 + ["f" * 150]  # about 950 bytes
        write(os.path.join(root, *long_parts), b"too long to name")
        entries = ShareFolder(root).list()
        self.assertEqual([entry.name for entry in entries], ["good.txt", "tab\there"])
        for entry in entries:
            self.assertEqual(wire.FileEntry.from_line(entry.to_line()), entry)

    def test_listing_skips_undecodable_names(self) -> None:
        """A file name that is not UTF-8 is skipped, not a crash."""
        root = temp_dir(self)
        write(os.path.join(root, "fine"), b"1")
        with open(os.path.join(os.fsencode(root), b"latin1-\xe9"), "wb") as f:
            f.write(b"2")
        self.assertEqual([entry.name for entry in ShareFolder(root).list()], ["fine"])

    def test_listing_limit(self) -> None:
        """The walk stops at C{MAX_LISTED_FILES} entries."""
        self.patch(share_module, "MAX_LISTED_FILES", 3)
        self.assertEqual(len(self.share.list()), 3)


class DigestTests(ShareTestMixin, SynchronousTestCase):
    """L{ShareFolder.digest}: SHA-256 through C{run_blocking}, cached."""

    def setUp(self) -> None:
        super().setUp()
        self.runner = CountingRunner()
        self.share = ShareFolder(self.root, run_blocking=self.runner)

    def digest_of(self, name: str) -> str:
        opened = self.share.open(name)
        try:
            return self.successResultOf(self.share.digest(opened))
        finally:
            opened.close()

    def test_digest(self) -> None:
        """The digest is the SHA-256 of the whole file, hashed via run_blocking."""
        self.assertEqual(self.digest_of("a.txt"), hashlib.sha256(A_CONTENT).hexdigest())
        self.assertEqual(self.runner.calls, 1)

    def test_empty_file(self) -> None:
        """An empty file has the SHA-256 of nothing."""
        write(os.path.join(self.root, "empty"), b"")
        self.assertEqual(self.digest_of("empty"), hashlib.sha256(b"").hexdigest())

    def test_large_file(self) -> None:
        """Files larger than one hashing chunk are hashed whole."""
        data = os.urandom(share_module.HASH_CHUNK_BYTES * 2 + 123)
        write(os.path.join(self.root, "big"), data)
        self.assertEqual(self.digest_of("big"), hashlib.sha256(data).hexdigest())

    def test_cached(self) -> None:
        """The same unchanged file is hashed once, whatever opens it."""
        first = self.digest_of("a.txt")
        self.assertEqual(self.digest_of("a.txt"), first)
        self.assertEqual(self.digest_of("inlink"), first)  # same inode
        self.assertEqual(self.runner.calls, 1)

    def test_changed_size_recomputed(self) -> None:
        """Appending to a file changes its identity: the digest is recomputed."""
        self.digest_of("a.txt")
        with open(os.path.join(self.root, "a.txt"), "ab") as stream:
            stream.write(b"more")
        self.assertEqual(
            self.digest_of("a.txt"), hashlib.sha256(A_CONTENT + b"more").hexdigest()
        )
        self.assertEqual(self.runner.calls, 2)

    def test_changed_mtime_recomputed(self) -> None:
        """
        A same-size rewrite is recomputed.  The test moves the mtime on by a
        second explicitly: two writes in one kernel clock tick can share an
        mtime, which the cache cannot tell apart (see the report).
        """
        path = os.path.join(self.root, "a.txt")
        self.digest_of("a.txt")
        before = os.stat(path).st_mtime_ns
        replacement = b"ALPHA FILE\n"
        self.assertEqual(len(replacement), len(A_CONTENT))
        write(path, replacement)
        os.utime(path, ns=(before + 10**9, before + 10**9))
        self.assertEqual(
            self.digest_of("a.txt"), hashlib.sha256(replacement).hexdigest()
        )
        self.assertEqual(self.runner.calls, 2)

    def test_replaced_file_recomputed(self) -> None:
        """A file replaced by rename (new inode) is recomputed."""
        self.digest_of("a.txt")
        write(os.path.join(self.root, "new.tmp"), b"other")
        os.replace(os.path.join(self.root, "new.tmp"), os.path.join(self.root, "a.txt"))
        self.assertEqual(self.digest_of("a.txt"), hashlib.sha256(b"other").hexdigest())
        self.assertEqual(self.runner.calls, 2)

    def test_cache_bounded(self) -> None:
        """The cache forgets its oldest entry beyond C{MAX_CACHED_DIGESTS}."""
        self.patch(share_module, "MAX_CACHED_DIGESTS", 2)
        self.digest_of("a.txt")
        self.digest_of("sub/b.txt")
        self.digest_of("sub/deeper/c.txt")  # evicts a.txt
        self.assertEqual(self.runner.calls, 3)
        self.digest_of("sub/deeper/c.txt")
        self.assertEqual(self.runner.calls, 3)
        self.digest_of("a.txt")
        self.assertEqual(self.runner.calls, 4)

    def test_hasher_survives_close(self) -> None:
        """
        The hasher uses its own descriptor: closing the opened file (the
        client left) before the hash runs still gives the right digest, and
        the hasher's descriptor is closed afterwards.
        """
        runner = DeferredRunner()
        share = ShareFolder(self.root, run_blocking=runner)
        before = open_descriptor_count()
        opened = share.open("a.txt")
        d = share.digest(opened)
        opened.close()
        self.assertNoResult(d)
        runner.run_all()
        self.assertEqual(self.successResultOf(d), hashlib.sha256(A_CONTENT).hexdigest())
        self.assertEqual(open_descriptor_count(), before)

    def test_failure_not_cached(self) -> None:
        """
        A file that shrank under the hasher fails with OSError, leaks no
        descriptor, and the failure is not cached.
        """
        path = write(os.path.join(self.root, "shrinking"), b"0123456789")
        before = open_descriptor_count()
        opened = self.share.open("shrinking")
        os.truncate(path, 4)
        self.failureResultOf(self.share.digest(opened), OSError)
        opened.close()
        self.assertEqual(open_descriptor_count(), before)
        self.assertEqual(
            self.digest_of("shrinking"), hashlib.sha256(b"0123").hexdigest()
        )

    def test_run_inline(self) -> None:
        """C{run_inline} turns a result or an exception into a fired Deferred."""
        self.assertEqual(self.successResultOf(run_inline(lambda: "x")), "x")
        self.failureResultOf(run_inline(lambda: 1 / 0), ZeroDivisionError)


class TwistdFilesTests(SynchronousTestCase):
    """twistd's own pid and log files in the share root are never served."""

    def test_not_served_or_listed(self) -> None:
        from p2p.wire import Code, WireError

        root = temp_dir(self)
        for name in ("twistd.pid", "twistd.log", "twistd.log.1", "ok.txt"):
            with open(os.path.join(root, name), "w") as stream:
                stream.write("x")
        share = ShareFolder(root)
        for name in ("twistd.pid", "twistd.log", "twistd.log.1"):
            with self.assertRaises(WireError) as caught:
                share.open(name)
            self.assertEqual(caught.exception.code, Code.FORBIDDEN)
        self.assertEqual([entry.name for entry in share.list()], ["ok.txt"])
