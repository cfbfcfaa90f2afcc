"""
Issue 9, points 7-10, on real processes: what a hostile peer can do to
``p2p get``, and what two runs can do to one ``-o`` target.

* **Slow peers.**  One sends a valid header, then trickles its content a
  byte at a time; another trickles its piece list.  Both are listed before
  an honest holder; the client skips them (``--min-rate``,
  ``--header-timeout``) and its output is byte-identical, in bounded time.
  One that sends fast, then slows down, is read as it sends: the client's
  read batching never leaves its bytes waiting into a timeout.
* **An oversized liar** claims 64 TiB under the name and streams for ever
  when asked.  Listed first, it is refused before anything is written (it
  would not fit the ``-o`` target; to stdout, ``--max-size``), and the
  honest holder's content is taken.
* **-o writes through** a FIFO, a character device (a copy of /dev/null,
  made as root) and ``/dev/stdout``: the target keeps its kind.
* **Two runs with one -o target**: the second fails at once, the first's
  file is whole.
* **Holders that disagree**: stderr lists every root with its holders, and
  which content was taken and why.

The hostile peers are small Twisted servers in this process (L{FakePeer})
on 127.0.0.2 and up, registered at a real relay from their own address
with a name filter that holds the name, so that the relay suggests them,
and lists them first (oldest registration first).  Every wait is on an
event or a process exit, bounded in time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import pytest_twisted
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IListeningPort, IPullProducer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import pieces, wire
from p2p.hints import build_filter

from ._processes import EVENT_TIMEOUT_SECONDS, Daemon, Launcher, RawConnection

MiB = 1024 * 1024
NAME = "report.bin"
EXIT_OK, EXIT_OUTPUT = 0, 4
# What any of these fetches may take on a loaded machine; each one's own
# bound (a slow peer's stretch, a header deadline) is a second or two.
FETCH_SECONDS = 20
TRICKLE_SECONDS = 0.2  # a byte this often: never silent, always too slow
HUGE_BYTES = 2**46  # 64 TiB: 4,194,304 pieces of 16 MiB, the most allowed
HUGE_PIECE = 16 * MiB


def describe(data: bytes) -> tuple[str, bytes]:
    """C{data}'s root (hex) and piece list."""
    digests = b"".join(
        pieces.hash_piece(data[i : i + pieces.PIECE_SIZE])
        for i in range(0, len(data), pieces.PIECE_SIZE)
    )
    return pieces.root_of(len(data), pieces.PIECE_SIZE, digests).hex(), digests


def header(root: str, size: int, count: int, piece: int, hashes: int) -> bytes:
    return wire.FileHeader(count, root, 0, size, piece, hashes).to_line() + b"\n"


@dataclass
class Script:
    """
    What a fake peer answers: to ``RANGE 0 0 <name>`` the header of a
    content of C{size} bytes with C{root}; to ``GET``, C{now} at once,
    then C{trickle}, C{drip} bytes every L{TRICKLE_SECONDS}, then
    (C{endless}) zero bytes for as long as the client reads.
    """

    root: str
    size: int
    piece: int = pieces.PIECE_SIZE
    now: bytes = b""
    trickle: bytes = b""
    drip: int = 1
    endless: bool = False
    # Answer every request with INDEXING lines, for ever.
    indexing: bool = False
    # What the fake sent, in all, over every connection.
    sent: list[int] = field(default_factory=lambda: [0])


@implementer(IPullProducer)
class _Zeros:
    """Zero bytes, 64 KiB whenever the transport wants more: for ever."""

    def __init__(self, peer: FakePeer) -> None:
        self.peer = peer

    def resumeProducing(self) -> None:
        self.peer.send(bytes(65536))

    def stopProducing(self) -> None:
        pass


