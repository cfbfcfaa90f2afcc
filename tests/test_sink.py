"""Tests for L{p2p.sink.SpoolSink}: spool, hash, then save or print."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.sink import SpoolSink
from tests.test_share import temp_dir

DATA = b"some verified content\n" * 100


def header_for(data: bytes) -> wire.FileHeader:
    return wire.FileHeader(len(data), hashlib.sha256(data).hexdigest(), 0, len(data))


class SpoolSinkTests(SynchronousTestCase):
    """The sink's life cycle: begin, write, then save_as/copy_to/reset."""

    def setUp(self) -> None:
        self.directory = temp_dir(self)
        self.sink = SpoolSink(self.directory)
        self.addCleanup(self.sink.discard)
        self.target = os.path.join(self.directory, "final.txt")

    def spool_files(self) -> list[str]:
        return [name for name in os.listdir(self.directory) if name.endswith(".part")]

    def fill(self, data: bytes = DATA, pieces: int = 7) -> None:
        self.sink.begin(header_for(data))
        step = max(1, len(data) // pieces)
        for start in range(0, len(data), step):
            self.sink.write(data[start : start + step])

    def test_begin_creates_hidden_spool(self) -> None:
        """begin() creates one hidden ``.p2p-*.part`` file in the directory."""
        self.sink.begin(header_for(DATA))
        [name] = self.spool_files()
        self.assertTrue(name.startswith(".p2p-"))
        self.assertEqual(self.sink.header, header_for(DATA))

    def test_write_hashes_and_counts(self) -> None:
        """Written bytes are counted and hashed as they arrive."""
        self.fill()
        self.assertEqual(self.sink.received, len(DATA))
        self.assertEqual(self.sink.hexdigest(), hashlib.sha256(DATA).hexdigest())

    def test_save_as_is_atomic(self) -> None:
        """
        Nothing stands under the final name until save_as, which moves the
        complete content there in one rename; the spool file is gone.
        """
        self.fill()
        self.assertFalse(os.path.exists(self.target))
        self.sink.save_as(self.target)
        with open(self.target, "rb") as stream:
            self.assertEqual(stream.read(), DATA)
        self.assertEqual(self.spool_files(), [])

    def test_save_as_replaces_in_one_step(self) -> None:
        """
        An existing file keeps its old content until save_as, then has the
        new content; it is replaced (new inode), never rewritten in place.
        """
        with open(self.target, "wb") as stream:
            stream.write(b"old content")
        old_inode = os.stat(self.target).st_ino
        self.fill()
        with open(self.target, "rb") as stream:
            self.assertEqual(stream.read(), b"old content")
        self.sink.save_as(self.target)
        with open(self.target, "rb") as stream:
            self.assertEqual(stream.read(), DATA)
        self.assertNotEqual(os.stat(self.target).st_ino, old_inode)

    def test_save_as_mode(self) -> None:
        """The saved file is world-readable as the umask allows (not 0600)."""
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        self.fill()
        self.sink.save_as(self.target)
        self.assertEqual(stat.S_IMODE(os.stat(self.target).st_mode), 0o644)

    def test_save_as_respects_umask(self) -> None:
        """A stricter umask gives a stricter mode."""
        old = os.umask(0o077)
        self.addCleanup(os.umask, old)
        self.fill()
        self.sink.save_as(self.target)
        self.assertEqual(stat.S_IMODE(os.stat(self.target).st_mode), 0o600)

    def test_save_empty(self) -> None:
        """An empty file saves as an empty file."""
        self.sink.begin(header_for(b""))
        self.sink.save_as(self.target)
        self.assertEqual(os.path.getsize(self.target), 0)

    def test_save_failure_keeps_spool_for_discard(self) -> None:
        """
        A failed rename (the target is a directory) raises OSError; discard
        then removes the spool file.
        """
        os.mkdir(self.target)
        self.fill()
        self.assertRaises(OSError, self.sink.save_as, self.target)
        self.sink.discard()
        self.assertEqual(self.spool_files(), [])

    def test_reset(self) -> None:
        """reset() removes the spool file and forgets the bytes and hash."""
        self.fill()
        self.sink.reset()
        self.assertEqual(self.spool_files(), [])
        self.assertEqual(self.sink.received, 0)
        self.assertIsNone(self.sink.header)
        self.assertEqual(self.sink.hexdigest(), hashlib.sha256(b"").hexdigest())

    def test_begin_again_starts_over(self) -> None:
        """A second begin() drops the first spool and its hash."""
        self.fill(b"first attempt, broken")
        self.fill()
        self.assertEqual(len(self.spool_files()), 1)
        self.assertEqual(self.sink.received, len(DATA))
        self.assertEqual(self.sink.hexdigest(), hashlib.sha256(DATA).hexdigest())
        self.sink.save_as(self.target)
        with open(self.target, "rb") as stream:
            self.assertEqual(stream.read(), DATA)

    def test_discard(self) -> None:
        """discard() removes the spool file; twice, or before begin, is harmless."""
        self.sink.discard()
        self.fill()
        self.sink.discard()
        self.sink.discard()
        self.assertEqual(self.spool_files(), [])

    def test_discard_after_external_removal(self) -> None:
        """A spool file already removed by someone else is not an error."""
        self.fill()
        [name] = self.spool_files()
        os.unlink(os.path.join(self.directory, name))
        self.sink.discard()

    def test_copy_to(self) -> None:
        """copy_to() writes the exact content, then removes the spool file."""
        self.fill()
        out = io.BytesIO()
        self.sink.copy_to(out)
        self.assertEqual(out.getvalue(), DATA)
        self.assertEqual(self.spool_files(), [])

    def test_copy_large(self) -> None:
        """Content larger than the copy buffer is copied whole."""
        data = os.urandom(3 * 1024 * 1024 + 5)
        self.fill(data, pieces=50)
        out = io.BytesIO()
        self.sink.copy_to(out)
        self.assertEqual(out.getvalue(), data)

    def test_default_directory(self) -> None:
        """Without a directory the spool goes to the system temporary folder."""
        directory = temp_dir(self)
        self.patch(tempfile, "tempdir", directory)
        sink = SpoolSink()
        self.addCleanup(sink.discard)
        sink.begin(header_for(DATA))
        self.assertEqual(len(os.listdir(directory)), 1)
        sink.discard()
        self.assertEqual(os.listdir(directory), [])


class ResumeTests(SynchronousTestCase):
    """A spool keeps a broken transfer's bytes for another peer to continue."""

    CONTENT = b"0123456789" * 100

    def setUp(self) -> None:
        self.sink = SpoolSink(tempfile.mkdtemp())
        self.addCleanup(self.sink.discard)
        digest = hashlib.sha256(self.CONTENT).hexdigest()
        self.first = wire.FileHeader(1000, digest, 0, 1000)
        self.sink.begin(self.first)
        self.sink.write(self.CONTENT[:400])

    def test_continues_same_content_at_offset(self) -> None:
        """Only a header for the same digest and size at the received offset
        continues the partial content."""
        self.assertEqual(self.sink.resume_offset, 400)
        same = wire.FileHeader(600, self.first.sha256, 400, 1000)
        self.assertTrue(self.sink.continues(same))
        self.assertFalse(
            self.sink.continues(wire.FileHeader(700, self.first.sha256, 300, 1000))
        )
        self.assertFalse(self.sink.continues(wire.FileHeader(600, "0" * 64, 400, 1000)))
        self.assertFalse(
            self.sink.continues(wire.FileHeader(601, self.first.sha256, 400, 1001))
        )

    def test_resumed_digest_covers_whole_file(self) -> None:
        """After a resume the running hash is the whole file's."""
        self.sink.begin(wire.FileHeader(600, self.first.sha256, 400, 1000))
        self.sink.write(self.CONTENT[400:])
        self.assertEqual(self.sink.hexdigest(), self.first.sha256)
        out = io.BytesIO()
        self.sink.copy_to(out)
        self.assertEqual(out.getvalue(), self.CONTENT)

    def test_begin_refuses_a_non_continuation(self) -> None:
        """A header at an offset that does not continue is refused."""
        with self.assertRaises(ValueError):
            self.sink.begin(wire.FileHeader(600, "0" * 64, 400, 1000))

    def test_reset_forgets(self) -> None:
        """After reset there is nothing to resume."""
        self.sink.reset()
        self.assertEqual(self.sink.resume_offset, 0)


class DurabilityTests(SynchronousTestCase):
    """save_as flushes to the disk only when asked (``p2p get --fsync``)."""

    def setUp(self) -> None:
        self.synced: list[int] = []
        self.patch(os, "fsync", self.synced.append)
        self.folder = tempfile.mkdtemp()
        self.sink = SpoolSink(self.folder)
        self.addCleanup(self.sink.discard)
        self.sink.begin(wire.FileHeader(3, hashlib.sha256(b"abc").hexdigest(), 0, 3))
        self.sink.write(b"abc")

    def test_not_durable_by_default(self) -> None:
        """By default the rename happens without fsync."""
        self.sink.save_as(os.path.join(self.folder, "out"))
        self.assertEqual(self.synced, [])

    def test_durable(self) -> None:
        """durable=True fsyncs the content before the rename."""
        target = os.path.join(self.folder, "out")
        self.sink.save_as(target, durable=True)
        self.assertEqual(len(self.synced), 1)
        with open(target, "rb") as stream:
            self.assertEqual(stream.read(), b"abc")


class _ThreadReactor:
    """
    Just enough reactor for L{PipelinedSpoolSink}: calls from its worker
    threads are queued, and the test runs them on its own thread, waiting
    on that queue (an event from the workers, not a sleep).
    """

    def __init__(self) -> None:
        import queue

        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, function, *args) -> None:
        self.calls.put((function, args))

    def run_until(self, d, timeout: float = 30) -> None:
        while not d.called:
            function, args = self.calls.get(timeout=timeout)
            function(*args)


