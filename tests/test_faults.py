"""
Fault tests: real relay, peer and ``p2p`` processes while things go wrong.

A peer killed or frozen mid-transfer, a blackholed or hanging peer, a relay
that restarts or is down, and SIGTERM during a transfer ("Survive faults and
hostile input").  Like ``test_integration.py`` these are pytest-twisted
functions, not TestCase classes, so trial finds nothing to run here.  They
wait for events (log lines, process exits), never for fixed times; every
wait is bounded and the fixtures kill every process at the end.

To freeze a transfer half-way, a test SIGSTOPs the *client* as soon as its
spool file appears (it accepted the peer's header) and checks the peer's
``sending NAME`` log line: the peer then blocks on full socket buffers, so
whatever is done to it next happens mid-transfer.  The files are large
(tens of MiB) so that the buffers cannot hold the rest of them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from p2p import hints, pieces

from ._processes import (
    LISTENING,
    REGISTERED,
    Blackhole,
    ClientResult,
    Daemon,
    Launcher,
    LoggedProcess,
    have_inotify,
    sample,
    when_created,
)

# The -o mid-transfer tests learn from inotify when the partial file is written.
needs_inotify = pytest.mark.skipif(not have_inotify(), reason="needs Linux inotify")

# The whole test, startup and teardown of its own processes included.
TEST_TIMEOUT_SECONDS = 45
# How long a SIGTERMed daemon may take to exit.
STOP_SECONDS = 5

EXIT_OK, EXIT_RELAY = 0, 3
MiB = 1024 * 1024
# Large enough that a transfer is still running when the client is frozen
# (loopback socket buffers can hold tens of MiB: tcp_rmem's maximum).
BIG_BYTES = 96 * MiB
MEDIUM_BYTES = 64 * MiB
# These tests are about the fallback from one peer to the next (resume by
# root after a break); several holders at once are tested with faults in
# test_pieces_fetch.py.
ONE_AT_A_TIME = ("--sources", "1")


def fault_test(test):
    """An async pytest-twisted test that fails after TEST_TIMEOUT_SECONDS."""

    @functools.wraps(test)
    async def bounded(*args, **kwargs):
        from twisted.internet import reactor

        d = Deferred.fromCoroutine(test(*args, **kwargs))
        return await d.addTimeout(TEST_TIMEOUT_SECONDS, reactor)

    return pytest_twisted.ensureDeferred(bounded)


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "internal error" not in stderr, stderr


# -- large random files, written once per module -------------------------------


@dataclass
class BigFile:
    name: str
    path: str
    size: int
    sha256: str
    root: str  # the content root peers announce (p2p.pieces)


def _random_file(path: str, size: int) -> BigFile:
    digest = hashlib.sha256()
    with open(path, "wb") as stream:
        for _ in range(size // MiB):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            stream.write(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        content, _ = pieces.hash_descriptor(fd, size)
    finally:
        os.close(fd)
    return BigFile(
        os.path.basename(path), path, size, digest.hexdigest(), content.root_hex
    )


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def big_files(tmp_path_factory) -> Iterator[dict[str, BigFile]]:
    """big.bin (96 MiB) and medium.bin (64 MiB) of random bytes."""
    folder = tmp_path_factory.mktemp("big")
    yield {
        "big": _random_file(str(folder / "big.bin"), BIG_BYTES),
        "medium": _random_file(str(folder / "medium.bin"), MEDIUM_BYTES),
    }
    shutil.rmtree(folder)


# -- helpers --------------------------------------------------------------------


async def wait_indexed(launcher: Launcher, peer: Daemon, big: BigFile) -> None:
    """
    Wait until C{peer} has indexed C{big}, and check it serves the right
    content.

    ``RANGE <size> 0 NAME`` is answered with a header and no bytes, after
    ``INDEXING`` lines while the peer is still hashing the file.  Once it is
    indexed, the peer answers the real request at once, well within the
    client's 0.25 s stagger: otherwise a second peer might be asked (and
    win) while the first is still hashing 96 MiB.
    """
    connection = await launcher.connect_raw(peer.address)
    connection.send_line(f"RANGE {big.size} 0 {big.name}")
    lines = await connection.wait_lines(2)
    while lines[-1].startswith("INDEXING "):
        lines = await connection.wait_lines(len(lines) + 1)
    await connection.close()
    assert lines[-1] == (
        f"OK 0 root={big.root} offset={big.size} size={big.size} "
        f"piece={pieces.PIECE_SIZE} hashes=0"
    )


async def two_peers_sharing(launcher: Launcher, big: BigFile):
    """A relay, then peers A and B (listed in that order) sharing C{big}."""
    relay = await launcher.relay()
    first = await launcher.peer(relay.address, links={big.name: big.path})
    second = await launcher.peer(relay.address, links={big.name: big.path})
    await gatherResults(
        [
            Deferred.fromCoroutine(wait_indexed(launcher, peer, big))
            for peer in (first, second)
        ]
    )
    return relay, first, second


def start_frozen_client(
    launcher: Launcher,
    peer: Daemon,
    big: BigFile,
    *args: str,
    target: str | None = None,
    env: dict[str, str] | None = None,
) -> Deferred[LoggedProcess]:
    """
    Start ``p2p ARGS`` and SIGSTOP it as soon as it holds a verified piece
    from C{peer}: once it printed its first byte (stdout), or wrote its
    partial file (C{target}, for ``-o``).  Check that C{peer} sent it.

    The peer's ``sending`` log line alone is no proof that any byte left:
    it is printed before the header is flushed from Twisted's buffer, and a
    peer killed right then closes the connection cleanly with nothing sent.
    The client writes a piece only once it arrived whole and verified.
    """
    since = peer.process.mark()
    written = None
    if target is not None:
        folder, name = os.path.split(target)
        written = when_created(
            launcher.reactor,
            folder,
            re.escape(name + ".p2p-part"),
            modified=True,
        )
    client = launcher.start_client(*args, env=env)

    async def freeze() -> LoggedProcess:
        await client.wait_for(rf"found at {re.escape(peer.address)} ")
        await (written if written is not None else client.when_stdout(1))
        client.send_signal(signal.SIGSTOP)
        # From byte 0: not the warm-up's empty RANGE.
        await peer.process.wait_for(
            rf"sending {re.escape(big.name)} \({big.size} bytes from byte 0\)", since
        )
        return client

    return Deferred.fromCoroutine(freeze())


def assert_resumed(result: ClientResult, big: BigFile, broken: Daemon, to: Daemon):
    """The client skipped C{broken} mid-transfer and resumed from C{to}."""
    assert result.code == EXIT_OK, result.stderr
    assert f"{big.name}: skipped {broken.address}: broken transfer" in result.stderr
    found = re.search(
        rf"{re.escape(big.name)}: resuming at byte (\d+) from "
        rf"{re.escape(to.address)} ",
        result.stderr,
    )
    assert found, result.stderr
    assert 0 < int(found[1]) < big.size, result.stderr
    no_traceback(result.stderr)


# -- 1. a peer dies mid-transfer: the client resumes elsewhere -------------------


@needs_inotify
@fault_test
async def test_peer_killed_mid_transfer_resumes_elsewhere(
    launcher: Launcher, big_files, tmp_path
):
    """
    Peer A is SIGKILLed mid-transfer; ``get -o`` resumes from peer B, the
    saved file is byte-identical and no spool file is left behind.
    """
    big = big_files["big"]
    relay, first, second = await two_peers_sharing(launcher, big)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / big.name

    client = await start_frozen_client(
        launcher,
        first,
        big,
        *("--relay", relay.address, "get", *ONE_AT_A_TIME, "-o", str(target), big.name),
        target=str(target),
    )
    await first.process.kill("KILL")
    client.send_signal(signal.SIGCONT)
    result = await launcher.client_result(client)

    assert_resumed(result, big, broken=first, to=second)
    assert result.stdout == b""
    assert os.listdir(out_dir) == [big.name]  # no partial or state file left
    assert target.stat().st_size == big.size
    assert sha256_of(target) == big.sha256
    target.unlink()


@fault_test
async def test_peer_killed_mid_transfer_to_stdout(
    launcher: Launcher, big_files, tmp_path
):
    """
    As above, printing to stdout: exactly the file's bytes, once (nothing
    duplicated by the resume, nothing cut), and nothing ever written to
    TMPDIR (verified pieces are streamed, never spooled).
    """
    big = big_files["medium"]
    relay, first, second = await two_peers_sharing(launcher, big)
    spool = tmp_path / "spool"
    spool.mkdir()

    client = await start_frozen_client(
        launcher,
        first,
        big,
        *("--relay", relay.address, "get", *ONE_AT_A_TIME, big.name),
        env={"TMPDIR": str(spool)},
    )
    await first.process.kill("KILL")
    client.send_signal(signal.SIGCONT)
    result = await launcher.client_result(client)

    assert_resumed(result, big, broken=first, to=second)
    assert len(result.stdout) == big.size
    assert hashlib.sha256(result.stdout).hexdigest() == big.sha256
    assert os.listdir(spool) == []


# -- 2. a blackholed peer costs the stagger, not the connect timeout -------------


async def register_by_hand(
    launcher: Launcher, relay: Daemon, port: int, files: str | None = None
) -> str:
    """Send ``REGISTER <port> [files=<filter>]`` over a raw connection."""
    connection = await launcher.connect_raw(relay.address)
    connection.send_line(f"REGISTER {port}" + (f" files={files}" if files else ""))
    _, reply = await connection.wait_lines(2)
    await connection.close()
    return reply


@fault_test
async def test_blackholed_peer_costs_little(launcher: Launcher):
    """
    The first listed peer drops every SYN.  With the default stagger the
    next peer is asked after 0.25 s, so ``get`` ends far below the 5 s
    connect timeout; strictly one at a time it costs the connect timeout.
    """
    # Without the dial-back, which would list the blackhole last.
    relay = await launcher.relay(args=["--no-dial-back"])
    with Blackhole() as hole:
        assert hole.still_blackholed()
        # Its filter names the file too (a wrong hint, or a holder that went
        # dark): registered first, it is the first peer tried.
        files = hints.build_filter(["sample1.txt"])
        reply = await register_by_hand(launcher, relay, hole.port, files)
        assert reply.startswith("OK ") and "observed=127.0.0.1" in reply, reply
        peer = await launcher.peer(relay.address, ["sample1.txt"])

        fast = await launcher.client("--relay", relay.address, "get", "sample1.txt")
        assert fast.code == EXIT_OK, fast.stderr
        assert fast.stdout == sample("sample1.txt")
        assert f"found at {peer.address}" in fast.stderr
        # Well below the 5 s connect timeout, as the client times it (the
        # process's own start-up is not the point, and varies with load).
        first_byte = re.search(r"\((\d+) ms to the first byte\)", fast.stderr)
        assert first_byte and int(first_byte[1]) < 4000, fast.stderr
        no_traceback(fast.stderr)

        slow = await launcher.client(
            "--relay",
            relay.address,
            "--stagger",
            "0",
            "--connect-timeout",
            "1",
            "get",
            # Nor the question to both holders (p2p.choice) first.
            "--sources",
            "1",
            "sample1.txt",
        )
        assert slow.code == EXIT_OK, slow.stderr
        assert slow.stdout == sample("sample1.txt")
        # Asked first (it registered first), given up after the timeout.
        # (Whichever timer fires first words it: the fetch's or the endpoint's.)
        timed_out = (
            rf"skipped {re.escape(hole.address)}: "
            r"(timed out|cannot connect: TimeoutError) \((\d+) ms\)"
        )
        skipped = re.search(timed_out, slow.stderr)
        assert skipped, slow.stderr
        # At least the connect timeout; generous above (a loaded machine).
        assert 1000 <= int(skipped[2]) < 10_000, slow.stderr
        assert f"found at {peer.address}" in slow.stderr
        assert slow.seconds >= 1, (slow.seconds, slow.stderr)
        no_traceback(slow.stderr)

        # Seconds later the probe connection is still not established: the
        # port really dropped SYNs all along.
        assert hole.still_blackholed()


# -- 3. a peer that accepts and never answers -----------------------------------


@fault_test
async def test_hanging_peer_is_skipped(launcher: Launcher):
    """
    A SIGSTOPped peer: the kernel still completes connections into its
    backlog, but nothing ever answers.  The idle timeout skips it.
    """
    relay = await launcher.relay()
    hung = await launcher.peer(relay.address, ["sample1.txt"])
    good = await launcher.peer(relay.address, ["sample1.txt"])
    hung.process.send_signal(signal.SIGSTOP)
    try:
        result = await launcher.client(
            "--relay",
            relay.address,
            "--stagger",
            "0",
            "--idle-timeout",
            "1",
            "--connect-timeout",
            "1",
            "get",
            # Nor the question to both holders (p2p.choice) first.
            "--sources",
            "1",
            "sample1.txt",
        )
    finally:
        hung.process.send_signal(signal.SIGCONT)
    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == sample("sample1.txt")
    skipped = re.search(
        rf"skipped {re.escape(hung.address)}: timed out: silent for 1s \((\d+) ms\)",
        result.stderr,
    )
    assert skipped, result.stderr
    assert 1000 <= int(skipped[1]) < 10_000, result.stderr
    assert f"found at {good.address}" in result.stderr
    no_traceback(result.stderr)


# -- 4. the relay restarts ---------------------------------------------------------

TTL = 6
RENEW = TTL // 3  # what the relay asks of peers by default
RETRY = r"relay registration failed \(.*\); retrying in (?P<delay>[0-9.]+)s"


@fault_test
async def test_peers_re_register_after_relay_restart(launcher: Launcher):
    """
    The relay is SIGKILLed (its table is lost) and restarted on the same
    port.  Each peer notices a failed renewal, retries with a backoff capped
    at the renew interval, and is registered again within about one
    interval of the relay's return.
    """
    relay = await launcher.relay(ttl=TTL)
    peers = await gatherResults(
        [
            Deferred.fromCoroutine(launcher.peer(relay.address, [name]))
            for name in ("sample1.txt", "sample2.txt")
        ]
    )
    before_kill = [peer.process.mark() for peer in peers]
    await relay.process.kill("KILL")
    # The next renewal (within RENEW seconds) fails.
    await gatherResults(
        [
            peer.process.wait_for(RETRY, since)
            for peer, since in zip(peers, before_kill, strict=True)
        ]
    )
    before_restart = [peer.process.mark() for peer in peers]

    restarted = await launcher.relay(f"tcp:{relay.port}:interface=127.0.0.1", ttl=TTL)
    assert restarted.address == relay.address
    back_at = restarted.process.time_of(await restarted.process.wait_for(LISTENING))
    registered = await gatherResults(
        [
            peer.process.wait_for(REGISTERED, since)
            for peer, since in zip(peers, before_restart, strict=True)
        ]
    )
    for peer, killed, since, match in zip(
        peers, before_kill, before_restart, registered, strict=True
    ):
        delay = peer.process.time_of(match, since) - back_at
        assert delay < 2 * RENEW + 1, (peer.process.label, delay)
        # Every retry while the relay was down waited at most RENEW seconds.
        retries = [
            float(m["delay"])
            for line in peer.process.lines[killed:since]
            if (m := re.search(RETRY, line))
        ]
        assert retries and max(retries) <= RENEW, retries

    result = await launcher.client("--relay", relay.address, "peers")
    assert result.code == EXIT_OK, result.stderr
    listed = [line.split()[:2] for line in result.stdout.decode().splitlines()]
    assert sorted(listed) == sorted(
        [peer.address, match["peer_id"]]
        for peer, match in zip(peers, registered, strict=True)
    )


# -- 5. the relay is down ------------------------------------------------------------


@fault_test
async def test_relay_down_fails_fast(launcher: Launcher):
    """
    Nothing listens at the relay address (the port is bound, not listening,
    so connecting is refused): status 3 at once, one line, no traceback.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        result = await launcher.client("--relay", address, "get", "x")
    assert result.code == EXIT_RELAY, result.stderr
    assert result.stdout == b""
    assert len(result.stderr_lines) == 1, result.stderr
    assert f"relay {address}: cannot connect" in result.stderr
    no_traceback(result.stderr)
    # At once: well below the 10 s a relay request may take.
    assert result.seconds < 8, result.seconds


