"""``twistd peer``: options and service tree."""

from __future__ import annotations

import gc
import hashlib
import os

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from p2p import wire
from p2p.announce import Announcer
from p2p.daemon import (
    CONNECTION_LIMIT_OPTIONS,
    CONNECTION_OPTIONS,
    METRICS_OPTION,
    REQUEST_LIMIT_OPTIONS,
    REQUEST_OPTIONS,
    DaemonOptions,
    check_connection_options,
    check_limits,
    check_metrics,
    connection_limits,
    connection_policy,
    metrics_descriptors,
    request_budget,
    token_option,
)
from p2p.endpoints import (
    check_client,
    check_server,
    client_endpoint,
    relay_option,
    relays_from_environment,
    server_endpoint,
)
from p2p.hints import build_filter
from p2p.index import ShareIndex
from p2p.options import named_types
from p2p.peer import (
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    DESCRIPTORS_PER_CONNECTION,
    PeerFactory,
)
from p2p.service import ListeningService, PortFileService
from p2p.share import ShareFolder
from p2p.text import quoted
from p2p.throttle import TokenBucket
from p2p.units import parse_bytes
from p2p.wire import TOKEN_ENVIRONMENT_VARIABLE

DEFAULT_LISTEN = "tcp:0"
# Threads of the index's own pool: one hashes (the other core serves
# clients), one more answers database reads (piece lists) meanwhile.
INDEX_THREADS = 2
DEFAULT_RESCAN_SECONDS = 300.0
# How long the first registration may wait for the share's first scan (a
# walk, no hashing): past it the peer registers with the names known so far.
FIRST_SCAN_WAIT_SECONDS = 2.0


