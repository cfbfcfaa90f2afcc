"""The ``p2p`` command: ``get``, ``peers``, ``ls`` and ``demo``.

This module parses the command line and prints; the work is done by a
L{p2p.session.ClientSession}.  stdout carries only results (file content,
peer or file lines, or with ``--json`` one JSON object per line); progress
and diagnostics go to stderr.  Every failure ends in one line on stderr and
a documented exit status, never a traceback.

Options may come anywhere among a command's operands, as GNU programs take
them (``p2p get NAME -o PATH``); ``--`` ends the options, and the global
options may follow the command too (L{permuted}).
"""

from __future__ import annotations

import errno
import getopt
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import IO, NoReturn

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import __version__, wire
from p2p.choice import Choice
from p2p.client import DEFAULT_CONNECT_TIMEOUT_SECONDS, DEFAULT_IDLE_TIMEOUT_SECONDS
from p2p.endpoints import relay_option, relays_from_environment
from p2p.errors import RELAY_FAILURES, FailureKind, describe
from p2p.fetch import DEFAULT_STAGGER_SECONDS, Attempt
from p2p.interfaces import IFetchObserver
from p2p.options import named_types
from p2p.pace import (
    DEFAULT_HEADER_TIMEOUT_SECONDS,
    DEFAULT_MIN_RATE,
    DEFAULT_MIN_RATE_SECONDS,
    Pace,
)
from p2p.progress import ProgressBar
from p2p.relay_cache import default_cache_folder, format_age
from p2p.relay_list import RelayFailure, RelayObserver, reasons
from p2p.session import (
    Basis,
    ClientSession,
    GetResult,
    Interruption,
    Settings,
    Status,
    in_daemon_thread,
    name_problem,
)
from p2p.sink import write_all
from p2p.swarm import DEFAULT_MAX_SOURCES, SourceReport
from p2p.targets import Target, TargetError, Targets
from p2p.text import quoted, shown
from p2p.units import format_bytes, parse_bytes

TOKEN_ENVIRONMENT_VARIABLE = "P2P_TOKEN"

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_RELAY = 3
EXIT_OUTPUT = 4
EXIT_INTERNAL = 70
# The reader of stdout left (``p2p get x | head -c 10``): quietly, with the
# status of a program SIGPIPE killed (128 + 13), as ``cat`` and GNU tools
# end there.  (SIGPIPE itself stays ignored: Twisted's sockets need that.)
EXIT_READER_LEFT = 141
# Stopped by a signal: 128 + its number, as a shell reports a process the
# signal killed: SIGINT (Ctrl-C) 130, SIGTERM 143.
EXIT_SIGNAL_BASE = 128
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT
# ``p2p ls`` writes its lines this many at a time.
LS_LINES_PER_WRITE = 1000

EXIT_FOR = {
    Status.OK: EXIT_OK,
    Status.NO_PEERS: EXIT_NOT_FOUND,
    Status.NOT_FOUND: EXIT_NOT_FOUND,
    Status.INVALID_NAME: EXIT_NOT_FOUND,
    Status.OUTPUT_FAILED: EXIT_OUTPUT,
    Status.RELAY_FAILED: EXIT_RELAY,
}

PROMPT = "file name (empty line or 'quit' to stop)> "

# p2p get -o DIR with several names: names fetched at once (as aria2c's -j,
# whose default is 5).  Measured on 1,000 files of 4 KiB from 3 peers:
# see docs/performance.rst.
DEFAULT_JOBS = 4
MAX_JOBS = 32


class _Command(usage.Options):
    """What every sub-command takes: ``--version`` (ours, not Twisted's),
    and ``-h`` for ``--help``, as GNU and argparse programs take it."""

    def opt_version(self) -> NoReturn:
        """Print the version and exit."""
        print(f"p2p {__version__}")
        sys.exit(0)

    opt_h = usage.Options.opt_help


class GetOptions(_Command):
    synopsis = "[-o PATH] [--expect ROOT] [--json] [NAME|ROOT ...]"
    longdesc = (
        "Fetch each NAME from the first active peer that has it and print it "
        "(or save it with -o), checking every piece as it arrives.  A ROOT (64 "
        "hex digits, as 'p2p ls --long' prints) fetches that content from any "
        "peer holding it under any name.  With no NAME, ask for names "
        "interactively.  With -o DIR and several names, each keeps its "
        "relative path under DIR."
    )
    optParameters = named_types(
        [
            [
                "output",
                "o",
                None,
                "Save to PATH instead of printing; with several names (or none), "
                "PATH is a folder and each name keeps its relative path under it.",
            ],
            [
                "expect",
                None,
                None,
                "Accept only the content with this ROOT (for a single NAME).",
            ],
            [
                "jobs",
                "j",
                DEFAULT_JOBS,
                "With -o DIR and several names: fetch up to this many names at "
                "once (1: one after the other, as to stdout).",
                int,
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
                "indexing progress does not count, up to 20 times this; "
                "0: no limit).",
                float,
            ],
        ]
    )
    optFlags = [
        ["fsync", None, "With -o: flush each file to the disk before renaming it."],
        [
            "json",
            None,
            "Print one JSON object per name on stdout (needs -o: stdout "
            "cannot carry both).",
        ],
        ["progress", None, "Show a progress bar even when stderr is no terminal."],
        ["no-progress", None, "Never show a progress bar."],
    ]

    def parseArgs(self, *names: str) -> None:
        self["names"] = list(names)

    def postOptions(self) -> None:
        for name in self["names"]:
            problem = name_problem(name)
            if problem is not None:
                raise usage.UsageError(f"{quoted(name[:60])}: {problem}")
        if self["output"] == "":
            raise usage.UsageError("-o: an empty path")
        if self["output"] == "-":
            # curl's and wget's way of saying stdout.
            if self["json"]:
                raise usage.UsageError("--json: -o - is stdout, which carries the JSON")
            self["output"] = None
        if self["fsync"] and self["output"] is None:
            raise usage.UsageError("--fsync goes with -o PATH")
        if self["progress"] and self["no-progress"]:
            raise usage.UsageError("--progress or --no-progress, not both")
        if self["json"]:
            if self["output"] is None:
                raise usage.UsageError(
                    "--json needs -o PATH: stdout carries the file content otherwise"
                )
            if _is_stdout(self["output"]):
                raise usage.UsageError(
                    f"--json: -o {self['output']} is stdout, which carries the JSON"
                )
        if not 1 <= self["sources"] <= 64:
            raise usage.UsageError("--sources must be between 1 and 64")
        if not 1 <= self["jobs"] <= MAX_JOBS:
            raise usage.UsageError(f"--jobs must be between 1 and {MAX_JOBS}")
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


