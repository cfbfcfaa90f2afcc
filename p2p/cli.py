"""The ``p2p`` command: ``get``, ``peers``, ``ls`` and ``demo``.

stdout carries only results (file content, peer or file lines); progress and
diagnostics go to stderr.  Every failure ends in one line on stderr and a
documented exit status, never a traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, NoReturn, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IReactorThreads
from twisted.python import usage
from twisted.python.failure import Failure

from p2p import __version__, wire
from p2p.choice import Choice, ask_roots, choose
from p2p.client import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    SKIPPABLE,
    ListingTooLong,
    OutputFailed,
    describe,
    likely_holders,
    list_files,
    list_peers,
    peer_endpoint,
)
from p2p.endpoints import client_endpoint, relay_from_environment
from p2p.fetch import DEFAULT_STAGGER_SECONDS, Attempt, Fetcher, NotFoundAnywhere
from p2p.pace import (
    DEFAULT_HEADER_TIMEOUT_SECONDS,
    DEFAULT_MIN_RATE,
    DEFAULT_MIN_RATE_SECONDS,
    DEFAULT_PACE,
    Pace,
)
from p2p.request import DEFAULT_REQUEST_TIMEOUT_SECONDS
from p2p.sink import (
    FileOutput,
    InlineWorker,
    Output,
    OutputRefused,
    PieceSink,
    SerialWorker,
    StreamOutput,
    ThroughOutput,
    output_for,
    write_all,
)
from p2p.swarm import DEFAULT_MAX_SOURCES, SourceReport
from p2p.text import shown
from p2p.units import format_bytes, parse_bytes

TOKEN_ENVIRONMENT_VARIABLE = "P2P_TOKEN"

T = TypeVar("T")

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_RELAY = 3
EXIT_OUTPUT = 4
EXIT_INTERRUPTED = 130

PROMPT = "file name (empty line or 'quit' to stop)> "
# A fetch by content root may use any peer: the first this many are asked
# to serve pieces at once (the rest remain the fallback).
MAX_ROOT_CANDIDATES = 16

# What "the relay cannot be reached or misbehaved" looks like: the peer-level
# failures plus a name that does not resolve (peers are IP literals, so only
# the relay's address goes through DNS).
RELAY_FAILURES = (*SKIPPABLE, DNSLookupError)


class GetOptions(usage.Options):
    synopsis = "[-o PATH] [--expect ROOT] [NAME|ROOT ...]"
    longdesc = (
        "Fetch each NAME from the first active peer that has it and print it "
        "(or save it with -o), checking every piece as it arrives.  A ROOT (64 "
        "hex digits, as 'p2p ls --long' prints) fetches that content from any "
        "peer holding it under any name.  With no NAME, ask for names "
        "interactively."
    )
    optParameters = [
        [
            "output",
            "o",
            None,
            "Save to PATH (a folder when several names) instead of printing.",
        ],
        [
            "expect",
            None,
            None,
            "Accept only the content with this ROOT (for a single NAME).",
        ],
        [
            "sources",
            None,
            DEFAULT_MAX_SOURCES,
            "Fetch a large file from up to this many holders at once, and ask "
            "up to this many which content they hold under the name (1: one "
            "peer at a time).",
            int,
        ],
        [
            "max-size",
            None,
            None,
            "Refuse a file larger than SIZE (e.g. 10G; K, M, G are powers of "
            "1024).  With -o, a file that would not fit on the target's file "
            "system is always refused.",
        ],
        [
            "min-rate",
            None,
            f"{DEFAULT_MIN_RATE // 1024}K",
            "Skip a peer whose transfer averages less than RATE bytes a second "
            "over --min-rate-time seconds (K, M, G as for --max-size; 0: any "
            "rate).",
        ],
        [
            "min-rate-time",
            None,
            DEFAULT_MIN_RATE_SECONDS,
            "Seconds over which --min-rate is measured.",
            float,
        ],
        [
            "header-timeout",
            None,
            DEFAULT_HEADER_TIMEOUT_SECONDS,
            "Skip a peer whose reply header and piece list take longer than "
            "this many seconds, however its bytes trickle (time it shows "
            "indexing progress does not count; 0: no limit).",
            float,
        ],
    ]
    optFlags = [
        ["fsync", None, "With -o: flush each file to the disk before renaming it."]
    ]

    def parseArgs(self, *names: str) -> None:
        self["names"] = list(names)

    def postOptions(self) -> None:
        if not 1 <= self["sources"] <= 64:
            raise usage.UsageError("--sources must be between 1 and 64")
        if self["max-size"] is not None:
            try:
                self["max-size"] = parse_bytes(self["max-size"])
            except ValueError as e:
                raise usage.UsageError(f"--max-size: {e}") from None
        try:
            self["min-rate"] = parse_bytes(self["min-rate"])
        except ValueError as e:
            raise usage.UsageError(f"--min-rate: {e}") from None
        if self["min-rate-time"] <= 0:
            raise usage.UsageError("--min-rate-time must be positive")
        if self["header-timeout"] < 0:
            raise usage.UsageError("--header-timeout must not be negative")
        self["pace"] = Pace(
            self["min-rate"], self["min-rate-time"], self["header-timeout"] or None
        )
        expect = self["expect"]
        if expect is not None:
            if not wire.is_root(expect):
                raise usage.UsageError("--expect takes a ROOT: 64 lowercase hex digits")
            if len(self["names"]) != 1:
                raise usage.UsageError("--expect goes with exactly one NAME")


class PeersOptions(usage.Options):
    synopsis = ""
    longdesc = "Print the active peers, one 'HOST:PORT ID [NAME]' line each."


class LsOptions(usage.Options):
    synopsis = "[--long]"
    longdesc = (
        "List the files of every active peer: 'SIZE HOST:PORT NAME' lines; "
        "with --long, 'SIZE ROOT HOST:PORT NAME', ROOT naming the content."
    )
    optFlags = [["long", "l", "Also print each file's content root."]]


class DemoOptions(usage.Options):
    synopsis = "[--peers N] [--files DIR] [NAME ...]"
    longdesc = (
        "Start a relay and N peers on 127.0.0.1 in this process, spread the "
        "sample files (or DIR's files) evenly among them, then fetch NAMEs "
        "(or ask for names)."
    )
    optParameters = [
        ["peers", "p", 3, "Number of peers.", int],
        ["files", "f", None, "Distribute this folder's files instead of the samples."],
    ]

    def parseArgs(self, *names: str) -> None:
        self["names"] = list(names)

    def postOptions(self) -> None:
        if not 1 <= self["peers"] <= 100:
            raise usage.UsageError("--peers must be between 1 and 100")
        if self["files"] is not None and not os.path.isdir(self["files"]):
            raise usage.UsageError(f"--files {self['files']!r} is not a directory")


class Options(usage.Options):
    synopsis = "Usage: p2p [options]"
    longdesc = (
        "Relay-based peer-to-peer file sharing client.  'p2p HOST PORT' is the "
        "seed client's form of 'p2p --relay HOST:PORT get'.  Exit status: 0 success, "
        "1 not found on any peer, 2 usage error, 3 relay unreachable or failing, "
        "4 output cannot be written, 70 internal error, 130 interrupted."
    )
    optParameters = [
        [
            "relay",
            "r",
            None,
            "Relay endpoint or HOST:PORT (default $P2P_RELAY or tcp:127.0.0.1:8000).",
        ],
        [
            "connect-timeout",
            None,
            DEFAULT_CONNECT_TIMEOUT_SECONDS,
            "Seconds to wait for each connection.",
            float,
        ],
        [
            "idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT_SECONDS,
            "Seconds of silence after which a peer is skipped.",
            float,
        ],
        [
            "peer-ca",
            None,
            None,
            "Connect to peers with TLS, trusting this CA (a PEM file or a folder "
            "of .pem files); peers without a valid certificate for their address "
            "are skipped.",
        ],
        [
            "token",
            None,
            None,
            "Token for a relay that requires one for queries (default $P2P_TOKEN).",
        ],
        [
            "stagger",
            None,
            DEFAULT_STAGGER_SECONDS,
            "Seconds after which a silent peer is joined by the next attempt "
            "(0: strictly one peer at a time).",
            float,
        ],
    ]
    optFlags = [
        ["quiet", "q", "No progress or diagnostics on stderr (errors still show)."],
        ["verbose", "v", "Also show Twisted's log on stderr."],
    ]
    subCommands = [
        ["get", None, GetOptions, "Fetch files by name."],
        ["peers", None, PeersOptions, "Print the active peers."],
        ["ls", None, LsOptions, "List the files across all active peers."],
        [
            "demo",
            None,
            DemoOptions,
            "Run a relay, peers and this client in one process.",
        ],
    ]

    def opt_version(self) -> NoReturn:
        """Print the version and exit."""
        print(f"p2p {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("missing COMMAND (get, peers, ls or demo)")
        if self["connect-timeout"] <= 0 or self["idle-timeout"] <= 0:
            raise usage.UsageError("timeouts must be positive")
        if self["stagger"] < 0:
            raise usage.UsageError("--stagger must not be negative")
        self["relay"] = relay_from_environment(self["relay"])
        if self["token"] is None:
            self["token"] = os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None
        if self["token"] is not None:
            try:
                wire.parse_token(self["token"])
            except wire.WireError as e:
                # Say what is wrong without repeating the secret.
                raise usage.UsageError(f"--token: {e.message}") from None


class Console:
    """The client's two output streams and its input."""

    def __init__(
        self, stdin: IO[str], stdout: IO[bytes], stderr: IO[str], quiet: bool
    ) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.quiet = quiet

    def say(self, text: str) -> None:
        """Progress: suppressed by -q."""
        if not self.quiet:
            self.error(text)

    def error(self, text: str) -> None:
        # Names are escaped where they are quoted (L{shown}); this catches
        # any other text a peer or the relay chose (an ERR message, say)
        # before it reaches the terminal.
        self.stderr.write(f"p2p: {shown(text, backslash=False)}\n")
        self.stderr.flush()

    def prompt(self) -> None:
        """Ask for a name, when a person is typing (not when input is piped)."""
        isatty = getattr(self.stdin, "isatty", None)
        if isatty is not None and isatty():
            self.stderr.write(PROMPT)
            self.stderr.flush()

    def write(self, data: bytes) -> bool:
        """Write results to stdout; False (after one error line) if it fails."""
        try:
            write_all(self.stdout, data)
            self.stdout.flush()
        except OSError as e:
            self.error(f"cannot write to stdout: {e.strerror or e}")
            return False
        return True


