"""Several holders at once: fetch the missing pieces of one content in parallel.

Once a content is known (its root and verified piece list, from the first
peer that answered, see L{p2p.fetch}), a L{Swarm} asks up to C{max_sources}
holders for *units* of a few consecutive pieces each, by content
(``BLOB <root> <offset> <length>``, one connection per unit).  A source
asks for its next unit as soon as one is done, so faster peers do more of
the work.  The last pieces are raced: a source with nothing new to take
duplicates the oldest unit another source is still working on (BitTorrent's
end game), and whichever finishes first wins; the other is cancelled.  So
one slow holder never holds up the end, nor, with stdout output, the
stream.

A source whose piece fails verification is dropped for this content and
its unit goes back to the pool; so is one that breaks, refuses, or turns
out not to hold the content (``ERR 404``), and the next candidate takes its
place.  Output to stdout is written in order: units are then taken only
within a window ahead of the first missing piece, which bounds the memory
held by pieces that arrived early.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2p import wire
from p2p.client import FileFetchProtocol
from p2p.endpoints import EndpointFor
from p2p.errors import SKIPPABLE, FailureKind, OutputFailed, describe, kind_of
from p2p.pace import DEFAULT_PACE, Pace
from p2p.pieces import PIECE_SIZE
from p2p.request import cancelled_to_timeout
from p2p.sink import PieceSink, StreamOutput

DEFAULT_MAX_SOURCES = 4
# Bytes per request (whole pieces, one at least): 4 MiB, so a request's
# set-up (a connection, a header) is small beside its transfer even on
# loopback.  Counted in bytes, not pieces: the holders choose the piece
# size (16 KiB to 16 MiB), and a count of pieces multiplied what a hostile
# one could make the client hold.
UNIT_BYTES = 4 * 1024 * 1024
UNIT_PIECES = UNIT_BYTES // PIECE_SIZE  # at the usual piece size
# With stdout output, units are taken at most this far ahead of the first
# missing piece (pieces that arrive early wait in memory): 16 MiB.
STREAM_WINDOW_BYTES = 16 * 1024 * 1024
STREAM_WINDOW_PIECES = STREAM_WINDOW_BYTES // PIECE_SIZE  # at the usual size
# Sources at once hold a piece buffer each: at most this much in all (with
# 16 MiB pieces, four sources; --sources 64 at 1 MiB pieces, all 64).
IN_FLIGHT_BYTES = 64 * 1024 * 1024
# At most this many sources work on one unit at once (the end game).
MAX_RACERS = 2


@dataclass
class SourceReport:
    """What one source did: for progress output and the final summary."""

    peer: wire.PeerEntry
    units: int = 0  # units it finished
    bytes: int = 0  # verified bytes of it stored, broken units' included
    reason: str | None = None  # why it was dropped, if it was
    kind: FailureKind | None = None  # and the kind of that

    def count_stored(self, size: int) -> None:
        self.bytes += size


class SwarmFailed(Exception):
    """No source is left and pieces are still missing."""

    def __init__(self, missing: int, reports: list[SourceReport]) -> None:
        super().__init__(f"{missing} piece(s) missing and no holder left")
        self.missing = missing
        self.reports = reports


@dataclass(eq=False)
class _Unit:
    """A run of consecutive pieces being fetched by one source."""

    first: int
    count: int
    source: _Source
    deferred: Deferred | None = None
    duplicate: bool = False

    @property
    def pieces(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass(eq=False)
class _Source:
    peer: wire.PeerEntry
    report: SourceReport
    unit: _Unit | None = None


class Swarm:
    """
    Fetch what C{sink} still misses of its content from several holders.

    :param candidates: peers that may hold the content, best first (the
        first is usually the peer that described it).
    :param max_sources: most holders asked at once.
    :param report: called with a L{SourceReport} whenever a source is
        dropped (its C{reason} set).
    :param pace: what each source must keep up to (L{p2p.pace}); one whose
        unit falls below the minimum rate is dropped like one that broke.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        sink: PieceSink,
        candidates: Sequence[wire.PeerEntry],
        endpoint_for: EndpointFor,
        connect_timeout: float,
        idle_timeout: float,
        max_sources: int = DEFAULT_MAX_SOURCES,
        unit_pieces: int | None = None,
        report: Callable[[SourceReport], None] = lambda report: None,
        pace: Pace = DEFAULT_PACE,
    ) -> None:
        assert sink.content is not None
        self.pace = pace
        self.reactor = reactor
        self.sink = sink
        self.content = sink.content
        self.candidates: deque[wire.PeerEntry] = deque(candidates)
        self.endpoint_for = endpoint_for
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        piece = self.content.piece_size
        self.max_sources = max(1, min(max_sources, IN_FLIGHT_BYTES // piece))
        if unit_pieces is None:
            unit_pieces = UNIT_BYTES // piece
        self.unit_pieces = max(1, unit_pieces)
        self.report = report
        self.window = (
            max(1, STREAM_WINDOW_BYTES // piece)
            if isinstance(sink.output, StreamOutput)
            else None
        )
        self.sources: list[_Source] = []
        self.reports: list[SourceReport] = []
        # piece index -> the units working on it
        self.assigned: dict[int, list[_Unit]] = {}
        self.done: Deferred[list[SourceReport]] = Deferred(self._cancel)
        # Every piece before this one is done (pieces are never undone).
        self._cursor = 0

    @property
    def serving(self) -> list[wire.PeerEntry]:
        """The holders in use now."""
        return [source.peer for source in self.sources]

    def run(self) -> Deferred[list[SourceReport]]:
        """Fires with a report per source once the content is complete."""
        self._fill()
        return self.done

    # -- sources -----------------------------------------------------------

    def _fill(self) -> None:
        """Bring sources up to C{max_sources}, then give idle ones work."""
        if self.done.called:
            return
        if self.sink.complete:
            self._finish()
            return
        while len(self.sources) < self.max_sources and self.candidates:
            peer = self.candidates.popleft()
            report = SourceReport(peer)
            self.reports.append(report)
            self.sources.append(_Source(peer, report))
        for source in list(self.sources):
            if source.unit is None:
                self._next(source)
        if not self.sources and not self.done.called:
            missing = self.content.pieces - len(self.sink.done)
            self.done.errback(SwarmFailed(missing, self.reports))

    def _drop(self, source: _Source, failure: Failure) -> None:
        if source in self.sources:
            self.sources.remove(source)
        source.report.reason = describe(failure)
        source.report.kind = kind_of(failure)
        self.report(source.report)

    # -- picking units ----------------------------------------------------

    def _pick(self, source: _Source) -> _Unit | None:
        """
        The lowest run of missing pieces nobody works on (within the
        window, for stdout); failing that, a duplicate of the oldest unit
        another source still works on.
        """
        done, pieces = self.sink.done, self.content.pieces
        while self._cursor < pieces and self._cursor in done:
            self._cursor += 1
        if self._cursor == pieces:
            return None
        limit = min(pieces, self._cursor + self.window) if self.window else pieces
        first = next(
            (
                i
                for i in range(self._cursor, limit)
                if i not in done and not self.assigned.get(i)
            ),
            None,
        )
        if first is not None:
            # A lone source with nobody left to join it takes the rest in one
            # request: units only pay off when there is someone to share with.
            alone = len(self.sources) == 1 and not self.candidates
            most = pieces if alone else self.unit_pieces
            end = pieces if alone else limit
            count = 1
            while (
                count < most
                and first + count < end
                and first + count not in done
                and not self.assigned.get(first + count)
            ):
                count += 1
            return _Unit(first, count, source)
        # The end game (or a stalled window): race the oldest unit.
        for index in range(self._cursor, limit):
            if index in done:
                continue  # only what is still missing is worth racing
            units = self.assigned.get(index, [])
            if 0 < len(units) < MAX_RACERS and all(
                u.source is not source for u in units
            ):
                other = units[0]
                return _Unit(other.first, other.count, source, duplicate=True)
        return None

    def _next(self, source: _Source) -> None:
        if source not in self.sources or self.done.called:
            return  # dropped meanwhile (a unit that failed at once)
        unit = self._pick(source)
        if unit is None:
            return  # idle until another unit ends
        source.unit = unit
        for index in unit.pieces:
            self.assigned.setdefault(index, []).append(unit)
        self._start(unit)

    def _release(self, unit: _Unit) -> None:
        for index in unit.pieces:
            units = self.assigned.get(index)
            if units and unit in units:
                units.remove(unit)
                if not units:
                    del self.assigned[index]
        if unit.source.unit is unit:
            unit.source.unit = None

    # -- one unit ------------------------------------------------------------

    def _start(self, unit: _Unit) -> None:
        offset = self.content.span(unit.first)[0]
        last_offset, last_length = self.content.span(unit.first + unit.count - 1)
        request = wire.Blob(
            self.content.root_hex, offset, last_offset + last_length - offset
        )
        report = unit.source.report
        protocol = FileFetchProtocol(
            request,
            self.sink,
            self.reactor,
            self.idle_timeout,
            pace=self.pace,
            on_stored=report.count_stored,
        )
        factory = Factory.forProtocol(lambda: protocol)
        factory.noisy = False
        try:
            d = self.endpoint_for(unit.source.peer).connect(factory)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addTimeout(
            self.connect_timeout, self.reactor, onTimeoutCancel=cancelled_to_timeout
        )
        d.addCallback(lambda _: protocol.result)
        unit.deferred = d
        d.addCallbacks(self._unit_done, self._unit_failed, (unit,), None, (unit,))
        d.addErrback(self._crashed)

    def _unit_done(self, header: wire.FileHeader, unit: _Unit) -> None:
        source = unit.source
        self._release(unit)
        source.report.units += 1
        # Whoever raced this unit lost: stop them, they take other work.
        for index in unit.pieces:
            for other in list(self.assigned.get(index, [])):
                if all(i in self.sink.done for i in other.pieces):
                    self._abandon(other)
        self._fill()

    def _abandon(self, unit: _Unit) -> None:
        self._release(unit)
        if unit.deferred is not None:
            unit.deferred.cancel()

    def _unit_failed(self, failure: Failure, unit: _Unit) -> None:
        source = unit.source
        was_current = source.unit is unit
        self._release(unit)
        if self.done.called:
            if not failure.check(*SKIPPABLE, OutputFailed):
                # Too late to matter, but a bug is logged, never dropped.
                self.log.failure(
                    "unexpected error in a unit after the end",
                    failure,
                    peer=source.peer.address,
                )
            return
        if failure.check(CancelledError, ConnectingCancelledError) and not was_current:
            return  # abandoned after another source finished its pieces
        if failure.check(OutputFailed):
            self._stop_all()
            self.done.errback(failure)
            return
        failure.trap(*SKIPPABLE)
        self._drop(source, failure)
        # Let the pieces received settle before working out what is missing.
        d = self.sink.settled()
        d.addCallbacks(lambda _: self._fill(), self._output_failed)

    def _output_failed(self, failure: Failure) -> None:
        if not self.done.called:
            self._stop_all()
            failure.trap(OSError)
            self.done.errback(OutputFailed(failure.value))

    def _crashed(self, failure: Failure) -> None:
        if not self.done.called:
            self._stop_all()
            self.done.errback(failure)

    # -- the end -------------------------------------------------------------

    def _finish(self) -> None:
        self._stop_all()
        self.done.callback(self.reports)

    def _stop_all(self) -> None:
        units = {id(u): u for us in self.assigned.values() for u in us}
        for unit in units.values():
            self._abandon(unit)
        self.assigned.clear()
        self.candidates.clear()

    def _cancel(self, _: Deferred) -> None:
        self._stop_all()
