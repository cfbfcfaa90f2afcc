"""Content ids and piece hashes: how a file's bytes are described and checked.

A file is cut into pieces of ``piece_size`` bytes (the last may be shorter;
an empty file has none).  Each piece is hashed with BLAKE3, and the file's
**root** is the BLAKE3 of a short preamble (a version tag, the size and the
piece size) followed by the piece digests in order: a two-level hash list,
like the hash list of a BitTorrent v1 ``info`` dictionary.  The root names
the content: two files with the same bytes have the same root whatever
their names, so a client can fetch different pieces from different holders
and check every piece on arrival, before any of its bytes are used.

Why BLAKE3, and why 1 MiB pieces, measured on our 2-core machine (see
docs/performance.rst): BLAKE3 hashes about 2.2-3.0 GB/s on one core against
SHA-256's 1.45 GB/s, and releases the GIL, so indexing and verifying run on
threads beside the reactor.  At 1 MiB a piece list is 32 bytes per MiB
(640 KiB for a 20 GiB file), per-piece overheads are negligible, and a
client holds only a few pieces in memory per source.  The Python binding
offers no access to BLAKE3's internal tree, hence the explicit list.

No I/O here except L{hash_descriptor}, which reads a file by ``pread``.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from blake3 import blake3

DIGEST_BYTES = 32
PIECE_SIZE = 1024 * 1024
# What a client accepts from a peer: powers of two in this range, so a
# hostile header can neither make pieces tiny (a huge list) nor huge (a huge
# buffer per piece).
MIN_PIECE_SIZE = 16 * 1024
MAX_PIECE_SIZE = 16 * 1024 * 1024
# The most pieces a client takes a piece list for: 128 MiB of digests (4 TiB
# at 1 MiB pieces).  A header claiming more could make the client buffer an
# unbounded list.
MAX_PIECES = 1 << 22
ROOT_TAG = b"p2p-relay pieces v1\n"


def valid_piece_size(piece_size: int) -> bool:
    """Whether C{piece_size} is a power of two within the accepted range."""
    return (
        MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE
        and piece_size & (piece_size - 1) == 0
    )


def piece_count(size: int, piece_size: int = PIECE_SIZE) -> int:
    """How many pieces a file of C{size} bytes has (0 for an empty file)."""
    return -(-size // piece_size)


def piece_span(index: int, size: int, piece_size: int = PIECE_SIZE) -> tuple[int, int]:
    """The C{(offset, length)} of piece C{index} of a C{size}-byte file."""
    offset = index * piece_size
    return offset, max(0, min(piece_size, size - offset))


# A piece's bytes: one buffer, or the parts it arrived in (a receiving
# client keeps the received chunks rather than copying them together).
PieceData = bytes | bytearray | memoryview | Sequence[bytes | memoryview]


def parts_of(data: PieceData) -> Sequence[bytes | bytearray | memoryview]:
    """C{data} as a sequence of buffers."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return (data,)
    return data


def hash_piece(data: PieceData) -> bytes:
    """The digest of one piece's bytes (given whole or in parts)."""
    hasher = blake3()
    for part in parts_of(data):
        hasher.update(part)
    return hasher.digest()


def length_of(data: PieceData) -> int:
    return sum(len(part) for part in parts_of(data))


def root_of(size: int, piece_size: int, digests: bytes | bytearray) -> bytes:
    """
    The root of content of C{size} bytes cut into C{piece_size} pieces whose
    digests, concatenated in order, are C{digests}.
    """
    hasher = blake3(ROOT_TAG + struct.pack(">QI", size, piece_size))
    hasher.update(digests)  # not concatenated: a list may be 128 MiB
    return hasher.digest()


class PieceListMismatch(Exception):
    """A piece list does not belong to the root it was offered for."""


@dataclass(frozen=True)
class Content:
    """
    What a file's bytes are: its C{root}, C{size} and C{piece_size}.

    The piece digests are kept apart (L{PieceList}): an index holds many
    of these, and a 20 GiB file has 640 KiB of digests.
    """

    root: bytes
    size: int
    piece_size: int = PIECE_SIZE

    @property
    def pieces(self) -> int:
        return piece_count(self.size, self.piece_size)

    @property
    def root_hex(self) -> str:
        return self.root.hex()

    def span(self, index: int) -> tuple[int, int]:
        return piece_span(index, self.size, self.piece_size)


