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
import shutil
import tempfile
from typing import BinaryIO

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

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)
        self.received += len(data)

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