# -- 6. crash-only shutdown -----------------------------------------------------------


@needs_inotify
@fault_test
async def test_sigterm_peer_mid_transfer(launcher: Launcher, big_files, tmp_path):
    """
    SIGTERM to a peer stuck in a transfer: it unregisters and exits within
    STOP_SECONDS instead of waiting for the transfer, and the client still
    gets the file, resuming from the other peer.
    """
    big = big_files["big"]
    relay, first, second = await two_peers_sharing(launcher, big)
    target = tmp_path / "out.bin"

    relay_since = relay.process.mark()
    client = await start_frozen_client(
        launcher,
        first,
        big,
        *("--relay", relay.address, "get", *ONE_AT_A_TIME, "-o", str(target), big.name),
        target=str(target),
    )
    signalled = launcher.reactor.seconds()
    await first.process.kill("TERM")
    assert first.process.ended_at is not None
    assert first.process.ended_at - signalled < STOP_SECONDS
    assert first.process.signal == signal.SIGTERM, first.process.lines[-10:]
    await relay.process.wait_for(rf"peer {first.peer_id} unregistered", relay_since)

    client.send_signal(signal.SIGCONT)
    result = await launcher.client_result(client)
    assert_resumed(result, big, broken=first, to=second)
    assert sha256_of(target) == big.sha256
    target.unlink()


@fault_test
async def test_sigterm_relay_exits_promptly(launcher: Launcher):
    """SIGTERM to a relay with a client connection open: it exits at once."""
    relay = await launcher.relay()
    idle = await launcher.connect_raw(relay.address)
    await idle.wait_lines(1)  # the banner: the relay holds the connection
    signalled = launcher.reactor.seconds()
    await relay.process.kill("TERM")
    assert relay.process.ended_at is not None
    assert relay.process.ended_at - signalled < STOP_SECONDS
    assert relay.process.signal == signal.SIGTERM, relay.process.lines[-10:]
    await idle.when_closed()