def _is_stdout(path: str) -> bool:
    """Whether C{path} names this process's stdout (``/dev/stdout``, its
    file, ...)."""
    if os.path.realpath(path) == os.devnull:
        return False  # both may go there: nothing mixes
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, AttributeError, ValueError):
        return False


class PeersOptions(_Command):
    synopsis = "[--json]"
    longdesc = (
        "Print the active peers, one 'HOST:PORT ID [NAME]' line each (with "
        "--json, one JSON object each)."
    )
    optFlags = [["json", None, "One JSON object per peer."]]


class LsOptions(_Command):
    synopsis = "[--long] [--json]"
    longdesc = (
        "List the files of every active peer: 'SIZE HOST:PORT NAME' lines; "
        "with --long, 'SIZE ROOT HOST:PORT NAME', ROOT naming the content; "
        "with --json, one JSON object per file."
    )
    optFlags = [
        ["long", "l", "Also print each file's content root."],
        ["json", None, "One JSON object per file (root included)."],
    ]


class DemoOptions(_Command):
    synopsis = "[--peers N] [--files DIR] [NAME ...]"
    longdesc = (
        "Start a relay and N peers on 127.0.0.1 in this process, spread the "
        "sample files (or DIR's files) evenly among them, then fetch NAMEs "
        "(or ask for names)."
    )
    optParameters = named_types(
        [
            ["peers", "p", 3, "Number of peers.", int],
            [
                "files",
                "f",
                None,
                "Distribute this folder's files instead of the samples.",
            ],
        ]
    )

    def parseArgs(self, *names: str) -> None:
        self["names"] = list(names)

    def postOptions(self) -> None:
        for name in self["names"]:
            problem = name_problem(name)
            if problem is not None:
                raise usage.UsageError(f"{quoted(name[:60])}: {problem}")
        if not 1 <= self["peers"] <= 100:
            raise usage.UsageError("--peers must be between 1 and 100")
        if self["files"] is not None and not os.path.isdir(self["files"]):
            raise usage.UsageError(
                f"--files {quoted(self['files'])} is not a directory"
            )


