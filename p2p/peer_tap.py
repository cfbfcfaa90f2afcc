"""``twistd peer``: options and service tree."""

from __future__ import annotations

import os

from twisted.application.service import MultiService
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage

from p2p import wire
from p2p.announce import Announcer
from p2p.endpoints import (
    check_client,
    check_server,
    client_endpoint,
    relay_from_environment,
    server_endpoint,
)
from p2p.hints import build_filter
from p2p.limits import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_HOST
from p2p.peer import DEFAULT_IDLE_TIMEOUT_SECONDS, PeerFactory
from p2p.relay_tap import (
    CONNECTION_LIMIT_OPTIONS,
    check_limits,
    connection_limits,
    token_option,
)
from p2p.service import ListeningService, PortFileService
from p2p.share import ShareFolder
from p2p.wire import TOKEN_ENVIRONMENT_VARIABLE

DEFAULT_LISTEN = "tcp:0"


class Options(usage.Options):
    synopsis = "[options] [RELAY_HOST RELAY_PORT]"
    longdesc = (
        "Run a peer: serve the files of --share to clients and keep a lease at "
        "the relay.  RELAY_HOST RELAY_PORT is the seed's short form of --relay."
    )
    optParameters = [
        [
            "relay",
            "r",
            None,
            "Relay endpoint (default $P2P_RELAY or tcp:127.0.0.1:8000).",
        ],
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
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Most client connections open at once (0: no limit).",
            int,
        ],
        [
            "max-connections-per-host",
            None,
            DEFAULT_MAX_CONNECTIONS_PER_HOST,
            "Most client connections open at once from one address (0: no limit).",
            int,
        ],
        [
            "token",
            None,
            None,
            "Shared secret sent to the relay with REGISTER and UNREGISTER "
            f"(default ${TOKEN_ENVIRONMENT_VARIABLE}).  Prefer the environment "
            "variable: a command line is visible to other users.",
        ],
        ["port-file", None, None, "Write 'HOST PORT' here once listening."],
    ]
    optFlags = [["include-hidden", None, "Also serve dot files and dot folders."]]

    def parseArgs(self, *args: str) -> None:
        if not args:
            return
        if len(args) != 2 or not (args[1].isascii() and args[1].isdigit()):
            raise usage.UsageError("expected RELAY_HOST RELAY_PORT (or use --relay)")
        if self["relay"]:
            raise usage.UsageError("give the relay either as --relay or as arguments")
        host, port = args
        self["relay"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def postOptions(self) -> None:
        self["relay"] = relay_from_environment(self["relay"])
        try:
            check_client(self["relay"])
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
        check_limits(self, CONNECTION_LIMIT_OPTIONS)
        self["token"] = token_option(self["token"])


def makeService(config: Options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor

    def in_thread(work):
        if not IReactorThreads.providedBy(reactor):
            return maybeDeferred(work)  # an in-memory reactor (tests)
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    share = ShareFolder(config["share"], in_thread, config["include-hidden"])
    factory = PeerFactory(
        share, reactor, config["idle-timeout"], connection_limits(config)
    )
    try:
        listen = server_endpoint(reactor, config["listen"])
        relay = client_endpoint(reactor, config["relay"])
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    parent = MultiService()
    listener = ListeningService(listen, factory, "peer")
    listener.setServiceParent(parent)
    Announcer(
        relay,
        listener,
        reactor,
        config["name"],
        token=config["token"],
        # Walking the share runs on a thread, off the reactor.
        files=lambda: in_thread(lambda: build_filter(share.names())),
    ).setServiceParent(parent)
    if config["port-file"]:
        PortFileService(config["port-file"], [listener]).setServiceParent(parent)
    return parent
