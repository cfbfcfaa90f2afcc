"""Tests for L{p2p.pulls}: how much a pull hands a buffering transport."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from p2p.pulls import ROOMY_STREAMS, TLS_RECORD_BYTES, BufferedPulls


class BufferedPullsTests(SynchronousTestCase):
    def test_few_streams_pull_full_chunks(self) -> None:
        """Up to C{roomy_streams} producing, a pull takes what it asks."""
        pulls = BufferedPulls(roomy_streams=2)
        self.assertEqual(pulls.size(256 * 1024), 256 * 1024)
        pulls.opened()
        pulls.opened()
        self.assertEqual(pulls.size(256 * 1024), 256 * 1024)

    def test_a_crowd_pulls_one_record(self) -> None:
        """Past C{roomy_streams}, a pull is one TLS record at most; a
        smaller ask stays as it is."""
        pulls = BufferedPulls(roomy_streams=2)
        for _ in range(3):
            pulls.opened()
        self.assertEqual(pulls.size(256 * 1024), TLS_RECORD_BYTES)
        self.assertEqual(pulls.size(1000), 1000)

    def test_full_chunks_again_when_the_crowd_leaves(self) -> None:
        pulls = BufferedPulls(roomy_streams=1)
        pulls.opened()
        pulls.opened()
        pulls.closed()
        self.assertEqual(pulls.size(256 * 1024), 256 * 1024)
        self.assertEqual(pulls.streams, 1)

    def test_defaults(self) -> None:
        """A record is 16 KiB of plaintext (RFC 8446, 5.1); 64 streams
        pulling 256 KiB hold at most 16 MiB."""
        pulls = BufferedPulls()
        self.assertEqual((pulls.roomy_streams, pulls.small), (ROOMY_STREAMS, 16384))
        self.assertEqual(ROOMY_STREAMS * 256 * 1024, 16 * 1024 * 1024)