def default_state_folder(share: str) -> str:
    """
    Where a share's index lives by default: under ``$XDG_STATE_HOME``
    (``~/.local/state``), one folder per share folder, never inside it.
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    real = os.path.realpath(share)
    tag = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(base, "p2p-relay", "shares", tag)


def _inside(path: str, folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _state_problem(path: str) -> str | None:
    """
    Why C{path} cannot be (or become) the index's folder, if it cannot:
    checked when the options are parsed, which creates nothing, so that
    twistd says so in one line.
    """
    if not path:
        return "an empty path"
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe!r} is not writable"
    return None


def _served(path: str, share: str, include_hidden: bool) -> bool:
    """
    Whether the files of folder C{path} would be served from C{share}: it
    is inside, and not under a hidden folder of it (one whose name starts
    with a dot) unless hidden files are shared.
    """
    if not _inside(path, share):
        return False
    inner = os.path.relpath(os.path.realpath(path), os.path.realpath(share))
    return include_hidden or not any(
        part.startswith(".") and part not in (".", "..") for part in inner.split(os.sep)
    )


class Options(DaemonOptions):
    tapname = "peer"
    synopsis = "[options] [RELAY_HOST RELAY_PORT]"
    longdesc = (
        "Run a peer: serve the files of --share to clients and keep a lease at "
        "the relay (at each relay, with several --relay).  RELAY_HOST "
        "RELAY_PORT is the seed's short form of --relay."
    )
    optParameters = named_types(
        [
            ["share", "s", ".", "Folder whose files are served."],
            [
                "listen",
                "l",
                DEFAULT_LISTEN,
                "Endpoint to serve on (default: an ephemeral port).",
            ],
            ["name", "n", None, "Display name sent to the relay."],
            [
                "idle-timeout",
                None,
                DEFAULT_IDLE_TIMEOUT_SECONDS,
                "Close connections silent for this many seconds.",
                float,
            ],
            *CONNECTION_OPTIONS,
            *REQUEST_OPTIONS,
            [
                "token",
                None,
                None,
                "Shared secret sent to the relay with REGISTER and UNREGISTER "
                f"(default ${TOKEN_ENVIRONMENT_VARIABLE}).  Prefer the environment "
                "variable: a command line is visible to other users.",
            ],
            ["port-file", None, None, "Write 'HOST PORT' here once listening."],
            METRICS_OPTION,
            [
                "state",
                None,
                None,
                "Folder for the share's index (default: one per share under "
                "$XDG_STATE_HOME/p2p-relay, i.e. ~/.local/state); never inside "
                "the share.",
            ],
            [
                "max-upload-rate",
                None,
                None,
                "Most bytes per second sent to all clients together (e.g. 20M; "
                "K, M, G are powers of 1024).  Default: no limit.",
            ],
            [
                "rescan-interval",
                None,
                DEFAULT_RESCAN_SECONDS,
                "Seconds between full rescans of the share (changes are also "
                "picked up at once through inotify where available).",
                float,
            ],
        ]
    )
    optFlags = [["include-hidden", None, "Also serve dot files and dot folders."]]

    opt_relay = opt_r = relay_option(
        "Relay endpoint; repeat it to register at several relays, each lease "
        "renewed on its own (default $P2P_RELAY, a comma-separated list, or "
        "tcp:127.0.0.1:8000)."
    )

    def parseArgs(self, *args: str) -> None:
        if not args:
            return
        if len(args) != 2:
            raise usage.UsageError("expected RELAY_HOST RELAY_PORT (or use --relay)")
        if not (args[1].isascii() and args[1].isdigit()):
            raise usage.UsageError(
                f"RELAY_PORT {quoted(args[1])} is not a number "
                "(RELAY_HOST RELAY_PORT, or use --relay)"
            )
        if self.get("relay"):
            raise usage.UsageError("give the relay either as --relay or as arguments")
        host, port = args
        self["relay"] = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]

    def postOptions(self) -> None:
        self["relay"] = relays_from_environment(self.get("relay", []))
        try:
            for relay in self["relay"]:
                check_client(relay)
            check_server(self["listen"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if not os.path.isdir(self["share"]):
            raise usage.UsageError(f"--share {self['share']!r} is not a directory")
        if self["name"] is not None:
            try:
                wire.parse_display_name(self["name"])
            except wire.WireError as e:
                raise usage.UsageError(f"--name: {e.message}") from None
        if self["idle-timeout"] <= 0:
            raise usage.UsageError("--idle-timeout must be positive")
        if self["max-upload-rate"] is not None:
            try:
                self["max-upload-rate"] = parse_bytes(self["max-upload-rate"])
            except ValueError as e:
                raise usage.UsageError(f"--max-upload-rate: {e}") from None
            if self["max-upload-rate"] <= 0:
                raise usage.UsageError("--max-upload-rate must be positive")
        if self["rescan-interval"] <= 0:
            raise usage.UsageError("--rescan-interval must be positive")
        given = self["state"] is not None
        if not given:
            self["state"] = default_state_folder(self["share"])
        problem = _state_problem(self["state"])
        if problem is not None:
            raise usage.UsageError(f"--state {self['state']!r}: {problem}")
        if _served(self["state"], self["share"], self["include-hidden"]):
            # Whatever the index holds (every name and root) would be served,
            # and indexed in turn: a share of $HOME with --include-hidden
            # holds the default, ~/.local/state.
            which = "--state" if given else "the default --state folder"
            raise usage.UsageError(
                f"{which} {self['state']!r} is inside the share, where it would "
                "be served: give --state a folder outside --share"
            )
        check_limits(self, [*CONNECTION_LIMIT_OPTIONS, *REQUEST_LIMIT_OPTIONS])
        check_connection_options(self)
        check_metrics(self)
        self["token"] = token_option(self["token"])


class IndexService(Service):
    """
    Runs the share's index: its thread pool, its first scan and its
    watching, from start to stop.  Stopping waits for the hashing step in
    progress (at most one, a few tens of milliseconds) and closes the
    database.
    """

    log = Logger()

    def __init__(self, index: ShareIndex, pool: ThreadPool | None, reactor) -> None:
        self.index = index
        self.pool = pool
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        # Everything built so far (modules, options, services) lives as long
        # as the process: keep it out of the garbage collector's full passes,
        # which otherwise walk it all, tens of milliseconds on the reactor
        # thread, while the index adds its entries (measured: a 50 ms pass
        # indexing 10,000 files).
        gc.freeze()
        if self.pool is not None:
            self.pool.start()
        self.index.start().addErrback(self._cannot_start)

    def _cannot_start(self, failure: Failure) -> None:
        """
        Without its index a peer answers every request with an error: stop
        (unregistering) instead of staying listed.  A damaged database does
        not get here (the index sets it aside and starts empty); a database
        that cannot be opened at all does (no permission, a full disk).
        """
        self.log.critical(
            "cannot open the share index {path}: {error}; stopping",
            path=self.index.database_path,
            error=failure.getErrorMessage(),
        )
        self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d = self.index.stop()
        if self.pool is not None:
            d.addBoth(lambda result: (self.pool.stop(), result)[1])
        return d


# The names of the services makeService builds, for getServiceNamed.
LISTENER = "listener"
ANNOUNCER = "announcer"


def announcer_name(number: int) -> str:
    """The service name of the announcer to the C{number}th relay (from 1)."""
    return ANNOUNCER if number == 1 else f"{ANNOUNCER} {number}"


def makeService(config: Options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor

    threaded = IReactorThreads.providedBy(reactor)
    pool = ThreadPool(0, INDEX_THREADS, "p2p-index") if threaded else None

    def in_pool(work):
        if pool is None:
            return maybeDeferred(work)  # an in-memory reactor (tests)
        return deferToThreadPool(reactor, pool, work)

    share = ShareFolder(config["share"], include_hidden=config["include-hidden"])
    try:
        os.makedirs(config["state"], mode=0o700, exist_ok=True)
    except OSError as e:
        # (Options checked it; something changed since.)  twistd prints a
        # SystemExit's message as one line; a UsageError from here would be
        # a traceback.
        raise SystemExit(
            f"twistd peer: --state {config['state']!r}: {e.strerror or e}"
        ) from None
    index = ShareIndex(
        share,
        os.path.join(config["state"], "index.sqlite3"),
        reactor,
        in_pool,
        rescan_interval=config["rescan-interval"],
        watch=threaded,
    )
    rate = config["max-upload-rate"]
    factory = PeerFactory(
        share,
        index,
        reactor,
        config["idle-timeout"],
        connection_limits(
            config,
            per_connection=DESCRIPTORS_PER_CONNECTION,
            reserved=metrics_descriptors(config),
        ),
        throttle=TokenBucket(reactor, rate) if rate else None,
        policy=connection_policy(config, reactor),
        budget=request_budget(config, reactor),
    )
    try:
        listen = server_endpoint(reactor, config["listen"])
        relays = [(text, client_endpoint(reactor, text)) for text in config["relay"]]
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    parent = MultiService()
    # The listener first: if it cannot listen, twistd exits before the
    # index's threads start (they would keep the process alive).  No
    # request can arrive before the reactor runs, by which time the index
    # has started too.
    listener = ListeningService(listen, factory, "peer")
    listener.setName(LISTENER)
    listener.setServiceParent(parent)
    if config["metrics"]:
        from p2p.metrics import peer_metrics

        peer_metrics(config["metrics"], reactor, factory).setServiceParent(parent)
    IndexService(index, pool, reactor).setServiceParent(parent)

    def name_filter():
        # The first registration waits (briefly) for the first scan, so that
        # it already names the share's files.  The names are copied on the
        # reactor thread; the filter is built in the index's pool.
        scanned = index.when_scanned()
        scanned.addTimeout(FIRST_SCAN_WAIT_SECONDS, reactor)
        scanned.addErrback(lambda _: None)

        def build(_):
            names = index.servable_names()
            return in_pool(lambda: build_filter(names))

        return scanned.addCallback(build)

    # One lease per relay, each renewed on that relay's own interval; the
    # first relay's announcer keeps the plain name (the demo waits on it).
    for number, (text, relay) in enumerate(relays, start=1):
        announcer = Announcer(
            relay,
            listener,
            reactor,
            config["name"],
            token=config["token"],
            files=name_filter,
            relay_text=text,
        )
        announcer.setName(announcer_name(number))
        announcer.setServiceParent(parent)
        index.subscribe(announcer.files_changed)
    if config["port-file"]:
        PortFileService(config["port-file"], [listener]).setServiceParent(parent)
    return parent
