"""Tests for L{p2p.demo}: how it deals the user's files out, and cleans up."""

from __future__ import annotations

import errno
import os
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2p import demo


def _sparse_file(path: str, size: int, data: bytes, at: int) -> None:
    """A file of C{size} bytes holding C{data} at C{at}, holes elsewhere."""
    with open(path, "wb") as stream:
        stream.truncate(size)
        stream.seek(at)
        stream.write(data)


class DealTests(SynchronousTestCase):
    """C{--files DIR}: the peers share the user's files without copies."""

    def setUp(self) -> None:
        self.source = self.mktemp()
        os.mkdir(self.source)
        self.workdir = self.mktemp()
        os.mkdir(self.workdir)

    def test_files_are_hard_linked(self) -> None:
        """Each file is the user's own (same inode), not a copy of it."""
        for name in ("a.bin", "b.bin"):
            with open(os.path.join(self.source, name), "wb") as stream:
                stream.write(name.encode() * 1000)
        shares = demo.deal(self.workdir, 2, self.source)
        self.assertEqual([names for _, names in shares], [["a.bin"], ["b.bin"]])
        for share, (name,) in shares:
            placed = os.stat(os.path.join(share, name))
            original = os.stat(os.path.join(self.source, name))
            self.assertEqual(
                (placed.st_dev, placed.st_ino), (original.st_dev, original.st_ino)
            )

    def test_copy_when_links_are_refused(self) -> None:
        """Across file systems (EXDEV) the file is copied, holes kept."""
        size = 64 * 1024 * 1024
        path = os.path.join(self.source, "sparse.bin")
        _sparse_file(path, size, b"middle", size // 2)

        def no_link(source: str, target: str) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        self.patch(demo.os, "link", no_link)
        ((share, names),) = demo.deal(self.workdir, 1, self.source)
        copy = os.path.join(share, "sparse.bin")
        self.assertNotEqual(os.stat(copy).st_ino, os.stat(path).st_ino)
        with open(copy, "rb") as stream:
            self.assertEqual(
                stream.read(), b"\0" * (size // 2) + b"middle" + b"\0" * (size // 2 - 6)
            )
        if os.stat(path).st_blocks * 512 < size // 2:
            # The file system keeps holes: so does the copy.
            self.assertLess(os.stat(copy).st_blocks * 512, size // 2)

    def test_other_link_errors_propagate(self) -> None:
        """A failure a copy would not cure (no room, say) is not hidden."""

        def no_room(source: str, target: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with open(os.path.join(self.source, "a"), "wb") as stream:
            stream.write(b"a")
        self.patch(demo.os, "link", no_room)
        self.assertRaises(OSError, demo.deal, self.workdir, 1, self.source)

    def test_cleanup_removes_only_the_links(self) -> None:
        """Stopping the demo removes its folder; the user's files stay."""
        path = os.path.join(self.source, "a.txt")
        with open(path, "wb") as stream:
            stream.write(b"keep me\n")
        demo.deal(self.workdir, 1, self.source)
        self.assertEqual(os.stat(path).st_nlink, 2)
        system = demo.DemoSystem("", [], demo.Narrator(lambda text: None), self.workdir)
        self.successResultOf(system.stop())
        self.assertFalse(os.path.exists(self.workdir))
        with open(path, "rb") as stream:
            self.assertEqual(stream.read(), b"keep me\n")
        self.assertEqual(os.stat(path).st_nlink, 1)


class ShutdownTests(SynchronousTestCase):
    """However the process ends, the demo's folder goes and it says so."""

    def setUp(self) -> None:
        self.tmp = self.mktemp()
        os.mkdir(self.tmp)
        self.patch(tempfile, "tempdir", self.tmp)
        self.reactor = MemoryReactorClock()
        self.said: list[str] = []

    def shut_down(self) -> None:
        """What the reactor does on Ctrl-C or SIGTERM: its "before
        shutdown" triggers, waited for."""
        for trigger, args, kwargs in self.reactor.triggers["before"]["shutdown"]:
            self.successResultOf(trigger(*args, **kwargs))

    def test_signal_while_starting(self) -> None:
        """Stopped while the peers register: the services stop, the folder
        with the dealt files is removed, the narration says so."""
        d = demo.start_demo(self.reactor, 2, None, self.said.append)
        (workdir,) = os.listdir(self.tmp)
        self.assertIn(
            "sample1.txt", os.listdir(os.path.join(self.tmp, workdir, "peer1"))
        )
        self.assertNoResult(d)
        self.shut_down()
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertEqual(
            self.said[-1], "the demo stops: peers unregister, the relay closes"
        )
        self.reactor.advance(demo.REGISTRATION_TIMEOUT_SECONDS)
        self.failureResultOf(d, demo.DemoFailed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(
            self.said.count("the demo stops: peers unregister, the relay closes"), 1
        )

    def test_signal_after_the_demo_stopped(self) -> None:
        """A demo stopped already (its end, then the reactor's): once."""
        files = self.mktemp()
        os.mkdir(files)
        with open(os.path.join(files, "a.txt"), "wb") as stream:
            stream.write(b"a\n")
        d = demo.start_demo(self.reactor, 1, files, self.said.append)
        self.reactor.advance(demo.REGISTRATION_TIMEOUT_SECONDS)
        self.failureResultOf(d, demo.DemoFailed)
        self.shut_down()
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertEqual(
            self.said.count("the demo stops: peers unregister, the relay closes"), 1
        )


class NoFilesTests(SynchronousTestCase):
    """``p2p demo --files EMPTY``: a usage error, and no narration of a
    shutdown of what never started."""

    def test_empty_folder(self) -> None:
        files = self.mktemp()
        os.mkdir(files)
        tmp = self.mktemp()
        os.mkdir(tmp)
        self.patch(tempfile, "tempdir", tmp)
        said: list[str] = []
        d = demo.start_demo(MemoryReactorClock(), 3, files, said.append)
        self.assertTrue(self.failureResultOf(d, demo.DemoFailed).value.usage)
        self.assertEqual(said, [])
        self.assertEqual(os.listdir(tmp), [])
