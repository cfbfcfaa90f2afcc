"""Phase 3: fetch a file from the peers, falling back from one to the next.

The peers are tried in the relay's order.  A peer that refuses, cannot be
reached, stays silent or delivers a broken or corrupted copy is skipped, and
the next attempt starts at once.  Two refinements over the seed's strict
one-at-a-time loop:

* **Staggered attempts** (RFC 8305 "Happy Eyeballs").  When the current
  peer has not answered within ``stagger`` seconds (default 0.25 s), the
  next attempt starts too, without abandoning the first.  Once
  L{STAGGERED_ONE_BY_ONE} (4) attempts in flight are all silent, each
  further stagger starts as many more as are silent, so their number
  doubles, up to ``max_parallel`` (64) in flight.  With that many in
  flight and peers never tried waiting, the oldest attempt silent for
  L{SILENT_PATIENCE_SECONDS} (2 s) gives way to a new one and waits at the
  end of the list for a second try, which runs to its timeout.  So a
  hundred peers that accept and say nothing (fakes, say) cost about two
  seconds, not a stagger or a timeout each, and a slow but honest first
  peer still costs the others only a few requests.  The first peer to
  answer with a file header wins and the others are cancelled (and
  requeued in list order, should the winner fail later).  Peers that
  answer quickly, as healthy ones do, are still asked strictly one at a
  time; a blackholed peer costs ``stagger`` seconds, not the connect
  timeout.
* **Resume.**  Every piece is verified as it arrives (L{p2p.sink}), so
  when a transfer breaks the pieces so far are good, and the next peer is
  asked for the rest by content (``BLOB <root> <offset> <length>``): any
  peer holding the same content may continue, under whatever name.  A
  peer that sends a piece that does not verify is dropped; nothing of that
  piece is used.  If no peer can continue and the output can still start
  over without losing work (nothing printed yet, or a file holding no
  verified piece), a second pass fetches the file whole from the peers
  that had other content under the name.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2p import wire
from p2p.client import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    FileFetchProtocol,
)
from p2p.endpoints import EndpointFor, peer_endpoint
from p2p.errors import (
    SKIPPABLE,
    FailureKind,
    OutputFailed,
    PeerFailed,
    describe,
    kind_of,
)
from p2p.pace import DEFAULT_PACE, SILENT_PATIENCE_SECONDS, Pace
from p2p.pieces import Content
from p2p.request import cancelled_to_timeout
from p2p.sink import PieceSink
from p2p.swarm import DEFAULT_MAX_SOURCES, SourceReport, Swarm, SwarmFailed

# Files smaller than this come from one peer: a few pieces gain little from
# several sources, and the single stream is the fastest path.
SWARM_MIN_BYTES = 16 * 1024 * 1024
# RFC 8305's recommended Connection Attempt Delay.
DEFAULT_STAGGER_SECONDS = 0.25
# Silent attempts started one stagger apart before their number doubles
# at each stagger: up to here, a slow but honest first peer (a long round
# trip, a TLS handshake) costs the others at most this many requests.
STAGGERED_ONE_BY_ONE = 4
# Generous: an attempt in flight costs one socket, and each silent or
# blackholed peer holds its slot until a timeout (10 s idle, 5 s connect);
# a small cap turns a few dozen of them back into waits of whole timeouts
# (16 made 64 silent fakes ahead of an honest holder cost 40 s).
DEFAULT_MAX_PARALLEL = 64


@dataclass
class Attempt:
    """What happened when one peer was asked for a file."""

    peer: wire.PeerEntry
    ok: bool
    reason: str
    seconds: float
    offset: int = 0
    # Why it failed, sorted (None for a success).
    kind: FailureKind | None = None


@dataclass
class FetchResult:
    name: str
    peer: wire.PeerEntry
    content: Content
    attempts: list[Attempt] = field(default_factory=list)
    # The holders that served pieces, when several did (see p2p.swarm).
    sources: list[SourceReport] = field(default_factory=list)


class NotFoundAnywhere(Exception):
    """No active peer delivered the file."""

    def __init__(self, name: str, attempts: list[Attempt]) -> None:
        peers = len({attempt.peer.peer_id for attempt in attempts})
        super().__init__(f"{name}: not found on any of {peers} peer(s)")
        self.name = name
        self.attempts = attempts
        self.peers = peers


class Fetcher:
    """
    Fetches files from lists of peers.

    :param reactor: provides time (and TCP, for the default endpoints).
    :param connect_timeout: seconds to wait for each peer's connection.
    :param idle_timeout: seconds of silence after which a peer is skipped,
        before its reply and during a transfer.
    :param stagger: seconds after which a silent attempt is joined by the
        next one (0: strictly one at a time).
    :param max_parallel: most attempts in flight at once.
    :param endpoint_for: builds a client endpoint for a peer (e.g. TLS).
    :param report: called with each finished L{Attempt}, for progress output.
    :param on_indexing: called with a peer and its L{wire.Indexing}
        progress while that peer indexes the file asked for.
    :param on_header: called with an L{Attempt} (C{reason} "sending") when
        a peer's header is accepted and its bytes start to come.
    :param max_sources: most holders to fetch a large file from at once
        (see L{p2p.swarm}); 1 keeps every fetch on one peer at a time.
    :param on_source_dropped: called with the L{SourceReport} of a holder
        the swarm stopped using, and why.
    :param on_serving: called with the peers sending pieces whenever they
        change: the one whose header won, then the swarm's sources.
    :param pace: what every peer must keep up to (L{p2p.pace}): a peer
        whose header comes too late, or whose transfer falls below the
        minimum rate, is skipped like one that broke (the next one goes on
        from the first missing piece), or dropped as a source of a swarm.
    """

    def __init__(
        self,
        reactor,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        endpoint_for: EndpointFor | None = None,
        report: Callable[[Attempt], None] = lambda attempt: None,
        now: Callable[[], float] = time.monotonic,
        stagger: float = DEFAULT_STAGGER_SECONDS,
        max_parallel: int = DEFAULT_MAX_PARALLEL,
        on_indexing: Callable[[wire.PeerEntry, wire.Indexing], None] = (
            lambda peer, progress: None
        ),
        on_header: Callable[[Attempt], None] = lambda attempt: None,
        max_sources: int = DEFAULT_MAX_SOURCES,
        on_source_dropped: Callable[[SourceReport], None] = lambda report: None,
        pace: Pace = DEFAULT_PACE,
        on_serving: Callable[[list[wire.PeerEntry]], None] = lambda peers: None,
    ) -> None:
        self.reactor = reactor
        self.pace = pace
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.endpoint_for = endpoint_for or (
            lambda peer: peer_endpoint(reactor, peer, connect_timeout)
        )
        self.report = report
        self.now = now
        self.stagger = stagger
        self.max_parallel = max(1, max_parallel)
        self.on_indexing = on_indexing
        self.on_header = on_header
        self.max_sources = max(1, max_sources)
        self.on_source_dropped = on_source_dropped
        self.on_serving = on_serving

    def fetch(
        self,
        name: str,
        peers: Sequence[wire.PeerEntry],
        sink: PieceSink,
        by_root: bool = False,
        candidates: Sequence[wire.PeerEntry] = (),
    ) -> Deferred[FetchResult]:
        """
        Fetch C{name} into C{sink} from the first of C{peers} that can.
        With C{by_root}, C{name} is a content root (64 hex digits): any
        peer holding that content, under any name, may serve it.

        A file of at least L{SWARM_MIN_BYTES} is fetched from several
        holders at once (L{p2p.swarm}) when C{max_sources} allows and
        C{candidates} (peers likely to hold it, e.g. the relay's
        suggestions) name others than the first peer to answer.

        Fires with a L{FetchResult}, or fails with L{NotFoundAnywhere}
        (listing every attempt) when no peer delivers.  Cancelling it stops
        every attempt.
        """
        run = _FetchRun(self, name, list(peers), sink, by_root, list(candidates))
        return run.start()


class _Try:
    """One attempt in flight."""

    def __init__(
        self,
        index: int,
        peer: wire.PeerEntry,
        offset: int,
        now: float,
        second_try: bool = False,
    ) -> None:
        self.index = index
        self.peer = peer
        self.offset = offset
        self.started = now
        self.abandoned = False
        # Whether the peer said anything yet (an INDEXING line): one that
        # did is slow, not silent, and does not make the fan-out grow.
        self.heard = False
        # Whether it gave way to a peer never tried (see the module doc),
        # and whether it is the second try of one that did.
        self.gave_way = False
        self.second_try = second_try
        self.deferred: Deferred[wire.FileHeader] | None = None


# The failures an attempt may end with that are not bugs: a peer's fault
# (SKIPPABLE), or the output's (the fetch stops).
EXPECTED = (*SKIPPABLE, OutputFailed)


class _FetchRun:
    """The state of one fetch: the queue of peers and the attempts in flight."""

    log = Logger()

    def __init__(
        self,
        fetcher: Fetcher,
        name: str,
        peers: list[wire.PeerEntry],
        sink: PieceSink,
        by_root: bool = False,
        candidates: list[wire.PeerEntry] | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.by_root = by_root
        self.candidates = candidates or []
        self.swarm: Swarm | None = None
        self.name = name
        self.peers = peers
        self.sink = sink
        self.queue: deque[int] = deque(range(len(peers)))
        # Peers whose first attempt gave way: tried again after the queue.
        self.gave_way: deque[int] = deque()
        self.pending: dict[int, _Try] = {}
        self.active: _Try | None = None
        self.attempts: list[Attempt] = []
        # Peers that hold other content under the name than the one being
        # assembled: the second pass's candidates.
        self.holders: set[int] = set()
        self.second_pass = False
        self.timer: IDelayedCall | None = None
        self._launching = False
        self._relaunch = False
        self.done: Deferred[FetchResult] = Deferred(self._cancel)

    def start(self) -> Deferred[FetchResult]:
        self._launch()
        return self.done

    # -- scheduling ------------------------------------------------------

    def _launch(self, count: int = 1) -> None:
        """
        Start up to C{count} more attempts if allowed, then arm the
        stagger timer.

        An attempt that fails at once calls back in here; a loop instead of
        recursion keeps a long list of such peers off the stack.
        """
        if self._launching:
            self._relaunch = True
            return
        self._launching = True
        try:
            self._relaunch = True
            while self._relaunch:
                self._relaunch = False
                for _ in range(count):
                    if not self._launch_once():
                        break
                count = 1
        finally:
            self._launching = False

    def _launch_once(self) -> bool:
        """Start the next attempt if allowed; whether one started."""
        if self.done.called or self.active is not None:
            return False
        if self.swarm is not None and not self.swarm.done.called:
            return False  # several holders are at work
        if not self.queue and not self.gave_way:
            if not self.pending:
                self._exhausted()
            return False
        if len(self.pending) >= self.fetcher.max_parallel:
            return False
        if self.queue:
            self._start(self.queue.popleft())
        else:
            self._start(self.gave_way.popleft(), second_try=True)
        self._arm()
        return True

    def _arm(self) -> None:
        self._disarm()
        if self.fetcher.stagger > 0 and (self.queue or self.gave_way):
            self.timer = self.fetcher.reactor.callLater(
                self.fetcher.stagger, self._stagger_elapsed
            )

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _stagger_elapsed(self) -> None:
        """No header came within a stagger: one more attempt, or, once
        several are silent, as many more as are silent (see the module
        doc)."""
        self.timer = None
        silent = sum(1 for attempt in self.pending.values() if not attempt.heard)
        count = silent if silent >= STAGGERED_ONE_BY_ONE else 1
        self._make_way(len(self.pending) + count - self.fetcher.max_parallel)
        self._launch(count)

    def _make_way(self, wanted: int) -> None:
        """
        Up to C{wanted} of the oldest first attempts silent for
        L{SILENT_PATIENCE_SECONDS} give their places to peers never tried
        (they go to the end of the list, for a second try).
        """
        if wanted <= 0 or not self.queue:
            return
        wanted = min(wanted, len(self.queue))
        since = self.fetcher.now() - SILENT_PATIENCE_SECONDS
        for attempt in list(self.pending.values()):
            if wanted <= 0 or attempt.started > since:
                break  # pending is in starting order: the rest are younger
            if attempt.heard or attempt.second_try:
                continue
            wanted -= 1
            attempt.gave_way = True
            assert attempt.deferred is not None
            attempt.deferred.cancel()

    def _heard(self, attempt: _Try, progress: wire.Indexing) -> None:
        attempt.heard = True
        self.fetcher.on_indexing(attempt.peer, progress)

    def _request(self) -> wire.Get | wire.Blob | wire.Pieces:
        """The whole file by name (or its piece list, when the user named a
        content root), or, once its content is known, what is still missing
        of it, by content."""
        content = self.sink.content
        if content is None:
            if self.by_root:
                return wire.Pieces(self.name)
            return wire.Get(self.name)
        offset = content.span(self.sink.first_missing())[0]
        return wire.Blob(content.root_hex, offset, content.size - offset)

    def _start(self, index: int, second_try: bool = False) -> None:
        fetcher = self.fetcher
        request = self._request()
        offset = request.offset if isinstance(request, wire.Blob) else 0
        attempt = _Try(index, self.peers[index], offset, fetcher.now(), second_try)
        self.pending[index] = attempt
        protocol = FileFetchProtocol(
            request,
            self.sink,
            fetcher.reactor,
            fetcher.idle_timeout,
            accept_header=lambda header: self._accept(attempt, header),
            on_indexing=lambda progress: self._heard(attempt, progress),
            on_content=lambda content: self._worth_a_swarm(attempt),
            pace=fetcher.pace,
        )
        factory = Factory.forProtocol(lambda: protocol)
        factory.noisy = False
        try:
            d = fetcher.endpoint_for(attempt.peer).connect(factory)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        # The endpoint's own timeout may be coarse (whole seconds); this one
        # bounds the connection attempt exactly.  After that, the protocol's
        # idle timeout takes over.  A kept connection is there at once: no
        # timer to make and cancel.
        if not d.called:
            d.addTimeout(
                fetcher.connect_timeout,
                fetcher.reactor,
                onTimeoutCancel=cancelled_to_timeout,
            )
        d.addCallback(lambda _: protocol.result)
        attempt.deferred = d
        d.addCallbacks(self._succeeded, self._failed, (attempt,), None, (attempt,))
        d.addErrback(self._crashed)

    # -- outcomes --------------------------------------------------------

    def _accept(self, attempt: _Try, header: wire.FileHeader) -> None:
        """A peer answered with a header: it wins, the others stand down."""
        if self.active is not None or self.done.called:
            raise PeerFailed("another peer is already sending", FailureKind.ABANDONED)
        del self.pending[attempt.index]
        self.active = attempt
        self._disarm()
        for other in list(self.pending.values()):
            other.abandoned = True
            assert other.deferred is not None
            other.deferred.cancel()
        self.fetcher.on_serving([attempt.peer])
        self.fetcher.on_header(
            Attempt(
                attempt.peer,
                True,
                "sending",
                self.fetcher.now() - attempt.started,
                attempt.offset,
            )
        )

    def _record(
        self, attempt: _Try, ok: bool, reason: str, kind: FailureKind | None = None
    ) -> None:
        finished = Attempt(
            attempt.peer,
            ok,
            reason,
            self.fetcher.now() - attempt.started,
            attempt.offset,
            kind,
        )
        self.attempts.append(finished)
        self.fetcher.report(finished)

    def _succeeded(self, header: wire.FileHeader, attempt: _Try) -> None:
        self.active = None
        self._record(attempt, True, "found")
        assert self.sink.content is not None
        self.done.callback(
            FetchResult(self.name, attempt.peer, self.sink.content, self.attempts)
        )

    def _failed(self, failure: Failure, attempt: _Try) -> None:
        if attempt.abandoned or attempt.gave_way or self.done.called:
            # Nothing to decide from it, but a bug is still a bug: logged,
            # never dropped (and never allowed to end a fetch going well).
            if not failure.check(*EXPECTED):
                self.log.failure(
                    "unexpected error in an attempt that no longer counts",
                    failure,
                    peer=attempt.peer.address,
                )
        if attempt.abandoned:
            # Cancelled because another peer answered first; it may still be
            # needed if that peer fails, so it goes back in the queue.
            self.pending.pop(attempt.index, None)
            self.queue.append(attempt.index)
            self.queue = deque(sorted(self.queue))
            return
        if attempt.gave_way and not self.done.called:
            self.pending.pop(attempt.index, None)
            self.gave_way.append(attempt.index)
            return
        if self.done.called:
            return
        failure.trap(*SKIPPABLE)
        self.pending.pop(attempt.index, None)
        if self.active is attempt:
            self.active = None
        kind = kind_of(failure)
        if kind is FailureKind.HANDOVER:
            self._start_swarm(attempt)
            return
        if kind is FailureKind.RESUME:
            # It holds the content, and an earlier run left part of it:
            # ask this same peer again, for the rest only.
            self.queue.appendleft(attempt.index)
        else:
            if kind is FailureKind.OTHER_CONTENT:
                self.holders.add(attempt.index)
            self._record(attempt, False, describe(failure), kind)
            if (
                not self.sink.done
                and not self.by_root
                and self.sink.content is not None
                and self.sink.restartable
            ):
                # Nothing of the content this peer described was verified:
                # forget it, so that the next peer is asked by name and may
                # describe its own (a liar's root must not bind the rest).
                self.sink.reset()
        # Let the pieces already received settle before working out what
        # is missing.
        d = self.sink.settled()
        d.addCallbacks(lambda _: self._go_on(attempt), self._output_failed)

    def _go_on(self, attempt: _Try) -> None:
        """After a failed attempt: the next one, unless the pieces that
        verified meanwhile already complete the content."""
        if self.sink.complete and not self.done.called:
            self._stop_all()
            assert self.sink.content is not None
            self.done.callback(
                FetchResult(self.name, attempt.peer, self.sink.content, self.attempts)
            )
            return
        self._launch()

    # -- several holders at once --------------------------------------------

    def _others(self, peer: wire.PeerEntry) -> list[wire.PeerEntry]:
        return [
            c for c in self.candidates if (c.host, c.port) != (peer.host, peer.port)
        ]

    def _worth_a_swarm(self, attempt: _Try) -> bool:
        """Whether to fetch the content just described from several holders."""
        content = self.sink.content
        return (
            self.fetcher.max_sources > 1
            and self.swarm is None
            and content is not None
            and content.size - self.sink.received >= SWARM_MIN_BYTES
            and bool(self._others(attempt.peer))
        )

    def _start_swarm(self, attempt: _Try) -> None:
        """The first holder described the content: fetch it from several."""
        self.active = None
        fetcher = self.fetcher
        self.swarm = Swarm(
            fetcher.reactor,
            self.sink,
            [attempt.peer, *self._others(attempt.peer)],
            fetcher.endpoint_for,
            fetcher.connect_timeout,
            fetcher.idle_timeout,
            fetcher.max_sources,
            report=self._source_dropped,
            pace=fetcher.pace,
        )
        d = self.swarm.run()
        if not d.called:
            fetcher.on_serving(self.swarm.serving)
        d.addCallbacks(self._swarmed, self._swarm_failed, (attempt,))
        d.addErrback(self._crashed)

    def _source_dropped(self, report: SourceReport) -> None:
        self.fetcher.on_source_dropped(report)
        if self.swarm is not None and not self.swarm.done.called:
            self.fetcher.on_serving(self.swarm.serving)

    def _swarmed(self, reports: list[SourceReport], attempt: _Try) -> None:
        self._record(attempt, True, "found")
        assert self.sink.content is not None
        served = [report for report in reports if report.bytes]
        # The holder named as the one it came from: the one that sent it
        # all, when one did; the one whose header began the fetch may have
        # been dropped since (a bad piece) and sent nothing kept.
        peer = served[0].peer if len(served) == 1 else attempt.peer
        self.done.callback(
            FetchResult(self.name, peer, self.sink.content, self.attempts, served)
        )

    def _swarm_failed(self, failure: Failure) -> None:
        if self.done.called:
            return
        if failure.check(OutputFailed):
            self._stop_all()
            self.done.errback(failure)
            return
        if failure.check(CancelledError):
            return  # the fetch itself was cancelled
        failure.trap(SwarmFailed)
        # Every likely holder failed: record why, then go on one peer at a
        # time with the rest of the list, asking for what is still missing
        # (never again a holder that sent a bad piece).
        liars = set()
        for report in failure.value.reports:
            if report.reason is None:
                continue
            self.attempts.append(
                Attempt(report.peer, False, report.reason, 0.0, kind=report.kind)
            )
            if report.kind is FailureKind.CORRUPTED:
                liars.add((report.peer.host, report.peer.port))

        def trusted(ids: deque[int]) -> deque[int]:
            return deque(
                i for i in ids if (self.peers[i].host, self.peers[i].port) not in liars
            )

        self.queue, self.gave_way = trusted(self.queue), trusted(self.gave_way)
        self._launch()

    def _output_failed(self, failure: Failure) -> None:
        if not self.done.called:
            self._stop_all()
            failure.trap(OSError)
            self.done.errback(OutputFailed(failure.value))

    def _exhausted(self) -> None:
        if (
            not self.second_pass
            and self.holders
            and self.sink.content is not None
            and self.sink.restartable
            and not self.sink.keeps_work
        ):
            # No peer could finish the content begun: start over, whole,
            # with the peers that offered other content under the name.
            # Never over verified pieces of a partial file: those stay for
            # the next run to resume, which is what the fetch then says.
            self.second_pass = True
            self.sink.reset()
            self.queue = deque(sorted(self.holders))
            self.holders = set()
            self._launch()
            return
        self.done.errback(NotFoundAnywhere(self.name, self.attempts))

    def _crashed(self, failure: Failure) -> None:
        # A bug, not a peer's fault: stop everything and let it propagate.
        if not self.done.called:
            self._stop_all()
            self.done.errback(failure)

    def _stop_all(self) -> None:
        self._disarm()
        if self.swarm is not None and not self.swarm.done.called:
            self.swarm.done.cancel()
        running = list(self.pending.values())
        if self.active is not None:
            running.append(self.active)
        self.pending.clear()
        self.active = None
        self.queue.clear()
        self.gave_way.clear()
        for attempt in running:
            attempt.abandoned = True
            if attempt.deferred is not None:
                attempt.deferred.cancel()

    def _cancel(self, _: Deferred) -> None:
        self._stop_all()
