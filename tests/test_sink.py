"""Tests for L{p2p.sink}: verified pieces to stdout or to a resumable file."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import pieces
from p2p.pieces import Content, PieceList
from p2p.sink import (
    HIGH_WATER_BYTES,
    PARTIAL_SUFFIX,
    STATE_SUFFIX,
    ContentMismatch,
    FileOutput,
    PieceSink,
    StreamOutput,
)
from tests._indexed import StepPool

MIB = 1024 * 1024


def describe(data: bytes) -> tuple[Content, PieceList | None]:
    digests = b"".join(
        pieces.hash_piece(data[i : i + MIB]) for i in range(0, len(data), MIB)
    )
    content = Content(pieces.root_of(len(data), MIB, digests), len(data))
    return content, (PieceList.check(content, digests) if content.pieces > 1 else None)


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + MIB] for i in range(0, len(data), MIB)]


class QueuedWorker(StepPool):
    """A sink's worker that runs what it is given only when the test says
    so (a slow thread): L{StepPool}'s queue behind the worker's interface."""

    def submit(self, work) -> Deferred:
        return self(work)

    def submit_checked(self, check, work) -> Deferred:
        return self(lambda: bool(check() and (work(), True)[1]))

    def stop(self) -> None:
        pass


def fired(d: Deferred):
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.urandom(3 * MIB + 10)
        self.content, self.list = describe(self.data)
        self.stream = io.BytesIO()
        self.sink = PieceSink(StreamOutput(self.stream))
        fired(self.sink.begin(self.content, self.list))

    def test_in_order(self) -> None:
        """Verified pieces reach the stream as they come."""
        for index, piece in enumerate(chunks(self.data)):
            self.assertTrue(self.sink.write(index, piece))
            self.assertEqual(
                self.stream.getvalue(), self.data[: index * MIB + len(piece)]
            )
        self.assertEqual(fired(self.sink.settled()), [])
        self.assertTrue(self.sink.complete)
        self.assertEqual(self.sink.received, len(self.data))

    def test_out_of_order(self) -> None:
        """A piece ahead of the stream waits for the gap before it."""
        parts = chunks(self.data)
        self.sink.write(2, parts[2])
        self.sink.write(0, parts[0])
        self.assertEqual(self.stream.getvalue(), parts[0])
        self.sink.write(1, parts[1])
        self.sink.write(3, parts[3])
        self.assertEqual(self.stream.getvalue(), self.data)

    def test_partial_writes(self) -> None:
        """
        A raw stream (stdout under ``python -u``: a FileIO, which may write
        only part of a buffer) still gets every byte, in order.
        """

        class Trickle(io.BytesIO):
            def write(self, data) -> int:
                return super().write(bytes(data)[:1000])

        stream = Trickle()
        sink = PieceSink(StreamOutput(stream))
        fired(sink.begin(self.content, self.list))
        for index, piece in enumerate(chunks(self.data)):
            sink.write(index, piece)
        self.assertEqual(fired(sink.settled()), [])
        self.assertEqual(stream.getvalue(), self.data)

    def test_bad_piece_never_reaches_the_stream(self) -> None:
        """A piece that does not verify is dropped and reported."""
        bad = bytearray(chunks(self.data)[0])
        bad[0] ^= 0xFF
        reported: list[int] = []
        self.sink.write(0, bytes(bad), reported.append)
        self.assertEqual(reported, [0])
        self.assertEqual(self.stream.getvalue(), b"")
        self.assertEqual(self.sink.missing(), [0, 1, 2, 3])
        self.sink.write(1, bytes(bad[:10]))
        self.assertEqual(fired(self.sink.settled()), [1])

    def test_other_content(self) -> None:
        """Once begun, the sink takes no other content."""
        other, other_list = describe(b"other")
        self.assertRaises(ContentMismatch, self.sink.begin, other, other_list)
        self.assertTrue(self.sink.continues(self.content.root_hex))
        self.assertFalse(self.sink.continues(other.root_hex))

    def test_restartable_until_written(self) -> None:
        self.assertTrue(self.sink.restartable)
        self.sink.write(0, chunks(self.data)[0])
        self.assertFalse(self.sink.restartable)

    def test_single_piece_checked_by_root(self) -> None:
        """A one-piece file has no list: the root checks its only piece."""
        content, listing = describe(b"small file")
        self.assertIsNone(listing)
        stream = io.BytesIO()
        sink = PieceSink(StreamOutput(stream))
        fired(sink.begin(content, None))
        bad: list[int] = []
        sink.write(0, b"small filE", bad.append)
        sink.write(0, b"small file", bad.append)
        self.assertEqual((bad, stream.getvalue()), ([0], b"small file"))

    def test_empty_file(self) -> None:
        content, _ = describe(b"")
        sink = PieceSink(StreamOutput(io.BytesIO()))
        fired(sink.begin(content, None))
        self.assertTrue(sink.complete)

    def test_store_failure(self) -> None:
        """A failing stream fails the next write and settled()."""

        class Broken(io.BytesIO):
            def write(self, data):
                raise OSError(32, "Broken pipe")

        sink = PieceSink(StreamOutput(Broken()))
        fired(sink.begin(self.content, self.list))
        sink.write(0, chunks(self.data)[0])
        self.assertRaises(OSError, fired, sink.settled())
        self.assertRaises(OSError, sink.write, 1, chunks(self.data)[1])


class BackpressureTests(SynchronousTestCase):
    def test_high_and_low_water(self) -> None:
        """write() asks for a pause past the high water mark; when_drained
        fires once the worker caught up."""
        data = os.urandom(12 * MIB)
        content, listing = describe(data)
        worker = QueuedWorker()
        sink = PieceSink(StreamOutput(io.BytesIO()), worker)
        sink.begin(content, listing)
        worker.run_all()
        answers = [sink.write(i, piece) for i, piece in enumerate(chunks(data))]
        pause_at = HIGH_WATER_BYTES // MIB - 1
        self.assertEqual(answers.index(False), pause_at)
        drained = sink.when_drained()
        self.assertNoResult(drained)
        worker.run_all()
        self.assertIsNone(fired(drained))
        self.assertTrue(sink.complete)


class FileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="p2p-test-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.path = os.path.join(self.folder, "out.bin")
        self.data = os.urandom(4 * MIB + 123)
        self.content, self.list = describe(self.data)

    def sink(self) -> PieceSink:
        sink = PieceSink(FileOutput(self.path))
        fired(sink.begin(self.content, self.list))
        return sink

    def test_complete_file_renamed_into_place(self) -> None:
        sink = self.sink()
        self.assertTrue(os.path.exists(self.path + PARTIAL_SUFFIX))
        for index, piece in reversed(list(enumerate(chunks(self.data)))):
            sink.write(index, piece)
        self.assertFalse(os.path.exists(self.path))
        fired(sink.finish())
        with open(self.path, "rb") as stream:
            self.assertEqual(stream.read(), self.data)
        self.assertEqual(os.listdir(self.folder), ["out.bin"])

    def test_resume_keeps_only_verified_pieces(self) -> None:
        """An interrupted run's verified pieces are kept by the next one;
        bytes that no longer verify are fetched again."""
        first = self.sink()
        parts = chunks(self.data)
        first.write(0, parts[0])
        first.write(2, parts[2])
        kept = fired(first.abandon(keep=True))
        self.assertEqual(kept, self.path + PARTIAL_SUFFIX)
        # Damage piece 2 on disk, as a crash before the write-back might.
        with open(kept, "r+b") as stream:
            stream.seek(2 * MIB + 5)
            stream.write(b"X")
        second = self.sink()
        self.assertEqual(second.done, {0})
        self.assertEqual(second.missing(), [1, 2, 3, 4])
        for index in second.missing():
            second.write(index, parts[index])
        fired(second.finish())
        with open(self.path, "rb") as stream:
            self.assertEqual(stream.read(), self.data)

    def test_other_content_starts_over(self) -> None:
        """A partial file of other content is not resumed."""
        first = self.sink()
        first.write(0, chunks(self.data)[0])
        fired(first.abandon(keep=True))
        other = os.urandom(2 * MIB)
        content, listing = describe(other)
        sink = PieceSink(FileOutput(self.path))
        fired(sink.begin(content, listing))
        self.assertEqual(sink.done, set())

    def test_abandon_without_keep_leaves_nothing(self) -> None:
        sink = self.sink()
        sink.write(0, chunks(self.data)[0])
        self.assertIsNone(fired(sink.abandon(keep=False)))
        self.assertEqual(os.listdir(self.folder), [])

    def test_state_file_names_the_content(self) -> None:
        self.sink()
        with open(self.path + STATE_SUFFIX, "rb") as stream:
            self.assertIn(self.content.root, stream.read())

    def test_second_writer_is_refused(self) -> None:
        """Two runs with the same target never interleave: the second one
        fails at once, and the first is unharmed."""
        first = self.sink()
        second = FileOutput(self.path)
        error = self.assertRaises(OSError, second.lock)
        self.assertEqual(error.errno, errno.EBUSY)
        for index, piece in enumerate(chunks(self.data)):
            first.write(index, piece)
        fired(first.finish())
        with open(self.path, "rb") as stream:
            self.assertEqual(stream.read(), self.data)
        second.lock()  # free again
        self.assertIsNone(second.abandon(keep=True))  # no content: nothing kept
        self.assertEqual(os.listdir(self.folder), ["out.bin"])

    def test_earlier_partial_survives_a_run_that_gets_nothing(self) -> None:
        """
        A run that ends before any peer described the content (nobody had
        it, Ctrl-C while a peer indexed) leaves an earlier run's partial
        file as it was, for a later run to resume.
        """
        first = self.sink()
        first.write(0, chunks(self.data)[0])
        kept = fired(first.abandon(keep=True))
        for keep in (True, False):
            output = FileOutput(self.path)
            output.lock()
            output.abandon(keep)
            self.assertEqual(os.path.getsize(kept), MIB)
        resumed = self.sink()
        self.assertEqual(resumed.done, {0})
