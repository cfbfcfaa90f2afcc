"""Where fetched bytes go: a spool file, hashed as it is written.

Nothing reaches its final place (stdout or the ``-o`` path) until the whole
content matched the SHA-256 its peer announced.  Saving renames the spool file
into place, so a partial file never stands under the final name; printing
copies the verified spool file to stdout.

A transfer that breaks leaves its bytes in the spool: another peer that
offers the same content (same SHA-256 and size) can continue from
``resume_offset``, and the running hash covers the whole file end to end.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import tempfile
import threading
from typing import BinaryIO

from twisted.internet.defer import Deferred, succeed

from p2p import wire


class SpoolSink:
    """
    Receives one file's bytes into a temporary file in C{directory}.

    Keep the spool on the same filesystem as the destination so that
    L{save_as} is an atomic rename.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self._file: BinaryIO | None = None
        self._path: str | None = None
        self._hash = hashlib.sha256()
        self.received = 0
        self.header: wire.FileHeader | None = None

    @property
    def resume_offset(self) -> int:
        """Where a continuation of the partial content would start (0: none)."""
        return self.received if self._file is not None else 0

    def continues(self, header: wire.FileHeader) -> bool:
        """Whether C{header} describes the content already partly received."""
        return (
            self.header is not None
            and header.offset == self.resume_offset
            and (header.sha256, header.size) == (self.header.sha256, self.header.size)
        )

    def begin(self, header: wire.FileHeader) -> None:
        """
        Start receiving C{header.count} bytes.

        At offset 0 this starts afresh; at a later offset the header must
        L{continue <continues>} the partial content.

        :raise ValueError: for a header that does not continue it.
        :raise OSError: when the spool file cannot be created.
        """
        if header.offset:
            if not self.continues(header):
                raise ValueError("the header does not continue the partial content")
            return
        self.reset()
        fd, self._path = tempfile.mkstemp(
            dir=self.directory, prefix=".p2p-", suffix=".part"
        )
        self._file = os.fdopen(fd, "w+b")
        self.header = header

    def write(self, data: bytes) -> bool:
        """Store C{data}; True (this sink never asks its input to pause)."""
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)
        self.received += len(data)
        return True

    def when_drained(self) -> Deferred[None]:
        """Fires when input paused because of L{write} may resume."""
        return succeed(None)

    def flushed(self) -> Deferred[None]:
        """Fires once everything received so far is hashed and stored."""
        return succeed(None)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def reset(self) -> None:
        """Throw away whatever was received (the peer failed)."""
        self.discard()
        self._hash = hashlib.sha256()
        self.received = 0
        self.header = None

    def discard(self) -> None:
        """Remove the spool file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def save_as(self, path: str, durable: bool = False) -> None:
        """
        Move the verified content to C{path} with an atomic rename.

        :param durable: flush it to the disk first (``fsync``), so that it
            survives a power cut too.  Off by default, as in curl, wget and
            rsync: it costs seconds per gigabyte.
        """
        assert self._file is not None and self._path is not None
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.chmod(self._path, 0o644 & ~_umask())
        os.replace(self._path, path)
        self._path = None

    def copy_to(self, stream: BinaryIO) -> None:
        """Write the verified content to C{stream}, then discard the spool."""
        assert self._file is not None
        self._file.flush()
        self._file.seek(0)
        shutil.copyfileobj(self._file, stream, 1024 * 1024)
        stream.flush()
        self.discard()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Received bytes allowed to wait for the hashing and writing threads before
# the connection is paused: enough to keep both busy, small enough to keep
# the client's memory flat.
PIPELINE_HIGH_WATER_BYTES = 8 * 1024 * 1024
PIPELINE_LOW_WATER_BYTES = 2 * 1024 * 1024


class _Barrier:
    """Marks a point in both work queues; fires once both threads reach it."""

    def __init__(self, workers: _Workers) -> None:
        self.workers = workers
        self.waiting = 2
        self.done: Deferred[None] = Deferred()

    def arrived(self) -> None:  # in the reactor thread
        self.waiting -= 1
        if self.waiting == 0:
            error = self.workers.error
            if error is not None:
                self.done.errback(error)
            else:
                self.done.callback(None)


class _Workers:
    """Two threads: one hashes the received chunks, one writes them."""

    def __init__(self, reactor, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.hash = hashlib.sha256()
        self.error: OSError | None = None
        self.pending = [0, 0]  # bytes queued for the hasher, for the writer
        self.lock = threading.Lock()
        self.drained: Deferred[None] | None = None
        self.queues: list[queue.SimpleQueue] = [
            queue.SimpleQueue(),
            queue.SimpleQueue(),
        ]
        for index, work in enumerate((self._hash_chunk, self._write_chunk)):
            threading.Thread(
                target=self._run, args=(index, work), daemon=True, name="p2p-spool"
            ).start()

    def put(self, data: bytes) -> bool:
        """Queue C{data}; False when the caller should pause its input."""
        with self.lock:
            self.pending[0] += len(data)
            self.pending[1] += len(data)
            backlog = max(self.pending)
        for work_queue in self.queues:
            work_queue.put(data)
        return backlog < PIPELINE_HIGH_WATER_BYTES

    def when_drained(self) -> Deferred[None]:
        """Fires (in the reactor thread) once the backlog is low again."""
        d: Deferred[None] = Deferred()
        with self.lock:
            if max(self.pending) < PIPELINE_LOW_WATER_BYTES:
                d.callback(None)
            else:
                self.drained = d
        return d

    def barrier(self) -> Deferred[None]:
        marker = _Barrier(self)
        for work_queue in self.queues:
            work_queue.put(marker)
        return marker.done

    def stop(self) -> None:
        for work_queue in self.queues:
            work_queue.put(None)

    def _run(self, index: int, work) -> None:
        work_queue = self.queues[index]
        while True:
            item = work_queue.get()
            if item is None:
                if work == self._write_chunk:
                    os.close(self.fd)  # the writer's own descriptor
                return
            if isinstance(item, _Barrier):
                self.reactor.callFromThread(item.arrived)
                continue
            work(item)
            with self.lock:
                self.pending[index] -= len(item)
                ready = self.drained
                if ready is not None and max(self.pending) < PIPELINE_LOW_WATER_BYTES:
                    self.drained = None
                else:
                    ready = None
            if ready is not None:
                self.reactor.callFromThread(ready.callback, None)

    def _hash_chunk(self, data: bytes) -> None:
        self.hash.update(data)  # hashlib releases the GIL for large chunks

    def _write_chunk(self, data: bytes) -> None:
        if self.error is not None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            self.error = e


class PipelinedSpoolSink(SpoolSink):
    """
    A L{SpoolSink} that hashes and writes on two threads while the reactor
    thread keeps receiving: on a bulk transfer the three overlap instead of
    taking turns.  L{write} returns False when the backlog is high; the
    caller pauses its connection until L{when_drained} fires.  L{flushed}
    fires when every byte received so far is hashed and written.
    """

    def __init__(self, directory: str | None, reactor) -> None:
        super().__init__(directory)
        self.reactor = reactor
        self._workers: _Workers | None = None

    def begin(self, header: wire.FileHeader) -> None:
        super().begin(header)
        if self._workers is None:
            assert self._file is not None
            # The writer gets its own descriptor: discarding the spool must
            # never leave it writing into a closed (or reused) one.
            self._workers = _Workers(self.reactor, os.dup(self._file.fileno()))

    def write(self, data: bytes) -> bool:
        assert self._workers is not None
        if self._workers.error is not None:
            raise self._workers.error
        self.received += len(data)
        return self._workers.put(data)

    def when_drained(self) -> Deferred[None]:
        assert self._workers is not None
        return self._workers.when_drained()

    def flushed(self) -> Deferred[None]:
        if self._workers is None:
            return succeed(None)
        return self._workers.barrier()

    def hexdigest(self) -> str:
        if self._workers is None:
            return super().hexdigest()
        return self._workers.hash.hexdigest()

    def save_as(self, path: str, durable: bool = False) -> None:
        # Call only once flushed() fired: every byte is in the file.
        super().save_as(path, durable)
        self._stop_workers()

    def discard(self) -> None:
        self._stop_workers()
        super().discard()

    def _stop_workers(self) -> None:
        if self._workers is not None:
            # The threads finish what is queued and exit; their file is
            # unlinked now (POSIX keeps it until they let go of it).
            self._workers.stop()
            self._workers = None
