"""Tests for L{p2p.swarm} and its use by L{p2p.fetch.Fetcher}.

A L{Swarm} fetches the missing pieces of one content from several holders
at once, in units of L{UNIT_PIECES} pieces asked by content
(``BLOB <root> <offset> <length>``, one connection per unit).  The holders
here are real L{PeerProtocol} servers over the share of a real file, or
scripted servers that break, lie or stay silent, all wired in memory
(L{tests.test_client.Network}) on a L{Clock}: nothing waits on real time.

The file is 20 pieces of 1 MiB, the last one short: five units, enough for
three holders to share and for the end game to race the last ones, small
enough to move in memory in a few hundredths of a second.
"""

from __future__ import annotations

import errno
import io
import os
import random
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2p import pieces, wire
from p2p.client import FileFetchProtocol, OutputFailed, PeerFailed
from p2p.fetch import SWARM_MIN_BYTES, Attempt, Fetcher, NotFoundAnywhere
from p2p.pace import DEFAULT_PACE, Pace
from p2p.peer import PeerFactory
from p2p.pieces import PIECE_SIZE, Content, PieceData, PieceList, length_of
from p2p.share import ShareFolder
from p2p.sink import PARTIAL_SUFFIX, FileOutput, PieceSink, StreamOutput
from p2p.swarm import (
    STREAM_WINDOW_PIECES,
    UNIT_PIECES,
    SourceReport,
    Swarm,
    SwarmFailed,
)
from p2p.throttle import TokenBucket
from tests.test_client import (
    CONNECT,
    IDLE,
    PEER_IDLE,
    Network,
    ScriptedServer,
    breaks_after,
    describe,
    flipped,
    open_files,
    reply_for,
)
from tests.test_share import temp_dir, write

MIB = 1024 * 1024
UNIT_BYTES = UNIT_PIECES * PIECE_SIZE
NAME = "big.bin"
# Twenty pieces, the last one short: five units.  Seeded, so that a failure
# can be replayed byte for byte.
DATA = random.Random(20).randbytes(20 * MIB - 1234)
DATA_CONTENT = describe(DATA)[0]
# Long enough that no test could pass by waiting for it: a stalled holder
# must be raced, not timed out.
LONG_IDLE = 3600.0


def blob(offset: int, length: int) -> bytes:
    """The request line for C{length} bytes of L{DATA}'s content from
    C{offset}."""
    return wire.Blob(DATA_CONTENT.root_hex, offset, length).to_line()


def unit_line(index: int) -> bytes:
    """The request line for unit C{index} of L{DATA} (four pieces, fewer
    for the last)."""
    offset = index * UNIT_BYTES
    return blob(offset, min(UNIT_BYTES, len(DATA) - offset))


def started_sink(case: SynchronousTestCase, output, data: bytes = DATA) -> PieceSink:
    """
    A sink that already knows C{data}'s content and piece list, as it does
    once the first holder described it: what a L{Swarm} starts from.
    """
    content, digests = describe(data)
    sink = PieceSink(output)
    case.successResultOf(sink.begin(content, PieceList.check(content, digests)))
    return sink


def serve(data: bytes, line: bytes, cut: int | None = None) -> bytes:
    """
    What an honest holder of C{data} sends for the request C{line} (a GET
    or a BLOB), cut after C{cut} bytes of content if given.

    Not L{tests.test_client.answer}: that one sends the piece list with a
    BLOB from offset 0, as if it were a GET, which no peer does (a client
    rejects it as a protocol error), and a swarm's first unit is such a
    BLOB.
    """
    request = wire.parse_peer_request(line)
    if isinstance(request, wire.Blob):
        count = min(request.length, len(data) - request.offset)
        reply = reply_for(data, request.offset, count, digests=b"")
    else:
        count = len(data)
        reply = reply_for(data)
    return reply if cut is None else reply[: len(reply) - count + cut]


def hangs_up_after(count: int, data: bytes):
    """A holder of C{data} that answers any request properly, but hangs up
    after C{count} bytes of content."""
    return lambda: ScriptedServer(lambda line: serve(data, line, count), close=True)


def answers_once(data: bytes):
    """
    A holder of C{data} that serves its first request properly and then
    stays silent on every later one (over any connection): a peer that
    stalls mid-fetch without hanging up.
    """
    asked: list[bytes] = []

    def reply(line: bytes) -> bytes:
        asked.append(line)
        return serve(data, line) if len(asked) == 1 else b""

    return lambda: ScriptedServer(reply)


def serves_names_only(data: bytes):
    """
    A holder that answers ``GET`` with C{data} (piece list included) but
    refuses every ``BLOB``: it describes the content, then cannot serve a
    unit of it.
    """

    def reply(line: bytes) -> bytes:
        if line.startswith(b"GET "):
            return serve(data, line)
        return b"ERR 404 no such content\n"

    return lambda: ScriptedServer(reply)


