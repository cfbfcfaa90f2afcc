"""One run of the client against its relays: what ``p2p`` does, without the
printing.

A L{ClientSession} asks the relays, in order until one answers
(L{p2p.relay_list}), for the active peers once (phase 2) and keeps that
list for the run, refreshing it only once it is older than a
lease (L{LISTING_MAX_AGE_SECONDS}); for each name it asks the relay which
peers may hold it (``PEERS hint=``; with several names, it matches them
itself against the filters a ``PEERS files=1`` listing carries), maybe
asks those holders which content they hold (L{p2p.choice}), then fetches
it (phase 3, L{p2p.fetch}) into stdout or a file, over connections kept
between fetches (L{p2p.pool}).  What happens meanwhile goes to an
L{IFetchObserver}; each fetch fires with a L{GetResult}.  L{p2p.cli} turns
both into lines, progress bars or JSON.  The last list a relay gave is
cached (L{p2p.relay_cache}); a fetch falls back on it when every relay
fails.
"""

from __future__ import annotations

import enum
import errno
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorThreads
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import hints, wire
from p2p.choice import Choice, ask_roots, choose
from p2p.client import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    MAX_LISTED_BYTES_IN_ALL,
    MAX_LISTED_FILES,
    MAX_LISTED_FILES_IN_ALL,
    ListingBudget,
    ListingTooLong,
    index_status,
    likely_holders,
    list_files,
    list_peers,
)
from p2p.endpoints import DEFAULT_RELAY, peer_endpoint
from p2p.errors import RELAY_FAILURES, SKIPPABLE, OutputFailed, describe, kind_of
from p2p.fetch import DEFAULT_STAGGER_SECONDS, Attempt, Fetcher, NotFoundAnywhere
from p2p.interfaces import IFetchObserver
from p2p.pace import DEFAULT_PACE, Pace
from p2p.pieces import Content
from p2p.pool import ConnectionPool
from p2p.relay_cache import CacheUnusable, PeerCache
from p2p.relay_list import RelayList, RelayObserver
from p2p.request import DEFAULT_REQUEST_TIMEOUT_SECONDS
from p2p.sink import (
    PARTIAL_SUFFIX,
    FileOutput,
    InlineWorker,
    Output,
    OutputRefused,
    PieceSink,
    SerialWorker,
    StreamOutput,
    ThroughOutput,
    output_for,
)
from p2p.swarm import DEFAULT_MAX_SOURCES, SourceReport
from p2p.targets import Target, make_parents, remove_made
from p2p.units import format_bytes

T = TypeVar("T")

# A fetch by content root may use any peer: the first this many are asked
# to serve pieces at once (the rest remain the fallback).
MAX_ROOT_CANDIDATES = 16
# The relay's list is kept for the run, but not longer than a lease (the
# relay's default): by then some of its peers may be gone, and others come.
LISTING_MAX_AGE_SECONDS = 60.0
# What stands for the relay's name while the cached list is in use.
CACHED_LIST = "(cached list)"


@dataclass
class Settings:
    """What a session needs from the command line."""

    # The relays to ask, in order.
    relays: list[str] = field(default_factory=lambda: [DEFAULT_RELAY])
    # Where the last peer list is cached (None: --no-cache).
    cache_folder: str | None = None
    token: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS
    stagger: float = DEFAULT_STAGGER_SECONDS
    peer_ca: str | None = None
    # get --fsync: saved files are flushed to the disk before renaming.
    durable: bool = False
    # get --max-size: the largest file to accept (None: what fits).
    max_size: int | None = None
    # get --sources: most holders of one file used at once.
    max_sources: int = DEFAULT_MAX_SOURCES
    # get --min-rate, --min-rate-time, --header-timeout.
    pace: Pace = DEFAULT_PACE


class Status(enum.Enum):
    """How the fetch of one name ended."""

    OK = "ok"
    #: the relay lists no active peer
    NO_PEERS = "no-peers"
    #: no active peer delivered it
    NOT_FOUND = "not-found"
    #: the output could not be written (C{GetResult.problem} says why)
    OUTPUT_FAILED = "output-failed"
    #: the relay could not be reached, or failed
    RELAY_FAILED = "relay-failed"
    #: the name cannot be asked for (C{GetResult.problem} says why)
    INVALID_NAME = "invalid-name"


