"""Tests for L{p2p.pieces}: piece spans, digests, roots and piece lists."""

from __future__ import annotations

import os
import struct
import tempfile

from blake3 import blake3
from twisted.trial.unittest import SynchronousTestCase

from p2p import pieces
from p2p.pieces import Content, PieceList, PieceListMismatch, PieceSet

MIB = 1024 * 1024


def independent_root(data: bytes, piece_size: int = pieces.PIECE_SIZE) -> bytes:
    """The root of C{data}, worked out here from the documented definition."""
    digests = b"".join(
        blake3(data[start : start + piece_size]).digest()
        for start in range(0, len(data), piece_size)
    )
    preamble = b"p2p-relay pieces v1\n" + struct.pack(">QI", len(data), piece_size)
    return blake3(preamble + digests).digest()


class SpanTests(SynchronousTestCase):
    def test_counts(self) -> None:
        """An empty file has no piece; a partial last piece counts."""
        self.assertEqual(pieces.piece_count(0), 0)
        self.assertEqual(pieces.piece_count(1), 1)
        self.assertEqual(pieces.piece_count(MIB), 1)
        self.assertEqual(pieces.piece_count(MIB + 1), 2)
        self.assertEqual(pieces.piece_count(20 * 1024 * MIB), 20480)

    def test_spans(self) -> None:
        self.assertEqual(pieces.piece_span(0, 10), (0, 10))
        self.assertEqual(pieces.piece_span(1, MIB + 5), (MIB, 5))
        self.assertEqual(Content(b"r" * 32, 3 * MIB).span(2), (2 * MIB, MIB))

    def test_valid_piece_sizes(self) -> None:
        """Powers of two from 16 KiB to 16 MiB only."""
        for good in (16 * 1024, MIB, 16 * MIB):
            self.assertTrue(pieces.valid_piece_size(good))
        for bad in (0, 1, 8 * 1024, 3 * MIB, 32 * MIB, MIB + 1):
            self.assertFalse(pieces.valid_piece_size(bad), bad)


class HashTests(SynchronousTestCase):
    def descriptor(self, data: bytes) -> int:
        fd, path = tempfile.mkstemp()
        os.write(fd, data)
        os.unlink(path)
        self.addCleanup(os.close, fd)
        return fd

    def test_root_matches_the_definition(self) -> None:
        """hash_descriptor's root is BLAKE3 over the preamble and digests."""
        for data in (b"", b"x", os.urandom(MIB), os.urandom(2 * MIB + 17)):
            content, digests = pieces.hash_descriptor(self.descriptor(data), len(data))
            self.assertEqual(content.root, independent_root(data))
            self.assertEqual(content.size, len(data))
            self.assertEqual(len(digests), 32 * content.pieces)

    def test_progress(self) -> None:
        """Progress reports bytes hashed, ending at the size."""
        data = os.urandom(2 * MIB + 3)
        seen: list[int] = []
        pieces.hash_descriptor(self.descriptor(data), len(data), progress=seen.append)
        self.assertEqual(seen, [MIB, 2 * MIB, 2 * MIB + 3])

    def test_shrunk_file(self) -> None:
        """A file shorter than announced is an EIO, not a wrong root."""
        fd = self.descriptor(b"short")
        self.assertRaises(OSError, pieces.hash_descriptor, fd, 100)

    def test_slices(self) -> None:
        """hash_pieces can hash any run of pieces (the indexer's steps)."""
        data = os.urandom(3 * MIB)
        fd = self.descriptor(data)
        whole = list(pieces.hash_pieces(fd, len(data)))
        self.assertEqual(list(pieces.hash_pieces(fd, len(data), 1, 3)), whole[1:])


class PieceListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.urandom(3 * MIB + 100)
        self.digests = b"".join(
            pieces.hash_piece(self.data[i : i + MIB])
            for i in range(0, len(self.data), MIB)
        )
        self.content = Content(independent_root(self.data), len(self.data))

    def test_check_and_verify(self) -> None:
        """A list that matches the root verifies each piece, and only it."""
        checked = PieceList.check(self.content, self.digests)
        self.assertTrue(checked.verify(3, self.data[3 * MIB :]))
        self.assertFalse(checked.verify(3, self.data[3 * MIB : -1]))
        self.assertFalse(checked.verify(0, self.data[MIB : 2 * MIB]))
        tampered = bytearray(self.data[:MIB])
        tampered[7] ^= 1
        self.assertFalse(checked.verify(0, bytes(tampered)))

    def test_mismatch(self) -> None:
        """A list of the wrong length, or not matching the root, is refused."""
        self.assertRaises(
            PieceListMismatch, PieceList.check, self.content, self.digests[:-32]
        )
        swapped = self.digests[32:64] + self.digests[:32] + self.digests[64:]
        self.assertRaises(PieceListMismatch, PieceList.check, self.content, swapped)


class PieceSetTests(SynchronousTestCase):
    """The pieces held, one bit each: memory that does not grow with a
    file's size as a set of ints did (about 100 bytes a piece)."""

    def test_as_a_set(self) -> None:
        held = PieceSet([3, 0])
        held.add(9)
        held.add(3)
        held |= {1, 9}
        self.assertEqual(len(held), 4)
        self.assertEqual(list(held), [0, 1, 3, 9])
        self.assertEqual(held, {0, 1, 3, 9})
        self.assertNotEqual(held, {0, 1, 3})
        self.assertIn(9, held)
        for absent in (2, 10, 1000, -1, "3"):
            self.assertNotIn(absent, held)
        self.assertTrue(held)
        held.clear()
        self.assertFalse(held)
        self.assertEqual(held, set())
        self.assertEqual(held, PieceSet())

    def test_first_missing(self) -> None:
        held = PieceSet()
        self.assertEqual(held.first_missing(5), 0)
        held |= range(8)
        self.assertEqual(held.first_missing(20), 8)
        self.assertIsNone(held.first_missing(8))
        held |= {9, 10}
        self.assertEqual(held.first_missing(20), 8)
        held.add(8)
        self.assertEqual(held.first_missing(20), 11)
        self.assertIsNone(held.first_missing(11))

    def test_small_for_many_pieces(self) -> None:
        """20 GiB in 1 MiB pieces: 20,480 bits, 2,560 bytes."""
        held = PieceSet(range(20480))
        self.assertEqual(len(held), 20480)
        self.assertEqual(len(held._bits), 2560)
        self.assertEqual(held.first_missing(20481), 20480)

    def test_negative_index_refused(self) -> None:
        self.assertRaises(ValueError, PieceSet().add, -1)
