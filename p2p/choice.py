"""Which content a fetch by name takes when its holders disagree.

A name is only a name: any peer can serve content of its own under any
name, with a root that matches it, and every piece of it verifies.  So
before a fetch by name with several likely holders, the client asks the
first few of them (up to ``--sources``) at once for the name's header
only, ``RANGE 0 0 <name>`` (a header with ``offset=0 size=<size>`` and no
bytes: see docs/protocol.rst), and takes the content **the most of them
offer**, ties going to the one the relay suggested first.  The fetch
then accepts that content only, as ``--expect`` would; holders offering
another are reported.

This notices a lone liar among honest holders, and says so; it cannot tell
which content the name's author meant when liars are as many as the honest
(a fetch by ROOT, or ``--expect ROOT``, can).  It costs one round trip, to
all of those holders in parallel, and only when the relay suggests two
holders or more (and ``--sources`` allows two): a name with one likely
holder is fetched as before, in one round trip.

L{choose} is the rule (pure); L{ask_roots} asks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2p import wire
from p2p.client import described
from p2p.endpoints import EndpointFor
from p2p.errors import SKIPPABLE, FailureKind, PeerFailed
from p2p.pace import DEFAULT_PACE, SILENT_PATIENCE_SECONDS, IndexingWatch, Pace
from p2p.request import Interim, request_lines
from p2p.wire import WireError

# Once a holder answered, the others have this long to answer too: RFC
# 8305's connection attempt delay, as for the fetch's stagger (a working
# link's round trip is far shorter); so a blackholed holder costs this, not
# the connect timeout.
DISCOVERY_GRACE_SECONDS = 0.25

_log = Logger()


@dataclass(frozen=True)
class Offer:
    """A holder's answer: the content it holds under the name."""

    peer: wire.PeerEntry
    root: str
    size: int


@dataclass(frozen=True)
class Offered:
    """One content offered under the name, and who offers it."""

    root: str
    size: int
    holders: tuple[wire.PeerEntry, ...]


@dataclass(frozen=True)
class Choice:
    """
    The content taken (C{chosen}), every content offered (most holders
    first, then the relay's order) and how many holders were asked.
    """

    chosen: Offered
    contents: tuple[Offered, ...]
    asked: int

    @property
    def disagree(self) -> bool:
        return len(self.contents) > 1

    @property
    def tied(self) -> bool:
        """Another content has as many holders as the chosen one."""
        return any(
            len(other.holders) == len(self.chosen.holders)
            for other in self.contents[1:]
        )

    @property
    def answered(self) -> int:
        return sum(len(content.holders) for content in self.contents)


def choose(
    offers: Sequence[Offer],
    asked: int,
    acceptable: Callable[[int], bool] = lambda size: True,
) -> Choice | None:
    """
    The content the most C{offers} (in the relay's order) name, ties
    broken by that order; only sizes C{acceptable} to the client (within
    ``--max-size``, fitting the target) can be chosen.  C{None} when no
    acceptable content is offered.
    """
    counts = Counter(offer.root for offer in offers)
    order: dict[str, int] = {}
    for position, offer in enumerate(offers):
        order.setdefault(offer.root, position)
    contents = tuple(
        Offered(
            root,
            next(offer.size for offer in offers if offer.root == root),
            tuple(offer.peer for offer in offers if offer.root == root),
        )
        for root in sorted(order, key=lambda root: (-counts[root], order[root]))
    )
    candidates = [content for content in contents if acceptable(content.size)]
    if not candidates:
        return None
    return Choice(candidates[0], contents, asked)