class Basis(enum.Enum):
    """What the pieces of a fetched content were checked against."""

    #: the ROOT the user gave
    ROOT = "root"
    #: ``--expect ROOT``
    EXPECT = "expect"
    #: the content most of the holders asked offered
    HOLDERS = "holders"
    #: the root the (first) holder that answered described
    HOLDER = "holder"


@dataclass
class GetResult:
    """The outcome of fetching one name (L{ClientSession.get})."""

    name: str
    status: Status
    # Where the content went: "stdout", or the -o path.
    output: str = "stdout"
    content: Content | None = None
    seconds: float = 0.0
    # Every peer tried, in order, with why it failed.
    attempts: list[Attempt] = field(default_factory=list)
    # The holders that served pieces, when several did.
    sources: list[SourceReport] = field(default_factory=list)
    # The peer whose header won (None unless OK).
    peer: wire.PeerEntry | None = None
    basis: Basis = Basis.HOLDER
    # With Basis.HOLDERS: how many holders offered the content taken, of
    # how many that answered.
    agreeing: int = 0
    answered: int = 0
    # Why it failed, for OUTPUT_FAILED, RELAY_FAILED and INVALID_NAME.
    problem: str | None = None
    # OUTPUT_FAILED because the output was a pipe nobody reads any more.
    reader_left: bool = False
    # Active peers when it was not found.
    active: int = 0
    # A partial file kept for a later run to resume, and its verified bytes.
    kept: str | None = None
    received: int = 0
    # Verified bytes an earlier run had stored and this one resumed from.
    resumed: int = 0
    # The holders that could not say which content they hold (p2p.choice),
    # before the fetch itself.
    questions: list[Attempt] = field(default_factory=list)


@dataclass
class Listing:
    """One peer's files (L{ClientSession.listings}): C{error} when it could
    not be listed; C{truncated} when it lists more than the client takes;
    C{status}, how far its index got once listed (C{None}: it cannot say),
    so that a listing of a peer still indexing is never taken for all."""

    peer: wire.PeerEntry
    files: list[wire.FileEntry]
    error: str | None = None
    truncated: bool = False
    status: wire.IndexStatus | None = None


@dataclass
class Interruption:
    """What an interrupted fetch leaves (L{ClientSession.interrupted})."""

    name: str
    # "kept" (a partial file to resume), "streamed" (verified bytes went to
    # a stream) or "nothing".
    what: str
    path: str | None = None
    received: int = 0
    size: int = 0


def name_problem(name: str) -> str | None:
    """Why C{name} cannot be asked of a peer, or C{None} if it can."""
    if not name:
        return "an empty name"
    try:
        wire.decode_line(wire.encode_line(f"GET {name}"))
    except (ValueError, wire.WireError):
        return "not a valid file name"
    if len(name.encode("utf-8")) > wire.MAX_NAME_LENGTH:
        return f"longer than {wire.MAX_NAME_LENGTH} bytes"
    return None


def in_daemon_thread(reactor, work: Callable[[], T]) -> Deferred[T]:
    """
    Run blocking C{work} (terminal input, opening a FIFO) off the reactor
    thread.  A daemon thread, unlike the reactor's pool, cannot keep the
    process alive after Ctrl-C while it waits.
    """
    d: Deferred[T] = Deferred()

    def runner() -> None:
        try:
            result = work()
        except BaseException:
            reactor.callFromThread(d.errback, Failure())
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=runner, daemon=True).start()
    return d


@implementer(IFetchObserver)
class QuietObserver:
    """An L{IFetchObserver} that ignores everything."""

    def listed(self, name, relay, peers, suggested) -> None:
        pass

    def no_suggestion(self, relay, reason) -> None:
        pass

    def question_failed(self, name, peer, reason, seconds) -> None:
        pass

    def disagreement(self, name, choice) -> None:
        pass

    def waiting_for_reader(self, name, path) -> None:
        pass

    def skipped(self, name, attempt) -> None:
        pass

    def indexing(self, name, peer, progress) -> None:
        pass

    def found(self, name, attempt) -> None:
        pass

    def serving(self, name, peers) -> None:
        pass

    def progress(self, name, received, total) -> None:
        pass

    def dropped(self, name, report) -> None:
        pass