class SwarmNetwork(Network):
    """
    L{Network}, with connections that close the way real ones do, and
    with each connection's pump kept by peer.

    iosim's transport, unlike a TCP one, never stops a server's file
    producer when the connection is lost: a throttled peer would keep its
    token-bucket timer after its client left, and a test could not tell a
    leaked timer of ours from that artefact.  Here a transport stops its
    producer before telling the protocol, as
    C{twisted.internet.abstract.FileDescriptor.connectionLost} does.
    """

    def __init__(self, case: SynchronousTestCase, clock: Clock) -> None:
        super().__init__(case, clock)
        self.pumps_by_port: dict[int, list[iosim.IOPump]] = {}

    def endpoint_for(self, peer: wire.PeerEntry) -> _ClosingEndpoint:
        return _ClosingEndpoint(self, peer, super().endpoint_for(peer))

    def all_closed(self) -> bool:
        """Whether every connection made is closed, on both ends."""
        return all(
            pump.clientIO.disconnected and pump.serverIO.disconnected
            for pump in self.pumps
        )

    def step(self, times: int = 1) -> None:
        """Move at most one write each way on every connection, C{times}
        over: a transfer caught half-way."""
        for _ in range(times):
            for pump in list(self.pumps):
                pump.pump()


class _ClosingEndpoint:
    """The endpoint L{SwarmNetwork.endpoint_for} gives for one peer."""

    def __init__(self, network: SwarmNetwork, peer: wire.PeerEntry, endpoint):
        self.network = network
        self.peer = peer
        self.endpoint = endpoint

    def connect(self, factory):
        before = len(self.network.pumps)
        d = self.endpoint.connect(factory)
        for pump in self.network.pumps[before:]:
            for transport in (pump.clientIO, pump.serverIO):
                _stop_producer_on_close(transport)
            self.network.pumps_by_port.setdefault(self.peer.port, []).append(pump)
        return d


def _stop_producer_on_close(transport: iosim.FakeTransport) -> None:
    report = transport.reportDisconnect

    def stop_then_report() -> None:
        producer, transport.producer = transport.producer, None
        if producer is not None:
            producer.stopProducing()
        report()

    transport.reportDisconnect = stop_then_report  # type: ignore[method-assign]


class _Watching:
    """
    An endpoint that shows each protocol it connects to C{seen} before
    handing it to its user (the swarm, the fetcher): what it was asked,
    what the output looked like then, how the connection ended.
    """

    def __init__(self, endpoint, seen: Callable[[FileFetchProtocol], object]):
        self.endpoint = endpoint
        self.seen = seen

    def connect(self, factory):
        d = self.endpoint.connect(factory)

        def show(protocol: FileFetchProtocol) -> FileFetchProtocol:
            self.seen(protocol)
            return protocol

        return d.addCallback(show)


class _FillsUp(StreamOutput):
    """A stream that fails with C{ENOSPC} past C{room} bytes."""

    def __init__(self, stream: io.BytesIO, room: int) -> None:
        super().__init__(stream)
        self.room_left = room

    def write_piece(self, offset: int, data: PieceData) -> None:
        size = length_of(data)
        if size > self.room_left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room_left -= size
        super().write_piece(offset, data)


class HandoverProtocolTests(SynchronousTestCase):
    """
    L{FileFetchProtocol}'s C{on_content} hook, on a StringTransport: the
    point where a first fetch hands its content over to several sources.
    """

    SMALL = DATA[: 3 * MIB + 5]  # four pieces: a piece list comes first

    def setUp(self) -> None:
        self.clock = Clock()
        self.out = io.BytesIO()
        self.sink = PieceSink(StreamOutput(self.out))
        self.described: list[Content] = []

    def connect(self, request, hand_over: bool) -> FileFetchProtocol:
        def on_content(content: Content) -> bool:
            self.described.append(content)
            return hand_over

        self.protocol = FileFetchProtocol(
            request, self.sink, self.clock, IDLE, on_content=on_content
        )
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"P2P/2 peer\n")
        return self.protocol

    def test_hands_over_once_the_piece_list_verified(self) -> None:
        """
        C{on_content} returning True ends the fetch as a L{PeerFailed} of
        kind ``handover`` right after the piece list checked out, before a
        single byte of content is stored; the sink keeps the content and
        its piece list (what the swarm starts from), the connection is
        dropped and no timer is left.
        """
        self.connect(wire.Get(NAME), hand_over=True)
        self.protocol.dataReceived(reply_for(self.SMALL))
        failure = self.failureResultOf(self.protocol.result, PeerFailed)
        self.assertEqual(failure.value.kind, "handover")
        self.assertEqual(self.described, [describe(self.SMALL)[0]])
        self.assertEqual(self.sink.content, describe(self.SMALL)[0])
        self.assertIsNotNone(self.sink.pieces)
        self.assertEqual((self.sink.done, self.out.getvalue()), (set(), b""))
        self.assertTrue(self.transport.disconnected)  # aborted
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_declined(self) -> None:
        """C{on_content} returning False lets the single stream go on."""
        self.connect(wire.Get(NAME), hand_over=False)
        self.protocol.dataReceived(reply_for(self.SMALL))
        self.successResultOf(self.protocol.result)
        self.assertEqual(len(self.described), 1)
        self.assertEqual(self.out.getvalue(), self.SMALL)

    def test_not_asked_for_a_unit(self) -> None:
        """
        A BLOB (a swarm's unit, or the rest of a content already known) is
        no first contact: C{on_content} is not asked, or every unit would
        hand over again.
        """
        self.sink = started_sink(self, StreamOutput(self.out), self.SMALL)
        self.connect(wire.Blob(describe(self.SMALL)[0].root_hex, 0, MIB), True)
        self.protocol.dataReceived(reply_for(self.SMALL, 0, MIB, digests=b""))
        self.successResultOf(self.protocol.result)
        self.assertEqual(self.described, [])
        self.assertEqual(self.sink.done, {0})