class FakePeer(LineReceiver):
    """A P2P/2 peer that follows a L{Script}."""

    delimiter = b"\n"

    def __init__(self, script: Script, clock) -> None:
        self.script = script
        self.clock = clock
        self.timer = None

    def send(self, data: bytes) -> None:
        self.script.sent[0] += len(data)
        self.transport.write(data)

    def connectionMade(self) -> None:
        self.transport.write(b"P2P/2 peer\n")

    def lineReceived(self, line: bytes) -> None:
        request = wire.parse_peer_request(line)
        script = self.script
        if script.indexing:
            self.still_indexing()
            return
        if isinstance(request, wire.Pieces):
            # No digests to send: only an empty content's list is whole.
            listing = wire.PiecesHeader(0, script.root, script.size, script.piece)
            self.transport.write(listing.to_line() + b"\n")
            return
        if isinstance(request, wire.Range) or not script.size:
            self.transport.write(header(script.root, script.size, 0, script.piece, 0))
            return
        self.send(script.now)
        self.drip(0)

    def still_indexing(self) -> None:
        self.transport.write(wire.Indexing(0, self.script.size).to_line() + b"\n")
        self.timer = self.clock.callLater(TRICKLE_SECONDS, self.still_indexing)

    def drip(self, position: int) -> None:
        self.timer = None
        if position < len(self.script.trickle):
            step = self.script.drip
            self.send(self.script.trickle[position : position + step])
            self.timer = self.clock.callLater(
                TRICKLE_SECONDS, self.drip, position + step
            )
        elif self.script.endless:
            self.transport.registerProducer(_Zeros(self), False)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


@dataclass
class Fake:
    address: str
    script: Script