class Options(usage.Options):
    synopsis = "Usage: p2p [options]"
    longdesc = (
        "Relay-based peer-to-peer file sharing client.  'p2p HOST PORT' is the "
        "seed client's form of 'p2p --relay HOST:PORT get'.  Options may follow "
        "the command and its arguments; '--' ends them.  Exit status: 0 "
        "success, 1 not found on any peer, 2 usage error, 3 relay unreachable "
        "or failing (every --relay, with no cached peer list to use), 4 output "
        "cannot be written, 70 internal error, 130 interrupted (Ctrl-C), 141 "
        "the reader of stdout left (a closed pipe), 143 terminated (SIGTERM)."
    )
    optParameters = named_types(
        [
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
    )
    optFlags = [
        ["quiet", "q", "No progress or diagnostics on stderr (errors still show)."],
        ["verbose", "v", "Also show Twisted's log on stderr."],
        [
            "no-cache",
            None,
            "Neither read nor write the cached peer list (by default 'get' "
            "falls back on it when no relay answers).",
        ],
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

    # -h: --help, as GNU and argparse programs take it (no option has it).
    opt_h = usage.Options.opt_help

    opt_relay = opt_r = relay_option(
        "Relay endpoint or HOST:PORT; repeat it to ask several, in order, "
        "until one answers (default $P2P_RELAY, a comma-separated list, or "
        "tcp:127.0.0.1:8000)."
    )

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse C{options} (the seed's form, or permuted: L{permuted})."""
        if options is None:
            options = sys.argv[1:]
        try:
            super().parseOptions(permuted(seed_form(options)))
        except usage.UsageError as e:
            _, unknown, word = str(e).partition("Unknown command: ")
            if not unknown:
                raise
            # ``p2p 127.0.0.1 notaport`` is neither a command nor the seed's
            # form: say what either would be.
            raise usage.UsageError(
                f"unknown command {quoted(word)} (get, peers, ls or demo; or "
                "the seed's form, HOST PORT with PORT a number)"
            ) from None

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("missing COMMAND (get, peers, ls or demo)")
        if self["connect-timeout"] <= 0 or self["idle-timeout"] <= 0:
            raise usage.UsageError("timeouts must be positive")
        if self["stagger"] < 0:
            raise usage.UsageError("--stagger must not be negative")
        self["relay"] = relays_from_environment(self.get("relay", []))
        if self["token"] is None:
            self["token"] = os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None
        if self["token"] is not None:
            try:
                wire.parse_token(self["token"])
            except wire.WireError as e:
                # Say what is wrong without repeating the secret.
                raise usage.UsageError(f"--token: {e.message}") from None

    def settings(self) -> Settings:
        """What the session needs of these options (and ``get``'s)."""
        settings = Settings(
            relays=self["relay"],
            cache_folder=None if self["no-cache"] else default_cache_folder(),
            token=self["token"],
            connect_timeout=self["connect-timeout"],
            idle_timeout=self["idle-timeout"],
            stagger=self["stagger"],
            peer_ca=self["peer-ca"],
        )
        if self.subCommand == "get":
            sub = self.subOptions
            settings.durable = sub["fsync"]
            settings.max_size = sub["max-size"]
            settings.max_sources = sub["sources"]
            settings.pace = sub["pace"]
        return settings


COMMANDS = {name: parser for name, _, parser, _ in Options.subCommands}


def _takes_value(option: str, parser: usage.Options) -> bool:
    if option.startswith("--"):
        return f"{option[2:]}=" in parser.longOpt
    return f"{option[1]}:" in parser.shortOpt


def _owns(option: str, parser: usage.Options) -> bool:
    if option.startswith("--"):
        name = option[2:]
        return name in parser.longOpt or f"{name}=" in parser.longOpt
    return option[1] in parser.shortOpt.replace(":", "")


def permuted(argv: list[str]) -> list[str]:
    """
    C{argv} with the options of a command moved before its operands, as GNU
    getopt permutes them (Twisted's parser, like C{getopt.getopt}, stops at
    the first operand): ``get NAME -o PATH`` becomes ``get -o PATH --
    NAME``.  Global options found after the command (``get NAME --relay
    R``) move before it; a command's own option wins a name both have
    (``--help``, ``--version``).  ``--`` ends the options; with
    ``POSIXLY_CORRECT`` set, so does the first operand.

    :raise usage.UsageError: for an unknown option after the command.
    """
    top = Options()
    try:
        _, rest = getopt.getopt(argv, top.shortOpt, top.longOpt)
    except getopt.GetoptError:
        return argv  # the parser itself says what is wrong
    if not rest or rest[0] not in COMMANDS:
        return argv
    before = argv[: len(argv) - len(rest)]
    if before[-1:] == ["--"]:
        before = before[:-1]  # "p2p -- get ...": ends nothing the command needs
    command, tail = rest[0], rest[1:]
    sub = COMMANDS[command]()
    own_short = set(sub.shortOpt.replace(":", ""))
    short = sub.shortOpt + "".join(
        letter + (":" if f"{letter}:" in top.shortOpt else "")
        for letter in top.shortOpt.replace(":", "")
        if letter not in own_short
    )
    long = sub.longOpt + [
        name for name in top.longOpt if not _owns(f"--{name.rstrip('=')}", sub)
    ]
    try:
        parsed, operands = getopt.gnu_getopt(tail, short, long)
    except getopt.GetoptError as e:
        raise usage.UsageError(str(e)) from None
    moved: list[str] = []
    own: list[str] = []
    for option, value in parsed:
        parser, tokens = (sub, own) if _owns(option, sub) else (top, moved)
        tokens.append(option)
        if _takes_value(option, parser):
            tokens.append(value)
    return [*before, *moved, command, *own, "--", *operands]


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
    options.parseOptions(argv)
    return options


class Console:
    """The client's two output streams and its input."""

    def __init__(
        self, stdin: IO[str], stdout: IO[bytes], stderr: IO[str], quiet: bool
    ) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.quiet = quiet
        # A progress bar, when one may be shown (see show_progress).
        self.bar: ProgressBar | None = None
        # Whether the prompt is on screen, waiting for a line.
        self.at_prompt = False
        # Whether the reader of stdout left (a broken pipe): the run then
        # ends with EXIT_READER_LEFT, and says nothing of it.
        self.reader_left = False

    def say(self, text: str) -> None:
        """Progress: suppressed by -q."""
        if not self.quiet:
            self.error(text)

    def error(self, text: str) -> None:
        # Names are escaped where they are quoted (L{shown}); this catches
        # any other text a peer or the relay chose (an ERR message, say)
        # before it reaches the terminal.
        line = f"p2p: {shown(text, backslash=False)}\n"
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.stderr.write(line)
            self.stderr.flush()

    def show_progress(self, forced: bool | None) -> None:
        """
        Draw progress bars on stderr: with C{forced} C{None}, only when
        stderr is a terminal and not -q; else as C{forced} says.
        """
        if forced is None:
            isatty = getattr(self.stderr, "isatty", None)
            forced = not self.quiet and isatty is not None and isatty()
        self.bar = ProgressBar(self.stderr) if forced else None

    def prompt(self) -> None:
        """Ask for a name, when a person is typing (not when input is piped)."""
        isatty = getattr(self.stdin, "isatty", None)
        if isatty is not None and isatty():
            self.stderr.write(PROMPT)
            self.stderr.flush()
            self.at_prompt = True

    def leave_prompt(self, answered: bool = False) -> None:
        """
        The prompt got its answer (C{answered}: the terminal echoed the
        newline), or input stopped there (Ctrl-D, Ctrl-C): then end its
        line, so that what follows, the shell's prompt included, starts on
        a line of its own.
        """
        if self.at_prompt and not answered:
            self.stderr.write("\n")
            self.stderr.flush()
        self.at_prompt = False

    def write(self, data: bytes) -> bool:
        """Write results to stdout; False (after one error line) if it fails."""
        try:
            write_all(self.stdout, data)
            self.stdout.flush()
        except BrokenPipeError:
            # ``p2p ls | head -1``: the reader left; nothing to say.
            self.reader_left = True
            return False
        except OSError as e:
            self.error(f"cannot write to stdout: {e.strerror or e}")
            return False
        return True

    def write_json(self, objects: list[dict]) -> bool:
        """One JSON object per line on stdout (L{json_line})."""
        return self.write(b"".join(json_line(obj) for obj in objects))


def json_line(obj: dict) -> bytes:
    """C{obj} as one line of JSON (ASCII: names are exact, escaped by JSON,
    never by L{shown})."""
    return json.dumps(obj).encode("ascii") + b"\n"


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


@implementer(IFetchObserver)
class HumanReport:
    """
    An L{IFetchObserver} that shows a fetch as ``p2p:`` lines on stderr,
    and as a progress bar when the console has one.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        # The relay and peer count said last: with many names (one listing
        # for all), said again only when they change.
        self._listed: tuple[str, int] | None = None

    def listed(self, name, relay, peers, suggested) -> None:
        if (relay, peers) == self._listed:
            return
        self._listed = (relay, peers)
        text = f"relay {relay}: {peers} active peer(s)"
        if suggested is not None:
            text += f", {suggested} suggested for {shown(name)}"
        self.console.say(text)

    def no_suggestion(self, relay, reason) -> None:
        self.console.say(f"relay {relay}: no suggestion ({reason})")

    def question_failed(self, name, peer, reason, seconds) -> None:
        self.console.say(
            f"{shown(name)}: skipped {peer.address}: {reason} "
            f"({seconds * 1000:.0f} ms, asked which content it holds)"
        )

    def disagreement(self, name, choice: Choice) -> None:
        label = shown(name)
        error = self.console.error
        error(
            f"{label}: holders disagree on its content ({choice.answered} of "
            f"{choice.asked} asked answered):"
        )
        for offered in choice.contents:
            count = len(offered.holders)
            error(
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
        error(
            f"{label}: taking root {choice.chosen.root[:12]}... ({why}); "
            "--expect ROOT takes another"
        )

    def waiting_for_reader(self, name, path) -> None:
        self.console.say(f"{shown(name)}: waiting for a reader of {shown(path)}")

    def skipped(self, name, attempt: Attempt) -> None:
        ms = attempt.seconds * 1000
        self.console.say(
            f"{shown(name)}: skipped {_where(attempt)}: {attempt.reason} ({ms:.0f} ms)"
        )

    def indexing(self, name, peer, progress: wire.Indexing) -> None:
        share = progress.done / progress.total if progress.total else 1.0
        self.console.say(
            f"{shown(name)}: {peer.address} is indexing it ({share:.0%} of "
            f"{progress.total} bytes); waiting"
        )

    def found(self, name, attempt: Attempt) -> None:
        """A peer's header arrived: say where from and how long it took (a
        resumed transfer says so rather than "found" a second time)."""
        if attempt.offset:
            where = f"resuming at byte {attempt.offset} from {attempt.peer.address}"
        else:
            where = f"found at {attempt.peer.address}"
        self.console.say(
            f"{shown(name)}: {where} ({attempt.seconds * 1000:.0f} ms to the "
            "first byte)"
        )

    def serving(self, name, peers) -> None:
        if self.console.bar is not None:
            self.console.bar.serving(name, peers)

    def progress(self, name, received, total) -> None:
        if self.console.bar is not None:
            self.console.bar.update(name, received, total)

    def dropped(self, name, report: SourceReport) -> None:
        self.console.say(
            f"{shown(name)}: stopped using {report.peer.address}: {report.reason}"
        )


class RelayReport(RelayObserver):
    """Which relay answered, and the peer cache's news, as ``p2p:`` lines."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def answered(self, relay: str, failures: list[RelayFailure]) -> None:
        text = f"relay {relay} answered"
        if failures:
            text += f" (after {reasons(failures)})"
        self.console.say(text)

    def using_cache(self, age: float, failures: list[RelayFailure]) -> None:
        # Shown even with -q: the peers may be long gone.
        which = "relays" if len(failures) > 1 else "relay"
        self.console.error(
            f"{which} unreachable; using the peer list cached {format_age(age)} "
            f"ago ({reasons(failures)})"
        )

    def cache_problem(self, problem: str) -> None:
        self.console.error(problem)


def _where(attempt: Attempt) -> str:
    where = attempt.peer.address
    if attempt.offset:
        where += f" (resuming at byte {attempt.offset})"
    return where


_BASIS = {
    Basis.ROOT: "as you gave it",
    Basis.EXPECT: "as --expect gave it",
    Basis.HOLDER: "as its holder described it",
}


def summary(result: GetResult) -> str:
    """The last line of a fetch that worked (benchmarks parse it)."""
    content = result.content
    assert content is not None and result.peer is not None
    seconds = result.seconds
    # The rate of what this run fetched, not of what an earlier run kept.
    fetched = content.size - result.resumed
    rate = fetched / seconds / 1e6 if seconds > 0 else 0.0
    if result.resumed:
        rate_text = (
            f"{rate:.1f} MB/s; {fetched} fetched, {result.resumed} kept from "
            "an earlier run"
        )
    else:
        rate_text = f"{rate:.1f} MB/s"
    if result.sources:
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
    if result.basis is Basis.HOLDERS:
        basis = f"as {result.agreeing} of {result.answered} holders described it"
    else:
        basis = _BASIS[result.basis]
    return (
        f"{shown(result.name)}: {content.size} bytes in {seconds:.2f} s "
        f"({rate_text}) from {origin} (root {content.root_hex[:12]}... "
        f"{basis}, every piece verified) -> {shown(result.output)}"
    )


def _attempt_json(attempt: Attempt, stage: str) -> dict:
    return {
        "stage": stage,
        "peer": attempt.peer.address,
        "peer_id": attempt.peer.peer_id,
        "ok": attempt.ok,
        "kind": None if attempt.kind is None else str(attempt.kind),
        "reason": attempt.reason,
        "seconds": round(attempt.seconds, 6),
        "offset": attempt.offset,
    }


def get_json(result: GetResult) -> dict:
    """The ``p2p get --json`` object of one name (see docs/usage.rst)."""
    content = result.content
    verified = result.status is Status.OK
    error = None
    if result.status is Status.OUTPUT_FAILED:
        error = f"cannot write {result.output}: {result.problem}"
    elif result.status is Status.NOT_FOUND:
        error = not_found(result)
    elif result.status is Status.NO_PEERS:
        error = "no active peers"
    elif result.problem is not None:
        error = result.problem
    return {
        "name": result.name,
        "status": result.status.value,
        "size": None if content is None else content.size,
        "root": None if content is None else content.root_hex,
        "verified_against": result.basis.value if verified else None,
        "output": result.output,
        "seconds": round(result.seconds, 6),
        "resumed": result.resumed,
        "peers": [_attempt_json(a, "question") for a in result.questions]
        + [_attempt_json(a, "fetch") for a in result.attempts],
        "sources": [
            {
                "peer": source.peer.address,
                "peer_id": source.peer.peer_id,
                "bytes": source.bytes,
            }
            for source in result.sources
        ],
        "error": error,
        "kept": result.kept,
    }


def interrupted_json(left: Interruption, target: Target | None) -> dict:
    """The ``p2p get --json`` object of a name Ctrl-C stopped."""
    return {
        "name": left.name,
        "status": "interrupted",
        "size": left.size or None,
        "root": None,
        "verified_against": None,
        "output": target.path if target is not None else "stdout",
        "seconds": None,
        "resumed": 0,
        "peers": [],
        "sources": [],
        "error": "interrupted",
        "kept": left.path if left.what == "kept" else None,
        "received": left.received,
    }


# Why a holder's copy was not taken, as the end of a fetch says it, with
# the option that would take it, if one would.  (A peer that could not be
# reached, or said nothing in time, may not hold the file at all.)
_REJECTIONS = {
    FailureKind.TOO_LARGE: "too large (--max-size)",
    FailureKind.SLOW: "too slow (--min-rate)",
    FailureKind.CORRUPTED: "corrupted",
    FailureKind.OTHER_CONTENT: "other content",
    FailureKind.BROKEN: "broke off",
    FailureKind.STALLED: "timed out (--idle-timeout)",
}


def not_found(result: GetResult) -> str:
    """
    What a fetch that got nothing says: "not found" when no peer had the
    name, else how many holders' copies were turned down, and why (with
    -q, the only line: "not found" alone hid a copy refused as too large).
    """
    peers: dict[FailureKind, set[str]] = {}
    for attempt in (*result.questions, *result.attempts):
        if not attempt.ok and attempt.kind in _REJECTIONS:
            peers.setdefault(attempt.kind, set()).add(attempt.peer.address)
    if not peers:
        missing = f"not found on any of {result.active} active peer(s)"
        if wire.is_root(result.name.lower()) and not wire.is_root(result.name):
            # Asked as a name: a ROOT is written in lower case (p2p ls --long).
            missing += "; a content ROOT is 64 lower-case hex digits"
        return missing
    why = ", ".join(
        f"{len(addresses)} {_REJECTIONS[kind]}" for kind, addresses in peers.items()
    )
    return f"no usable copy on {result.active} active peer(s): {why}"


def _left_line(left: Interruption) -> str:
    """The line saying what an interrupted fetch leaves."""
    label = shown(left.name)
    if left.what == "kept":
        assert left.path is not None
        return (
            f"{label}: kept {left.received} of {left.size} verified bytes in "
            f"{shown(left.path)}; run the same command again to resume"
        )
    if left.what == "streamed":
        return (
            f"{label}: interrupted after {left.received} verified bytes to "
            f"{shown(left.path or 'stdout')}"
        )
    return f"{label}: interrupted; nothing was kept"


def _still_indexing(address: str, status: wire.IndexStatus) -> str:
    """The line saying a peer's listing is not all it will serve yet."""
    details = []
    if status.pending:
        details.append(f"{status.pending} file(s) waiting to be hashed")
    if status.scanning:
        details.append("still looking for files")
    return (
        f"{address}: still indexing its share, not every file is listed yet "
        f"({', '.join(details)}); run 'p2p ls' again later"
    )


class Runner:
    """Carries out one parsed ``p2p`` command, printing what it learns."""

    def __init__(self, reactor, options: Options, console: Console) -> None:
        self.reactor = reactor
        self.options = options
        self.console = console
        self.session = self.make_session(options.settings())

    def make_session(self, settings: Settings) -> ClientSession:
        return ClientSession(
            self.reactor,
            settings,
            self.console.stdout,
            HumanReport(self.console),
            RelayReport(self.console),
        )

    @property
    def relay_text(self) -> str:
        return self.session.relay_text

    def relay_failed(self, failure: Failure) -> int:
        failure.trap(*RELAY_FAILURES)
        self.relay_error(describe(failure))
        return EXIT_RELAY

    def relay_error(self, problem: str | None) -> None:
        """No relay answered (and no cache could stand in): one line."""
        if self.session.relays.several:
            self.console.error(f"no relay answered: {problem}")
        else:
            self.console.error(f"relay {self.relay_text}: {problem}")

    @inlineCallbacks
    def peers(self, as_json: bool = False):
        """``p2p peers``."""
        try:
            entries = yield self.session.peers()
        except RELAY_FAILURES:
            return self.relay_failed(Failure())
        self.console.say(f"{len(entries)} active peer(s) at {self.relay_text}")
        if as_json:
            written = self.console.write_json(
                [
                    {
                        "id": entry.peer_id,
                        "host": entry.host,
                        "port": entry.port,
                        "age": entry.age,
                        "name": entry.name,
                    }
                    for entry in entries
                ]
            )
            return EXIT_OK if written else EXIT_OUTPUT
        lines = []
        for entry in entries:
            line = f"{entry.address} {entry.peer_id}"
            if entry.name:
                line += f" {shown(entry.name)}"
            lines.append(line.encode() + b"\n")
        return EXIT_OK if self.console.write(b"".join(lines)) else EXIT_OUTPUT

    @inlineCallbacks
    def ls(self, long: bool = False, as_json: bool = False):
        """``p2p ls``."""
        try:
            listings = yield self.session.listings()
        except RELAY_FAILURES:
            return self.relay_failed(Failure())
        self.console.say(f"{len(listings)} active peer(s) at {self.relay_text}")
        rows = []
        for listing in listings:
            peer = listing.peer
            if listing.truncated:
                self.console.error(
                    f"{peer.address}: {listing.error}; showing the first "
                    f"{len(listing.files)}"
                )
            elif listing.error is not None:
                self.console.error(
                    f"{peer.address}: cannot list files: {listing.error}"
                )
            elif listing.status is not None and not listing.status.complete:
                self.console.error(_still_indexing(peer.address, listing.status))
            rows.extend((f.name, f.size, f.root, peer) for f in listing.files)
        # Sorted by the names themselves; shown escaped (see p2p.text).
        rows.sort(key=lambda row: (row[0], row[1], row[2], row[3].address))
        if as_json:

            def render(name, size, root, peer) -> bytes:
                return json_line(
                    {
                        "peer": peer.address,
                        "peer_id": peer.peer_id,
                        "name": name,
                        "size": size,
                        "root": root,
                    }
                )

        elif long:

            def render(name, size, root, peer) -> bytes:
                return f"{size:>12} {root} {peer.address:<22} {shown(name)}\n".encode()

        else:

            def render(name, size, root, peer) -> bytes:
                return f"{size:>12} {peer.address:<22} {shown(name)}\n".encode()

        # Written a batch of lines at a time: the whole text at once was as
        # large again as the rows (see p2p.client.MAX_LISTED_BYTES_IN_ALL).
        for start in range(0, len(rows), LS_LINES_PER_WRITE):
            batch = rows[start : start + LS_LINES_PER_WRITE]
            if not self.console.write(b"".join(render(*row) for row in batch)):
                return EXIT_OUTPUT
        return EXIT_OK

    @inlineCallbacks
    def get(
        self,
        names: list[str],
        output: str | None,
        expect: str | None = None,
        as_json: bool = False,
        jobs: int = 1,
    ):
        """
        Phase 2 then phase 3 for each name; interactive without names.
        Several names saved to files are fetched up to C{jobs} at once.
        """
        try:
            targets = Targets(output, keep_paths=len(names) != 1)
            planned = [targets.claim(name) for name in names]
        except TargetError as e:
            self.console.error(f"{e} (try 'p2p get --help')")
            return EXIT_USAGE
        worst = EXIT_OK
        if names:
            self.session.match_locally = len(names) > 1
            if output is None:
                jobs = 1  # one stdout: the contents one after the other
            work = list(zip(names, planned, strict=True))
            return (yield self.get_many(work, expect, as_json, jobs))
        # Interactive: the relay is asked before the first prompt, so that
        # a relay that is down says so at once.
        try:
            entries = yield self.session.peers(cached=True)
        except RELAY_FAILURES:
            return self.relay_failed(Failure())
        self.console.say(f"relay {self.relay_text}: {len(entries)} active peer(s)")
        while True:
            self.console.prompt()
            line = yield in_daemon_thread(self.reactor, self.console.stdin.readline)
            self.console.leave_prompt(answered=line.endswith("\n"))
            name = line.strip()
            if not line or name in ("", "quit", "exit"):
                return worst
            problem = name_problem(name)
            if problem is not None:
                self.console.error(f"{shown(name[:60])}: {problem}")
                worst = max(worst, EXIT_NOT_FOUND)
                continue
            try:
                target = targets.claim(name, again=True)
            except TargetError as e:
                self.console.error(str(e))
                worst = max(worst, EXIT_USAGE)
                continue
            code = yield self.get_one(name, target, None, as_json)
            worst = max(worst, code)
            if code == EXIT_RELAY:
                return worst

    def get_many(self, work: list, expect, as_json: bool, jobs: int) -> Deferred[int]:
        """
        Fetch each (name, target) of C{work}, up to C{jobs} at once, and
        fire with the worst exit status.  Each name's lines are printed when
        it ends; its JSON object in the order of C{work}.  A relay that
        fails stops the names not started yet.
        """
        done: Deferred[int] = Deferred()
        queue = iter(enumerate(work))
        results: dict[int, GetResult] = {}
        state = {"written": 0, "running": 0, "worst": EXIT_OK, "stop": False}
        if as_json:
            # What Ctrl-C must still write (see interrupted).
            self._json_run = (work, results, state)

        def start_next() -> None:
            while not state["stop"] and state["running"] < jobs:
                item = next(queue, None)
                if item is None:
                    break
                index, (name, target) = item
                state["running"] += 1
                d = self.fetch_one(name, target, expect)
                d.addCallback(finished, index)
                d.addErrback(crashed)
            if state["running"] == 0 and not done.called:
                done.callback(state["worst"])

        def crashed(failure: Failure) -> None:
            # A bug: the run ends with it (the first one; later ones too
            # would have nowhere to go).
            state["stop"] = True
            if not done.called:
                done.errback(failure)

        def finished(result: GetResult, index: int) -> None:
            state["running"] -= 1
            if self.stopped:
                # Ctrl-C: interrupted() said (and wrote) it all; start nothing.
                state["stop"] = True
                start_next()
                return
            code = EXIT_FOR[result.status]
            if not (code == EXIT_RELAY and state["stop"]):
                self.report(result)  # a failed relay is said once
            results[index] = result
            # JSON objects in the order of the names: each once all before it
            # are written.
            while state["written"] in results:
                ready = results.pop(state["written"])
                state["written"] += 1
                if as_json and not self.console.write_json([get_json(ready)]):
                    code = EXIT_OUTPUT
            state["worst"] = max(state["worst"], code)
            if code == EXIT_RELAY:
                state["stop"] = True
            start_next()

        start_next()
        return done

    @inlineCallbacks
    def fetch_one(self, name, target, expect=None):
        """Fetch one name; fire with its L{GetResult}."""
        try:
            return (yield self.session.get(name, target, expect))
        finally:
            if self.console.bar is not None:
                self.console.bar.close(name)

    @inlineCallbacks
    def get_one(self, name, target, expect=None, as_json=False):
        """Fetch one name; print what came of it; fire with its status."""
        result = yield self.fetch_one(name, target, expect)
        if self.stopped:
            return EXIT_INTERRUPTED  # Ctrl-C said what it left
        self.report(result)
        if as_json and not self.console.write_json([get_json(result)]):
            return EXIT_OUTPUT
        return EXIT_FOR[result.status]

    # Whether Ctrl-C stopped fetches in progress (see interrupted).
    stopped = False

    def report(self, result: GetResult) -> None:
        """The lines that end a fetch."""
        if self.stopped:
            return
        label = shown(result.name)
        status = result.status
        if status is Status.OK:
            self.console.say(summary(result))
        elif status is Status.RELAY_FAILED:
            self.relay_error(result.problem)
        elif status is Status.NO_PEERS:
            self.console.error(f"{label}: no active peers")
        elif status is Status.NOT_FOUND:
            self.console.error(f"{label}: {not_found(result)}")
        elif status is Status.OUTPUT_FAILED:
            if result.reader_left:
                # ``p2p get x | head``: the reader left, as GNU tools do.
                self.console.reader_left = True
                return
            self.console.error(
                f"{label}: cannot write {shown(result.output)}: {result.problem}"
            )
        else:
            self.console.error(f"{shown(result.name[:60])}: {result.problem}")
        if result.kept is not None and result.content is not None:
            self.console.error(
                f"{label}: kept {result.received} of {result.content.size} "
                f"verified bytes in {shown(result.kept)}; run the same command "
                "again to resume"
            )

    def interrupted(self) -> None:
        """
        The process is stopping (Ctrl-C) in the middle of fetches: one line
        for each on what it leaves.  At the prompt, its line is ended.
        """
        self.console.leave_prompt()
        left = self.session.interrupted()
        if not left:
            return
        # Fetches stopped half-way end as they may (one waiting for a peer
        # that indexes ends "not found"): the line above is all there is
        # to say of them, and the status is Ctrl-C's.
        self.stopped = True
        if self.console.bar is not None:
            self.console.bar.close()
        # What the stopping transfers report after these lines is noise.
        self.console.quiet = True
        for one in left:
            self.console.error(_left_line(one))
        if self._json_run is not None:
            self._write_json_left(left)

    # With --json: the names, the results not written yet and the progress
    # of the run in progress (get_many).
    _json_run: tuple[list, dict[int, GetResult], dict] | None = None

    def _write_json_left(self, left: list[Interruption]) -> None:
        """
        Ctrl-C with --json: one object for every name started, in order,
        the interrupted ones included (status ``interrupted``, with what
        they kept), so that a script sees each name it was running.
        """
        assert self._json_run is not None
        work, results, state = self._json_run
        interrupted = {one.name: one for one in left}
        objects = []
        for index in range(state["written"], len(work)):
            name, target = work[index]
            if index in results:
                objects.append(get_json(results.pop(index)))
            elif name in interrupted:
                objects.append(interrupted_json(interrupted[name], target))
            else:
                break  # not started: nothing to say
        state["written"] = len(work)
        if objects:
            self.console.write_json(objects)

    @inlineCallbacks
    def demo(self, demo_options: DemoOptions):
        """``p2p demo``: a relay and peers in this process, then ``get``."""
        from p2p.demo import DemoFailed, start_demo

        try:
            system = yield start_demo(
                self.reactor,
                demo_options["peers"],
                demo_options["files"],
                self.console.say,
            )
        except DemoFailed as e:
            self.console.error(str(e))
            return EXIT_USAGE if e.usage else EXIT_RELAY
        try:
            self.session = self.make_session(
                _with_relay(self.options.settings(), system.relay_address)
            )
            code = yield self.get(demo_options["names"], None)
        finally:
            yield system.stop()
        return code


def _with_relay(settings: Settings, relay: str) -> Settings:
    # The demo's relay lives for one run, on a port of its own: nothing to
    # cache.
    settings.relays = [relay]
    settings.cache_folder = None
    return settings


@inlineCallbacks
def run(
    reactor,
    argv: list[str],
    console: Console | None = None,
    on_runner: Callable[[Runner], object] = lambda runner: None,
):
    """Run one ``p2p`` command; fires with the exit status.  C{on_runner}
    is handed the L{Runner} before it starts (main() uses it to hear of
    an interruption)."""
    console = console or Console(sys.stdin, standard_output(), sys.stderr, False)
    try:
        options = parse(argv)
        console.quiet = options["quiet"]
        runner = Runner(reactor, options, console)
    except (usage.UsageError, ValueError) as e:
        # One line, like every other failure.
        command = " " + argv_command(argv) if argv_command(argv) else ""
        console.error(f"{e} (try 'p2p{command} --help')")
        return EXIT_USAGE
    on_runner(runner)
    try:
        code = yield _run_command(runner, options, console)
    finally:
        runner.session.close()
    if code == EXIT_OUTPUT and console.reader_left:
        return EXIT_READER_LEFT
    return code


@inlineCallbacks
def _run_command(runner: Runner, options: Options, console: Console):
    """The command's own work (see L{run})."""
    command, sub = options.subCommand, options.subOptions
    if command == "get":
        if sub["progress"]:
            console.show_progress(True)
        elif sub["no-progress"]:
            console.show_progress(False)
        else:
            console.show_progress(None)
        return (
            yield runner.get(
                sub["names"], sub["output"], sub["expect"], sub["json"], sub["jobs"]
            )
        )
    if command == "peers":
        return (yield runner.peers(sub["json"]))
    if command == "ls":
        return (yield runner.ls(sub["long"], sub["json"]))
    console.show_progress(None)
    return (yield runner.demo(sub))


class StopSignal:
    """
    The signal that stopped the run, if one did, for the exit status: 128
    + its number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a
    process the signal killed.  Noted by wrapping the handlers the reactor
    installed (L{install}, once it runs), which still do their work.
    """

    def __init__(self) -> None:
        self.number: int | None = None

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(number)
            if callable(handler):
                signal.signal(number, self._noting(handler))

    def _noting(self, handler: Callable) -> Callable:
        def noted(number: int, frame: object) -> object:
            self.number = number
            return handler(number, frame)

        return noted

    @property
    def status(self) -> int:
        if self.number is None:
            return EXIT_INTERRUPTED
        return EXIT_SIGNAL_BASE + self.number


def argv_command(argv: list[str]) -> str | None:
    """The command named in C{argv}, if one is (for the usage line's hint)."""
    for word in seed_form(argv):
        if word in COMMANDS:
            return word
    return None


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
    runners: list[Runner] = []
    stop_signal = StopSignal()

    def finished(result: object) -> None:
        if any(runner.stopped for runner in runners):
            outcome.append(stop_signal.status)
        elif isinstance(result, Failure):
            if result.check(SystemExit):
                outcome.append(result.value.code or 0)
            elif result.check(BrokenPipeError):
                # e.g. ``p2p --help | head -1``: the reader left; nothing to say.
                outcome.append(EXIT_READER_LEFT)
            else:
                sys.stderr.write(f"p2p: internal error: {describe(result)}\n")
                outcome.append(EXIT_INTERNAL)
        else:
            outcome.append(result)  # type: ignore[arg-type]
        if reactor.running:
            reactor.stop()

    def watch(runner: Runner) -> None:
        # Ctrl-C (SIGINT) stops the reactor: say what an unfinished fetch
        # leaves behind.  After a normal end there is none, and it says
        # nothing.
        runners.append(runner)
        reactor.addSystemEventTrigger("before", "shutdown", runner.interrupted)

    def start() -> None:
        stop_signal.install()
        run(reactor, args, on_runner=watch).addBoth(finished)

    reactor.callWhenRunning(start)
    reactor.run()
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``p2p get x | head``): say nothing more.
        outcome[:] = [max([*outcome, EXIT_READER_LEFT])]
    except OSError:
        # Said already, where the write failed (>/dev/full, >&-).
        outcome[:] = outcome or [EXIT_OUTPUT]
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except OSError:
        pass
    code = outcome[0] if outcome else stop_signal.status
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # a profiler or coverage writes its report at exit
    # Everything is written, flushed and closed: skip the interpreter's
    # teardown of every module and object, which took 170-220 ms here after
    # the last byte, a fifth of a small fetch's whole command.
    os._exit(code)


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