class SwarmTestsMixin:
    """Holders in memory on a Clock, and a Swarm over them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.network = SwarmNetwork(self, self.clock)
        self.dropped: list[SourceReport] = []
        self._shares: dict[bytes, ShareFolder] = {}
        self.files_before = open_files()

    def share(self, data: bytes = DATA, name: str = NAME) -> ShareFolder:
        """A share folder holding C{data} as C{name}, in a fresh directory."""
        root = temp_dir(self)
        write(os.path.join(root, name), data)
        return ShareFolder(root)

    def holders(self, count: int, data: bytes = DATA) -> list[wire.PeerEntry]:
        """C{count} honest holders of C{data}, serving one share (and one
        index, built once)."""
        share = self._shares.get(data)
        if share is None:
            share = self._shares[data] = self.share(data)
        return [self.network.add(share) for _ in range(count)]

    def throttled(self, rate: int, data: bytes = DATA) -> wire.PeerEntry:
        """An honest holder of C{data} that uploads C{rate} bytes a second
        (its own L{TokenBucket} on the test's clock)."""
        [peer] = self.holders(1, data)
        index = self.network.behaviours[peer.port].index
        share = self._shares[data]
        self.network.behaviours[peer.port] = PeerFactory(
            share, index, self.clock, PEER_IDLE, throttle=TokenBucket(self.clock, rate)
        )
        return peer

    def swarm(
        self,
        sink: PieceSink,
        candidates: list[wire.PeerEntry],
        max_sources: int = 3,
        idle_timeout: float = IDLE,
        endpoint_for=None,
        pace: Pace = DEFAULT_PACE,
    ) -> Swarm:
        return Swarm(
            self.clock,
            sink,
            candidates,
            endpoint_for or self.network.endpoint_for,
            CONNECT,
            idle_timeout,
            max_sources,
            report=self.dropped.append,
            pace=pace,
        )

    def report_of(
        self, reports: list[SourceReport], peer: wire.PeerEntry
    ) -> SourceReport:
        [report] = [r for r in reports if r.peer == peer]
        return report

    def assertQuiet(self) -> None:
        """
        Once the closes reached every server: no timer on the clock, no
        connection open, and no served file left open (a unit cancelled
        mid-transfer closes its file on the holder too).  The partial file
        of a file output stays open until it is finished or abandoned.
        """
        self.network.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.network.all_closed())
        opened = open_files() - self.files_before
        self.assertEqual(
            {p for _, p in opened if not p.endswith(PARTIAL_SUFFIX)}, set()
        )


