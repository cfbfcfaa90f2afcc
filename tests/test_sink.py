"""Tests for L{p2p.sink}: verified pieces to stdout or to a resumable file."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import socket
import stat
import tempfile
import threading
from unittest import SkipTest

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import pieces
from p2p import sink as sink_module
from p2p.pieces import Content, PieceList
from p2p.sink import (
    HIGH_WATER_BYTES,
    PARTIAL_SUFFIX,
    SPARE_BYTES,
    STATE_SUFFIX,
    ContentMismatch,
    FileOutput,
    OutputRefused,
    PieceSink,
    StreamOutput,
    ThroughOutput,
    output_for,
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


class CheckingWorker(QueuedWorker):
    """As L{SerialWorker}: checks a piece at once, on the calling thread,
    and stores it only when the test says so (a slow storing thread)."""

    def submit_checked(self, check, work) -> Deferred:
        if not check():
            return succeed(False)
        return self(work).addCallback(lambda _: True)


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

    def test_not_restartable_once_a_piece_is_on_its_way(self) -> None:
        """
        A verified piece handed to the storing thread, not yet written: the
        stream can no longer start over.  (Judged by what its thread had
        written, a peer that broke then let the run start over from byte
        0, and the pieces after the one that went out waited for ever: the
        run claimed the whole file with 1 MiB of 64 on stdout.)
        """
        worker = CheckingWorker()
        stream = io.BytesIO()
        sink = PieceSink(StreamOutput(stream), worker)
        sink.begin(self.content, self.list)
        worker.run_all()
        sink.write(0, chunks(self.data)[0])
        self.assertEqual(stream.getvalue(), b"")
        self.assertFalse(sink.restartable)

    def test_never_again_from_byte_zero(self) -> None:
        """Bytes gone out are never followed by a content from byte 0, and
        a piece that never went out in order fails the end, loudly."""
        output = StreamOutput(io.BytesIO())
        output.write_piece(0, b"went out")
        self.assertRaises(OSError, output.prepare, self.content, self.list)
        output.write_piece(MIB, b"waits for the bytes before it")
        self.assertRaises(OSError, output.finish, False)

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


class ProgressTests(SynchronousTestCase):
    """C{on_progress} hears each change of the verified byte count; a
    failing listener is logged and never stops the pieces."""

    def test_told_and_robust(self) -> None:
        data = os.urandom(2 * MIB + 10)
        content, piece_list = describe(data)
        seen: list[int] = []

        def listener() -> None:
            seen.append(sink.received)
            raise ZeroDivisionError("a display's bug")

        stream = io.BytesIO()
        sink = PieceSink(StreamOutput(stream), on_progress=listener)
        fired(sink.begin(content, piece_list))
        for index, piece in enumerate(chunks(data)):
            sink.write(index, piece)
        self.assertEqual(fired(sink.settled()), [])
        self.assertEqual(stream.getvalue(), data)
        self.assertEqual(seen, [0, MIB, 2 * MIB, len(data)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 4)


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


class LentBufferTests(SynchronousTestCase):
    """
    L{PieceSink.lend}: receivers fill buffers the sink lends and takes
    back once their piece is stored, so a large download runs in the
    same few buffers.
    """

    def setUp(self) -> None:
        self.data = os.urandom(3 * MIB + 10)
        self.content, self.list = describe(self.data)
        self.stream = io.BytesIO()
        self.worker = QueuedWorker()
        self.sink = PieceSink(StreamOutput(self.stream), self.worker)
        self.sink.begin(self.content, self.list)
        self.worker.run_all()

    def filled(self, index: int) -> bytearray:
        buffer = self.sink.lend(index)
        offset, length = self.content.span(index)
        self.assertEqual(len(buffer), length)
        buffer[:] = self.data[offset : offset + length]
        return buffer

    def test_whole_piece_buffers_lent_again(self) -> None:
        """A stored piece's buffer is the next one lent, not a new one;
        the short last piece gets its own length."""
        first = self.filled(0)
        self.sink.write(0, first)
        self.assertIsNot(self.sink.lend(1), first, "not stored yet")
        self.worker.run_all()
        second = self.filled(1)
        self.assertIs(second, first)
        self.sink.write(1, second)
        self.worker.run_all()
        last = self.filled(3)
        self.assertEqual(len(last), 10)
        self.sink.write(3, last)
        self.sink.write(2, self.filled(2))
        self.worker.run_all()
        self.assertEqual(self.stream.getvalue(), self.data)

    def test_bad_piece_buffer_taken_back(self) -> None:
        """A buffer whose piece failed verification is lent again too."""
        buffer = self.filled(0)
        buffer[0] ^= 1
        self.sink.write(0, buffer)
        settled = self.sink.settled()
        self.worker.run_all()
        self.assertEqual(fired(settled), [0])
        self.assertIs(self.sink.lend(0), buffer)

    def test_spares_are_bounded(self) -> None:
        """No more spare buffers are kept than the backlog and the piece
        being received need, however many were lent at once."""
        many = SPARE_BYTES // MIB + 5
        lent = [self.sink.lend(0) for _ in range(many)]
        for buffer in lent:
            self.sink.take_back(buffer)
        again = {id(self.sink.lend(0)) for _ in range(many)}
        self.assertEqual(len(again & {id(b) for b in lent}), SPARE_BYTES // MIB)

    def test_only_lent_buffers_are_taken_back(self) -> None:
        """A caller's own buffer is never lent out (it may still use it)."""
        own = bytearray(MIB)
        self.sink.take_back(own)
        self.assertIsNot(self.sink.lend(0), own)

    def test_held_piece_copied_before_its_buffer_is_reused(self) -> None:
        """
        A piece ahead of the stream (several sources) waits in the output
        after its buffer went back: what waits is a copy, so the buffer
        lent again and overwritten changes nothing.
        """
        ahead = self.filled(1)
        self.sink.write(1, ahead)
        self.worker.run_all()
        reused = self.sink.lend(2)
        self.assertIs(reused, ahead)
        reused[:] = b"x" * MIB
        self.sink.write(0, self.filled(0))
        self.worker.run_all()
        self.assertEqual(self.stream.getvalue(), self.data[: 2 * MIB])


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

    def test_a_late_piece_of_the_content_before_is_ignored(self) -> None:
        """
        A piece verified for one content and stored only after the sink
        started over with another is never counted for the new one.
        """
        worker = CheckingWorker()
        sink = PieceSink(FileOutput(self.path), worker)
        sink.begin(self.content, self.list)
        worker.run_all()
        sink.write(0, chunks(self.data)[0])
        self.assertTrue(sink.restartable)
        sink.reset()
        other = os.urandom(len(self.data))
        sink.begin(*describe(other))
        worker.run_all()
        self.assertEqual(sink.missing(), list(range(5)))
        for index, piece in enumerate(chunks(other)):
            sink.write(index, piece)
        finished = sink.finish()
        worker.run_all()
        fired(finished)
        with open(self.path, "rb") as stream:
            self.assertEqual(stream.read(), other)

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
        # Damage piece 2 on disk, as a crash before the write-back might:
        # a byte flipped (a constant written over random data would leave
        # it as it was once in 256 runs).
        with open(kept, "r+b") as stream:
            stream.seek(2 * MIB + 5)
            stream.write(bytes([self.data[2 * MIB + 5] ^ 0xFF]))
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

    def test_fifos_planted_beside_the_partial_file(self) -> None:
        """
        FIFOs at the state file's path and its temporary's (anyone who can
        write in the folder can make them) neither block the run, as
        plain opens would, for ever, nor are written through: they are
        not state files, and are replaced by ours.
        """
        partial = self.sink()
        partial.write(0, chunks(self.data)[0])
        fired(partial.abandon(keep=True))
        for path in (self.path + STATE_SUFFIX, self.path + STATE_SUFFIX + ".new"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.mkfifo(path)
        sink = self.sink()  # would hang here before
        self.assertEqual(sink.done, set())  # no state: nothing to resume
        self.assertTrue(stat.S_ISREG(os.lstat(self.path + STATE_SUFFIX).st_mode))
        self.assertNotIn("out.bin" + STATE_SUFFIX + ".new", os.listdir(self.folder))
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


class SmallFileTests(SynchronousTestCase):
    """A content of one piece has nothing to resume: no state file; and one
    of at most L{FileOutput.inline_bytes} is stored on the reactor thread."""

    def setUp(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="p2p-test-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.path = os.path.join(self.folder, "out.bin")

    def test_single_piece_has_no_state_file(self) -> None:
        data = os.urandom(MIB // 2)
        content, listing = describe(data)
        sink = PieceSink(FileOutput(self.path), QueuedWorker())
        sink.begin(content, listing)
        sink.worker.run_all()
        self.assertEqual(os.listdir(self.folder), ["out.bin" + PARTIAL_SUFFIX])
        sink.write(0, data)
        sink.finish()
        sink.worker.run_all()
        self.assertEqual(os.listdir(self.folder), ["out.bin"])

    def test_second_content_into_a_written_file(self) -> None:
        """A second content prepared into the partial file after a first
        one's bytes went in is cut to its own length."""
        first, second = os.urandom(3000), os.urandom(1000)
        output = FileOutput(self.path)
        output.lock()
        output.prepare(*describe(first))
        output.write_piece(0, first)
        output.prepare(*describe(second))
        output.write_piece(0, second)
        output.finish(durable=False)
        with open(self.path, "rb") as stream:
            self.assertEqual(stream.read(), second)

    def test_single_piece_interrupted_leaves_nothing(self) -> None:
        """Nothing to resume: even a kept partial file is removed."""
        content, listing = describe(os.urandom(1000))
        sink = PieceSink(FileOutput(self.path))
        fired(sink.begin(content, listing))
        self.assertIsNone(fired(sink.abandon(keep=True)))
        self.assertEqual(os.listdir(self.folder), [])

    def test_earlier_state_removed(self) -> None:
        """A state file an earlier run left (another content, of several
        pieces) does not outlive a single-piece content at the same path."""
        big = os.urandom(2 * MIB)
        first = PieceSink(FileOutput(self.path))
        fired(first.begin(*describe(big)))
        fired(first.abandon(keep=True))
        self.assertIn("out.bin" + STATE_SUFFIX, os.listdir(self.folder))
        small = os.urandom(10)
        second = PieceSink(FileOutput(self.path))
        fired(second.begin(*describe(small)))
        second.write(0, small)
        fired(second.finish())
        self.assertEqual(os.listdir(self.folder), ["out.bin"])

    def test_small_content_stored_inline(self) -> None:
        """Every step of a small file happens at once, never on the worker;
        a bigger one still goes through it."""
        small = os.urandom(FileOutput.inline_bytes)
        worker = QueuedWorker()
        sink = PieceSink(FileOutput(self.path), worker)
        fired(sink.begin(*describe(small)))
        sink.write(0, small)
        fired(sink.settled())
        fired(sink.finish())
        self.assertEqual(worker.pending, [])
        with open(self.path, "rb") as stream:
            self.assertEqual(stream.read(), small)
        bigger = os.urandom(FileOutput.inline_bytes + 1)
        other = PieceSink(FileOutput(self.path + "2"), worker)
        d = other.begin(*describe(bigger))
        self.assertNoResult(d)
        worker.run_all()
        fired(d)

    def test_refused_before_content_never_threaded(self) -> None:
        """A peer that refused before describing any content (settled), and
        a name found nowhere (abandon), leave the threads unstarted: a run
        of small files with a few refusals never starts them."""
        worker = QueuedWorker()
        sink = PieceSink(FileOutput(self.path), worker)
        sink.output.lock()
        self.assertEqual(fired(sink.settled()), [])
        self.assertIsNone(fired(sink.abandon(keep=True)))
        self.assertEqual(worker.pending, [])
        self.assertEqual(os.listdir(self.folder), [])

    def test_threads_once_used_stay_in_order(self) -> None:
        """Once anything went to the threads, a reset sink (no content
        again) still waits for them: what they hold is not done."""
        bigger = os.urandom(FileOutput.inline_bytes + 1)
        worker = QueuedWorker()
        sink = PieceSink(FileOutput(self.path), worker)
        begun = sink.begin(*describe(bigger))
        worker.run_all()
        fired(begun)
        sink.reset()
        settled = sink.settled()
        self.assertNoResult(settled)
        worker.run_all()
        self.assertEqual(fired(settled), [])

    def test_stream_never_inline(self) -> None:
        """A stream may block (a pipe to a slow reader): never written on
        the reactor thread, however small the content."""
        worker = QueuedWorker()
        sink = PieceSink(StreamOutput(io.BytesIO()), worker)
        d = sink.begin(*describe(b"tiny"))
        self.assertNoResult(d)
        worker.run_all()
        fired(d)


class _ThreadCalls:
    """A reactor's C{callFromThread}, recording calls from another thread."""

    def __init__(self) -> None:
        self.called = threading.Event()

    def callFromThread(self, f, *args) -> None:
        f(*args)
        self.called.set()


class SerialWorkerTests(SynchronousTestCase):
    """The storing thread starts with the first work only; checks run on
    the caller's thread."""

    def test_no_threads_until_work(self) -> None:
        before = threading.active_count()
        worker = sink_module.SerialWorker(_ThreadCalls())
        self.assertFalse(worker.started)
        self.assertEqual(threading.active_count(), before)
        worker.stop()  # stopping a worker that never started is fine
        self.assertEqual(threading.active_count(), before)

    def test_first_work_starts_them(self) -> None:
        reactor = _ThreadCalls()
        worker = sink_module.SerialWorker(reactor)
        self.addCleanup(worker.stop)
        results: list[int] = []
        worker.submit(lambda: 7).addCallback(results.append)
        self.assertTrue(worker.started)
        self.assertTrue(reactor.called.wait(10))
        self.assertEqual(results, [7])

    def test_check_runs_on_the_callers_thread(self) -> None:
        """
        A piece is checked at once, where it was received; a piece that
        fails is never stored, and says so at once, without starting the
        storing thread; one that passes is stored on that thread.
        """
        reactor = _ThreadCalls()
        worker = sink_module.SerialWorker(reactor)
        self.addCleanup(worker.stop)
        checked: list[threading.Thread] = []
        stored: list[threading.Thread] = []

        def check(passes: bool):
            def checking() -> bool:
                checked.append(threading.current_thread())
                return passes

            return checking

        def store() -> None:
            stored.append(threading.current_thread())

        self.assertFalse(fired(worker.submit_checked(check(False), store)))
        self.assertFalse(worker.started)
        d = worker.submit_checked(check(True), store)
        self.assertEqual(checked, [threading.current_thread()] * 2)
        self.assertTrue(reactor.called.wait(10))
        self.assertTrue(fired(d))
        self.assertEqual(len(stored), 1)
        self.assertIsNot(stored[0], threading.current_thread())

    def test_check_that_raises(self) -> None:
        worker = sink_module.SerialWorker(_ThreadCalls())

        def broken() -> bool:
            raise ValueError("no")

        failure = self.failureResultOf(
            worker.submit_checked(broken, lambda: None), ValueError
        )
        self.assertEqual(str(failure.value), "no")
        self.assertFalse(worker.started)


class LockTests(SynchronousTestCase):
    """Two runs with one ``-o`` target never write into each other."""

    def setUp(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="p2p-test-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.path = os.path.join(self.folder, "out.bin")
        self.data = os.urandom(2 * MIB + 5)
        self.content, self.list = describe(self.data)

    def test_finished_file_is_never_taken_over(self) -> None:
        """
        A second run that opened the partial file just before the first
        renamed it into place (and so unlocked it) does not lock the
        finished file: it sees the partial path now names another file
        (none), starts a partial file of its own, and preparing that for
        other content leaves the finished file whole.
        """
        first = PieceSink(FileOutput(self.path))
        fired(first.begin(self.content, self.list))
        for index, piece in enumerate(chunks(self.data)):
            first.write(index, piece)
        real_lock = sink_module._lock
        raced: list[int] = []

        def lock_after_the_rename(fd: int, path: str) -> None:
            if not raced:
                raced.append(fd)
                fired(first.finish())  # renamed into place, lock released
            real_lock(fd, path)

        self.patch(sink_module, "_lock", lock_after_the_rename)
        second = FileOutput(self.path)
        second.lock()
        self.assertEqual(len(raced), 1)
        other, listing = describe(os.urandom(3000))
        fired(PieceSink(second).begin(other, listing))
        with open(self.path, "rb") as stream:
            self.assertEqual(stream.read(), self.data)
        self.assertNotEqual(
            os.stat(self.path).st_ino, os.stat(self.path + PARTIAL_SUFFIX).st_ino
        )
        second.abandon(keep=False)
        self.assertEqual(os.listdir(self.folder), ["out.bin"])

    def test_partial_path_never_followed(self) -> None:
        """A symbolic link planted at the partial path is not written
        through: the run fails, the file it points to is untouched."""
        victim = os.path.join(self.folder, "victim")
        with open(victim, "wb") as stream:
            stream.write(b"precious")
        os.symlink(victim, self.path + PARTIAL_SUFFIX)
        error = self.assertRaises(OSError, FileOutput(self.path).lock)
        self.assertEqual(error.errno, errno.ELOOP)
        with open(victim, "rb") as stream:
            self.assertEqual(stream.read(), b"precious")


class _Reader:
    """Reads a FIFO (or a pipe's read end) to its end, on a thread: the
    other end of a write-through output."""

    def __init__(self, path: str | None = None, fd: int | None = None) -> None:
        self.data = bytearray()
        self.path = path
        self.fd = fd
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY) if self.fd is None else self.fd
        try:
            while chunk := os.read(fd, 65536):
                self.data += chunk
        finally:
            os.close(fd)

    def result(self) -> bytes:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the writer never closed"
        return bytes(self.data)


class ThroughTests(SynchronousTestCase):
    """
    ``-o`` onto something that is not a regular file is written through,
    in order, and never replaced (L{output_for}, L{ThroughOutput}).
    """

    def setUp(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="p2p-test-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.data = os.urandom(3 * MIB + 77)
        self.content, self.list = describe(self.data)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def write_through(self, output) -> None:
        """Every piece, out of order, then finish."""
        sink = PieceSink(output)
        fired(sink.begin(self.content, self.list))
        for index, piece in reversed(list(enumerate(chunks(self.data)))):
            sink.write(index, piece)
        fired(sink.finish())

    def test_fifo(self) -> None:
        """A FIFO gets the content in order; it is still a FIFO, and no
        partial or state file appears beside it."""
        fifo = self.path("fifo")
        os.mkfifo(fifo)
        reader = _Reader(fifo)
        output = output_for(fifo)
        self.assertIsInstance(output, ThroughOutput)
        self.write_through(output)
        self.assertEqual(reader.result(), self.data)
        self.assertTrue(stat.S_ISFIFO(os.lstat(fifo).st_mode))
        self.assertEqual(os.listdir(self.folder), ["fifo"])

    def test_fifo_without_reader(self) -> None:
        """Opening without waiting says there is no reader yet."""
        fifo = self.path("fifo")
        os.mkfifo(fifo)
        output = output_for(fifo)
        self.assertFalse(output.open(blocking=False))
        self.assertEqual(os.listdir(self.folder), ["fifo"])

    def test_second_writer_refused(self) -> None:
        """Two runs never interleave pieces in one FIFO: the second fails
        at once (EBUSY), the first's output is whole."""
        fifo = self.path("fifo")
        os.mkfifo(fifo)
        reader = _Reader(fifo)
        first = output_for(fifo)
        self.assertTrue(first.open())
        second = output_for(fifo)
        error = self.assertRaises(OSError, second.open, False)
        self.assertEqual(error.errno, errno.EBUSY)
        self.write_through(first)
        self.assertEqual(reader.result(), self.data)

    def test_symlink_to_fifo(self) -> None:
        fifo = self.path("fifo")
        os.mkfifo(fifo)
        link = self.path("link")
        os.symlink("fifo", link)
        reader = _Reader(fifo)
        self.write_through(output_for(link))
        self.assertEqual(reader.result(), self.data)
        self.assertTrue(os.path.islink(link))

    def test_character_device(self) -> None:
        """
        A copy of /dev/null (a character device made with mknod, as root):
        written through, and still that device afterwards, with --fsync
        too (which a device may not support).
        """
        device = self.path("null")
        try:
            os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            raise SkipTest("making a device needs root") from None
        output = output_for(device)
        self.assertIsInstance(output, ThroughOutput)
        self.assertTrue(output.open())
        sink = PieceSink(output, durable=True)
        fired(sink.begin(self.content, self.list))
        for index, piece in enumerate(chunks(self.data)):
            sink.write(index, piece)
        fired(sink.finish())
        info = os.lstat(device)
        self.assertTrue(stat.S_ISCHR(info.st_mode))
        self.assertEqual(info.st_rdev, os.makedev(1, 3))
        self.assertEqual(os.listdir(self.folder), ["null"])

    def test_system_devices_are_written_through(self) -> None:
        """/dev/null and /dev/stdout would be written through, never
        replaced (only classified here: nothing is opened)."""
        self.assertIsInstance(output_for("/dev/null"), ThroughOutput)
        stdout = output_for("/dev/stdout")
        self.assertIsInstance(stdout, ThroughOutput)
        self.assertEqual(stdout.descriptor, 1)

    def test_link_to_a_descriptor(self) -> None:
        """
        A link to one of our descriptors (as /dev/stdout is, through
        /proc/self/fd/1), even through another link, is written through a
        duplicate of that descriptor: the pipe's reader gets the content.
        """
        read_end, write_end = os.pipe()
        reader = _Reader(fd=read_end)
        link = self.path("stdout")
        os.symlink(f"/proc/self/fd/{write_end}", link)
        os.symlink("stdout", self.path("again"))
        output = output_for(self.path("again"))
        self.assertIsInstance(output, ThroughOutput)
        self.assertEqual(output.descriptor, write_end)
        self.assertTrue(output.open(blocking=False))
        self.write_through(output)
        os.close(write_end)
        self.assertEqual(reader.result(), self.data)

    def test_refused(self) -> None:
        """A link to a regular file or to nothing, and a socket, are
        refused; the file the link points to is untouched."""
        target = self.path("real.bin")
        with open(target, "wb") as stream:
            stream.write(b"precious")
        os.symlink("real.bin", self.path("to-file"))
        os.symlink("missing", self.path("dangling"))
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(self.path("socket"))
        for name, reason in (
            ("to-file", "a symbolic link to a regular file"),
            ("dangling", "a symbolic link to nothing"),
            ("socket", "not a regular file, a device or a FIFO"),
        ):
            error = self.assertRaises(OutputRefused, output_for, self.path(name))
            self.assertIn(reason, str(error))
        with open(target, "rb") as stream:
            self.assertEqual(stream.read(), b"precious")

    def test_regular_and_missing_targets_use_a_partial_file(self) -> None:
        existing = self.path("there.bin")
        with open(existing, "wb"):
            pass
        self.assertIsInstance(output_for(existing), FileOutput)
        self.assertIsInstance(output_for(self.path("new.bin")), FileOutput)
