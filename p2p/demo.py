"""``p2p demo``: the whole system in one process, narrated on stderr.

A relay and N peers start on 127.0.0.1 with ephemeral ports, each peer with
its own temporary share folder; the sample files (or the user's) are dealt
out evenly; then the ordinary client (L{p2p.cli}) runs against that relay.
It reaches the relay's and the peers' services by their names
(C{getServiceNamed}), never by looking inside the service trees.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources

from twisted.application.service import MultiService
from twisted.internet.defer import (
    Deferred,
    FirstError,
    gatherResults,
    inlineCallbacks,
)
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage

from p2p import peer_tap, relay_tap
from p2p.fetch import DEFAULT_STAGGER_SECONDS

REGISTRATION_TIMEOUT_SECONDS = 10
# The demo's relay: on loopback, and without the periodic activity line,
# which would land on the client's prompt once a minute (the narrator shows
# the relay's events as they happen).
DEMO_RELAY_OPTIONS = ["--listen", "tcp:0:interface=127.0.0.1", "--report-interval", "0"]


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
            place(source, os.path.join(path, os.path.basename(source)))
            names.append(os.path.basename(source))
    return shares


# Why a hard link may not be made where a copy can: another file system
# (/tmp is often a tmpfs), a file system without links, a file the user
# may read but not link (fs.protected_hardlinks), too many links already.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.EOPNOTSUPP}
# What a sparse copy reads and writes at once.
_COPY_CHUNK_BYTES = 1024 * 1024


def place(source: str, target: str) -> None:
    """
    Put the user's file C{source} at C{target} in a peer's share without
    duplicating its data: a hard link (the peers only read it; removing the
    demo's folder removes the link, never the file), else a copy that keeps
    its holes (a sparse file stays sparse).
    """
    try:
        os.link(source, target)
        return
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    copy_sparse(source, target)


def copy_sparse(source: str, target: str) -> None:
    """Copy C{source} to the new file C{target}, only its data: the holes
    of a sparse file stay holes (SEEK_DATA/SEEK_HOLE, where the file
    system tells them; else every byte is copied)."""
    with open(source, "rb") as reader, open(target, "xb") as writer:
        fd = reader.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
                end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break  # nothing but a hole up to the end
                start, end = offset, size  # holes unknown here: copy it all
            writer.seek(start)
            while start < end:
                data = os.pread(fd, min(_COPY_CHUNK_BYTES, end - start), start)
                if not data:
                    break  # shrunk meanwhile
                writer.write(data)
                start += len(data)
            offset = end
        writer.truncate(size)


class Narrator:
    """Shows the relay's and peers' log events as they happen."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
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
            self.say(f"  [{label}] {formatEvent(event)}")


class DemoFailed(Exception):
    """The demo could not start; C{usage} when the command line is to blame
    (no files to share), else the system itself (peers that never
    registered)."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class DemoSystem:
    """A running demo: the relay's address for the client, and L{stop}."""

    def __init__(
        self, relay_address: str, services: list[MultiService], narrator, workdir
    ) -> None:
        self.relay_address = relay_address
        self._services = services
        self._narrator = narrator
        self._workdir = workdir
        self._stopped: Deferred[None] | None = None

    def stop(self) -> Deferred[None]:
        """
        Stop the peers (they unregister) and the relay; remove the
        temporary folder.  Called when the demo ends and again, as a
        shutdown trigger, when Ctrl-C or SIGTERM stops the reactor first:
        the work is done once, and both wait for it.
        """
        if self._stopped is None:
            # Set before the work starts: stopping a peer may fail its
            # registration, and so call back in here at once.
            self._stopped = Deferred()
            self._stop().chainDeferred(self._stopped)
        result: Deferred[None] = Deferred()

        def fire(outcome: object) -> None:
            # An error goes to the first caller only: no later one re-raises
            # it, and none is left unhandled here.
            result.callback(outcome)

        self._stopped.addBoth(fire)
        return result

    @inlineCallbacks
    def _stop(self):
        if self._services:  # nothing to say when nothing had started
            self._narrator.say("the demo stops: peers unregister, the relay closes")
        try:
            for service in reversed(self._services):
                yield service.stopService()
        finally:
            globalLogPublisher.removeObserver(self._narrator)
            shutil.rmtree(self._workdir, ignore_errors=True)


@inlineCallbacks
def start_demo(reactor, peers: int, files: str | None, say: Callable[[str], None]):
    """
    Start a relay and C{peers} peers on 127.0.0.1, dealing out the sample
    files (or those directly inside C{files}); C{say} narrates.  Fires with
    a L{DemoSystem} once every peer registered, or fails with L{DemoFailed}
    (after stopping what started).
    """
    workdir = tempfile.mkdtemp(prefix="p2p-demo-")
    services: list[MultiService] = []
    narrator = Narrator(say)
    globalLogPublisher.addObserver(narrator)
    system = DemoSystem("", services, narrator, workdir)
    # However the process ends (Ctrl-C at the prompt or during a fetch,
    # SIGTERM), the reactor's shutdown waits for the peers to unregister
    # and the folder, with everything dealt into it, to go.
    reactor.addSystemEventTrigger("before", "shutdown", system.stop)
    try:
        shares = deal(workdir, peers, files)
        if not any(names for _, names in shares):
            raise DemoFailed(f"--files {files}: no files to share", usage=True)
        say("phase 1: a relay and its peers start; each peer registers, then hangs up")
        relay_config = relay_tap.Options()
        relay_config.parseOptions(DEMO_RELAY_OPTIONS)
        relay = relay_tap.makeService(relay_config, reactor)
        listener = relay.getServiceNamed(relay_tap.LISTENER)
        narrator.label(listener, "relay")
        relay.startService()
        services.append(relay)
        port = yield listener.when_listening()
        system.relay_address = f"tcp:127.0.0.1:{port.getHost().port}"
        waiting = []
        for index, (share, names) in enumerate(shares):
            label = f"peer{index + 1}"
            config = peer_tap.Options()
            config.parseOptions(
                [
                    "--relay", system.relay_address,
                    "--share", share,
                    "--listen", "tcp:0:interface=127.0.0.1",
                    "--name", label,
                    "--state", os.path.join(workdir, f"state{index + 1}"),
                ]
            )  # fmt: skip
            peer = peer_tap.makeService(config, reactor)
            announcer = peer.getServiceNamed(peer_tap.ANNOUNCER)
            narrator.label(announcer, label)
            narrator.label(peer.getServiceNamed(peer_tap.LISTENER), label)
            peer.startService()
            services.append(peer)
            narrator.label(peer_share(peer), label)
            say(f"  [{label}] shares {', '.join(names) or 'nothing'}")
            registered = announcer.when_registered()
            registered.addTimeout(REGISTRATION_TIMEOUT_SECONDS, reactor)
            waiting.append(registered)
        try:
            yield gatherResults(waiting, consumeErrors=True)
        except FirstError:
            raise DemoFailed(
                "the peers could not register at the demo relay in time"
            ) from None
        say(
            "phase 2: the client asks the relay for the active peers; "
            "phase 3: it tries them in turn (the next one joins a peer "
            f"silent for {DEFAULT_STAGGER_SECONDS:g} s; a large file comes "
            "from several at once)"
        )
    except usage.UsageError as e:
        yield system.stop()
        raise DemoFailed(str(e), usage=True) from None
    except BaseException:
        yield system.stop()
        raise
    return system


def peer_share(peer: MultiService):
    """The ShareFolder a peer service tree serves (for labelling its logs)."""
    return peer.getServiceNamed(peer_tap.LISTENER).factory.share