class SwarmTests(SwarmTestsMixin, SynchronousTestCase):
    """L{Swarm} on its own, from a sink that already knows the content."""

    def stream_sink(self) -> PieceSink:
        self.out = io.BytesIO()
        return started_sink(self, StreamOutput(self.out))

    def file_sink(self) -> PieceSink:
        self.target = os.path.join(temp_dir(self), "saved.bin")
        return started_sink(self, FileOutput(self.target))

    def assertSaved(self, sink: PieceSink) -> None:
        """The file output holds exactly L{DATA} once finished."""
        self.assertTrue(sink.complete)
        self.successResultOf(sink.finish())
        with open(self.target, "rb") as stream:
            self.assertEqual(stream.read(), DATA)

    def units_asked(self, peer: wire.PeerEntry) -> list[tuple[int, int]]:
        """The (offset, length) of every BLOB C{peer} received."""
        asked = []
        for line in self.network.requests(peer):
            request = wire.parse_peer_request(line)
            assert isinstance(request, wire.Blob), line
            self.assertEqual(request.root, DATA_CONTENT.root_hex)
            asked.append((request.offset, request.length))
        return asked

    def test_three_honest_holders(self) -> None:
        """
        Three holders share the content: every request is a BLOB of one
        unit on a four-piece boundary, more than one holder serves units,
        each unit counts once (the races' losers count nothing), the file
        is byte for byte the content, and nothing is left running.
        """
        peers = self.holders(3)
        sink = self.file_sink()
        d = self.swarm(sink, peers).run()
        self.network.run(d)
        reports = self.successResultOf(d)
        self.assertEqual([r.peer for r in reports], peers)
        units = [line for peer in peers for line in self.network.requests(peer)]
        self.assertEqual(set(units), {unit_line(i) for i in range(5)})
        for peer in peers:
            for offset, length in self.units_asked(peer):
                self.assertEqual(offset % UNIT_BYTES, 0)
                self.assertEqual(length, min(UNIT_BYTES, len(DATA) - offset))
        self.assertGreaterEqual(len([r for r in reports if r.units]), 2)
        self.assertEqual(sum(r.units for r in reports), 5)
        self.assertEqual(sum(r.bytes for r in reports), len(DATA))
        self.assertEqual([r.reason for r in reports], [None] * 3)
        self.assertEqual(self.dropped, [])
        self.assertEqual(self.clock.seconds(), 0)
        self.assertQuiet()
        self.assertSaved(sink)

    def test_max_sources(self) -> None:
        """
        No more than C{max_sources} holders are asked at once: the others
        stay candidates, in case one of the first fails.
        """
        peers = self.holders(4)
        sink = self.stream_sink()
        d = self.swarm(sink, peers, max_sources=2).run()
        self.network.run(d)
        reports = self.successResultOf(d)
        self.assertEqual([r.peer for r in reports], peers[:2])
        self.assertEqual(set(self.network.contacted), {7000, 7001})
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_faster_holders_take_more_units(self) -> None:
        """
        A source asks for its next unit as soon as one is done, so the
        work follows speed: two holders uploading 4 MiB/s each serve more
        units than one at 2.5 MiB/s, which still serves its share rather
        than being left out.
        """
        fast = [self.throttled(4 * MIB), self.throttled(4 * MIB)]
        slow = self.throttled(5 * MIB // 2)
        sink = self.stream_sink()
        d = self.swarm(sink, [*fast, slow]).run()
        self.network.run(d, limit=5000)
        reports = self.successResultOf(d)
        slow_units = self.report_of(reports, slow).units
        self.assertGreater(slow_units, 0)
        for peer in fast:
            self.assertGreater(self.report_of(reports, peer).units, slow_units)
        # 20 MiB at 10.5 MiB/s in all: a little over two seconds at best.
        self.assertLess(self.clock.seconds(), 2.5)
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_slow_source_is_dropped(self) -> None:
        """
        A holder below the minimum rate (here 1 MiB/s over 1 s, against
        256 KiB/s) is dropped as a source at the end of its first stretch,
        its unit goes back to the pool, and the others finish the content.
        """
        fast = [self.throttled(4 * MIB), self.throttled(4 * MIB)]
        slow = self.throttled(MIB // 4)
        sink = self.stream_sink()
        pace = Pace(min_rate=MIB, min_rate_time=1.0, header_timeout=30.0)
        d = self.swarm(sink, [slow, *fast], pace=pace).run()
        self.network.run(d, limit=5000)
        reports = self.successResultOf(d)
        [dropped] = self.dropped
        self.assertEqual(dropped.peer, slow)
        self.assertEqual(dropped.kind, "slow")
        self.assertIn("too slow", dropped.reason)
        self.assertEqual(self.report_of(reports, slow).units, 0)
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_end_game_races_a_stalled_unit(self) -> None:
        """
        With every unit taken, an idle source duplicates the unit of a
        source that stalled (it served one unit, then went silent without
        hanging up).  The duplicate wins, the stalled connection is closed,
        and the content completes at once: no idle timeout is waited for.
        The stalled source is not dropped (it was raced, not failed).
        """
        stalls = self.network.add(answers_once(DATA))
        peers = [stalls, *self.holders(2)]
        sink = self.stream_sink()
        d = self.swarm(sink, peers, idle_timeout=LONG_IDLE).run()
        self.network.flush()
        reports = self.successResultOf(d)
        self.assertEqual(self.clock.seconds(), 0)
        _, stalled = self.network.requests(stalls)
        racers = [p for p in peers[1:] if stalled in self.network.requests(p)]
        self.assertEqual(len(racers), 1)
        self.assertEqual(self.report_of(reports, stalls).units, 1)
        self.assertIsNone(self.report_of(reports, stalls).reason)
        self.assertEqual(self.dropped, [])
        stalled_pump = self.network.pumps_by_port[stalls.port][-1]
        self.assertTrue(stalled_pump.clientIO.disconnected)
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_corrupted_piece(self) -> None:
        """
        A holder whose file went bad on disk behind its index's back is
        dropped at the bad piece ("corrupted"); the pieces of its unit
        before that one are kept, the rest of the unit is fetched from
        another holder, and the file is the content byte for byte.
        """
        honest = self.holders(2)
        rotten_share = self.share(flipped(DATA, 5 * MIB + 7))
        rotten = self.network.add(self.network.rotten(rotten_share, {NAME: DATA}))
        peers = [honest[0], rotten, honest[1]]
        sink = self.file_sink()
        d = self.swarm(sink, peers).run()
        self.network.run(d)
        reports = self.successResultOf(d)
        self.assertEqual(self.network.requests(rotten), [unit_line(1)])
        [dropped] = self.dropped
        self.assertEqual(dropped.peer, rotten)
        self.assertIn("corrupted", dropped.reason)
        self.assertEqual(dropped.reason, "corrupted: piece 5 does not match its digest")
        self.assertEqual(self.report_of(reports, rotten), dropped)
        others = [line for p in honest for line in self.network.requests(p)]
        self.assertIn(blob(5 * MIB, 3 * MIB), others)
        self.assertNotIn(unit_line(1), others)  # piece 4 verified: kept
        self.assertQuiet()
        self.assertSaved(sink)

    def test_broken_mid_unit(self) -> None:
        """
        A holder that hangs up in the middle of its unit is dropped; the
        piece it completed is kept, and only the pieces after it are asked
        again, from another holder.  Its report counts that piece: the
        sources' bytes add up to the content.
        """
        honest = self.holders(2)
        breaks = self.network.add(breaks_after(MIB + 1000, DATA))
        peers = [honest[0], breaks, honest[1]]
        sink = self.stream_sink()
        d = self.swarm(sink, peers).run()
        self.network.run(d)
        reports = self.successResultOf(d)
        broken = self.report_of(reports, breaks)
        self.assertEqual((broken.units, broken.bytes), (0, MIB))
        self.assertEqual(sum(r.bytes for r in reports), len(DATA))
        [dropped] = self.dropped
        self.assertEqual(dropped.peer, breaks)
        self.assertEqual(
            dropped.reason, f"broken transfer after {MIB + 1000} of {UNIT_BYTES} bytes"
        )
        others = [line for p in honest for line in self.network.requests(p)]
        self.assertIn(blob(5 * MIB, 3 * MIB), others)
        self.assertNotIn(unit_line(1), others)
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_holder_without_the_content_is_replaced(self) -> None:
        """
        A candidate that turns out not to hold the content (``ERR 404``)
        is dropped, and the next candidate takes its place and its unit.
        """
        first, second = self.holders(2)
        lacks = self.network.add(self.share(b"something else\n", "other.bin"))
        spare = self.holders(1)[0]
        sink = self.stream_sink()
        d = self.swarm(sink, [first, lacks, second, spare]).run()
        self.network.run(d)
        reports = self.successResultOf(d)
        [dropped] = self.dropped
        self.assertEqual(dropped.peer, lacks)
        self.assertEqual(dropped.reason, "refused: ERR 404 no such content")
        self.assertEqual([r.peer for r in reports], [first, lacks, second, spare])
        self.assertEqual(self.network.requests(spare)[0], unit_line(1))
        self.assertGreater(self.report_of(reports, spare).units, 0)
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_dropped_at_once_is_not_asked_again(self) -> None:
        """
        A holder whose connection fails at once is dropped once and never
        given another unit (its failure comes back while the swarm is still
        handing out work).
        """
        refuse_a = self.network.add("refuse")
        refuse_b = self.network.add("refuse")
        holder = self.holders(1)[0]
        sink = self.stream_sink()
        d = self.swarm(sink, [refuse_a, refuse_b, holder]).run()
        self.network.run(d)
        self.successResultOf(d)
        self.assertEqual(
            sorted(r.peer.port for r in self.dropped),
            sorted([refuse_a.port, refuse_b.port]),
        )
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_stream_window(self) -> None:
        """
        To stdout, no unit starts more than L{STREAM_WINDOW_PIECES} pieces
        past the first piece the stream still waits for: with the first
        unit stalled, the others fill the window and then race the stalled
        unit instead of running ahead (pieces that arrive early wait in
        memory).  The stream is the content, in order.
        """
        self.assertEqual(STREAM_WINDOW_PIECES * PIECE_SIZE, 4 * UNIT_BYTES)
        mute = self.network.add(lambda: ScriptedServer())
        peers = [mute, *self.holders(2)]
        sink = self.stream_sink()
        seen: list[tuple[int, wire.Blob]] = []

        def note(protocol: FileFetchProtocol) -> None:
            # Connections here complete at once: this is where the stream
            # stood when the unit was started.
            seen.append((sink.output.position, protocol.request))

        def watching(peer: wire.PeerEntry) -> _Watching:
            return _Watching(self.network.endpoint_for(peer), note)

        d = self.swarm(sink, peers, endpoint_for=watching).run()
        self.network.flush()
        self.successResultOf(d)
        window = STREAM_WINDOW_PIECES * PIECE_SIZE
        for position, request in seen:
            self.assertLessEqual(request.offset + request.length, position + window)
        # The last unit was asked only once the stalled first one was in.
        positions = [p for p, r in seen if r.offset == 4 * UNIT_BYTES]
        self.assertTrue(positions)
        self.assertGreaterEqual(min(positions), UNIT_BYTES)
        # Meanwhile the stalled first unit was raced by a holder.
        racers = [p for p in peers[1:] if unit_line(0) in self.network.requests(p)]
        self.assertEqual(len(racers), 1)
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_bounds_in_bytes_whatever_the_piece_size(self) -> None:
        """
        The unit, the stdout window and the pieces in flight are bounded in
        bytes: holders that choose 16 MiB pieces get units of one piece,
        a window of one piece and four sources at most (counted in pieces,
        they made a client hold 256 MiB of early pieces, 277 MB of RSS).
        At the usual 1 MiB, the usual figures.
        """
        big = 16 * MIB
        data = os.urandom(3 * big)
        digests = b"".join(
            pieces.hash_piece(data[i : i + big]) for i in range(0, len(data), big)
        )
        content = Content(pieces.root_of(len(data), big, digests), len(data), big)
        sink = PieceSink(StreamOutput(io.BytesIO()))
        self.successResultOf(sink.begin(content, PieceList.check(content, digests)))
        swarm = Swarm(
            self.clock, sink, [], self.network.endpoint_for, CONNECT, IDLE, 64
        )
        self.assertEqual(
            (swarm.unit_pieces, swarm.window, swarm.max_sources), (1, 1, 4)
        )
        usual = self.swarm(self.stream_sink(), [], max_sources=64)
        self.assertEqual((usual.unit_pieces, usual.window), (4, 16))
        self.assertEqual(usual.max_sources, 64)

    def test_all_sources_fail(self) -> None:
        """
        When every holder failed and pieces are still missing, the swarm
        fails with L{SwarmFailed}, saying how many, with every source's
        report (and why each was dropped); the pieces that did verify are
        kept.
        """
        breaks = self.network.add(hangs_up_after(MIB + 10, DATA))
        refuses = self.network.add("refuse")
        lacks = self.network.add(self.share(b"something else\n", "other.bin"))
        sink = self.stream_sink()
        d = self.swarm(sink, [breaks, refuses, lacks]).run()
        self.network.run(d)
        failure = self.failureResultOf(d, SwarmFailed)
        self.assertEqual(failure.value.missing, 19)
        self.assertEqual(str(failure.value), "19 piece(s) missing and no holder left")
        self.assertEqual(sink.done, {0})
        reasons = {r.peer: r.reason for r in failure.value.reports}
        self.assertEqual(
            reasons,
            {
                breaks: f"broken transfer after {MIB + 10} of {UNIT_BYTES} bytes",
                refuses: "cannot connect: ConnectionRefusedError",
                lacks: "refused: ERR 404 no such content",
            },
        )
        self.assertEqual(
            sorted(self.dropped, key=lambda r: r.peer.port),
            [
                self.report_of(failure.value.reports, p)
                for p in (breaks, refuses, lacks)
            ],
        )
        self.assertEqual(self.out.getvalue(), DATA[:MIB])
        self.assertQuiet()

    def test_output_fails(self) -> None:
        """
        A store that fails (the disk is full) is not a holder's fault:
        the swarm fails at once with L{OutputFailed}, drops no holder, and
        stops every unit in flight.
        """
        peers = self.holders(3)
        sink = started_sink(self, _FillsUp(io.BytesIO(), room=6 * PIECE_SIZE))
        d = self.swarm(sink, peers).run()
        self.network.run(d)
        failure = self.failureResultOf(d, OutputFailed)
        self.assertEqual(failure.value.error.errno, errno.ENOSPC)
        self.assertEqual(self.dropped, [])
        self.assertQuiet()

    def test_cancel(self) -> None:
        """
        Cancelling the swarm's Deferred aborts every unit in flight at
        once, and leaves no timer once the closes reached the holders.
        """
        peers = self.holders(3)
        sink = self.stream_sink()
        d = self.swarm(sink, peers).run()
        self.network.step(4)
        self.assertNoResult(d)
        self.assertEqual(len(self.network.pumps), 3)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        for pump in self.network.pumps:
            self.assertTrue(pump.clientIO.disconnecting)
        self.assertFalse(sink.complete)
        self.assertQuiet()
        self.assertEqual(len(self.network.pumps), 3)  # nothing started after

    def test_lone_source(self) -> None:
        """
        A lone holder, with nobody to share the work with, asks for the
        whole content in one request: units only pay off between several.
        """
        [peer] = self.holders(1)
        sink = self.stream_sink()
        d = self.swarm(sink, [peer]).run()
        self.network.run(d)
        [report] = self.successResultOf(d)
        self.assertEqual(self.network.requests(peer), [blob(0, len(DATA))])
        self.assertEqual((report.units, report.bytes), (1, len(DATA)))
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_last_source_left_takes_the_rest(self) -> None:
        """
        A source left alone once the others were dropped, with no
        candidate to join it, asks for all the rest in one request.
        """
        [peer] = self.holders(1)
        refuses = self.network.add("refuse")
        sink = self.stream_sink()
        d = self.swarm(sink, [peer, refuses], max_sources=2).run()
        self.network.run(d)
        self.successResultOf(d)
        self.assertEqual(
            self.network.requests(peer),
            [unit_line(0), blob(UNIT_BYTES, len(DATA) - UNIT_BYTES)],
        )
        self.assertEqual(self.out.getvalue(), DATA)
        self.assertQuiet()

    def test_already_complete(self) -> None:
        """A sink that holds every piece needs nobody: the swarm ends at
        once, without a connection."""
        [peer] = self.holders(1)
        sink = self.stream_sink()
        for index in range(DATA_CONTENT.pieces):
            offset, length = DATA_CONTENT.span(index)
            sink.write(index, DATA[offset : offset + length])
        self.assertEqual(self.successResultOf(self.swarm(sink, [peer]).run()), [])
        self.assertEqual(self.network.contacted, [])


class FetcherSwarmTests(SwarmTestsMixin, SynchronousTestCase):
    """
    L{Fetcher} handing a large file over to a L{Swarm}, or not: the first
    peer to answer describes the content, the swarm fetches it.
    """

    def setUp(self) -> None:
        super().setUp()
        self.attempts: list[Attempt] = []
        # How each connection's fetch ended, by peer port, in order.
        self.outcomes: list[tuple[int, str]] = []
        self.folder = temp_dir(self)
        self.target = os.path.join(self.folder, "saved.bin")
        self.sink = PieceSink(FileOutput(self.target))
        self.addCleanup(lambda: self.sink.abandon())

    def fetcher(self, max_sources: int = 3) -> Fetcher:
        return Fetcher(
            self.clock,
            connect_timeout=CONNECT,
            idle_timeout=IDLE,
            endpoint_for=self.watched_endpoint,
            report=self.attempts.append,
            now=self.clock.seconds,
            stagger=0,
            max_sources=max_sources,
            on_source_dropped=self.dropped.append,
        )

    def watched_endpoint(self, peer: wire.PeerEntry) -> _Watching:
        """The network's endpoint for C{peer}, noting how each of its
        fetches ends in C{outcomes} (success, or the failure's kind)."""

        def note(protocol: FileFetchProtocol) -> None:
            def ended(result: object) -> object:
                value = getattr(result, "value", None)
                kind = getattr(value, "kind", type(value).__name__)
                self.outcomes.append((peer.port, "ok" if value is None else kind))
                return result

            protocol.result.addBoth(ended)

        return _Watching(self.network.endpoint_for(peer), note)

    def fetch(
        self,
        peers: list[wire.PeerEntry],
        candidates: list[wire.PeerEntry],
        max_sources: int = 3,
        name: str = NAME,
        by_root: bool = False,
    ) -> Deferred:
        d = self.fetcher(max_sources).fetch(
            name, peers, self.sink, by_root=by_root, candidates=candidates
        )
        self.network.run(d)
        return d

    def assertSaved(self, data: bytes = DATA) -> None:
        self.assertTrue(self.sink.complete)
        self.successResultOf(self.sink.finish())
        with open(self.target, "rb") as stream:
            self.assertEqual(stream.read(), data)
        self.assertEqual(os.listdir(self.folder), ["saved.bin"])

    def assertSingleStream(self, peers: list[wire.PeerEntry]) -> None:
        """The first peer sent it all on one connection; nobody else was
        asked anything."""
        self.assertEqual(self.network.requests(peers[0]), [b"GET " + NAME.encode()])
        self.assertEqual(self.network.contacted, [peers[0].port])
        self.assertEqual(len(self.network.pumps), 1)

    def test_named_holder_is_the_one_that_sent_it(self) -> None:
        """
        The first holder describes the content, then sends a bad piece and
        is dropped; the other sends every unit.  The result names that one
        (the summary line said "from" the dropped liar).
        """
        rotten = self.network.add(
            self.network.rotten(self.share(flipped(DATA, 7)), {NAME: DATA})
        )
        [honest] = self.holders(1)
        result = self.successResultOf(self.fetch([rotten, honest], [rotten, honest]))
        self.assertEqual([report.peer for report in result.sources], [honest])
        self.assertEqual(result.peer, honest)
        self.assertSaved()

    def test_large_file_from_several_holders(self) -> None:
        """
        A 20 MiB file whose likely holders are known: the first peer is
        asked by name, its connection is handed over once the piece list
        verified, and the units come from several holders.  The handover
        is no failed attempt: the one attempt recorded is the first peer's
        success.  C{sources} names the holders that served units.
        """
        peers = self.holders(3)
        d = self.fetch(peers, peers)
        result = self.successResultOf(d)
        self.assertEqual(result.peer, peers[0])
        self.assertEqual(result.content, DATA_CONTENT)
        self.assertEqual(
            [(a.peer, a.reason) for a in result.attempts], [(peers[0], "found")]
        )
        self.assertEqual(self.attempts, result.attempts)
        self.assertEqual(self.network.requests(peers[0])[0], b"GET " + NAME.encode())
        # The first connection ended as a handover, once the piece list was
        # in; every unit after it was either served or lost a race.
        self.assertEqual(self.outcomes[0], (peers[0].port, "handover"))
        later = [outcome for _, outcome in self.outcomes[1:]]
        self.assertLessEqual(set(later), {"ok", "CancelledError"})
        self.assertEqual(later.count("ok"), 5)
        blobs = [line for p in peers for line in self.network.requests(p)][1:]
        self.assertEqual(set(blobs), {unit_line(i) for i in range(5)})
        self.assertGreaterEqual(len(result.sources), 2)
        self.assertTrue(all(s.units for s in result.sources))
        self.assertEqual(sum(s.bytes for s in result.sources), len(DATA))
        self.assertEqual(self.dropped, [])
        self.assertQuiet()
        self.assertSaved()

    def test_by_root(self) -> None:
        """
        Fetched by root, the first peer's piece list (``PIECES``) is enough
        to hand over: that connection asks for no content itself.
        """
        peers = self.holders(3)
        root = DATA_CONTENT.root_hex
        self.sink = PieceSink(FileOutput(self.target), expected_root=root)
        result = self.successResultOf(self.fetch(peers, peers, name=root, by_root=True))
        self.assertEqual(self.network.requests(peers[0])[0], f"PIECES {root}".encode())
        self.assertEqual(self.outcomes[0], (peers[0].port, "handover"))
        blobs = [line for p in peers for line in self.network.requests(p)][1:]
        self.assertEqual(set(blobs), {unit_line(i) for i in range(5)})
        self.assertGreaterEqual(len(result.sources), 2)
        self.assertQuiet()
        self.assertSaved()

    def test_dropped_holder_reported(self) -> None:
        """
        A likely holder that lacks the content is reported through
        C{on_source_dropped}, not as an attempt, and is not among the
        sources.
        """
        first, second = self.holders(2)
        lacks = self.network.add(self.share(b"something else\n", "other.bin"))
        result = self.successResultOf(
            self.fetch([first, lacks, second], [first, lacks, second])
        )
        self.assertEqual(
            [(r.peer, r.reason) for r in self.dropped],
            [(lacks, "refused: ERR 404 no such content")],
        )
        self.assertEqual([a.reason for a in result.attempts], ["found"])
        self.assertNotIn(lacks, [s.peer for s in result.sources])
        self.assertQuiet()
        self.assertSaved()

    def test_one_source_allowed(self) -> None:
        """With C{max_sources=1} a large file comes over one stream."""
        peers = self.holders(3)
        result = self.successResultOf(self.fetch(peers, peers, max_sources=1))
        self.assertSingleStream(peers)
        self.assertEqual(result.sources, [])
        self.assertQuiet()
        self.assertSaved()

    def test_small_file(self) -> None:
        """A file one byte under L{SWARM_MIN_BYTES} comes over one stream:
        a few pieces gain little from several sources."""
        data = DATA[: SWARM_MIN_BYTES - 1]
        peers = self.holders(3, data)
        result = self.successResultOf(self.fetch(peers, peers))
        self.assertSingleStream(peers)
        self.assertEqual(result.sources, [])
        self.assertQuiet()
        self.assertSaved(data)

    def test_threshold(self) -> None:
        """A file of exactly L{SWARM_MIN_BYTES} is handed over."""
        data = DATA[:SWARM_MIN_BYTES]
        peers = self.holders(3, data)
        result = self.successResultOf(self.fetch(peers, peers))
        self.assertGreater(len(self.network.requests(peers[0])), 1)
        self.assertTrue(result.sources)
        self.assertQuiet()
        self.assertSaved(data)

    def test_no_other_candidates(self) -> None:
        """
        When the likely holders name nobody but the first peer to answer,
        there is no one to share with: one stream.
        """
        peers = self.holders(3)
        result = self.successResultOf(self.fetch(peers, peers[:1]))
        self.assertSingleStream(peers)
        self.assertEqual(result.sources, [])
        self.assertQuiet()
        self.assertSaved()

    def test_no_candidates(self) -> None:
        """Without likely holders (the relay suggested none) a large file
        comes over one stream."""
        peers = self.holders(3)
        result = self.successResultOf(self.fetch(peers, []))
        self.assertSingleStream(peers)
        self.assertEqual(result.sources, [])
        self.assertQuiet()
        self.assertSaved()

    def test_swarm_failure_falls_back(self) -> None:
        """
        When every likely holder fails, the fetch goes on one peer at a
        time with the rest of the peer list, asking for what is still
        missing, and completes from a peer that can.
        """
        describes = self.network.add(serves_names_only(DATA))
        refuses = self.network.add("refuse")
        lacks = self.network.add(self.share(b"something else\n", "other.bin"))
        [holder] = self.holders(1)
        result = self.successResultOf(
            self.fetch([describes, holder], [describes, refuses, lacks])
        )
        self.assertEqual({r.peer for r in self.dropped}, {describes, refuses, lacks})
        self.assertEqual(result.peer, holder)
        self.assertEqual(result.attempts[-1].reason, "found")
        self.assertEqual(self.network.requests(holder), [blob(0, len(DATA))])
        self.assertEqual(result.sources, [])
        self.assertQuiet()
        self.assertSaved()

    def test_swarm_failure_with_nobody_left(self) -> None:
        """
        When every likely holder fails and the peer list has nobody else,
        the fetch ends in L{NotFoundAnywhere} (rather than waiting), each
        holder having been reported as dropped, and nothing is left
        running.
        """
        describes = self.network.add(serves_names_only(DATA))
        refuses = self.network.add("refuse")
        d = self.fetch([describes], [describes, refuses])
        failure = self.failureResultOf(d, NotFoundAnywhere)
        self.assertEqual(
            {(r.peer, r.reason) for r in self.dropped},
            {
                (describes, "refused: ERR 404 no such content"),
                (refuses, "cannot connect: ConnectionRefusedError"),
            },
        )
        # The holders the swarm dropped are the attempts the failure names
        # ("not found on any of 2 peer(s)", never "of 0").
        self.assertEqual(failure.value.peers, 2)
        self.assertEqual(
            {a.reason for a in failure.value.attempts},
            {r.reason for r in self.dropped},
        )
        self.assertQuiet()

    def test_cancel_during_swarm(self) -> None:
        """
        Cancelling the fetch while the swarm works aborts every unit in
        flight; no timer is left once the closes reached the holders.
        """
        peers = self.holders(3)
        d = self.fetcher().fetch(NAME, peers, self.sink, candidates=peers)
        self.network.step(12)
        self.assertNoResult(d)
        self.assertGreater(len(self.network.pumps), 1)  # handed over
        units = self.network.pumps[1:]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        for pump in units:
            self.assertTrue(pump.clientIO.disconnecting)
        self.assertFalse(self.sink.complete)
        self.assertQuiet()