class PieceList:
    """
    The verified digests of one content: built only through L{check}, so
    holding one means it matches its root.
    """

    def __init__(self, content: Content, digests: bytes | bytearray) -> None:
        self.content = content
        self.digests = digests

    @classmethod
    def check(cls, content: Content, digests: bytes | bytearray) -> PieceList:
        """
        Accept C{digests} for C{content} only if they hash to its root.

        :raise PieceListMismatch: for a list of the wrong length or one that
            does not match the root.
        """
        if len(digests) != content.pieces * DIGEST_BYTES:
            raise PieceListMismatch(
                f"{len(digests)} bytes of digests for {content.pieces} pieces"
            )
        if root_of(content.size, content.piece_size, digests) != content.root:
            raise PieceListMismatch("the piece list does not match the root")
        return cls(content, digests)

    def digest(self, index: int) -> bytes:
        start = index * DIGEST_BYTES
        return self.digests[start : start + DIGEST_BYTES]

    def verify(self, index: int, data: PieceData) -> bool:
        """Whether C{data} is exactly piece C{index}."""
        offset, length = self.content.span(index)
        return length_of(data) == length and hash_piece(data) == self.digest(index)


def hash_pieces(
    fd: int,
    size: int,
    start: int = 0,
    stop: int | None = None,
    piece_size: int = PIECE_SIZE,
) -> Iterator[bytes]:
    """
    Yield the digests of pieces C{start} up to (not including) C{stop} of
    the C{size}-byte file open as C{fd}, reading with ``pread``.

    :raise OSError: ``EIO`` when the file ends early (it shrank).
    """
    stop = piece_count(size, piece_size) if stop is None else stop
    for index in range(start, stop):
        offset, length = piece_span(index, size, piece_size)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            # A short pread mid-file: a network file system may do it, a
            # shrinking file does.  Read the rest, or give up.
            data += _read_exactly(fd, length - len(data), offset + len(data))
        yield hash_piece(data)


def _read_exactly(fd: int, count: int, offset: int) -> bytes:
    chunks = []
    while count:
        chunk = os.pread(fd, count, offset)
        if not chunk:
            raise OSError(errno.EIO, "the file shrank while it was being hashed")
        chunks.append(chunk)
        count -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def hash_descriptor(
    fd: int,
    size: int,
    piece_size: int = PIECE_SIZE,
    progress: Callable[[int], object] = lambda done: None,
) -> tuple[Content, bytes]:
    """
    Hash a whole file: its L{Content} and its concatenated piece digests.
    C{progress} is called with the bytes hashed so far after each piece.
    """
    digests = bytearray()
    for index, digest in enumerate(hash_pieces(fd, size, piece_size=piece_size)):
        digests += digest
        progress(min(size, (index + 1) * piece_size))
    content = Content(root_of(size, piece_size, bytes(digests)), size, piece_size)
    return content, bytes(digests)


class PieceSet:
    """
    The pieces of a content held so far: one bit per piece.  A set of ints
    cost about 100 bytes a piece (2.6 MiB for 20 GiB in 1 MiB pieces), so a
    client streaming a large file held memory that grew with its size.
    Supports what a set of piece indexes was used for: C{in}, C{add},
    C{|=}, C{clear}, C{len}, iteration in order, and equality with a set.
    """

    __slots__ = ("_bits", "_count")

    def __init__(self, indexes: Iterable[int] = ()) -> None:
        self._bits = bytearray()
        self._count = 0
        for index in indexes:
            self.add(index)

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or index < 0:
            return False
        byte = index >> 3
        return byte < len(self._bits) and bool(self._bits[byte] >> (index & 7) & 1)

    def add(self, index: int) -> None:
        if index < 0:
            raise ValueError(f"no piece {index}")
        byte = index >> 3
        if byte >= len(self._bits):
            self._bits.extend(bytes(byte + 1 - len(self._bits)))
        mask = 1 << (index & 7)
        if not self._bits[byte] & mask:
            self._bits[byte] |= mask
            self._count += 1

    def __ior__(self, indexes: Iterable[int]) -> PieceSet:
        for index in indexes:
            self.add(index)
        return self

    def clear(self) -> None:
        self._bits = bytearray()
        self._count = 0

    def first_missing(self, pieces: int) -> int | None:
        """The lowest index below C{pieces} not held, if any."""
        for byte_index, byte in enumerate(self._bits):
            if byte != 0xFF:
                index = byte_index * 8 + (~byte & (byte + 1)).bit_length() - 1
                return index if index < pieces else None
        index = len(self._bits) * 8
        return index if index < pieces else None

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[int]:
        for byte_index, byte in enumerate(self._bits):
            if byte:
                base = byte_index * 8
                for bit in range(8):
                    if byte >> bit & 1:
                        yield base + bit

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PieceSet):
            return self._bits.rstrip(b"\0") == other._bits.rstrip(b"\0")
        if isinstance(other, (set, frozenset)):
            return len(other) == self._count and all(i in self for i in other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PieceSet({sorted(self)!r})"