def ask_roots(
    name: str,
    holders: Sequence[wire.PeerEntry],
    endpoint_for: EndpointFor,
    clock: IReactorTime,
    timeout: float,
    grace: float = DISCOVERY_GRACE_SECONDS,
    on_failure: Callable[[wire.PeerEntry, Failure, float], object] = (
        lambda peer, failure, seconds: None
    ),
    pace: Pace = DEFAULT_PACE,
    refusal: Callable[[int], str | None] = lambda size: None,
    on_indexing: Callable[[wire.PeerEntry, wire.Indexing], object] = (
        lambda peer, progress: None
    ),
    patience: float = SILENT_PATIENCE_SECONDS,
) -> Deferred[list[Offer]]:
    """
    Ask every one of C{holders} at once for C{name}'s header only
    (``RANGE 0 0 <name>``).  Fires with the offers, in C{holders}' order,
    once every holder answered or failed, or C{grace} seconds after the
    first answer, or after C{patience} seconds if none offered anything nor
    is indexing the file (the stragglers are dropped: silent fakes
    suggested first must not hold the fetch up for the whole C{timeout}),
    each request being bounded by C{timeout} seconds.  A holder still
    indexing the file answers ``INDEXING`` lines first, as to a ``GET``:
    each goes to C{on_indexing}, one that shows progress gives its request
    C{timeout} seconds afresh, and they are held to C{pace} as a fetch's
    are (L{IndexingWatch}), a size C{refusal} names failing the holder at
    once.  A holder that refuses, fails, answers something other than an
    empty range of a well-formed content, or is still indexing when the
    question ends, offers nothing, and is told to C{on_failure} with the
    failure and the seconds it took (not one still waited for otherwise, a
    straggler that said nothing yet).  Cancelling stops every request.
    """
    line = wire.Range(0, 0, name).to_line()
    offers: list[Offer | None] = [None] * len(holders)
    requests: list[Deferred] = []
    # The grace timer (once a holder offered), and the silence timer.
    timer: list[IDelayedCall] = []
    silence: list[IDelayedCall] = []
    # Requests still to settle; and whether the result is decided.
    pending = [0]
    over: list[bool] = []

    def stop() -> None:
        over.append(True)
        for call in [*timer, *silence]:
            if call.active():
                call.cancel()
        for request in requests:
            request.cancel()

    done: Deferred[list[Offer]] = Deferred(lambda _: stop())

    def finish() -> None:
        if not over:
            # Taken before the requests are stopped (that settles them).
            left = dict(indexing)
            stop()
            still_indexing(left)
            done.callback([offer for offer in offers if offer is not None])

    # The last progress of each holder still indexing the file.
    indexing: dict[int, wire.Indexing] = {}
    started = clock.seconds()

    def watch(index: int) -> Interim:
        """Take holder C{index}'s INDEXING lines as a fetch does."""
        watcher = IndexingWatch(clock, pace)

        def interim(line: bytes) -> bool | None:
            progress = wire.Indexing.from_line(line)
            if progress is None:
                return None
            renews = watcher.judge(progress, refusal)
            indexing[index] = progress
            on_indexing(holders[index], progress)
            return renews

        return interim

    def still_indexing(left: dict[int, wire.Indexing]) -> None:
        """The question ended: say which holders were still indexing."""
        for index, progress in sorted(left.items()):
            share = progress.done / progress.total if progress.total else 1.0
            reason = PeerFailed(
                f"still indexing the file ({share:.0%} of {progress.total} bytes) "
                "when the others had answered",
                FailureKind.TIMEOUT,
            )
            on_failure(holders[index], Failure(reason), clock.seconds() - started)

    def answered(lines: list[bytes], index: int) -> None:
        indexing.pop(index, None)
        header = wire.FileHeader.from_line(lines[0])
        if (header.offset, header.count, header.hashes) != (0, 0, 0):
            raise WireError(wire.Code.BAD_REQUEST, "the reply is for another range")
        described(header.root, header.size, header.piece)
        offers[index] = Offer(holders[index], header.root, header.size)
        if not timer and not over:
            timer.append(clock.callLater(grace, finish))

    def failed(failure: Failure, index: int, started: float) -> None:
        indexing.pop(index, None)
        failure.trap(*SKIPPABLE)
        if not over:
            on_failure(holders[index], failure, clock.seconds() - started)

    def settled(_: None) -> None:
        pending[0] -= 1
        if not pending[0]:
            finish()

    def crashed(failure: Failure) -> None:
        # A bug, not a peer's fault: let it reach the caller, or, once the
        # answer is given, the log (never dropped).
        if not over:
            stop()
            done.errback(failure)
        else:
            _log.failure("unexpected error after the holders' question", failure)

    for index, holder in enumerate(holders):
        try:
            endpoint = endpoint_for(holder)
        except Exception:
            continue  # an address this client cannot reach (TLS setup)
        d = request_lines(
            endpoint, "peer", line, clock, False, timeout, interim=watch(index)
        )
        d.addCallback(answered, index)
        d.addErrback(failed, index, clock.seconds())
        requests.append(d)
    # Counted first, watched after: a request may have settled already.
    pending[0] = len(requests)
    for request in requests:
        request.addCallback(settled)
        request.addErrback(crashed)

    def silent() -> None:
        # No offer (its grace timer would be set) and nobody indexing.
        if not timer and not indexing:
            finish()

    if not requests:
        finish()
    elif not over:
        silence.append(clock.callLater(patience, silent))
    return done