class PipelinedSpoolSinkTests(SynchronousTestCase):
    """Hashing and writing on worker threads, with bounded backlog."""

    def setUp(self) -> None:
        from p2p.sink import PipelinedSpoolSink

        self.reactor = _ThreadReactor()
        self.folder = tempfile.mkdtemp()
        self.sink = PipelinedSpoolSink(self.folder, self.reactor)
        self.addCleanup(self.sink.discard)

    def flush(self) -> None:
        d = self.sink.flushed()
        self.reactor.run_until(d)
        self.successResultOf(d)

    def test_digest_and_content(self) -> None:
        """Chunks written on the threads make the right file and digest."""
        chunks = [os.urandom(300_000) for _ in range(10)]
        content = b"".join(chunks)
        digest = hashlib.sha256(content).hexdigest()
        self.sink.begin(wire.FileHeader(len(content), digest, 0, len(content)))
        for chunk in chunks:
            self.sink.write(chunk)
        self.flush()
        self.assertEqual(self.sink.hexdigest(), digest)
        target = os.path.join(self.folder, "out")
        self.sink.save_as(target)
        with open(target, "rb") as stream:
            self.assertEqual(stream.read(), content)

    def test_backpressure(self) -> None:
        """Past the high-water mark write() asks to pause; when_drained
        fires once the threads caught up."""
        from p2p.sink import PIPELINE_HIGH_WATER_BYTES

        chunk = b"x" * (1024 * 1024)
        size = PIPELINE_HIGH_WATER_BYTES + len(chunk)
        self.sink.begin(wire.FileHeader(size, "0" * 64, 0, size))
        answers = [self.sink.write(chunk) for _ in range(size // len(chunk))]
        self.assertIn(False, answers)
        drained = self.sink.when_drained()
        self.reactor.run_until(drained)
        self.successResultOf(drained)
        self.flush()
        self.assertEqual(self.sink.received, size)

    def test_resume_continues_the_hash(self) -> None:
        """A continuation keeps hashing where the first part stopped."""
        content = os.urandom(500_000)
        digest = hashlib.sha256(content).hexdigest()
        self.sink.begin(wire.FileHeader(len(content), digest, 0, len(content)))
        self.sink.write(content[:123_456])
        self.sink.begin(
            wire.FileHeader(len(content) - 123_456, digest, 123_456, len(content))
        )
        self.sink.write(content[123_456:])
        self.flush()
        self.assertEqual(self.sink.hexdigest(), digest)

    def test_write_error(self) -> None:
        """A failing disk write fails flushed() and then write() itself."""
        import errno

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", full)
        self.sink.begin(wire.FileHeader(10, "0" * 64, 0, 10))
        self.sink.write(b"0123456789")
        d = self.sink.flushed()
        self.reactor.run_until(d)
        self.failureResultOf(d, OSError)
        with self.assertRaises(OSError):
            self.sink.write(b"more")

    def test_discard_while_busy(self) -> None:
        """Discarding with work queued removes the spool file; the threads
        finish on their own descriptor."""
        self.sink.begin(wire.FileHeader(4_000_000, "0" * 64, 0, 4_000_000))
        for _ in range(4):
            self.sink.write(os.urandom(1_000_000))
        self.sink.discard()
        self.assertEqual(os.listdir(self.folder), [])