class _LentWorker:
    """The session's L{SerialWorker}, lent to one fetch: a fetch that ends
    stops using it, without stopping it for the next."""

    def __init__(self, worker: SerialWorker) -> None:
        self.submit = worker.submit
        self.submit_checked = worker.submit_checked

    def stop(self) -> None:
        """The fetch is done with it (the session stops it in close())."""


class ClientSession:
    """
    The client's work against its relays.

    :param reactor: provides TCP and time (threads too, outside tests).
    :param settings: the command line's choices.
    :param stdout: where content goes without ``-o``.
    :param observer: hears each fetch's progress.
    :param relay_observer: hears which relay answered, and of the cache.
    :raise ValueError: for an unusable relay address.
    """

    def __init__(
        self,
        reactor,
        settings: Settings,
        stdout: BinaryIO,
        observer: IFetchObserver | None = None,
        relay_observer: RelayObserver | None = None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.stdout = stdout
        self.observer: IFetchObserver = observer or QuietObserver()
        self.relay_observer = relay_observer or RelayObserver()
        self.relays = RelayList(reactor, settings.relays)
        self.cache = (
            None
            if settings.cache_folder is None
            else PeerCache(settings.cache_folder, self.relays.texts, reactor.seconds)
        )
        timeout = settings.connect_timeout
        if settings.peer_ca is not None:
            from p2p.tls import peer_endpoint_for

            endpoint_for = peer_endpoint_for(reactor, settings.peer_ca, timeout)
        else:
            endpoint_for = lambda peer: peer_endpoint(reactor, peer, timeout)  # noqa: E731
        # Connections to peers kept between fetches (p2p.pool).
        self.pool = ConnectionPool(reactor)
        self.endpoint_for = self.pool.wrap(endpoint_for)
        self.request_timeout = max(timeout, DEFAULT_REQUEST_TIMEOUT_SECONDS)
        # The relay's last list, and when it came (the reactor's clock).
        self._listing: list[wire.PeerEntry] | None = None
        self._listed_at = 0.0
        # With several names to fetch, the list carries the peers' name
        # filters and names are matched here: one relay request per run
        # instead of one per name (which the relay's request budget would
        # slow to a few names a second).  Off again for a relay that
        # cannot send filters.
        self.match_locally = False
        self._listed_with_files = False
        # While the relay is being asked: those waiting for the same answer.
        self._asking: list[Deferred[None]] | None = None
        # Folders found writable this run (L{_writable_folder}).
        self._writable: set[str] = set()
        # The names being fetched and their sinks (for an interruption):
        # several at once with p2p get --jobs.
        self._running: list[tuple[str, PieceSink]] = []
        # Whether the list in use is the cached one (every relay failed).
        self._listing_cached = False
        # The storing thread, started at the first fetch that needs it and
        # lent to every fetch after it (threads started per file were a
        # tenth of a small file's cost); stopped by close().
        self._worker: SerialWorker | None = None

    def _worker_for_fetch(self) -> _LentWorker | InlineWorker:
        if not IReactorThreads.providedBy(self.reactor):
            return InlineWorker()  # an in-memory reactor (tests)
        if self._worker is None:
            self._worker = SerialWorker(self.reactor)
        return _LentWorker(self._worker)

    def close(self) -> None:
        """Stop the session's threads and close its idle connections (after
        its last fetch)."""
        self.pool.close()
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    @property
    def relay_text(self) -> str:
        """The relay whose list is in use (before one answered: all)."""
        if self._listing_cached:
            return CACHED_LIST
        return self.relays.text

    # -- phase 2 -------------------------------------------------------------

    @inlineCallbacks
    def peers(self, fresh: bool = False, cached: bool = False):
        """
        The list of active peers from the first relay that answers: asked
        once, then kept for L{LISTING_MAX_AGE_SECONDS} (with C{fresh},
        asked again anyway), and cached.  Fails with one of
        L{RELAY_FAILURES} when no relay answers, unless C{cached} allows
        the cached list (which is then kept like a relay's).
        """
        if fresh or self._listing_stale():
            if self._asking is None:
                # Names fetched at once share one request to the relays (and
                # one look at the cache: the first asker's C{cached} holds
                # for all); each goes on in the order it asked.
                self._asking = []
                self._from_relays(cached).addBoth(self._listed)
            waiter: Deferred[None] = Deferred()
            self._asking.append(waiter)
            yield waiter
        assert self._listing is not None
        return list(self._listing)

    def _listing_stale(self) -> bool:
        """Whether L{peers} will ask the relays (nothing kept, or too old,
        or without the name filters now wanted)."""
        return (
            self._listing is None
            or self.reactor.seconds() - self._listed_at > LISTING_MAX_AGE_SECONDS
            or self.match_locally != self._listed_with_files
        )

    def _listed(self, result: list[wire.PeerEntry] | Failure) -> None:
        """The relay answered (or failed): tell everyone waiting."""
        if not isinstance(result, Failure):
            self._listing, self._listed_at = result, self.reactor.seconds()
        waiters, self._asking = self._asking or [], None
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    @inlineCallbacks
    def _from_relays(self, cached: bool):
        """The first answering relay's list (saved to the cache), else with
        C{cached} the cached list; else the relays' failure."""
        try:
            entries = yield self.relays.first_answer(self._list)
        except RELAY_FAILURES:
            failure = Failure()
            entries = self._cached() if cached else None
            if entries is None:
                failure.raiseException()
            self._listing_cached = True
            # The cache keeps no name filters: nothing to match here.
            self.match_locally = self._listed_with_files = False
        else:
            self._listing_cached = False
            if self.relays.several:
                self.relay_observer.answered(self.relay_text, self.relays.failures)
            self._save(entries)
        return entries

    def _save(self, entries: list[wire.PeerEntry]) -> None:
        # Written on the reactor thread: once per listing (a run's first,
        # then one a minute at most), at most 10,000 short lines.
        if self.cache is None:
            return
        try:
            self.cache.save(entries)
        except OSError as e:
            self.relay_observer.cache_problem(
                f"cannot write the peer cache {self.cache.path}: {e.strerror or e}"
            )

    def _cached(self) -> list[wire.PeerEntry] | None:
        """The cached peers (telling the relay observer), if any."""
        if self.cache is None:
            return None
        try:
            cached = self.cache.load()
        except CacheUnusable as e:
            self.relay_observer.cache_problem(
                f"ignoring the peer cache {self.cache.path}: {e}"
            )
            return None
        if cached is None:
            return None
        age = self.reactor.seconds() - cached.saved
        self.relay_observer.using_cache(age, self.relays.failures)
        return cached.peers

    @inlineCallbacks
    def _list(self, relay):
        """One relay's list, with filters if L{match_locally} and the relay
        can (a relay that cannot is asked again without)."""
        files = self.match_locally
        ask = functools.partial(
            list_peers,
            relay,
            self.reactor,
            self.request_timeout,
            self.settings.token,
        )
        try:
            entries = yield ask(files=files)
        except wire.RemoteError as e:
            if not files or e.code != wire.Code.BAD_REQUEST:
                raise
            self.match_locally = files = False  # a relay from before filters
            entries = yield ask()
        self._listed_with_files = files
        return entries

    def _early_hint_wanted(self) -> bool:
        """Whether one relay is about to be asked for its list, and then
        for a name's likely holders (see L{_early_hint})."""
        return (
            not self.match_locally
            and not self.relays.several
            and self._asking is None
            and self._listing_stale()
        )

    def _early_hint(self, name: str) -> Deferred:
        """
        Ask the relay for C{name}'s likely holders while its list is being
        asked (L{_early_hint_wanted}): a single name's fetch starts a round
        trip sooner.
        """
        d = self._ask_hint(self.relays.endpoints[0], name)
        # A value either way: L{suggested} raises the failure, if it is
        # still wanted then (not when the list came from the cache).
        return d.addCallbacks(lambda entries: (entries, None), lambda f: (None, f))

    def _ask_hint(self, relay, name: str) -> Deferred[list[wire.PeerEntry]]:
        return likely_holders(
            relay, self.reactor, self.request_timeout, name, self.settings.token
        )

    @inlineCallbacks
    def suggested(self, name: str, early: Deferred | None = None):
        """
        The peers the relay suggests for C{name} (likely holders, from the
        peers' name filters); none if the relay cannot say.  Only an
        ordering hint: the fetch still falls back across every active peer.
        With L{match_locally}, matched here against the listed filters.
        C{early} is the answer to the same question asked already
        (L{_early_hint}).
        """
        if self._listed_with_files and self._listing is not None:
            return hints.suggest(self._listing, name, wire.MAX_PEERS_PER_PAGE)
        relay = self.relays.endpoint
        if relay is None:
            return []  # the cached list: no relay to ask
        try:
            if early is None:
                entries = yield self._ask_hint(relay, name)
            else:
                entries, failure = yield early
                if failure is not None:
                    failure.raiseException()
        except RELAY_FAILURES:
            # The full list is in already: go on without a suggestion.
            self.observer.no_suggestion(self.relay_text, describe(Failure()))
            return []
        return entries

    @inlineCallbacks
    def listings(self, max_files: int | None = None, max_bytes: int | None = None):
        """
        Every active peer's files, one L{Listing} per peer in the relay's
        order (every page of each; a peer that cannot be listed has its
        C{error}).  Fails like L{peers} when the relay cannot answer.

        At most C{max_files} files and C{max_bytes} of ``FILE`` lines
        (default: L{MAX_LISTED_FILES_IN_ALL}, L{MAX_LISTED_BYTES_IN_ALL}) are
        taken from all peers together, so memory is bounded however many
        peers list.  They are shared: each peer may take what is left
        divided by the peers left (what a short listing leaves goes to the
        next ones), so peers early in the relay's order cannot crowd out
        the rest.  A listing cut by its share is C{truncated} and says so.
        """
        if max_files is None:
            max_files = MAX_LISTED_FILES_IN_ALL
        if max_bytes is None:
            max_bytes = MAX_LISTED_BYTES_IN_ALL
        entries = yield self.peers()
        listings = []
        budget = ListingBudget(max_files, max_bytes)
        for position, entry in enumerate(entries):
            endpoint = self.endpoint_for(entry)
            share = budget.share(len(entries) - position)
            maximum = min(MAX_LISTED_FILES, share.files_left)
            try:
                files = yield list_files(
                    endpoint,
                    self.reactor,
                    self.request_timeout,
                    maximum=maximum,
                    budget=share,
                )
            except ListingTooLong as e:
                files = e.files
                reason = str(e)
                if e.by_bytes or maximum < MAX_LISTED_FILES:
                    reason += (
                        f" (its share of the {max_files} files and "
                        f"{format_bytes(max_bytes)} of FILE lines p2p ls takes "
                        f"from all {len(entries)} peers)"
                    )
                listings.append(Listing(entry, files, reason, truncated=True))
            except SKIPPABLE:
                listings.append(Listing(entry, [], describe(Failure())))
                continue
            else:
                # Asked after the last page: files indexed while the pages
                # were read came last in the order (LIST), so were listed;
                # what is pending now is what the listing lacks.
                try:
                    status = yield index_status(
                        endpoint, self.reactor, self.request_timeout
                    )
                except SKIPPABLE:
                    status = None
                listings.append(Listing(entry, files, status=status))
            # Charged once its files are kept: what the pages of a peer
            # that then failed (SKIPPABLE above) took is left to the rest.
            budget.charge(share)
        return listings

    # -- phase 3 -------------------------------------------------------------

    @inlineCallbacks
    def get(self, name: str, target: Target | None, expect: str | None = None):
        """
        Fetch C{name} (or a ROOT) into C{target} (C{None}: stdout); fires
        with a L{GetResult}.  Missing folders of the target under its
        C{folder} are made first, and removed again if nothing was written.
        """
        made: list[str] = []
        # The holders of the name that could not say which content they hold.
        questions: list[Attempt] = []
        result = yield self._get(name, target, expect, made, questions)
        result.questions = questions
        if made and result.status is not Status.OK and result.kept is None:
            remove_made(made)
        return result

    def _writable_folder(self, folder: str) -> bool:
        """
        Whether C{folder} is one a partial file can be made in.  Asked
        once per folder and run (1,000 names into one folder asked the
        file system 2,000 times); a folder that stops being writable later
        fails the file's creation instead, as clearly.
        """
        if folder in self._writable:
            return True
        if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            self._writable.add(folder)
            return True
        return False

    @inlineCallbacks
    def _get(
        self,
        name: str,
        target: Target | None,
        expect: str | None,
        made: list[str],
        questions: list[Attempt],
    ):
        # The name's whole time, as its user waits it: the listing, the
        # questions to its holders, the fetch and the storing.
        started = time.monotonic()
        settings = self.settings
        observer = self.observer
        problem = name_problem(name)
        if problem is not None:
            return GetResult(name, Status.INVALID_NAME, problem=problem)
        by_root = wire.is_root(name)
        output_to: Output
        if target is None:
            output_to = StreamOutput(self.stdout)
        else:
            path = target.path
            try:
                made.extend(make_parents(target))
                output_to = output_for(path)
            except (OSError, OutputRefused) as e:
                reason = os_reason(e, path) if isinstance(e, OSError) else str(e)
                return self._output_failed(name, path, reason)
            # The partial file is created next to the target (for an atomic
            # rename); find out now, not mid-transfer, that it cannot be.
            folder = os.path.dirname(path) or os.curdir
            if isinstance(output_to, FileOutput) and not self._writable_folder(folder):
                if os.path.isdir(folder):
                    why = "not writable"
                elif os.path.lexists(folder):
                    why = "not a folder"
                else:
                    why = "no such folder"
                return self._output_failed(name, path, f"{folder}: {why}")
        output_label = output_to.label if target is not None else "stdout"
        early_wanted = not by_root and self._early_hint_wanted()
        listing = self.peers(cached=True)
        early = self._early_hint(name) if early_wanted else None
        try:
            try:
                peers = yield listing
            except RELAY_FAILURES:
                return GetResult(
                    name,
                    Status.RELAY_FAILED,
                    output_label,
                    problem=describe(Failure()),
                )
            if not peers:
                observer.listed(name, self.relay_text, 0, None)
                return GetResult(name, Status.NO_PEERS, output_label)
            if by_root:
                # The relay's hints are by name: every peer may hold a content.
                suggested: list[wire.PeerEntry] = []
                observer.listed(name, self.relay_text, len(peers), None)
            else:
                suggested = yield self.suggested(name, early)
                count = None if self._listing_cached else len(suggested)
                observer.listed(name, self.relay_text, len(peers), count)
        finally:
            # The early question, if its answer was not wanted after all
            # (the relay failed, no peers, the cached list): stopped.
            if early is not None and not early.called:
                early.cancel()
        peers = hinted_order(suggested, peers)
        # Likely holders, for several sources at once: the relay's
        # suggestions by name; any peer for a content root.
        candidates = peers[:MAX_ROOT_CANDIDATES] if by_root else suggested
        basis = Basis.ROOT if by_root else Basis.HOLDER
        agreeing = answered = 0
        if expect is not None:
            basis = Basis.EXPECT
        if (
            not by_root
            and expect is None
            and min(len(suggested), settings.max_sources) >= 2
        ):
            choice = yield self._choose(name, suggested, output_to, questions)
            if choice is not None:
                expect = choice.chosen.root
                peers, candidates = _holders_first(choice, peers, suggested)
                if choice.answered > 1:
                    basis = Basis.HOLDERS
                    agreeing = len(choice.chosen.holders)
                    answered = choice.answered
        worker = self._worker_for_fetch()
        if target is not None:
            # On the reactor thread: creating a file is about 50 us here;
            # done on the worker thread while the first peer was asked, it
            # cost more than it saved, the two threads contending for the
            # GIL (each send() on the reactor thread took 0.3 ms, not 0.04).
            try:
                yield self._open(name, output_to)
            except OSError as e:
                return self._output_failed(name, target.path, os_reason(e, target.path))
        sink: PieceSink

        def progressed() -> None:
            if sink.content is not None:
                observer.progress(name, sink.received, sink.content.size)

        sink = PieceSink(
            output_to,
            worker,
            durable=settings.durable,
            expected_root=name if by_root else expect,
            max_size=settings.max_size,
            on_progress=progressed,
        )
        running = (name, sink)
        self._running.append(running)
        fetcher = Fetcher(
            self.reactor,
            settings.connect_timeout,
            settings.idle_timeout,
            endpoint_for=self.endpoint_for,
            report=lambda attempt: self._finished(name, attempt),
            stagger=settings.stagger,
            on_indexing=lambda peer, progress: observer.indexing(name, peer, progress),
            on_header=lambda attempt: observer.found(name, attempt),
            max_sources=settings.max_sources,
            on_source_dropped=lambda report: observer.dropped(name, report),
            on_serving=lambda serving: observer.serving(name, serving),
            pace=settings.pace,
        )
        try:
            try:
                fetched = yield fetcher.fetch(name, peers, sink, by_root, candidates)
                yield sink.finish()
            finally:
                # The fetch is over, one way or another: nothing for an
                # interruption to report from here on.
                if running in self._running:
                    self._running.remove(running)
        except NotFoundAnywhere as e:
            kept = yield sink.abandon(keep=True)
            result = GetResult(
                name,
                Status.NOT_FOUND,
                output_label,
                sink.content,
                time.monotonic() - started,
                e.attempts,
                active=e.peers,
            )
            if kept is not None and sink.content is not None:
                result.kept, result.received = kept, sink.received
            return result
        except (OutputFailed, OSError) as e:
            yield sink.abandon(keep=False)
            error = e.error if isinstance(e, OutputFailed) else e
            result = self._output_failed(
                name, output_label, error.strerror or str(error), sink.content
            )
            # A pipe whose reader left (``p2p get x | head -c 100``).
            result.reader_left = isinstance(error, BrokenPipeError)
            return result
        except BaseException:
            sink.abandon(keep=False)
            raise
        yield sink.abandon(keep=False)  # stops the worker; the file is in place
        return GetResult(
            name,
            Status.OK,
            output_label,
            fetched.content,
            time.monotonic() - started,
            fetched.attempts,
            fetched.sources if len(fetched.sources) > 1 else [],
            fetched.peer,
            basis,
            agreeing,
            answered,
            resumed=sink.resumed,
        )

    def _finished(self, name: str, attempt: Attempt) -> None:
        if not attempt.ok:
            self.observer.skipped(name, attempt)

    def _output_failed(
        self, name: str, path: str, reason: str, content: Content | None = None
    ) -> GetResult:
        return GetResult(name, Status.OUTPUT_FAILED, path, content, problem=reason)

    @inlineCallbacks
    def _choose(
        self,
        name: str,
        suggested: list[wire.PeerEntry],
        output: Output,
        questions: list[Attempt],
    ):
        """
        Ask the first suggested holders (up to --sources) which content
        they hold under C{name} (L{p2p.choice}); tell the observer when
        they disagree.  Fires with the L{Choice}, or C{None} when no holder
        answered with a content the client would take.
        """
        holders = suggested[: self.settings.max_sources]

        def failed(peer: wire.PeerEntry, failure: Failure, seconds: float) -> None:
            reason = describe(failure)
            questions.append(
                Attempt(peer, False, reason, seconds, kind=kind_of(failure))
            )
            self.observer.question_failed(name, peer, reason, seconds)

        sizes = PieceSink(output, InlineWorker(), max_size=self.settings.max_size)
        offers = yield ask_roots(
            name,
            holders,
            self.endpoint_for,
            self.reactor,
            self.settings.connect_timeout,
            on_failure=failed,
            pace=self.settings.pace,
            refusal=sizes.refusal,
            on_indexing=functools.partial(self.observer.indexing, name),
        )
        choice = choose(offers, len(holders), lambda size: sizes.refusal(size) is None)
        if choice is not None and choice.disagree:
            self.observer.disagreement(name, choice)
        return choice

    @inlineCallbacks
    def _open(self, name: str, output: Output):
        """
        Lock a file output's partial file, or open (and lock) a target
        written through.  A FIFO nobody reads yet is waited for, off the
        reactor thread, before any peer is asked.
        """
        if isinstance(output, FileOutput):
            output.lock()
        elif isinstance(output, ThroughOutput) and not output.open(blocking=False):
            self.observer.waiting_for_reader(name, output.label)
            if IReactorThreads.providedBy(self.reactor):
                yield in_daemon_thread(self.reactor, output.open)
            else:
                output.open()

    def interrupted(self) -> list[Interruption]:
        """
        The process is stopping (Ctrl-C) in the middle of fetches: what each
        leaves.  A partial ``-o`` file of known content stays, to be resumed
        by the same command; what cannot be resumed was never written
        (stdout) or is not there yet (and is cleaned up here).
        """
        running, self._running = self._running, []
        return [_left_by(name, sink) for name, sink in running]


# Why a folder that exists may take no new file, by errno: procfs and sysfs
# answer ENOENT to a create.
_NO_NEW_FILES = {
    errno.ENOENT: "",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
}


def os_reason(error: OSError, path: str) -> str:
    """
    Why writing C{path} failed, naming the file that failed when it is
    another (the partial file beside it): "No such file or directory" for
    ``-o /proc/version``, an existing file, was no answer.
    """
    reason = error.strerror or str(error)
    failed = error.filename
    if not isinstance(failed, str) or failed == path:
        return reason
    if failed == path + PARTIAL_SUFFIX and error.errno in _NO_NEW_FILES:
        # The folder is there (checked before): it takes no new file, where
        # the download goes before it is renamed over the target.
        folder = os.path.dirname(path) or os.curdir
        why = _NO_NEW_FILES[error.errno]
        return (
            f"{folder} takes no new files{f' ({why})' if why else ''}: a "
            "download is written beside its target, then renamed over it"
        )
    if error.errno == errno.ELOOP:
        return f"{failed} is a symbolic link (remove it: it is never followed)"
    if error.errno == errno.EISDIR:
        return f"{failed} is a folder (remove it or give another -o)"
    return f"{failed}: {reason}"


def _left_by(name: str, sink: PieceSink) -> Interruption:
    """What an interrupted fetch of C{name} into C{sink} leaves."""
    output = sink.output
    if isinstance(output, FileOutput) and output.resumable:
        return Interruption(
            name, "kept", output.partial, sink.received, output.content.size
        )
    if isinstance(output, StreamOutput):
        return Interruption(name, "streamed", output.label, output.written)
    if isinstance(output, FileOutput):
        # Nothing of this run to resume (no content known yet, or one of
        # a single piece): no leftovers (an earlier run's partial file, if
        # any, stays for the next run).
        output.abandon(keep=False)
    return Interruption(name, "nothing")


def hinted_order(
    suggested: list[wire.PeerEntry], peers: list[wire.PeerEntry]
) -> list[wire.PeerEntry]:
    """
    The order to try peers in: the relay's suggestions first (in its
    order), then the rest of the full list in its order; each address once.
    """
    seen: set[tuple[str, int]] = set()
    ordered = []
    for entry in [*suggested, *peers]:
        key = (entry.host, entry.port)
        if key not in seen:
            seen.add(key)
            ordered.append(entry)
    return ordered


def _holders_first(
    choice: Choice, peers: list[wire.PeerEntry], suggested: list[wire.PeerEntry]
) -> tuple[list[wire.PeerEntry], list[wire.PeerEntry]]:
    """
    The order to try peers in, and the candidates for several sources,
    once a content is chosen: its holders first; holders of other content
    last (they will be skipped: asked only if everything else failed).
    """
    others = {
        (peer.host, peer.port)
        for offered in choice.contents
        if offered is not choice.chosen
        for peer in offered.holders
    }

    def differs(peer: wire.PeerEntry) -> bool:
        return (peer.host, peer.port) in others

    chosen = list(choice.chosen.holders)
    ordered = hinted_order(
        chosen,
        [p for p in peers if not differs(p)] + [p for p in peers if differs(p)],
    )
    candidates = hinted_order(chosen, [p for p in suggested if not differs(p)])
    return ordered, candidates