class ClosedOutput:
    """Stands in for a stdout the process was started without (``>&-``)."""

    def write(self, data: bytes) -> int:
        raise OSError(errno.EBADF, "stdout is closed")

    def flush(self) -> None:
        raise OSError(errno.EBADF, "stdout is closed")


def standard_output():
    """The binary stdout, or a L{ClosedOutput} when there is none."""
    if sys.stdout is None:
        return ClosedOutput()
    return sys.stdout.buffer


def in_daemon_thread(reactor, work: Callable[[], T]) -> Deferred[T]:
    """
    Run blocking C{work} (terminal input, a large write to stdout) off the
    reactor thread.  A daemon thread, unlike the reactor's pool, cannot keep
    the process alive after Ctrl-C while it waits for input.
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


class Client:
    """Carries out one ``p2p`` command against one relay."""

    def __init__(self, reactor, options: Options, console: Console) -> None:
        self.reactor = reactor
        self.options = options
        self.console = console
        self.relay_text = options["relay"]
        # With -o --fsync: saved files are flushed to the disk before renaming.
        self.durable = False
        # get --max-size: the largest file to accept (None: what fits).
        self.max_size: int | None = None
        # get --sources: most holders of one file used at once.
        self.max_sources = DEFAULT_MAX_SOURCES
        # get --min-rate, --min-rate-time, --header-timeout.
        self.pace = DEFAULT_PACE
        # The name being fetched and its sink (for an interruption).
        self.current: tuple[str, PieceSink] | None = None
        self.relay = client_endpoint(reactor, self.relay_text)
        timeout = options["connect-timeout"]
        if options["peer-ca"] is not None:
            from p2p.tls import peer_endpoint_for

            self.endpoint_for = peer_endpoint_for(reactor, options["peer-ca"], timeout)
        else:
            self.endpoint_for = lambda peer: peer_endpoint(reactor, peer, timeout)
        self.request_timeout = max(
            options["connect-timeout"], DEFAULT_REQUEST_TIMEOUT_SECONDS
        )

    @inlineCallbacks
    def peers(self):
        """Phase 2; prints nothing itself on success."""
        entries = yield list_peers(
            self.relay, self.reactor, self.request_timeout, self.options["token"]
        )
        return entries

    @inlineCallbacks
    def suggested(self, name: str):
        """
        The peers the relay suggests for C{name} (likely holders, from the
        peers' name filters); none if the relay cannot say.  Only an
        ordering hint: the fetch still falls back across every active peer.
        """
        try:
            entries = yield likely_holders(
                self.relay,
                self.reactor,
                self.request_timeout,
                name,
                self.options["token"],
            )
        except RELAY_FAILURES:
            # The full list is in already: go on without a suggestion.
            self.console.say(
                f"relay {self.relay_text}: no suggestion ({describe(Failure())})"
            )
            return []
        return entries

    def relay_failed(self, failure: Failure) -> int:
        failure.trap(*RELAY_FAILURES)
        self.console.error(f"relay {self.relay_text}: {describe(failure)}")
        return EXIT_RELAY

    @inlineCallbacks
    def print_peers(self):
        try:
            entries = yield self.peers()
        except RELAY_FAILURES:
            return self.relay_failed(Failure())
        self.console.say(f"{len(entries)} active peer(s) at {self.relay_text}")
        lines = []
        for entry in entries:
            line = f"{entry.address} {entry.peer_id}"
            if entry.name:
                line += f" {shown(entry.name)}"
            lines.append(line.encode() + b"\n")
        return EXIT_OK if self.console.write(b"".join(lines)) else EXIT_OUTPUT

    @inlineCallbacks
    def list_all_files(self, long: bool = False):
        try:
            entries = yield self.peers()
        except RELAY_FAILURES:
            return self.relay_failed(Failure())
        self.console.say(f"{len(entries)} active peer(s) at {self.relay_text}")
        rows = []
        for entry in entries:
            endpoint = self.endpoint_for(entry)
            try:
                files = yield list_files(endpoint, self.reactor, self.request_timeout)
            except ListingTooLong as e:
                files = e.files
                self.console.error(
                    f"{entry.address}: {e}; showing the first {len(files)}"
                )
            except SKIPPABLE:
                self.console.error(
                    f"{entry.address}: cannot list files: {describe(Failure())}"
                )
                continue
            rows.extend((f.name, f.size, f.root, entry.address) for f in files)
        rows.sort()
        # Sorted by the names themselves; shown escaped (see p2p.text).
        if long:
            text = "".join(
                f"{size:>12} {root} {address:<22} {shown(name)}\n"
                for name, size, root, address in rows
            )
        else:
            text = "".join(
                f"{size:>12} {address:<22} {shown(name)}\n"
                for name, size, _, address in rows
            )
        return EXIT_OK if self.console.write(text.encode()) else EXIT_OUTPUT

    @inlineCallbacks
    def get(self, names: list[str], output: str | None, expect: str | None = None):
        """Phase 2 then phase 3 for each name; interactive without names."""
        if output is not None and (len(names) > 1 or not names):
            if not os.path.isdir(output):
                self.console.error(
                    f"-o {output}: must be a folder when fetching several names"
                )
                return EXIT_USAGE
        worst = EXIT_OK
        if names:
            for name in names:
                code = yield self.get_one(name, output, expect)
                worst = max(worst, code)
                if code == EXIT_RELAY:
                    break
            return worst
        while True:
            self.console.prompt()
            line = yield in_daemon_thread(self.reactor, self.console.stdin.readline)
            name = line.strip()
            if not line or name in ("", "quit", "exit"):
                return worst
            code = yield self.get_one(name, output)
            worst = max(worst, code)

    @inlineCallbacks
    def get_one(self, name: str, output: str | None, expect: str | None = None):
        try:
            wire.Get(name).to_line()
        except ValueError:
            self.console.error(f"{shown(name[:60])}: not a valid file name")
            return EXIT_NOT_FOUND
        # The name as shown to a person (p2p.text); the fetch uses it as is.
        label = shown(name)
        by_root = wire.is_root(name)
        target = _target_path(name, output)
        output_to: Output
        if target is None:
            output_to = StreamOutput(self.console.stdout)
        else:
            try:
                output_to = output_for(target)
            except OutputRefused as e:
                self.console.error(f"{label}: cannot write {shown(target)}: {e}")
                return EXIT_OUTPUT
            folder = os.path.dirname(os.path.abspath(target))
            # The partial file is created next to the target (for an atomic
            # rename); find out now, not mid-transfer, that it cannot be.
            if isinstance(output_to, FileOutput) and not (
                os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)
            ):
                self.console.error(
                    f"{label}: cannot write {shown(target)}: no writable folder"
                )
                return EXIT_OUTPUT
        try:
            peers = yield self.peers()
        except RELAY_FAILURES:
            return self.relay_failed(Failure())
        if not peers:
            self.console.say(f"relay {self.relay_text}: 0 active peer(s)")
            self.console.error(f"{label}: no active peers")
            return EXIT_NOT_FOUND
        if by_root:
            # The relay's hints are by name: every peer may hold a content.
            suggested = []
            self.console.say(f"relay {self.relay_text}: {len(peers)} active peer(s)")
        else:
            suggested = yield self.suggested(name)
            self.console.say(
                f"relay {self.relay_text}: {len(peers)} active peer(s), "
                f"{len(suggested)} suggested for {label}"
            )
        peers = hinted_order(suggested, peers)
        # Likely holders, for several sources at once: the relay's
        # suggestions by name; any peer for a content root.
        candidates = peers[:MAX_ROOT_CANDIDATES] if by_root else suggested
        if by_root:
            basis = "as you gave it"
        elif expect is not None:
            basis = "as --expect gave it"
        else:
            basis = "as its holder described it"
        if (
            not by_root
            and expect is None
            and min(len(suggested), self.max_sources) >= 2
        ):
            choice = yield self._choose(label, name, suggested, output_to)
            if choice is not None:
                expect = choice.chosen.root
                peers, candidates = _holders_first(choice, peers, suggested)
                if choice.answered > 1:
                    basis = (
                        f"as {len(choice.chosen.holders)} of {choice.answered} "
                        "holders described it"
                    )
        if target is not None:
            try:
                yield self._open(label, output_to)
            except OSError as e:
                self.console.error(
                    f"{label}: cannot write {shown(target)}: {e.strerror or e}"
                )
                return EXIT_OUTPUT
        if IReactorThreads.providedBy(self.reactor):
            worker: SerialWorker | InlineWorker = SerialWorker(self.reactor)
        else:  # an in-memory reactor (tests): everything on this thread
            worker = InlineWorker()
        sink = PieceSink(
            output_to,
            worker,
            durable=self.durable,
            expected_root=name if by_root else expect,
            max_size=self.max_size,
        )
        self.current = (label, sink)
        fetcher = Fetcher(
            self.reactor,
            self.options["connect-timeout"],
            self.options["idle-timeout"],
            endpoint_for=self.endpoint_for,
            report=lambda attempt: self._report(label, attempt),
            stagger=self.options["stagger"],
            on_indexing=lambda peer, progress: self._indexing(label, peer, progress),
            on_header=lambda attempt: self._found(label, attempt),
            max_sources=self.max_sources,
            on_source_dropped=lambda report: self._dropped(label, report),
            pace=self.pace,
        )
        started = time.monotonic()
        try:
            try:
                result = yield fetcher.fetch(name, peers, sink, by_root, candidates)
                yield sink.finish()
            finally:
                # The fetch is over, one way or another: nothing for an
                # interruption to report from here on.
                self.current = None
        except NotFoundAnywhere as e:
            kept = yield sink.abandon(keep=True)
            self.console.error(f"{label}: not found on any of {e.peers} active peer(s)")
            self._kept(label, sink, kept)
            return EXIT_NOT_FOUND
        except (OutputFailed, OSError) as e:
            yield sink.abandon(keep=False)
            error = e.error if isinstance(e, OutputFailed) else e
            self.console.error(
                f"{label}: cannot write {shown(output_to.label)}: "
                f"{error.strerror or error}"
            )
            return EXIT_OUTPUT
        except BaseException:
            sink.abandon(keep=False)
            raise
        yield sink.abandon(keep=False)  # stops the worker; the file is in place
        content = result.content
        seconds = time.monotonic() - started
        rate = content.size / seconds / 1e6 if seconds > 0 else 0.0
        if len(result.sources) > 1:
            origin = (
                f"{len(result.sources)} peers ("
                + ", ".join(
                    f"{source.peer.address} {format_bytes(source.bytes)}"
                    for source in result.sources
                )
                + ")"
            )
        else:
            origin = result.peer.address
        self.console.say(
            f"{label}: {content.size} bytes in {seconds:.2f} s ({rate:.1f} MB/s) "
            f"from {origin} (root {content.root_hex[:12]}... {basis}, "
            f"every piece verified) -> {shown(output_to.label)}"
        )
        return EXIT_OK

    @inlineCallbacks
    def _choose(
        self, label: str, name: str, suggested: list[wire.PeerEntry], output: Output
    ):
        """
        Ask the first suggested holders (up to --sources) which content
        they hold under C{name} (L{p2p.choice}); say so on stderr, even
        with -q, when they disagree.  Fires with the L{Choice}, or C{None}
        when no holder answered with a content the client would take.
        """
        holders = suggested[: self.max_sources]

        def failed(peer: wire.PeerEntry, failure: Failure, seconds: float) -> None:
            self.console.say(
                f"{label}: skipped {peer.address}: {describe(failure)} "
                f"({seconds * 1000:.0f} ms, asked which content it holds)"
            )

        offers = yield ask_roots(
            name,
            holders,
            self.endpoint_for,
            self.reactor,
            self.options["connect-timeout"],
            on_failure=failed,
        )
        sizes = PieceSink(output, InlineWorker(), max_size=self.max_size)
        choice = choose(offers, len(holders), lambda size: sizes.refusal(size) is None)
        if choice is None or not choice.disagree:
            return choice
        self.console.error(
            f"{label}: holders disagree on its content ({choice.answered} of "
            f"{choice.asked} asked answered):"
        )
        for offered in choice.contents:
            count = len(offered.holders)
            self.console.error(
                f"{label}:   root {offered.root} ({offered.size} bytes) from "
                f"{count} holder{'s' if count > 1 else ''}: "
                + ", ".join(peer.address for peer in offered.holders)
            )
        if choice.chosen is not choice.contents[0]:
            why = "the contents ahead of it are too large"
        elif choice.tied:
            why = "as many holders offer another; the relay suggested it first"
        else:
            why = "the most holders offer it"
        self.console.error(
            f"{label}: taking root {choice.chosen.root[:12]}... ({why}); "
            "--expect ROOT takes another"
        )
        return choice

    @inlineCallbacks
    def _open(self, label: str, output: Output):
        """
        Lock a file output's partial file, or open (and lock) a target
        written through.  A FIFO nobody reads yet is waited for, off the
        reactor thread, before any peer is asked.
        """
        if isinstance(output, FileOutput):
            output.lock()
        elif isinstance(output, ThroughOutput) and not output.open(blocking=False):
            self.console.say(f"{label}: waiting for a reader of {shown(output.label)}")
            if IReactorThreads.providedBy(self.reactor):
                yield in_daemon_thread(self.reactor, output.open)
            else:
                output.open()

    def _dropped(self, label: str, report: SourceReport) -> None:
        self.console.say(
            f"{label}: stopped using {report.peer.address}: {report.reason}"
        )

    def _indexing(
        self, label: str, peer: wire.PeerEntry, progress: wire.Indexing
    ) -> None:
        share = progress.done / progress.total if progress.total else 1.0
        self.console.say(
            f"{label}: {peer.address} is indexing it ({share:.0%} of "
            f"{progress.total} bytes); waiting"
        )

    def interrupted(self) -> None:
        """
        The process is stopping (Ctrl-C) in the middle of a fetch: one line
        on what it leaves.  A partial ``-o`` file of known content stays,
        to be resumed by the same command; what cannot be resumed was never
        written (stdout) or is not there yet.
        """
        if self.current is None:
            return
        label, sink = self.current
        self.current = None
        output = sink.output
        # What the stopping transfers report after this line is noise.
        self.console.quiet = True
        if isinstance(output, FileOutput) and sink.content is not None:
            self._kept(label, sink, output.partial)
        elif isinstance(output, StreamOutput):
            self.console.error(
                f"{label}: interrupted after {output.written} verified bytes to "
                f"{shown(output.label)}"
            )
        else:
            if isinstance(output, FileOutput):
                # Nothing of this run to resume: no leftovers (an earlier
                # run's partial file, if any, stays for the next run).
                output.abandon(keep=False)
            self.console.error(f"{label}: interrupted; nothing was kept")

    def _kept(self, label: str, sink: PieceSink, kept: str | None) -> None:
        if kept is not None and sink.content is not None:
            self.console.error(
                f"{label}: kept {sink.received} of {sink.content.size} verified "
                f"bytes in {shown(kept)}; run the same command again to resume"
            )

    def _found(self, label: str, attempt: Attempt) -> None:
        """A peer's header arrived: say where from and how long it took."""
        self.console.say(
            f"{label}: found at {_where(attempt)} "
            f"({attempt.seconds * 1000:.0f} ms to the first byte)"
        )

    def _report(self, label: str, attempt: Attempt) -> None:
        if not attempt.ok:
            ms = attempt.seconds * 1000
            self.console.say(
                f"{label}: skipped {_where(attempt)}: {attempt.reason} ({ms:.0f} ms)"
            )


def _where(attempt: Attempt) -> str:
    where = attempt.peer.address
    if attempt.offset:
        where += f" (resuming at byte {attempt.offset})"
    return where


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


def _target_path(name: str, output: str | None) -> str | None:
    if output is None:
        return None
    if os.path.isdir(output):
        return os.path.join(output, os.path.basename(name))
    return output


COMMANDS = frozenset({"get", "peers", "ls", "demo"})
# Global options that take a value (the seed form must skip those values).
_VALUED = frozenset(
    {
        "-r",
        "--relay",
        "--connect-timeout",
        "--idle-timeout",
        "--stagger",
        "--peer-ca",
        "--token",
    }
)


def seed_form(argv: list[str]) -> list[str]:
    """
    Rewrite the seed client's ``HOST PORT [NAME ...]`` as
    ``--relay HOST:PORT get [NAME ...]``; other command lines are unchanged.
    """
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        takes_value = argv[index] in _VALUED
        index += 2 if takes_value else 1
    rest = argv[index:]
    if len(rest) >= 2 and rest[0] not in COMMANDS and rest[1].isdigit():
        host, port = rest[0], rest[1]
        relay = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return argv[:index] + ["--relay", relay, "get", *rest[2:]]
    return argv


def parse(argv: list[str]) -> Options:
    options = Options()
    options.parseOptions(seed_form(argv))
    return options


@inlineCallbacks
def run(
    reactor,
    argv: list[str],
    console: Console | None = None,
    on_client: Callable[[Client], object] = lambda client: None,
):
    """Run one ``p2p`` command; fires with the exit status.  C{on_client}
    is handed the L{Client} before it starts (main() uses it to hear of
    an interruption)."""
    console = console or Console(sys.stdin, standard_output(), sys.stderr, False)
    try:
        options = parse(argv)
        console.quiet = options["quiet"]
        client = Client(reactor, options, console)
    except (usage.UsageError, ValueError) as e:
        # One line, like every other failure.
        console.error(f"{e} (try 'p2p --help')")
        return EXIT_USAGE
    on_client(client)
    command, sub = options.subCommand, options.subOptions
    if command == "get":
        client.durable = sub["fsync"]
        client.max_size = sub["max-size"]
        client.max_sources = sub["sources"]
        client.pace = sub["pace"]
        return (yield client.get(sub["names"], sub["output"], sub["expect"]))
    if command == "peers":
        return (yield client.print_peers())
    if command == "ls":
        return (yield client.list_all_files(sub["long"]))
    from p2p.demo import run_demo

    return (yield run_demo(reactor, options, sub, console))


def main(argv: list[str] | None = None) -> NoReturn:
    """Console-script entry point."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from p2p.allocator import keep_freed_memory

    keep_freed_memory()

    args = sys.argv[1:] if argv is None else argv
    if "-v" in args or "--verbose" in args:
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(sys.stderr)], redirectStandardIO=False
        )
    else:
        globalLogBeginner.beginLoggingTo(
            [_errors_only(sys.stderr)], redirectStandardIO=False
        )
    outcome: list[int] = []

    def finished(result: object) -> None:
        if isinstance(result, Failure):
            if result.check(SystemExit):
                outcome.append(result.value.code or 0)
            elif result.check(BrokenPipeError):
                # e.g. ``p2p --help | head -1``: the reader left; nothing to say.
                outcome.append(EXIT_OUTPUT)
            else:
                sys.stderr.write(f"p2p: internal error: {describe(result)}\n")
                outcome.append(70)
        else:
            outcome.append(result)  # type: ignore[arg-type]
        if reactor.running:
            reactor.stop()

    def watch(client: Client) -> None:
        # Ctrl-C (SIGINT) stops the reactor: say what an unfinished fetch
        # leaves behind.  After a normal end there is none, and it says
        # nothing.
        reactor.addSystemEventTrigger("before", "shutdown", client.interrupted)

    def start() -> None:
        run(reactor, args, on_client=watch).addBoth(finished)

    reactor.callWhenRunning(start)
    reactor.run()
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError:
        # The reader went away (``p2p get x | head``): say nothing more, and
        # keep the interpreter's own final flush from printing a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        outcome[:] = outcome or [EXIT_OUTPUT]
    sys.exit(outcome[0] if outcome else EXIT_INTERRUPTED)


def _errors_only(stream: IO[str]):
    """A log observer that shows only unexpected errors, one line each."""
    from twisted.logger import LogLevel, formatEvent

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("twisted.internet._sslverify"):
            # Twisted logs service_identity errors it then ignores; p2p.tls
            # checks certificates again and reports refusals itself.
            return
        if event.get("log_level") is LogLevel.critical:
            text = formatEvent(event) or "unexpected error"
            failure = event.get("log_failure")
            if failure is not None:
                text += f": {failure.getErrorMessage()}"
            stream.write(f"p2p: internal error: {text}\n")

    return observe