class Fakes:
    """Fake peers for one test: listening, registered; all stopped after."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.reactor = launcher.reactor
        self.ports: list[IListeningPort] = []
        self.protocols: list[FakePeer] = []

    async def start(self, relay: Daemon, host: str, script: Script) -> Fake:
        """Serve C{script} on C{host} and register it at C{relay} from
        there, with a name filter that holds L{NAME}."""

        def build(_: object) -> FakePeer:
            protocol = FakePeer(script, self.reactor)
            self.protocols.append(protocol)
            return protocol

        factory = Factory()
        factory.buildProtocol = build  # type: ignore[method-assign]
        factory.noisy = False
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface=host)
        port = await endpoint.listen(factory)
        self.ports.append(port)
        number = port.getHost().port
        relay_host, relay_port = relay.address.rsplit(":", 1)
        registration = RawConnection(self.reactor)
        self.launcher.connections.append(registration)
        await connectProtocol(
            TCP4ClientEndpoint(
                self.reactor,
                relay_host,
                int(relay_port),
                timeout=EVENT_TIMEOUT_SECONDS,
                bindAddress=(host, 0),
            ),
            registration,
        ).addTimeout(EVENT_TIMEOUT_SECONDS, self.reactor)
        line = wire.Register(number, files=build_filter([NAME])).to_line()
        registration.send_line(line.decode())
        lines = await registration.wait_lines(2)
        assert lines[1].startswith("OK "), lines
        return Fake(f"{host}:{number}", script)

    async def stop(self) -> None:
        for protocol in self.protocols:
            if protocol.transport is not None and protocol.transport.connected:
                protocol.transport.abortConnection()
        for port in self.ports:
            await port.stopListening()


@pytest_twisted.async_yield_fixture
async def fakes(launcher: Launcher) -> AsyncIterator[Fakes]:
    running = Fakes(launcher)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def file_of(tmp_path) -> Callable[[int], tuple[str, bytes]]:
    """Writes a random file of the given size outside every share."""

    def write(size: int) -> tuple[str, bytes]:
        data = os.urandom(size)
        path = str(tmp_path / f"source-{size}.bin")
        with open(path, "wb") as stream:
            stream.write(data)
        return path, data

    return write


async def honest_peer(launcher: Launcher, relay: Daemon, path: str) -> Daemon:
    """
    A real peer holding a copy of C{path} as L{NAME}, its share indexed.
    A copy, not a hard link: linking a file again changes its change time,
    so every peer that indexed it before would index it again.
    """
    copy = os.path.join(launcher.workdir, f"copy-{len(launcher.processes)}.bin")
    shutil.copyfile(path, copy)
    peer = await launcher.peer(relay.address, links={NAME: copy})
    await peer.process.wait_for(r"indexed the share")
    return peer


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr


# -- 7. slow and lying peers --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slow_peers_are_skipped(launcher: Launcher, fakes: Fakes, file_of):
    """
    A peer trickling its content and one trickling its piece list, listed
    before the honest holder: each is skipped after its bound (a 1 s
    stretch below --min-rate; a 2 s --header-timeout) and the file comes
    whole from the honest holder, well within FETCH_SECONDS.
    """
    path, data = file_of(3 * MiB + 1000)  # four pieces: a piece list first
    root, digests = describe(data)
    whole = header(root, len(data), len(data), pieces.PIECE_SIZE, len(digests))
    relay = await launcher.relay()
    content = await fakes.start(
        relay,
        "127.0.0.2",
        Script(root, len(data), now=whole + digests, trickle=data),
    )
    listing = await fakes.start(
        relay, "127.0.0.3", Script(root, len(data), now=whole, trickle=digests)
    )
    honest = await honest_peer(launcher, relay, path)

    result = await launcher.client(
        "--relay", relay.address, "get",
        "--min-rate", "64K", "--min-rate-time", "1", "--header-timeout", "2",
        NAME,
    )  # fmt: skip

    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == data
    assert re.search(
        rf"skipped {re.escape(content.address)}: too slow: \d+ B in 1 s, less "
        r"than --min-rate 64\.0 KiB/s",
        result.stderr,
    ), result.stderr
    assert f"skipped {listing.address}: timed out: no header within 2s" in result.stderr
    assert f"from {honest.address} (root {root[:12]}..." in result.stderr
    assert "disagree" not in result.stderr  # all three offered the same root
    assert result.seconds < FETCH_SECONDS
    no_traceback(result.stderr)


@pytest_twisted.ensureDeferred
async def test_peer_that_slows_down_is_read_as_it_sends(
    launcher: Launcher, fakes: Fakes, file_of
):
    """
    The only holder sends most of the file at once, then the last 300 KiB
    at 80 KiB/s.  The client read the fast part in batches (its socket's
    low-water mark at 256 KiB, p2p.batching); once the peer slows down it
    must read every byte again as it comes, or with --idle-timeout 1 it
    would see a second of silence while bytes waited in its socket below
    the mark.  The file arrives whole, from that peer.
    """
    path, data = file_of(3 * MiB + 1000)
    root, digests = describe(data)
    whole = header(root, len(data), len(data), pieces.PIECE_SIZE, len(digests))
    slow_part = 300 * 1024
    relay = await launcher.relay()
    slowing = await fakes.start(
        relay,
        "127.0.0.2",
        Script(
            root,
            len(data),
            now=whole + digests + data[:-slow_part],
            trickle=data[-slow_part:],
            drip=16 * 1024,  # every 0.2 s: 80 KiB/s, 64 KiB/s above --min-rate
        ),
    )

    result = await launcher.client(
        "--relay", relay.address, "get", "--idle-timeout", "1", NAME
    )

    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == data
    assert f"from {slowing.address} (root {root[:12]}..." in result.stderr
    assert "skipped" not in result.stderr
    no_traceback(result.stderr)


@pytest_twisted.ensureDeferred
async def test_oversized_liar_is_refused(
    launcher: Launcher, fakes: Fakes, file_of, tmp_path
):
    """
    A liar listed first claims 64 TiB under the name (and would stream
    zeros for ever if asked for it).  With -o it would not fit the target's
    file system; to stdout it is over --max-size: either way it is
    reported, never chosen nor asked for the file, and the honest
    holder's content is written, byte for byte.
    """
    path, data = file_of(100_000)
    root, _ = describe(data)
    relay = await launcher.relay()
    lie = Script("e" * 64, HUGE_BYTES, piece=HUGE_PIECE, endless=True)
    liar = await fakes.start(relay, "127.0.0.2", lie)
    honest = await honest_peer(launcher, relay, path)
    out = tmp_path / "out"
    out.mkdir()
    target = out / NAME

    saved = await launcher.client(
        "--relay", relay.address, "get", "-o", str(target), NAME
    )
    printed = await launcher.client(
        "--relay", relay.address, "get", "--max-size", "10M", NAME
    )

    for result in (saved, printed):
        assert result.code == EXIT_OK, result.stderr
        assert "holders disagree on its content (2 of 2 asked answered)" in (
            result.stderr
        )
        assert (
            f"root {'e' * 64} ({HUGE_BYTES} bytes) from 1 holder: {liar.address}"
            in result.stderr
        )
        taking = f"taking root {root[:12]}... (the contents ahead of it are too large)"
        assert taking in result.stderr, result.stderr
        assert f"from {honest.address} (root {root[:12]}..." in result.stderr
        no_traceback(result.stderr)
    assert target.read_bytes() == data
    assert os.listdir(out) == [NAME]
    assert printed.stdout == data
    assert lie.sent[0] == 0  # asked for headers only: nothing streamed


@pytest_twisted.ensureDeferred
async def test_empty_content_liar(launcher: Launcher, fakes: Fakes, file_of, tmp_path):
    """
    A liar says a content is empty, under that content's root: there is
    no piece to verify, so only the root can show the lie (the root of no
    bytes is known).  Alone, asked for the root, it gets nothing taken:
    nothing printed, a non-zero exit.  Listed first before an honest
    holder, asked by root, by name and by ``--expect ROOT NAME`` over an
    existing file, it is skipped as corrupted and the real content taken.
    """
    path, data = file_of(3 * MiB + 5)
    root, _ = describe(data)
    relay = await launcher.relay()
    await fakes.start(relay, "127.0.0.2", Script(root, 0))

    alone = await launcher.client("--relay", relay.address, "get", root)

    assert alone.code != EXIT_OK and alone.stdout == b"", alone.stderr
    assert "is not that of empty content" in alone.stderr, alone.stderr
    no_traceback(alone.stderr)
    await honest_peer(launcher, relay, path)
    target = tmp_path / "kept.bin"
    target.write_bytes(b"precious existing data\n")
    runs = [
        await launcher.client("--relay", relay.address, "get", root),
        await launcher.client("--relay", relay.address, "get", NAME),
        await launcher.client(
            "--relay", relay.address, "get", "--expect", root, NAME, "-o", str(target)
        ),
    ]
    for result in runs:
        assert result.code == EXIT_OK, result.stderr
        no_traceback(result.stderr)
    assert [runs[0].stdout, runs[1].stdout, target.read_bytes()] == [data] * 3


@pytest_twisted.ensureDeferred
async def test_ctrl_c_while_a_peer_indexes(launcher: Launcher, fakes: Fakes, tmp_path):
    """
    Ctrl-C while the only holder is still indexing the file: one line
    saying nothing was kept, status 130, as mid-transfer; not also "not
    found" with status 1 (the fetch, stopped, ends as not found).
    """
    relay = await launcher.relay()
    await fakes.start(relay, "127.0.0.2", Script("a" * 64, 6 * 2**30, indexing=True))
    for extra in ((), ("-o", str(tmp_path / "out.bin"))):
        client = launcher.start_client("--relay", relay.address, "get", *extra, NAME)
        await client.wait_for(r"is indexing it", client.mark())
        client.send_signal(signal.SIGINT)
        result = await launcher.client_result(client, FETCH_SECONDS)

        assert result.code == 130, result.stderr
        assert result.stderr_lines[-1].startswith(f"p2p: {NAME}: interrupted"), (
            result.stderr
        )
        assert "not found" not in result.stderr, result.stderr
        no_traceback(result.stderr)
    assert os.listdir(tmp_path) == []


# -- 8. -o writes through; two runs never share a target ----------------------


@pytest_twisted.ensureDeferred
async def test_output_written_through(launcher: Launcher, file_of, tmp_path):
    """
    -o onto a FIFO (read by cat), onto a copy of /dev/null (as root) and
    onto /dev/stdout: each gets the content written through, and keeps its
    kind; nothing is created beside it.
    """
    path, data = file_of(2 * MiB + 10)
    relay = await launcher.relay()
    await honest_peer(launcher, relay, path)
    out = tmp_path / "out"
    out.mkdir()

    fifo = out / "pipe"
    os.mkfifo(fifo)
    reader = launcher.spawn("cat", ["/bin/cat", str(fifo)], stdout_lines=False)
    result = await launcher.client(
        "--relay", relay.address, "get", "-o", str(fifo), NAME
    )
    assert result.code == EXIT_OK, result.stderr
    assert await reader.when_ended() == 0
    assert reader.stdout == data
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    result = await launcher.client(
        "--relay", relay.address, "get", "-o", "/dev/stdout", NAME
    )
    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == data
    assert "-> /dev/stdout" in result.stderr

    if os.geteuid() == 0:
        device = out / "null"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        result = await launcher.client(
            "--relay", relay.address, "get", "-o", str(device), NAME
        )
        assert result.code == EXIT_OK, result.stderr
        info = os.lstat(device)
        assert stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(out)) in (["null", "pipe"], ["pipe"])


@pytest_twisted.ensureDeferred
async def test_two_runs_one_target(launcher: Launcher, file_of, tmp_path):
    """
    While one run writes -o TARGET (from a peer capped at 1 MiB/s), a
    second run with the same target fails at once with status 4 and says
    why; the first completes, and the file is its content, whole.
    """
    path, data = file_of(2 * MiB + 10)
    relay = await launcher.relay()
    peer = await launcher.peer(
        relay.address, links={NAME: path}, args=("--max-upload-rate", "1M")
    )
    await peer.process.wait_for(r"indexed the share")
    target = tmp_path / NAME
    argv = ("--relay", relay.address, "get", "-o", str(target), NAME)

    first = launcher.start_client(*argv)
    await first.wait_for(rf"found at {re.escape(peer.address)} ")
    second = await launcher.client(*argv)
    assert second.code == EXIT_OUTPUT, second.stderr
    assert "another p2p is already writing it" in second.stderr
    result = await launcher.client_result(first)
    assert result.code == EXIT_OK, result.stderr
    assert target.read_bytes() == data
    assert os.listdir(tmp_path).count(NAME) == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(NAME + ".")]


# -- 10. holders that disagree ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_disagreeing_holders_are_reported(launcher: Launcher, file_of, tmp_path):
    """
    Three real peers hold a file under one name: the first with content of
    its own, the other two the same.  stderr lists both roots with their
    holders and says the majority's was taken; that is what is printed.
    """
    real_path, real = file_of(50_000)
    fake_path, fake = file_of(40_000)
    relay = await launcher.relay()
    liar = await honest_peer(launcher, relay, fake_path)
    first = await honest_peer(launcher, relay, real_path)
    second = await honest_peer(launcher, relay, real_path)
    real_root, fake_root = describe(real)[0], describe(fake)[0]

    result = await launcher.client("-q", "--relay", relay.address, "get", NAME)

    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == real
    assert result.stderr_lines == [
        f"p2p: {NAME}: holders disagree on its content (3 of 3 asked answered):",
        f"p2p: {NAME}:   root {real_root} ({len(real)} bytes) from 2 holders: "
        f"{first.address}, {second.address}",
        f"p2p: {NAME}:   root {fake_root} ({len(fake)} bytes) from 1 holder: "
        f"{liar.address}",
        f"p2p: {NAME}: taking root {real_root[:12]}... (the most holders offer "
        "it); --expect ROOT takes another",
    ]
