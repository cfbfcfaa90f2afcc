"""Property-based tests: hostile bytes never crash a protocol or corrupt state.

Each server protocol is fed arbitrary bytes, and arbitrary mixes of valid and
invalid lines, through a StringTransport.  Whatever arrives, ``dataReceived``
must not raise, every line sent back must be a documented reply, and the
server's state must stay well-formed.  The client's parsers get the same
treatment as if a malicious relay or peer were answering.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2p import pieces, wire
from p2p.client import FileFetchProtocol, PeerFailed
from p2p.limits import ReadGate
from p2p.peer import PeerProtocol
from p2p.registry import MemoryRegistry
from p2p.relay import Relay, RelayProtocol
from p2p.request import IncompleteReply, LineRequestProtocol
from p2p.share import ShareFolder
from p2p.sink import PieceSink, StreamOutput

from ._indexed import indexed

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ERROR_CODES = {int(code) for code in wire.Code}
RELAY_REPLY = re.compile(
    r"P2P/1 relay|OK( .*)?|PEER [0-9a-f]{16} \S+ \d+ age=\d+( name=\S+)?|ERR (\d{3}) .+"
)


# The smallest piece size a client accepts: several pieces in a few KiB.
SMALL_PIECE = pieces.MIN_PIECE_SIZE


def piece_digests(content: bytes, piece_size: int) -> bytes:
    """The digests of C{content} cut in C{piece_size} pieces, concatenated."""
    return b"".join(
        pieces.hash_piece(content[i : i + piece_size])
        for i in range(0, len(content), piece_size)
    )


def root_of(content: bytes, piece_size: int) -> str:
    """The root of C{content} cut in C{piece_size} pieces, as on the wire."""
    digests = piece_digests(content, piece_size)
    return pieces.root_of(len(content), piece_size, digests).hex()


def header_for(content: bytes, piece_size: int) -> wire.FileHeader:
    """The header of a whole-file reply for C{content} (a GET)."""
    count = pieces.piece_count(len(content), piece_size)
    return wire.FileHeader(
        len(content),
        root_of(content, piece_size),
        0,
        len(content),
        piece_size,
        pieces.DIGEST_BYTES * count if count > 1 else 0,
    )


# The roots of PeerFuzzTests' shared file and of the secret outside the share.
A_ROOT = root_of(b"hello\n", pieces.PIECE_SIZE)
SECRET_ROOT = root_of(b"TOP-SECRET-OUTSIDE-THE-SHARE", pieces.PIECE_SIZE)


VALID_RELAY_LINES = st.sampled_from(
    [
        b"REGISTER 9001",
        b"REGISTER 9002 name=alice",
        b"REGISTER 65535 name=b.c-d_e",
        b"UNREGISTER 9001",
        b"PEERS",
        b"peers",
        b"",
    ]
)
GARBAGE_LINES = st.binary(max_size=80).map(lambda b: b.replace(b"\n", b""))
HOSTILE_WORDS = st.sampled_from(
    [
        b"REGISTER",
        b"REGISTER 0",
        b"REGISTER -1",
        b"REGISTER 1e3",
        b"REGISTER 9001 host=6.6.6.6",
        b"REGISTER 9001 name=",
        b"REGISTER 9001 name=a name=b",
        b"REGISTER 9001 evil=1",
        b"UNREGISTER",
        b"PEERS extra",
        b"\xff\xfe",
        b"REGISTER 9001\x00",
        b"A" * 2000,
    ]
)


def _lines(data: bytes) -> list[str]:
    return [line.decode("utf-8") for line in data.split(b"\n") if line]


class RelayFuzzTests(SynchronousTestCase):
    """The relay answers anything with documented replies and stays sane."""

    def _relay(self) -> tuple[RelayProtocol, StringTransport, MemoryRegistry]:
        registry = MemoryRegistry(ttl=60, max_peers=50, max_per_host=20)
        relay = Relay(registry, Clock())
        protocol = RelayProtocol(relay, idle_timeout=30)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 4444))
        protocol.makeConnection(transport)
        return protocol, transport, registry

    def _check(self, transport: StringTransport, registry: MemoryRegistry) -> None:
        for line in _lines(transport.value()):
            match = RELAY_REPLY.fullmatch(line)
            self.assertIsNotNone(match, f"undocumented reply {line!r}")
            if line.startswith("ERR "):
                self.assertIn(int(line[4:7]), ERROR_CODES)
        for lease in registry:
            self.assertEqual(lease.host, "10.1.2.3")
            self.assertTrue(1 <= lease.port <= 65535)
            self.assertEqual(str(ipaddress.ip_address(lease.host)), lease.host)
            if lease.name is not None:
                wire.parse_display_name(lease.name)

    @FUZZ
    @given(st.lists(st.binary(max_size=300), max_size=8))
    def test_arbitrary_bytes(self, chunks: list[bytes]) -> None:
        """Random chunks: no exception, only documented replies."""
        protocol, transport, registry = self._relay()
        for chunk in chunks:
            protocol.dataReceived(chunk)
        self._check(transport, registry)

    @FUZZ
    @given(
        st.lists(
            st.one_of(VALID_RELAY_LINES, GARBAGE_LINES, HOSTILE_WORDS), max_size=25
        ),
        st.sampled_from([b"\n", b"\r\n"]),
    )
    def test_mixed_lines(self, lines: list[bytes], ending: bytes) -> None:
        """Valid and invalid lines mixed: state stays consistent."""
        protocol, transport, registry = self._relay()
        protocol.dataReceived(b"".join(line + ending for line in lines))
        self._check(transport, registry)


class PeerFuzzTests(SynchronousTestCase):
    """The peer answers anything with documented replies and leaks nothing."""

    SECRET = b"TOP-SECRET-OUTSIDE-THE-SHARE"

    def setUp(self) -> None:
        base = tempfile.mkdtemp(prefix="p2p-fuzz-")
        self.addCleanup(_rmtree, base)
        self.share_dir = os.path.join(base, "share")
        os.mkdir(self.share_dir)
        with open(os.path.join(base, "secret.txt"), "wb") as stream:
            stream.write(self.SECRET)
        with open(os.path.join(self.share_dir, "a.txt"), "wb") as stream:
            stream.write(b"hello\n")
        os.symlink(
            os.path.join(base, "secret.txt"), os.path.join(self.share_dir, "link")
        )
        self.share = ShareFolder(self.share_dir)
        # One index for every example: what one example asks to index is
        # simply indexed for the next ones.
        self.index = indexed(self, self.share, Clock())

    def _serve(self, data: bytes) -> bytes:
        clock = Clock()
        protocol = PeerProtocol(self.share, self.index, clock, idle_timeout=30)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 4444))
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        # Drive any file transfer the input started to its end.
        for _ in range(1000):
            # A read gate (ReadGate) is not a transfer: nothing to drive.
            if transport.producer is None or isinstance(transport.producer, ReadGate):
                break
            transport.producer.resumeProducing()
        return transport.value()

    @FUZZ
    @given(st.binary(max_size=400))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        """Random bytes: no exception, no byte from outside the share."""
        output = self._serve(data)
        self.assertNotIn(self.SECRET, output)
        self.assertTrue(output.startswith(b"P2P/2 peer\n"))

    @FUZZ
    @given(
        st.lists(
            st.one_of(
                st.sampled_from(
                    [
                        "GET a.txt",
                        "GET link",
                        "GET ../secret.txt",
                        "GET ./a.txt",
                        "RANGE 3 2 a.txt",
                        "RANGE 99 1 a.txt",
                        "RANGE 0 100 link",
                        f"BLOB {A_ROOT} 0 6",
                        f"BLOB {A_ROOT} 7 1",
                        f"BLOB {SECRET_ROOT} 0 100",
                        f"PIECES {A_ROOT}",
                        f"PIECES {SECRET_ROOT}",
                        "RESUME 3 a.txt",
                        "LIST",
                        "LIST limit=1",
                        "LIST cursor=1",
                        "LIST limit=0",
                    ]
                ),
                st.text(max_size=40).map(lambda text: "GET " + text),
                st.text(max_size=40).map(lambda text: "RANGE 0 9 ../" + text),
                st.text(max_size=70).map(lambda text: "BLOB " + text),
            ),
            max_size=10,
        )
    )
    def test_hostile_names(self, lines: list[str]) -> None:
        """
        GET, RANGE, BLOB, PIECES and LIST with any argument never leak the
        secret (not even by its root) or crash.
        """
        data = b"".join(
            line.encode("utf-8", "surrogatepass") + b"\n"
            for line in lines
            if "\n" not in line and "\r" not in line
        )
        output = self._serve(data)
        self.assertNotIn(self.SECRET, output)


class ClientParsingFuzzTests(SynchronousTestCase):
    """A malicious relay or peer makes the client fail cleanly, never crash."""

    @FUZZ
    @given(st.lists(st.binary(max_size=200), max_size=6), st.booleans())
    def test_relay_reply(self, chunks: list[bytes], listing: bool) -> None:
        """Arbitrary replies to PEERS: a result or an expected failure."""
        protocol = LineRequestProtocol("relay", b"PEERS", listing)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"P2P/1 relay\n")
        for chunk in chunks:
            protocol.dataReceived(chunk)
        protocol.connectionLost(None)
        results: list = []
        protocol.result.addBoth(results.append)
        self.assertEqual(len(results), 1)
        outcome = results[0]
        if not isinstance(outcome, list):
            outcome.trap(wire.WireError, wire.RemoteError, IncompleteReply)
        elif listing:
            # A listing that parsed may still hold bad PEER lines; the
            # client's parser must reject those with WireError only.
            for line in outcome[1:]:
                try:
                    wire.PeerEntry.from_line(line)
                except wire.WireError:
                    pass

    @FUZZ
    @given(st.binary(max_size=300), st.binary(max_size=300))
    def test_peer_reply(self, header: bytes, body: bytes) -> None:
        """Arbitrary file replies: success only for content that verifies."""
        out = io.BytesIO()
        sink = PieceSink(StreamOutput(out))
        clock = Clock()
        protocol = FileFetchProtocol(wire.Get("a.txt"), sink, clock, idle_timeout=10)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"P2P/2 peer\n")
        protocol.dataReceived(header)
        protocol.dataReceived(body)
        protocol.connectionLost(None)
        results: list = []
        protocol.result.addBoth(results.append)
        self.assertEqual(len(results), 1)
        outcome = results[0]
        if isinstance(outcome, wire.FileHeader):
            received = out.getvalue()
            self.assertEqual(len(received), outcome.size)
            self.assertEqual(root_of(received, outcome.piece), outcome.root)
        else:
            outcome.trap(PeerFailed)
        self.assertEqual(clock.getDelayedCalls(), [])

    @FUZZ
    @given(st.binary(min_size=0, max_size=2000), st.integers(0, 2000))
    def test_truncated_or_padded_file(self, content: bytes, cut: int) -> None:
        """A valid header with too few or too many bytes fails that peer."""
        header = header_for(content, pieces.PIECE_SIZE)
        body = (content + b"extra")[:cut]
        out = io.BytesIO()
        sink = PieceSink(StreamOutput(out))
        protocol = FileFetchProtocol(wire.Get("a.txt"), sink, Clock(), idle_timeout=10)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"P2P/2 peer\n" + header.to_line() + b"\n" + body)
        protocol.connectionLost(None)
        results: list = []
        protocol.result.addBoth(results.append)
        if body == content:
            self.assertEqual(results[0], header)
            self.assertEqual(out.getvalue(), content)
        elif isinstance(results[0], wire.FileHeader):
            # Only an empty file completes before any (surplus) byte arrives.
            self.assertEqual((content, results[0]), (b"", header))
        else:
            results[0].trap(PeerFailed)
            self.assertEqual(out.getvalue(), b"")

    @FUZZ
    @given(
        st.integers(0, 5 * SMALL_PIECE),
        st.integers(0, 5 * SMALL_PIECE + 10),
        st.one_of(st.none(), st.integers(0, 5 * SMALL_PIECE)),
        st.integers(1, 3000),
    )
    def test_only_verified_pieces_reach_the_output(
        self, size: int, cut: int, flip: int | None, segment: int
    ) -> None:
        """
        A file of several (small) pieces, cut short, padded or with one byte
        flipped, in segments of any size: whatever happens, the output holds
        a run of whole pieces from the start of the content, all verified,
        and the whole content only on success.
        """
        content = bytes(i * 7 % 251 for i in range(size))
        header = header_for(content, SMALL_PIECE)
        digests = piece_digests(content, SMALL_PIECE)
        body = bytearray((content + b"extra")[:cut])
        if flip is not None and flip < len(body):
            body[flip] ^= 0x20
        stream = b"P2P/2 peer\n" + header.to_line() + b"\n"
        if header.hashes:
            stream += digests
        stream += bytes(body)
        out = io.BytesIO()
        sink = PieceSink(StreamOutput(out))
        clock = Clock()
        protocol = FileFetchProtocol(wire.Get("a.txt"), sink, clock, idle_timeout=10)
        protocol.makeConnection(StringTransport())
        for start in range(0, len(stream), segment):
            protocol.dataReceived(stream[start : start + segment])
        protocol.connectionLost(None)
        results: list = []
        protocol.result.addBoth(results.append)
        received = out.getvalue()
        self.assertEqual(received, content[: len(received)])
        if isinstance(results[0], wire.FileHeader):
            self.assertEqual(received, content)
            self.assertEqual(bytes(body[: len(content)]), content)
        else:
            results[0].trap(PeerFailed)
            self.assertTrue(
                len(received) % SMALL_PIECE == 0 or len(received) == len(content)
            )
            self.assertLessEqual(len(received), len(content))
        self.assertEqual(clock.getDelayedCalls(), [])


class WireFuzzTests(SynchronousTestCase):
    """The pure parsers accept or raise WireError; nothing else."""

    @FUZZ
    @given(st.binary(max_size=200))
    def test_parsers(self, line: bytes) -> None:
        for parse in (wire.parse_relay_request, wire.parse_peer_request):
            try:
                parse(line)
            except wire.WireError as e:
                self.assertIn(int(e.code), ERROR_CODES)
        for reply in (wire.Registered, wire.PeerEntry, wire.FileHeader, wire.FileEntry):
            try:
                reply.from_line(line)
            except (wire.WireError, wire.RemoteError):
                pass


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
