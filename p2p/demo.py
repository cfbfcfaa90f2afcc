"""``p2p demo``: the whole system in one process, narrated on stderr.

A relay and N peers start on 127.0.0.1 with ephemeral ports, each peer with
its own temporary share folder; the sample files (or the user's) are dealt
out evenly; then the ordinary client runs against that relay.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources

from twisted.application.service import MultiService
from twisted.internet.defer import FirstError, gatherResults, inlineCallbacks
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage

from p2p import peer_tap, relay_tap
from p2p.announce import Announcer
from p2p.service import ListeningService

REGISTRATION_TIMEOUT_SECONDS = 10


def sample_files() -> list[tuple[str, bytes]]:
    """The sample text files shipped with the package."""
    folder = resources.files("p2p") / "samples"
    return sorted(
        (entry.name, entry.read_bytes())
        for entry in folder.iterdir()
        if entry.name.endswith(".txt")
    )


def user_files(folder: str) -> list[str]:
    """Regular, non-hidden files directly inside C{folder}."""
    return sorted(
        entry.path
        for entry in os.scandir(folder)
        if entry.is_file() and not entry.name.startswith(".")
    )


def deal(workdir: str, peers: int, folder: str | None) -> list[tuple[str, list[str]]]:
    """Make one share folder per peer and deal the files out round-robin."""
    shares = []
    for index in range(peers):
        path = os.path.join(workdir, f"peer{index + 1}")
        os.mkdir(path)
        shares.append((path, []))
    if folder is None:
        for index, (name, content) in enumerate(sample_files()):
            path, names = shares[index % peers]
            with open(os.path.join(path, name), "wb") as stream:
                stream.write(content)
            names.append(name)
    else:
        for index, source in enumerate(user_files(folder)):
            path, names = shares[index % peers]
            shutil.copyfile(source, os.path.join(path, os.path.basename(source)))
            names.append(os.path.basename(source))
    return shares


class Narrator:
    """Shows the relay's and peers' log events as they happen."""

    def __init__(self, console) -> None:
        self.console = console
        self.labels: dict[int, str] = {}

    def label(self, thing: object, text: str) -> None:
        self.labels[id(thing)] = text

    def __call__(self, event: dict) -> None:
        namespace = event.get("log_namespace", "")
        if not namespace.startswith("p2p.") or event.get("log_level") is LogLevel.debug:
            return
        if event.get("event") == "renewed":
            return  # routine, and it would bury the prompt
        source = event.get("log_source")
        label = self.labels.get(id(source))
        if label is None and source is not None:
            label = self.labels.get(id(getattr(source, "share", None)))
        if label is None and namespace.startswith("p2p.relay"):
            label = "relay"
        if label is not None:
            self.console.say(f"  [{label}] {formatEvent(event)}")


def _children(parent: MultiService, kind: type) -> list:
    return [service for service in parent if isinstance(service, kind)]


@inlineCallbacks
def run_demo(reactor, options, demo_options, console):
    """Run the demo; fires with the client's exit status."""
    from p2p.cli import EXIT_RELAY, EXIT_USAGE, Client

    workdir = tempfile.mkdtemp(prefix="p2p-demo-")
    services: list[MultiService] = []
    narrator = Narrator(console)
    globalLogPublisher.addObserver(narrator)
    try:
        shares = deal(workdir, demo_options["peers"], demo_options["files"])
        if not any(names for _, names in shares):
            console.error(f"--files {demo_options['files']}: no files to share")
            return EXIT_USAGE
        console.say(
            "phase 1: a relay and its peers start; each peer registers, then hangs up"
        )
        relay_config = relay_tap.Options()
        relay_config.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
        relay = relay_tap.makeService(relay_config, reactor)
        narrator.label(_children(relay, ListeningService)[0], "relay")
        relay.startService()
        services.append(relay)
        relay_port = _children(relay, ListeningService)[0].port.getHost().port
        relay_address = f"tcp:127.0.0.1:{relay_port}"
        waiting = []
        for index, (share, names) in enumerate(shares):
            config = peer_tap.Options()
            config.parseOptions(
                [
                    "--relay", relay_address,
                    "--share", share,
                    "--listen", "tcp:0:interface=127.0.0.1",
                    "--name", f"peer{index + 1}",
                    "--state", os.path.join(workdir, f"state{index + 1}"),
                ]
            )  # fmt: skip
            peer = peer_tap.makeService(config, reactor)
            announcer = _children(peer, Announcer)[0]
            narrator.label(announcer, f"peer{index + 1}")
            narrator.label(_children(peer, ListeningService)[0], f"peer{index + 1}")
            peer.startService()
            services.append(peer)
            narrator.label(peer_share(peer), f"peer{index + 1}")
            console.say(f"  [peer{index + 1}] shares {', '.join(names) or 'nothing'}")
            registered = announcer.when_registered()
            registered.addTimeout(REGISTRATION_TIMEOUT_SECONDS, reactor)
            waiting.append(registered)
        try:
            yield gatherResults(waiting, consumeErrors=True)
        except FirstError:
            console.error("the peers could not register at the demo relay in time")
            return EXIT_RELAY
        console.say(
            "phase 2: the client asks the relay for the active peers; "
            "phase 3: it tries them one at a time"
        )
        options["relay"] = relay_address
        client = Client(reactor, options, console)
        code = yield client.get(demo_options["names"], None)
        return code
    except usage.UsageError as e:
        console.error(str(e))
        return EXIT_USAGE
    finally:
        console.say("the demo stops: peers unregister, the relay closes")
        for service in reversed(services):
            yield service.stopService()
        globalLogPublisher.removeObserver(narrator)
        shutil.rmtree(workdir, ignore_errors=True)


def peer_share(peer: MultiService):
    """The ShareFolder a peer service tree serves (for labelling its logs)."""
    return _children(peer, ListeningService)[0].factory.share
