"""
Tests for the ``p2p`` command, in memory: a fake console and a
MemoryReactorClock whose connections the tests answer by hand.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import stat
import sys

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    DNSLookupError,
    getConnectError,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import cli, hints, pieces, progress, session, wire
from p2p.pace import Pace
from p2p.request import DEFAULT_REQUEST_TIMEOUT_SECONDS

from ._support import set_cache_environment, set_relay_environment
from .test_sink import _Reader

# What a real refused connect() reports: an errno and its name.
REFUSED = (errno.ECONNREFUSED, "ECONNREFUSED")
PEER_A = "aaaaaaaaaaaaaaaa"
PEER_B = "bbbbbbbbbbbbbbbb"
# A peer's answer to STATUS once its whole share is indexed.
COMPLETE_STATUS = b"OK indexed=3 pending=0 scanning=0\n"
MIB = pieces.PIECE_SIZE


class FakeConsole(cli.Console):
    """A console over in-memory streams."""

    def __init__(self, stdin: str = "") -> None:
        super().__init__(io.StringIO(stdin), io.BytesIO(), io.StringIO(), False)

    @property
    def out(self) -> bytes:
        return self.stdout.getvalue()

    @property
    def err_lines(self) -> list[str]:
        return self.stderr.getvalue().splitlines()


def connect(reactor: MemoryReactorClock, index: int, banner: bytes):
    """Complete the C{index}th outgoing connection; return its protocol."""
    host, port, factory = reactor.tcpClients[index][:3]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    protocol.dataReceived(banner + b"\n")
    return protocol, transport


def refuse(
    reactor: MemoryReactorClock, index: int, reason: Exception | None = None
) -> None:
    """Fail the C{index}th outgoing connection (refused by default)."""
    factory = reactor.tcpClients[index][2]
    connector = reactor.connectors[index]
    factory.clientConnectionFailed(
        connector, Failure(reason or getConnectError(REFUSED))
    )


def answer_peers(reactor: MemoryReactorClock, index: int, *entries: tuple) -> bytes:
    """
    Play the relay: answer PEERS with C{entries}: (id, host, port), or
    (id, host, port, names) for a peer whose filter holds C{names}.
    """
    protocol, transport = connect(reactor, index, b"P2P/1 relay")
    request = transport.value()
    reply = [f"OK {len(entries)}"]
    for peer_id, host, port, *names in entries:
        line = f"PEER {peer_id} {host} {port} age=0"
        if names:
            line += f" files={hints.build_filter(names[0])}"
        reply.append(line)
    protocol.dataReceived("".join(line + "\n" for line in reply).encode())
    return request


def piece_digests(content: bytes) -> bytes:
    """The concatenated digests of C{content}'s pieces."""
    return b"".join(
        pieces.hash_piece(content[i : i + pieces.PIECE_SIZE])
        for i in range(0, len(content), pieces.PIECE_SIZE)
    )


def root_of(content: bytes) -> str:
    """C{content}'s root, as on the wire."""
    return pieces.root_of(len(content), pieces.PIECE_SIZE, piece_digests(content)).hex()


def peer_reply(content: bytes, offset: int = 0) -> bytes:
    """
    A P2P/2 peer's answer for C{content} from C{offset}: the header, the
    piece list (a whole file of several pieces), then the bytes.
    """
    digests = piece_digests(content)
    if offset or len(digests) <= pieces.DIGEST_BYTES:
        digests = b""
    header = wire.FileHeader(
        len(content) - offset,
        root_of(content),
        offset,
        len(content),
        pieces.PIECE_SIZE,
        len(digests),
    )
    return header.to_line() + b"\n" + digests + content[offset:]


def hang_up(protocol, transport: StringTransport) -> None:
    """
    The peer closes the connection after its reply, unless the client did:
    each exchange of these tests on a connection of its own (the client's
    keeping of connections is tested in test_pool).
    """
    if not transport.disconnecting:
        protocol.connectionLost(Failure(ConnectionDone()))


def serve(reactor: MemoryReactorClock, index: int, content: bytes) -> bytes:
    """Play a peer that has the file; return the request it got."""
    protocol, transport = connect(reactor, index, b"P2P/2 peer")
    request = transport.value()
    protocol.dataReceived(peer_reply(content))
    hang_up(protocol, transport)
    return request


def refuse_file(reactor: MemoryReactorClock, index: int) -> None:
    """Play a peer that does not have the file."""
    protocol, transport = connect(reactor, index, b"P2P/2 peer")
    protocol.dataReceived(b"ERR 404 no such file\n")
    hang_up(protocol, transport)


def answer_range(reactor: MemoryReactorClock, index: int, content: bytes) -> bytes:
    """Play a peer asked for a name's header only (RANGE 0 0); return the
    request it got."""
    protocol, transport = connect(reactor, index, b"P2P/2 peer")
    request = transport.value()
    header = wire.FileHeader(0, root_of(content), 0, len(content), pieces.PIECE_SIZE, 0)
    protocol.dataReceived(header.to_line() + b"\n")
    hang_up(protocol, transport)
    return request


class CommandTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        set_relay_environment(self, None)
        self.cache_home = set_cache_environment(self)
        self.reactor = MemoryReactorClock()
        self.console = FakeConsole()

    def run_cli(self, *argv: str):
        return cli.run(self.reactor, list(argv), self.console)

    def connect(self, index: int, banner: bytes):
        return connect(self.reactor, index, banner)

    def refuse(self, index: int, reason: Exception | None = None) -> None:
        refuse(self.reactor, index, reason)

    def answer_peers(self, index: int, *entries: tuple) -> bytes:
        return answer_peers(self.reactor, index, *entries)

    def assert_one_error_line(self, *fragments: str) -> None:
        lines = self.console.err_lines
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("p2p: "), lines)
        self.assertNotIn("Traceback", self.console.stderr.getvalue())
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    def assert_no_timers(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class OutputReasonTests(SynchronousTestCase):
    """Why ``-o PATH`` failed, said of PATH, not of the partial file."""

    def test_folder_that_takes_no_file(self) -> None:
        """``-o /proc/version``: procfs refuses the partial file beside it
        with ENOENT; the reason names the folder and why, not a missing
        "/proc/version.p2p-part"."""
        error = OSError(errno.ENOENT, "No such file or directory")
        error.filename = "/proc/version.p2p-part"
        reason = session.os_reason(error, "/proc/version")
        self.assertEqual(
            reason,
            "/proc takes no new files: a download is written beside its "
            "target, then renamed over it",
        )
        self.assertNotIn("p2p-part", reason)
        error = OSError(errno.EROFS, "Read-only file system")
        error.filename = "ro/x.p2p-part"
        self.assertIn(
            "ro takes no new files (read-only file system)",
            session.os_reason(error, "ro/x"),
        )


class InterruptedStatusTests(SynchronousTestCase):
    """A run a signal stopped exits 128 + its number, as shells report."""

    def test_status_of_the_signal(self) -> None:
        """The handlers installed before still run; the status is noted."""
        called = []
        for number in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(number, lambda n, frame: called.append(n))
            self.addCleanup(signal.signal, number, previous)
        stop = cli.StopSignal()
        self.assertEqual(stop.status, 130)  # none noted: as Ctrl-C
        stop.install()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual((stop.status, called), (143, [signal.SIGTERM]))
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        self.assertEqual((stop.status, called[-1]), (130, signal.SIGINT))


class UsageTests(CommandTestCase):
    """Usage errors: status 2, one line on stderr, nothing else happens."""

    def test_address_without_port(self) -> None:
        """A relay given as a bare host says which forms are expected, not
        Twisted's "Unknown endpoint type"."""
        d = self.run_cli("-r", "127.0.0.1", "peers")
        self.assertEqual(self.successResultOf(d), cli.EXIT_USAGE)
        self.assert_one_error_line(
            "bad endpoint '127.0.0.1': expected HOST:PORT", "endpoint string"
        )
        self.assertNotIn("Unknown endpoint type", self.console.stderr.getvalue())

    def test_h_is_help(self) -> None:
        """-h is --help, as GNU and argparse programs take it: for p2p and
        for each command."""
        for argv, words in (
            (["-h"], "Usage: p2p [options]"),
            (["get", "-h"], "get [-o PATH]"),
            (["ls", "-h"], "ls "),
        ):
            stdout = io.StringIO()
            self.patch(sys, "stdout", stdout)
            with self.assertRaises(SystemExit) as raised:
                cli.parse(argv)
            self.assertEqual(raised.exception.code, 0)
            self.assertIn(words, stdout.getvalue())

    def test_usage_errors(self) -> None:
        missing = self.mktemp()
        for argv in (
            [],
            ["frob"],
            ["--no-such-option", "peers"],
            ["get", "-o"],
            ["peers", "extra"],
            ["ls", "extra"],
            ["--connect-timeout", "x", "peers"],
            ["--connect-timeout", "0", "peers"],
            ["--idle-timeout", "-1", "get", "a"],
            ["--relay", "bogus:x", "peers"],
            ["--relay", "tcp:nohost", "peers"],
            ["--relay", "127.0.0.1:99999", "get", "a"],
            ["demo", "--peers", "0"],
            ["demo", "--peers", "x"],
            ["demo", "--files", missing],
            ["get", "-o", missing, "a", "b"],
            ["get", "-o", "", "a"],
            ["get", "--expect", "abc", "a"],
            ["get", "--expect", "A" * 64, "a"],
            ["get", "--expect", "a" * 63 + "g", "a"],
            ["get", "--expect", "a" * 64, "a", "b"],
            ["get", "--expect", "a" * 64],
            ["get", "--min-rate", "fast", "a"],
            ["get", "--min-rate-time", "0", "a"],
            ["get", "--header-timeout", "-1", "a"],
        ):
            self.console = FakeConsole()
            code = self.successResultOf(self.run_cli(*argv))
            self.assertEqual(code, cli.EXIT_USAGE, argv)
            self.assert_one_error_line()
            self.assertEqual(self.console.out, b"")
            self.assertEqual(self.reactor.tcpClients, [], argv)
            self.assert_no_timers()

    def test_malformed_number_names_its_option(self) -> None:
        """Not Twisted's "Parameter type enforcement failed: could not
        convert string to float": the option, what it wants, what came."""
        self.successResultOf(self.run_cli("get", "a", "--sources", "many"))
        self.assert_one_error_line("--sources: not a whole number: 'many'")
        self.console = FakeConsole()
        self.successResultOf(self.run_cli("--connect-timeout", "soon", "peers"))
        self.assert_one_error_line("--connect-timeout: not a number: 'soon'")

    def test_message_names_the_problem(self) -> None:
        self.successResultOf(self.run_cli("frob"))
        self.assert_one_error_line("frob", "p2p --help")
        self.console = FakeConsole()
        self.successResultOf(self.run_cli("127.0.0.1", "notaport"))
        self.assert_one_error_line(
            "unknown command '127.0.0.1'", "HOST PORT with PORT a number"
        )

    def test_help(self) -> None:
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        failure = self.failureResultOf(self.run_cli("--help"), SystemExit)
        self.assertEqual(failure.value.code, 0)
        for command in ("get", "peers", "ls", "demo"):
            self.assertIn(command, output.getvalue())


class RelayUnreachableTests(CommandTestCase):
    """Status 3 and one stderr line whatever the command."""

    def test_refused(self) -> None:
        for command in (["peers"], ["ls"], ["get", "a.txt"]):
            self.reactor = MemoryReactorClock()
            self.console = FakeConsole()
            d = self.run_cli("--relay", "127.0.0.1:9", *command)
            self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 9))
            self.refuse(0)
            self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY, command)
            self.assert_one_error_line("cannot connect", "Connection refused")
            self.assertEqual(self.console.out, b"")
            self.assert_no_timers()

    def test_timeout(self) -> None:
        d = self.run_cli("--relay", "[::1]:9", "peers")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("::1", 9))
        self.reactor.advance(DEFAULT_REQUEST_TIMEOUT_SECONDS - 0.1)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assert_one_error_line("timed out")
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assert_no_timers()

    def test_unknown_host(self) -> None:
        """A relay name that does not resolve is unreachable, not a crash."""
        d = self.run_cli("--relay", "relay.invalid:4001", "get", "a.txt")
        self.refuse(0, DNSLookupError("relay.invalid"))
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assert_one_error_line("relay.invalid")

    def test_relay_refuses_request(self) -> None:
        d = self.run_cli("--relay", "127.0.0.1:9", "peers")
        protocol, transport = self.connect(0, b"P2P/1 relay")
        protocol.dataReceived(b"ERR 503 going away\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assert_one_error_line("503", "going away")

    def test_not_a_relay(self) -> None:
        d = self.run_cli("--relay", "127.0.0.1:9", "peers")
        self.connect(0, b"SSH-2.0-OpenSSH_9.6")
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assert_one_error_line()


class PeersTests(CommandTestCase):
    def test_lists_peers(self) -> None:
        d = self.run_cli("--relay", "127.0.0.1:9", "peers")
        request = self.answer_peers(
            0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "::1", 4002)
        )
        self.assertEqual(request, b"PEERS\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(
            self.console.out,
            f"127.0.0.1:4001 {PEER_A}\n[::1]:4002 {PEER_B}\n".encode(),
        )
        self.assert_no_timers()

    def test_quiet(self) -> None:
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "peers")
        self.answer_peers(0)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.err_lines, [])
        self.assertEqual(self.console.out, b"")

    def test_environment_names_the_relay(self) -> None:
        set_relay_environment(self, "10.1.2.3:4001")
        self.run_cli("peers")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.1.2.3", 4001))

    def test_option_beats_environment(self) -> None:
        set_relay_environment(self, "10.1.2.3:4001")
        self.run_cli("--relay", "4002", "peers")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 4002))


class GetTests(CommandTestCase):
    CONTENT = b"raven canyon otter\n" * 50

    def test_no_active_peers(self) -> None:
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt")
        self.answer_peers(0)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assert_one_error_line("a.txt", "no active peers")
        self.assert_no_timers()

    def test_fallback_to_next_peer_and_save(self) -> None:
        """A dead first peer is skipped; the second one's copy is saved."""
        target = self.mktemp()
        d = self.run_cli("--relay", "127.0.0.1:9", "get", "-o", target, "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        self.answer_peers(1)  # no suggestion
        self.assertEqual(self.reactor.tcpClients[2][:2], ("127.0.0.1", 4001))
        self.refuse(2)
        self.assertEqual(self.reactor.tcpClients[3][:2], ("127.0.0.1", 4002))
        self.assertEqual(serve(self.reactor, 3, self.CONTENT), b"GET a.txt\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        with open(target, "rb") as stream:
            self.assertEqual(stream.read(), self.CONTENT)
        self.assertEqual(self.console.out, b"")
        errors = self.console.stderr.getvalue()
        self.assertIn("skipped 127.0.0.1:4001", errors)
        self.assertIn("found at 127.0.0.1:4002", errors)
        self.assertNotIn("Traceback", errors)
        self.assert_no_timers()

    def test_not_found_anywhere(self) -> None:
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "-o", "x", "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        self.answer_peers(1)
        protocol, _ = self.connect(2, b"P2P/2 peer")
        protocol.dataReceived(b"ERR 404 no such file\n")
        self.refuse(3)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assert_one_error_line("a.txt", "not found on any of 2")
        self.assertFalse(os.path.exists("x"))
        self.assert_no_timers()

    def test_copies_turned_down_are_not_not_found(self) -> None:
        """
        A holder whose copy is too large for --max-size, and one whose
        copy is corrupted: with -q the one line says so (and which option
        takes the first), not "not found"; --json's error too.
        """
        d = self.run_cli(
            "-q", "--relay", "127.0.0.1:9", "get", "--max-size", "100", "a.txt"
        )
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        self.answer_peers(1)
        protocol, _ = self.connect(2, b"P2P/2 peer")
        header = peer_reply(self.CONTENT).split(b"\n")[0] + b"\n"
        protocol.dataReceived(header)
        protocol, _ = self.connect(3, b"P2P/2 peer")
        reply = peer_reply(self.CONTENT[:50])
        protocol.dataReceived(reply[:-1] + b"!")
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assert_one_error_line(
            "a.txt: no usable copy on 2 active peer(s): "
            "1 too large (--max-size), 1 corrupted"
        )
        self.assert_no_timers()

    def test_upper_case_root_hint(self) -> None:
        """A ROOT typed in upper case is a name; not found, it says how a
        ROOT is written."""
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "AB" * 32)
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        self.refuse(2)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assert_one_error_line(
            "not found on any of 1", "a content ROOT is 64 lower-case hex digits"
        )

    def test_names_and_peer_messages_are_escaped(self) -> None:
        """
        Every line on stderr shows a name with visible escapes, and text a
        peer chose (its ERR message) cannot reorder or hide what follows.
        """
        name = "invoice\u202efdp.exe"
        d = self.run_cli("--relay", "127.0.0.1:9", "get", name)
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        protocol, _ = self.connect(2, b"P2P/2 peer")
        protocol.dataReceived("ERR 404 gone\u2066\u200b\n".encode())
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        errors = self.console.stderr.getvalue()
        self.assertTrue(errors.isascii(), errors)
        self.assertIn(
            "invoice\\u202efdp.exe: skipped 127.0.0.1:4001: refused: "
            "ERR 404 gone\\u2066\\u200b",
            errors,
        )
        self.assertIn("invoice\\u202efdp.exe: not found on any of 1", errors)

    def test_output_not_writable(self) -> None:
        folder = self.mktemp()
        os.mkdir(folder)
        target = os.path.join(folder, "sub", "a.txt")
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "-o", target, "a.txt")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OUTPUT)
        self.assert_one_error_line("cannot write")
        self.assertEqual(self.reactor.tcpClients, [], "checked before any request")

    def test_output_through_a_fifo(self) -> None:
        """-o onto a FIFO writes the content through it; the FIFO stays a
        FIFO and nothing else appears beside it."""
        folder = self.mktemp()
        os.mkdir(folder)
        fifo = os.path.join(folder, "pipe")
        os.mkfifo(fifo)
        reader = _Reader(fifo)
        d = self.run_cli("--relay", "127.0.0.1:9", "get", "-o", fifo, "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        serve(self.reactor, 2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(reader.result(), self.CONTENT)
        self.assertTrue(stat.S_ISFIFO(os.lstat(fifo).st_mode))
        self.assertEqual(os.listdir(folder), ["pipe"])
        self.assertIn(f"every piece verified) -> {fifo}", self.console.err_lines[-1])
        self.assert_no_timers()

    def test_partial_file_in_the_way_named(self) -> None:
        """What is in the way is named: a symbolic link or a folder at
        PATH.p2p-part (not "Too many levels of symbolic links" for PATH)."""
        folder = self.mktemp()
        os.mkdir(folder)
        os.symlink("elsewhere", os.path.join(folder, "z.p2p-part"))
        os.mkdir(os.path.join(folder, "y.p2p-part"))
        for name, what in (("z", "is a symbolic link"), ("y", "is a folder")):
            self.console = FakeConsole()
            self.reactor = MemoryReactorClock()
            target = os.path.join(folder, name)
            d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "-o", target, "a")
            self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
            self.answer_peers(1)
            self.assertEqual(self.successResultOf(d), cli.EXIT_OUTPUT)
            self.assert_one_error_line(
                f"cannot write {target}: {target}.p2p-part {what}"
            )

    def test_output_link_to_a_file_refused(self) -> None:
        """-o onto a symbolic link to a regular file is refused before the
        relay is asked; the file is untouched."""
        folder = self.mktemp()
        os.mkdir(folder)
        with open(os.path.join(folder, "real"), "wb") as stream:
            stream.write(b"precious")
        link = os.path.join(folder, "link")
        os.symlink("real", link)
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "-o", link, "a.txt")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OUTPUT)
        self.assert_one_error_line("cannot write", "a symbolic link to a regular file")
        self.assertEqual(self.reactor.tcpClients, [])
        with open(os.path.join(folder, "real"), "rb") as stream:
            self.assertEqual(stream.read(), b"precious")

    def test_peer_connect_timeout_skips_peer(self) -> None:
        """A peer that never accepts the connection is skipped after
        --connect-timeout, and the next peer serves the file."""
        target = self.mktemp()
        d = self.run_cli(
            "-q", "--connect-timeout", "2", "--stagger", "0",
            "--relay", "127.0.0.1:9", "get", "-o", target, "a.txt",
        )  # fmt: skip
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        self.answer_peers(1)
        self.reactor.advance(2 - 0.1)
        self.assertEqual(len(self.reactor.tcpClients), 3, "still waiting for A")
        self.reactor.advance(0.2)
        self.assertTrue(self.reactor.connectors[2].stoppedConnecting)
        self.assertEqual(self.reactor.tcpClients[3][:2], ("127.0.0.1", 4002))
        serve(self.reactor, 3, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        with open(target, "rb") as stream:
            self.assertEqual(stream.read(), self.CONTENT)
        self.assert_no_timers()


class PaceOptionTests(CommandTestCase):
    """--min-rate, --min-rate-time and --header-timeout reach every peer."""

    CONTENT = os.urandom(300_000)

    def start_get(self, *argv: str):
        d = self.run_cli("--relay", "127.0.0.1:9", "get", *argv, "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        self.answer_peers(1)  # no suggestion
        return d

    def test_defaults(self) -> None:
        options = cli.parse(["get", "a"])
        self.assertEqual(options.subOptions["pace"], Pace(4096, 10.0, 30.0))
        options = cli.parse(["get", "--min-rate", "0", "--header-timeout", "0", "a"])
        self.assertEqual(options.subOptions["pace"], Pace(0, 10.0, None))

    def test_slow_peer_skipped(self) -> None:
        """
        With --min-rate 64K --min-rate-time 2, a peer sending 10 KiB a
        second is skipped after two seconds of it, and the next one serves
        the whole file (to stdout: nothing had been written yet).
        """
        d = self.start_get("--min-rate", "64K", "--min-rate-time", "2")
        protocol, _ = self.connect(2, b"P2P/2 peer")
        reply = peer_reply(self.CONTENT)
        start = len(reply) - len(self.CONTENT)
        protocol.dataReceived(reply[:start])
        for _ in range(3):
            protocol.dataReceived(reply[start : start + 10240])
            start += 10240
            for _ in range(10):
                self.reactor.advance(0.1)
        self.assertIn(
            "skipped 127.0.0.1:4001: too slow: 20.0 KiB in 2 s, less than "
            "--min-rate 64.0 KiB/s",
            self.console.stderr.getvalue(),
        )
        serve(self.reactor, 3, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.CONTENT)
        self.assert_no_timers()

    def test_header_timeout(self) -> None:
        """--header-timeout 3: a peer that greets and never answers the
        request, though it keeps sending INDEXING lines without progress,
        is skipped after 3 s."""
        d = self.start_get("--header-timeout", "3")
        protocol, _ = self.connect(2, b"P2P/2 peer")
        for _ in range(3):
            protocol.dataReceived(wire.Indexing(0, 100).to_line() + b"\n")
            self.reactor.advance(1)
        self.assertIn(
            "skipped 127.0.0.1:4001: timed out: no header within 3s",
            self.console.stderr.getvalue(),
        )
        serve(self.reactor, 3, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)


class ChoiceTests(CommandTestCase):
    """
    A fetch by name with several likely holders first asks them which
    content they hold (L{p2p.choice}), takes the one most offer, and says
    so when they disagree.
    """

    REAL = b"the report everybody wants\n" * 40
    FAKE = b"MZ something else entirely\n"
    HOLDERS = [
        (PEER_A, "127.0.0.1", 4001),
        (PEER_B, "127.0.0.1", 4002),
        ("cccccccccccccccc", "127.0.0.1", 4003),
    ]

    def start(self, *argv: str, holders=HOLDERS):
        d = self.run_cli("--relay", "127.0.0.1:9", *argv, "get", "r.pdf")
        self.answer_peers(0, *holders)
        self.answer_peers(1, *holders)  # all suggested
        return d

    def test_majority_taken_and_disagreement_reported(self) -> None:
        """
        A liar listed first offers other content under the name: the two
        honest holders outvote it.  stderr names every content with its
        holders, the choice and why (even with -q); the liar is never
        asked for the file, and the final line says what was verified.
        """
        d = self.start("-q")
        range_line = b"RANGE 0 0 r.pdf\n"
        self.assertEqual(answer_range(self.reactor, 2, self.FAKE), range_line)
        self.assertEqual(answer_range(self.reactor, 3, self.REAL), range_line)
        self.assertEqual(answer_range(self.reactor, 4, self.REAL), range_line)
        self.assertEqual(self.reactor.tcpClients[5][:2], ("127.0.0.1", 4002))
        self.assertEqual(serve(self.reactor, 5, self.REAL), b"GET r.pdf\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.REAL)
        real, fake = root_of(self.REAL), root_of(self.FAKE)
        self.assertEqual(
            self.console.err_lines,
            [
                "p2p: r.pdf: holders disagree on its content (3 of 3 asked answered):",
                f"p2p: r.pdf:   root {real} ({len(self.REAL)} bytes) from 2 "
                "holders: 127.0.0.1:4002, 127.0.0.1:4003",
                f"p2p: r.pdf:   root {fake} ({len(self.FAKE)} bytes) from 1 "
                "holder: 127.0.0.1:4001",
                f"p2p: r.pdf: taking root {real[:12]}... (the most holders "
                "offer it); --expect ROOT takes another",
            ],
        )
        self.assertEqual(len(self.reactor.tcpClients), 6)
        self.assert_no_timers()

    def test_holders_still_indexing_are_waited_for(self) -> None:
        """
        Both holders are still indexing the file when asked which content
        they hold: their INDEXING lines are progress, not a protocol error
        (protocol.rst: ``RANGE 0 0`` waits with them), so both answer
        once indexed and the content is taken as both describe it.
        """
        d = self.start(holders=self.HOLDERS[:2])
        size = len(self.REAL)
        holders = [self.connect(index, b"P2P/2 peer") for index in (2, 3)]
        for done in (0, size // 2):
            for protocol, _ in holders:
                protocol.dataReceived(wire.Indexing(done, size).to_line() + b"\n")
            self.reactor.advance(1)
        header = wire.FileHeader(0, root_of(self.REAL), 0, size, pieces.PIECE_SIZE, 0)
        for protocol, transport in holders:
            self.assertEqual(transport.value(), b"RANGE 0 0 r.pdf\n")
            protocol.dataReceived(header.to_line() + b"\n")
            hang_up(protocol, transport)
        serve(self.reactor, 4, self.REAL)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.REAL)
        errors = self.console.stderr.getvalue()
        self.assertNotIn("skipped", errors)
        self.assertIn("r.pdf: 127.0.0.1:4001 is indexing it (50% of", errors)
        self.assertIn("as 2 of 2 holders described it, every piece verified", errors)
        self.assert_no_timers()

    def test_tie_goes_to_the_relays_order(self) -> None:
        d = self.start(holders=self.HOLDERS[:2])
        answer_range(self.reactor, 2, self.FAKE)
        answer_range(self.reactor, 3, self.REAL)
        self.assertEqual(self.reactor.tcpClients[4][:2], ("127.0.0.1", 4001))
        serve(self.reactor, 4, self.FAKE)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.FAKE)
        errors = self.console.stderr.getvalue()
        self.assertIn(
            "(as many holders offer another; the relay suggested it first)", errors
        )
        self.assertIn("as 1 of 2 holders described it, every piece verified", errors)

    def test_chosen_content_only(self) -> None:
        """The choice pins the content: a chosen holder that answers the
        GET with other content is skipped, like a mismatch of --expect."""
        d = self.start(holders=self.HOLDERS[:2])
        answer_range(self.reactor, 2, self.REAL)
        answer_range(self.reactor, 3, self.REAL)
        serve(self.reactor, 4, self.FAKE)
        self.assertIn(
            "skipped 127.0.0.1:4001: has other content",
            self.console.stderr.getvalue(),
        )
        serve(self.reactor, 5, self.REAL)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.REAL)

    def test_one_answer(self) -> None:
        """One holder answers, the other cannot be reached: its content is
        taken, and the final line does not claim a count."""
        d = self.start(holders=self.HOLDERS[:2])
        self.refuse(2)
        answer_range(self.reactor, 3, self.REAL)
        self.assertEqual(self.reactor.tcpClients[4][:2], ("127.0.0.1", 4002))
        serve(self.reactor, 4, self.REAL)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        errors = self.console.stderr.getvalue()
        self.assertIn("as its holder described it, every piece verified", errors)
        self.assertRegex(
            errors,
            r"r\.pdf: skipped 127\.0\.0\.1:4001: cannot connect: .* \(0 ms, asked "
            r"which content it holds\)",
        )
        self.assert_no_timers()

    def test_agreement_is_quiet(self) -> None:
        d = self.start(holders=self.HOLDERS[:2])
        answer_range(self.reactor, 2, self.REAL)
        answer_range(self.reactor, 3, self.REAL)
        serve(self.reactor, 4, self.REAL)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        errors = self.console.stderr.getvalue()
        self.assertNotIn("disagree", errors)
        self.assertIn("as 2 of 2 holders described it", errors)

    def test_no_question_with_one_holder_or_a_pinned_root(self) -> None:
        """
        One likely holder, --sources 1, --expect, or a fetch by ROOT: no
        RANGE is sent, the first connection to a peer asks for the file
        itself (one round trip, as before).
        """
        for argv, holders, name in (
            ([], self.HOLDERS[:1], "r.pdf"),
            (["--sources", "1"], self.HOLDERS, "r.pdf"),
            (["--expect", root_of(self.REAL)], self.HOLDERS, "r.pdf"),
        ):
            self.reactor = MemoryReactorClock()
            self.console = FakeConsole()
            d = self.run_cli("--relay", "127.0.0.1:9", "get", *argv, name)
            self.answer_peers(0, *holders)
            self.answer_peers(1, *holders)
            self.assertEqual(serve(self.reactor, 2, self.REAL), b"GET r.pdf\n")
            self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.reactor = MemoryReactorClock()
        self.console = FakeConsole()
        root = root_of(self.REAL)
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", root)
        self.answer_peers(0, *self.HOLDERS)
        for index in range(1, 4):
            protocol, transport = self.connect(index, b"P2P/2 peer")
            self.assertEqual(transport.value(), f"PIECES {root}\n".encode())
            protocol.dataReceived(b"ERR 404 no such content\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assert_one_error_line("not found on any of 3")
        self.assert_no_timers()


class PinnedContentTests(CommandTestCase):
    """
    ``get ROOT`` and ``get --expect ROOT NAME`` take that content and
    nothing else, whatever a peer answers.
    """

    CONTENT = b"exactly this content\n" * 30
    OTHER = b"any other content\n" * 30

    def test_root_fetch_skips_a_piece_list_of_other_content(self) -> None:
        root = root_of(self.CONTENT)
        d = self.run_cli("--relay", "127.0.0.1:9", "get", root)
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        protocol, transport = self.connect(1, b"P2P/2 peer")
        self.assertEqual(transport.value(), f"PIECES {root}\n".encode())
        listing = wire.PiecesHeader(32, root_of(self.OTHER), len(self.OTHER), MIB)
        protocol.dataReceived(listing.to_line() + b"\n" + piece_digests(self.OTHER))
        protocol, transport = self.connect(2, b"P2P/2 peer")
        listing = wire.PiecesHeader(32, root, len(self.CONTENT), MIB)
        protocol.dataReceived(listing.to_line() + b"\n" + piece_digests(self.CONTENT))
        self.assertEqual(
            transport.value().splitlines()[-1],
            f"BLOB {root} 0 {len(self.CONTENT)}".encode(),
        )
        protocol.dataReceived(peer_reply(self.CONTENT))
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.CONTENT)
        errors = self.console.stderr.getvalue()
        self.assertIn(
            "skipped 127.0.0.1:4001: protocol error: the reply is for other content",
            errors,
        )
        self.assertIn(f"(root {root[:12]}... as you gave it, every piece", errors)
        self.assert_no_timers()

    def test_expect_skips_other_content(self) -> None:
        root = root_of(self.CONTENT)
        d = self.run_cli("--relay", "127.0.0.1:9", "get", "--expect", root, "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        self.answer_peers(1)
        self.assertEqual(serve(self.reactor, 2, self.OTHER), b"GET a.txt\n")
        self.assertEqual(serve(self.reactor, 3, self.CONTENT), b"GET a.txt\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.CONTENT)
        errors = self.console.stderr.getvalue()
        self.assertIn(
            f"skipped 127.0.0.1:4001: has other content (root "
            f"{root_of(self.OTHER)[:12]}...)",
            errors,
        )
        self.assertIn("as --expect gave it, every piece verified", errors)

    def test_expect_never_takes_other_content(self) -> None:
        """With only other content on offer, nothing is written."""
        d = self.run_cli(
            "-q", "--relay", "127.0.0.1:9", "get", "--expect", "a" * 64, "a.txt"
        )
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        serve(self.reactor, 2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assertEqual(self.console.out, b"")


class PieceTests(CommandTestCase):
    """``get`` of a file of several pieces: each verified on arrival, an
    interrupted run resumed by the next, a peer still indexing waited for."""

    MIB = pieces.PIECE_SIZE
    CONTENT = os.urandom(2 * pieces.PIECE_SIZE + 333)  # three pieces

    def start_get(self, *argv: str):
        d = self.run_cli("--relay", "127.0.0.1:9", "get", *argv, "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)  # no suggestion
        return d

    def test_to_stdout(self) -> None:
        """Every verified piece goes to stdout; stderr says they all were."""
        d = self.start_get()
        self.assertEqual(serve(self.reactor, 2, self.CONTENT), b"GET a.txt\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.CONTENT)
        errors = self.console.stderr.getvalue()
        self.assertIn(f"a.txt: {len(self.CONTENT)} bytes in", errors)
        self.assertIn("every piece verified) -> stdout", errors)
        self.assert_no_timers()

    def test_stalled_holder_said_timed_out(self) -> None:
        """A holder silent mid-transfer for --idle-timeout: the last line
        says it timed out, not that it broke off."""
        d = self.run_cli(
            "-q", "--idle-timeout", "0.5", "--relay", "127.0.0.1:9", "get", "a.txt"
        )  # fmt: skip
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        protocol, _ = self.connect(2, b"P2P/2 peer")
        reply = peer_reply(self.CONTENT)
        protocol.dataReceived(reply[: len(reply) - len(self.CONTENT) + 9])
        self.reactor.advance(0.5)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assert_one_error_line(
            "no usable copy on 1 active peer(s): 1 timed out (--idle-timeout)"
        )
        self.assert_no_timers()

    def test_reader_left_stdout(self) -> None:
        """
        ``p2p get a.txt | head -c 10``: the reader leaves mid-transfer;
        p2p stops quietly with SIGPIPE's status, 141 (nothing on stderr:
        the reader chose to stop).
        """

        class Gone(io.BytesIO):
            def write(self, data) -> int:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        self.console.stdout = Gone()
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        serve(self.reactor, 2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_READER_LEFT)
        self.assertEqual(self.console.err_lines, [])
        self.assert_no_timers()

    def test_full_stdout_still_says_so(self) -> None:
        """Any other failure to write stdout (``>/dev/full``) keeps its
        one line and status 4."""

        class Full(io.BytesIO):
            def write(self, data) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")

        self.console.stdout = Full()
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        serve(self.reactor, 2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OUTPUT)
        self.assert_one_error_line("cannot write stdout: No space left on device")

    def test_corrupted_piece_to_stdout(self) -> None:
        """
        A peer whose second piece does not verify: stdout gets the first
        piece only (never a byte of the bad one), and with no other peer
        the file is not found.
        """
        d = self.start_get()
        protocol, _ = self.connect(2, b"P2P/2 peer")
        reply = bytearray(peer_reply(self.CONTENT))
        reply[len(reply) - len(self.CONTENT) + self.MIB + 5] ^= 1
        protocol.dataReceived(bytes(reply))
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assertEqual(self.console.out, self.CONTENT[: self.MIB])
        self.assertIn(
            "skipped 127.0.0.1:4001: corrupted: piece 1 does not match",
            self.console.stderr.getvalue(),
        )
        self.assert_no_timers()

    def test_failed_fetch_keeps_its_partial_file_and_says_so(self) -> None:
        """
        The holder breaks off and the only other peer holds nothing under
        that content (``ERR 404 no such content``): the fetch fails, keeps
        its verified pieces for the next run and says so, and counts that
        peer as not holding it (not as "other content").
        """
        folder = self.mktemp()
        os.mkdir(folder)
        target = os.path.join(folder, "a.txt")
        d = self.run_cli(
            "--relay", "127.0.0.1:9", "get", "--json", "-o", target, "a.txt"
        )  # fmt: skip
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        self.answer_peers(1)  # no suggestion
        protocol, _ = self.connect(2, b"P2P/2 peer")
        reply = peer_reply(self.CONTENT)
        protocol.dataReceived(reply[: len(reply) - len(self.CONTENT) + self.MIB + 9])
        protocol.connectionLost(Failure(ConnectionLost()))
        protocol, transport = self.connect(3, b"P2P/2 peer")
        self.assertTrue(transport.value().startswith(b"BLOB "))
        protocol.dataReceived(b"ERR 404 no such content\n")
        hang_up(protocol, transport)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assertEqual(
            self.console.err_lines[-2:],
            [
                "p2p: a.txt: no usable copy on 2 active peer(s): 1 broke off",
                f"p2p: a.txt: kept {self.MIB} of {len(self.CONTENT)} verified "
                f"bytes in {target}.p2p-part; run the same command again to "
                "resume",
            ],
        )
        (result,) = [json.loads(line) for line in self.console.out.splitlines()]
        self.assertEqual(result["kept"], target + ".p2p-part")
        self.assertEqual([p["kind"] for p in result["peers"]], ["broken", "refused"])
        self.assertEqual(
            sorted(os.listdir(folder)), ["a.txt.p2p-part", "a.txt.p2p-part.state"]
        )
        self.assert_no_timers()

    def test_interrupted_run_resumes(self) -> None:
        """
        A transfer that breaks keeps its verified pieces in PATH.p2p-part
        and says so; the same command run again hashes them, asks the peer
        for the rest only (by root) and puts the whole file in place.
        """
        folder = self.mktemp()
        os.mkdir(folder)
        target = os.path.join(folder, "a.txt")
        d = self.start_get("-o", target)
        protocol, _ = self.connect(2, b"P2P/2 peer")
        reply = peer_reply(self.CONTENT)
        protocol.dataReceived(reply[: len(reply) - len(self.CONTENT) + self.MIB + 9])
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assertIn(
            f"kept {self.MIB} of {len(self.CONTENT)} verified bytes in "
            f"{target}.p2p-part; run the same command again to resume",
            self.console.stderr.getvalue(),
        )
        self.assertEqual(
            sorted(os.listdir(folder)), ["a.txt.p2p-part", "a.txt.p2p-part.state"]
        )

        self.reactor = MemoryReactorClock()
        self.console = FakeConsole()
        d = self.start_get("-o", target)
        # The peer is asked for the file; its header shows the content is
        # the one held in part, so it is asked again for the rest.
        protocol, transport = self.connect(2, b"P2P/2 peer")
        self.assertEqual(transport.value(), b"GET a.txt\n")
        reply = peer_reply(self.CONTENT)
        protocol.dataReceived(reply[: len(reply) - len(self.CONTENT) + 100])
        self.assertTrue(transport.disconnecting)
        protocol, transport = self.connect(3, b"P2P/2 peer")
        root = peer_reply(self.CONTENT).split(b"root=")[1][:64].decode()
        rest = len(self.CONTENT) - self.MIB
        self.assertEqual(transport.value(), f"BLOB {root} {self.MIB} {rest}\n".encode())
        protocol.dataReceived(peer_reply(self.CONTENT, self.MIB))
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        with open(target, "rb") as stream:
            self.assertEqual(stream.read(), self.CONTENT)
        self.assertEqual(os.listdir(folder), ["a.txt"])
        errors = self.console.stderr.getvalue()
        # Found once; the second request is a resumption, said as one.
        self.assertEqual(errors.count("found at"), 1, errors)
        self.assertIn(f"resuming at byte {self.MIB} from 127.0.0.1:4001", errors)
        # The rate is of what this run fetched, the kept bytes said apart.
        self.assertIn(
            f"{len(self.CONTENT)} bytes in ",
            errors,
        )
        self.assertIn(
            f"MB/s; {len(self.CONTENT) - self.MIB} fetched, {self.MIB} kept from "
            "an earlier run) from 127.0.0.1:4001",
            errors,
        )
        self.assert_no_timers()

    def test_waits_for_an_indexing_peer(self) -> None:
        """
        A peer still indexing the file is not silent: its progress lines are
        shown and keep it from timing out, however long it takes.
        """
        d = self.start_get()
        protocol, _ = self.connect(2, b"P2P/2 peer")
        size = len(self.CONTENT)
        for step in range(30):
            protocol.dataReceived(
                wire.Indexing(step * size // 30, size).to_line() + b"\n"
            )
            self.reactor.advance(1)
        self.assertNoResult(d)
        protocol.dataReceived(peer_reply(self.CONTENT))
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.CONTENT)
        errors = self.console.stderr.getvalue()
        self.assertIn(
            f"a.txt: 127.0.0.1:4001 is indexing it (50% of {size} bytes); waiting",
            errors,
        )
        self.assertNotIn("skipped", errors)
        self.assert_no_timers()

    def test_gives_up_on_fake_indexing(self) -> None:
        """
        The only holder fakes progress on a 4 TiB size (41,000 bytes a
        second, above --min-rate): once the header timeout's length is
        over, it is skipped with one line saying why, and p2p exits 1.
        """
        d = self.start_get()
        protocol, _ = self.connect(2, b"P2P/2 peer")
        for second in range(32):
            line = wire.Indexing(second * 41_000, 4398046511103).to_line()
            protocol.dataReceived(line + b"\n")
            self.reactor.advance(1)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assertEqual(self.console.out, b"")
        skipped = [line for line in self.console.err_lines if "skipped" in line]
        self.assertEqual(len(skipped), 1, self.console.err_lines)
        self.assertIn(
            "a.txt: skipped 127.0.0.1:4001: too slow: indexing 4096.0 GiB at "
            "40.0 KiB/s would take 3.4 years, more than 600 s (20 x "
            "--header-timeout)",
            skipped[0],
        )
        self.assertNotIn("Traceback", self.console.stderr.getvalue())
        self.assert_no_timers()


class LsTests(CommandTestCase):
    """``p2p ls``: every page of every peer's listing, sorted by name."""

    ROOT_A = "a" * 64
    ROOT_B = "b" * 64

    def answer_pages(self, status: bytes = COMPLETE_STATUS.rstrip()) -> list[bytes]:
        """The peer's listing comes in two pages, then its answer to
        ``STATUS`` (C{status}), asked on one connection (it is kept between
        requests); return the LIST requests."""
        requests = []
        pages = [
            (b"OK 1 next=7", wire.FileEntry(10, self.ROOT_B, "b.txt")),
            (b"OK 1", wire.FileEntry(2048, self.ROOT_A, "a dir/a.txt")),
        ]
        protocol, transport = self.connect(1, b"P2P/2 peer")
        for header, entry in pages:
            requests.append(transport.value())
            transport.clear()
            protocol.dataReceived(header + b"\n" + entry.to_line() + b"\n")
        self.assertEqual(transport.value(), b"STATUS\n")
        transport.clear()
        protocol.dataReceived(status + b"\n")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        return requests

    def test_reader_that_left(self) -> None:
        """``p2p ls | head -1`` with a long listing: the pipe breaks, and
        p2p ends with nothing on stderr and status 141, SIGPIPE's (128 +
        13), as GNU tools do."""

        class Gone(io.BytesIO):
            def write(self, data) -> int:
                raise BrokenPipeError(32, "Broken pipe")

        self.console.stdout = Gone()
        d = self.run_cli("--relay", "127.0.0.1:9", "ls")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_pages()
        self.assertEqual(self.successResultOf(d), cli.EXIT_READER_LEFT)
        self.assertEqual(cli.EXIT_READER_LEFT, 128 + signal.SIGPIPE)
        self.assertEqual(
            self.console.err_lines, ["p2p: 1 active peer(s) at 127.0.0.1:9"]
        )

    def test_ls(self) -> None:
        d = self.run_cli("--relay", "127.0.0.1:9", "ls")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(
            self.answer_pages(), [b"LIST limit=1000\n", b"LIST limit=1000 cursor=7\n"]
        )
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(
            self.console.out.decode().splitlines(),
            [
                f"{2048:>12} {'127.0.0.1:4001':<22} a dir/a.txt",
                f"{10:>12} {'127.0.0.1:4001':<22} b.txt",
            ],
        )
        self.assert_no_timers()

    def list_one_page(self, index: int, names: list[str]) -> list[bytes]:
        """Play the peer on connection C{index}: one page of C{names}, then
        (if asked) a complete STATUS; return the requests it got."""
        return self.answer_page(index, self.page_of(names))

    def page_of(self, names: list[str]) -> bytes:
        """A whole listing of C{names} in one page."""
        page = [b"OK %d" % len(names)]
        page += [wire.FileEntry(1, self.ROOT_A, name).to_line() for name in names]
        return b"".join(line + b"\n" for line in page)

    def answer_page(self, index: int, page: bytes) -> list[bytes]:
        """Play the peer on connection C{index}: C{page}, then (if asked) a
        complete STATUS; return the requests it got."""
        protocol, transport = self.connect(index, b"P2P/2 peer")
        requests = [transport.value()]
        transport.clear()
        protocol.dataReceived(page)
        if transport.value():
            requests.append(transport.value())
            protocol.dataReceived(COMPLETE_STATUS)
        return requests

    def test_ls_shares_a_total_budget(self) -> None:
        """
        However many peers list, ``p2p ls`` takes a bounded number of files
        from all of them together, shared: a peer early in the relay's order
        listing many is cut at its share (saying so, as the per-peer cap
        does), and what a short listing leaves goes to the peers after it.
        """
        self.patch(session, "MAX_LISTED_FILES_IN_ALL", 6)
        d = self.run_cli("--relay", "127.0.0.1:9", "ls")
        self.answer_peers(
            0,
            (PEER_A, "127.0.0.1", 4001),
            (PEER_B, "127.0.0.1", 4002),
            ("c" * 16, "127.0.0.1", 4003),
        )
        # A's share is 6 // 3: the rest of its page is not taken, nor STATUS
        # asked; B takes 1 of its 2, leaving C 3 of which it needs 2.
        hostile = self.list_one_page(1, [f"h{i}" for i in range(5)])
        self.assertEqual(hostile, [b"LIST limit=1000\n"])
        self.assertEqual(len(self.list_one_page(2, ["b.txt"])), 2)
        self.assertEqual(len(self.list_one_page(3, ["c.txt", "d.txt"])), 2)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(
            [line.split()[-1] for line in self.console.out.decode().splitlines()],
            ["b.txt", "c.txt", "d.txt", "h0", "h1"],
        )
        self.assertEqual(
            self.console.err_lines[1:],
            [
                "p2p: 127.0.0.1:4001: lists more than 2 files (its share of the "
                "6 files and 64.0 MiB of FILE lines p2p ls takes from all 3 "
                "peers); showing the first 2"
            ],
        )

    def test_ls_formats_each_file_once(self) -> None:
        """
        The byte budget shared by all peers is spent as each file is taken,
        its FILE line formatted once: what a listing cost is read back from
        the budget, not counted over every file again, and what one peer
        leaves is the next's.
        """
        line_bytes = len(wire.FileEntry(1, self.ROOT_A, "a0").to_line())
        self.patch(session, "MAX_LISTED_BYTES_IN_ALL", 6 * line_bytes)
        short = self.page_of(["a0", "a1"])
        long = self.page_of([f"b{i}" for i in range(5)])
        formatted = []
        to_line = wire.FileEntry.to_line

        def counted(entry: wire.FileEntry) -> bytes:
            formatted.append(entry.name)
            return to_line(entry)

        self.patch(wire.FileEntry, "to_line", counted)
        d = self.run_cli("--relay", "127.0.0.1:9", "ls", "--json")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        # A's share is 3 lines, of which it takes 2; B's the 4 left.
        self.assertEqual(len(self.answer_page(1, short)), 2)
        self.assertEqual(self.answer_page(2, long), [b"LIST limit=1000\n"])
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(
            [json.loads(line)["name"] for line in self.console.out.splitlines()],
            ["a0", "a1", "b0", "b1", "b2", "b3"],
        )
        self.assertIn(
            "127.0.0.1:4002: lists more than 4 files", self.console.err_lines[1]
        )
        # Each file once, taken or (b4) refused; none again afterwards.
        self.assertEqual(formatted, ["a0", "a1", "b0", "b1", "b2", "b3", "b4"])

    def test_ls_failed_peer_leaves_its_share(self) -> None:
        """
        A peer that fails after a page has its listing dropped, and what
        that page took of the budget goes back to the peers after it.
        """
        line_bytes = len(wire.FileEntry(1, self.ROOT_A, "a0").to_line())
        self.patch(session, "MAX_LISTED_BYTES_IN_ALL", 6 * line_bytes)
        d = self.run_cli("--relay", "127.0.0.1:9", "ls")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        protocol, transport = self.connect(1, b"P2P/2 peer")
        first = self.page_of(["a0", "a1"]).replace(b"OK 2", b"OK 2 next=2", 1)
        protocol.dataReceived(first)
        self.assertIn(b"cursor=2", transport.value())
        protocol.dataReceived(b"ERR 503 going away\n")
        # All 6 lines are B's: the 2 A's page took were not charged.
        self.answer_page(2, self.page_of([f"b{i}" for i in range(6)]))
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(len(self.console.out.splitlines()), 6)
        self.assertEqual(len(self.console.err_lines), 2, self.console.err_lines)
        self.assertIn("127.0.0.1:4001: cannot list files", self.console.err_lines[1])

    def test_ls_output_is_written_in_batches(self) -> None:
        """The lines go out a batch at a time, never as one whole text: its
        memory is bounded by the batch, not by the listing."""
        self.patch(cli, "LS_LINES_PER_WRITE", 2)
        writes = []
        stdout = self.console.stdout
        original = stdout.write

        def write(data: bytes) -> int:
            writes.append(bytes(data).count(b"\n"))
            return original(data)

        stdout.write = write
        d = self.run_cli("--relay", "127.0.0.1:9", "ls", "--json")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.list_one_page(1, ["a", "b", "c", "d", "e"])
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(writes, [2, 2, 1])
        self.assertEqual(
            [json.loads(line)["name"] for line in self.console.out.splitlines()],
            ["a", "b", "c", "d", "e"],
        )

    def ls_with_status(self, status: bytes) -> list[str]:
        """``p2p ls`` of one peer answering STATUS with C{status}: it
        exits 0 with both files listed; its stderr lines."""
        d = self.run_cli("--relay", "127.0.0.1:9", "ls")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_pages(status)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(len(self.console.out.decode().splitlines()), 2)
        return self.console.err_lines

    def test_peer_still_indexing(self) -> None:
        """A peer still indexing lists what it indexed so far; p2p says, in
        one line, that the listing is not all it will serve, and still
        exits 0 (the files listed are real)."""
        self.assertEqual(
            self.ls_with_status(b"OK indexed=2 pending=3 scanning=1 later=x")[1:],
            [
                "p2p: 127.0.0.1:4001: still indexing its share, not every file "
                "is listed yet (3 file(s) waiting to be hashed, still looking "
                "for files); run 'p2p ls' again later"
            ],
        )

    def test_peer_without_status(self) -> None:
        """A peer that predates STATUS (``ERR 501``) cannot say: its
        listing is shown as it is, with no line about it."""
        self.assertEqual(
            self.ls_with_status(b"ERR 501 unknown command"),
            ["p2p: 1 active peer(s) at 127.0.0.1:9"],
        )

    def test_long_prints_roots(self) -> None:
        d = self.run_cli("--relay", "127.0.0.1:9", "ls", "--long")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_pages()
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(
            self.console.out.decode().splitlines(),
            [
                f"{2048:>12} {self.ROOT_A} {'127.0.0.1:4001':<22} a dir/a.txt",
                f"{10:>12} {self.ROOT_B} {'127.0.0.1:4001':<22} b.txt",
            ],
        )

    def test_names_are_escaped(self) -> None:
        """
        A name with a bidirectional override or a zero-width space is
        printed with visible escapes (a backslash doubled), by ls and ls
        --long alike; sorting uses the names themselves.
        """
        names = ["invoice\u202efdp.exe", "pay\u200bpal", "back\\slash\tx"]
        for argv, root in ((["ls"], ""), (["ls", "--long"], f"{self.ROOT_A} ")):
            self.reactor = MemoryReactorClock()
            self.console = FakeConsole()
            d = self.run_cli("--relay", "127.0.0.1:9", *argv)
            self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
            protocol, _ = self.connect(1, b"P2P/2 peer")
            entries = [wire.FileEntry(1, self.ROOT_A, name) for name in names]
            protocol.dataReceived(
                b"OK 3\n" + b"".join(entry.to_line() + b"\n" for entry in entries)
            )
            protocol.dataReceived(COMPLETE_STATUS)
            self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
            address = f"{'127.0.0.1:4001':<22}"
            self.assertEqual(
                self.console.out.decode().splitlines(),
                [
                    f"{1:>12} {root}{address} back\\\\slash\\u0009x",
                    f"{1:>12} {root}{address} invoice\\u202efdp.exe",
                    f"{1:>12} {root}{address} pay\\u200bpal",
                ],
            )

    def test_older_peer_is_reported_and_skipped(self) -> None:
        """A P2P/1 peer cannot be listed: one line says why, the others
        are listed."""
        d = self.run_cli("--relay", "127.0.0.1:9", "ls")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        self.connect(1, b"P2P/1 peer")
        protocol, _ = self.connect(2, b"P2P/2 peer")
        protocol.dataReceived(
            b"OK 1\n" + wire.FileEntry(3, self.ROOT_A, "c.txt").to_line() + b"\n"
        )
        protocol.dataReceived(COMPLETE_STATUS)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(
            self.console.out.decode(), f"{3:>12} {'127.0.0.1:4002':<22} c.txt\n"
        )
        self.assertIn(
            "127.0.0.1:4001: cannot list files: protocol error: unsupported "
            "protocol version 'P2P/1'",
            self.console.stderr.getvalue(),
        )
        self.assert_no_timers()


class TokenOptionTests(SynchronousTestCase):
    """``--token`` (or $P2P_TOKEN) is sent with PEERS; a bad one is a usage
    error that does not repeat it."""

    def test_sent_with_peers(self) -> None:
        from p2p import cli

        options = cli.parse(["--relay", "127.0.0.1:9", "--token", "s3cret", "peers"])
        self.assertEqual(options["token"], "s3cret")

    def test_environment(self) -> None:
        from p2p import cli

        self.patch(os, "environ", {"P2P_TOKEN": "from-env"})
        options = cli.parse(["--relay", "127.0.0.1:9", "peers"])
        self.assertEqual(options["token"], "from-env")

    def test_malformed_not_repeated(self) -> None:
        from twisted.python import usage

        from p2p import cli

        with self.assertRaises(usage.UsageError) as caught:
            cli.parse(["--token", "bad token!", "peers"])
        self.assertNotIn("bad token!", str(caught.exception))


class TtyStringIO(io.StringIO):
    """stderr as a terminal."""

    def isatty(self) -> bool:
        return True


class PermutationTests(CommandTestCase):
    """Options anywhere among a command's operands, as GNU getopt takes
    them; ``--`` ends them; global options after the command too."""

    def test_options_after_names(self) -> None:
        options = cli.parse(["get", "a.txt", "-o", "out", "b.txt", "--sources=2"])
        sub = options.subOptions
        self.assertEqual(sub["names"], ["a.txt", "b.txt"])
        self.assertEqual(sub["output"], "out")
        self.assertEqual(sub["sources"], 2)

    def test_dash_output_is_stdout(self) -> None:
        """``-o -`` is stdout, as for curl and wget (not a file named
        ``-``); --json and --fsync cannot go with it."""
        for argv in (["get", "-o", "-", "a.txt"], ["get", "a.txt", "-o-"]):
            sub = cli.parse(argv).subOptions
            self.assertIsNone(sub["output"])
            self.assertEqual(sub["names"], ["a.txt"])
        for extra in ("--json", "--fsync"):
            self.assertRaises(
                usage.UsageError, cli.parse, ["get", "-o", "-", extra, "a.txt"]
            )

    def test_double_dash_ends_options(self) -> None:
        options = cli.parse(["get", "-o", "out", "--", "-weird-name", "--json"])
        self.assertEqual(options.subOptions["names"], ["-weird-name", "--json"])
        self.assertFalse(options.subOptions["json"])

    def test_global_options_after_the_command(self) -> None:
        options = cli.parse(
            ["get", "a.txt", "--relay", "10.1.2.3:4001", "-q", "--stagger", "0"]
        )
        self.assertEqual(options["relay"], ["10.1.2.3:4001"])
        self.assertTrue(options["quiet"])
        self.assertEqual(options["stagger"], 0)
        self.assertEqual(options.subOptions["names"], ["a.txt"])
        options = cli.parse(["ls", "--long", "-r", "4002"])
        self.assertEqual(options["relay"], ["4002"])
        self.assertTrue(options.subOptions["long"])

    def test_seed_form_with_options_after_names(self) -> None:
        options = cli.parse(["127.0.0.1", "8000", "a.txt", "-o", "out"])
        self.assertEqual(options["relay"], ["127.0.0.1:8000"])
        self.assertEqual(options.subOptions["names"], ["a.txt"])
        self.assertEqual(options.subOptions["output"], "out")

    def test_posixly_correct_stops_at_the_first_operand(self) -> None:
        self.patch(os, "environ", {**os.environ, "POSIXLY_CORRECT": "1"})
        options = cli.parse(["get", "a.txt", "-o", "out"])
        self.assertEqual(options.subOptions["names"], ["a.txt", "-o", "out"])
        self.assertIsNone(options.subOptions["output"])

    def test_saves_with_output_after_the_name(self) -> None:
        """``p2p get NAME -o PATH`` saves, as ``p2p get -o PATH NAME`` does."""
        target = self.mktemp()
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt", "-o", target)
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        self.assertEqual(serve(self.reactor, 2, GetTests.CONTENT), b"GET a.txt\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        with open(target, "rb") as stream:
            self.assertEqual(stream.read(), GetTests.CONTENT)
        self.assertEqual(self.console.out, b"")

    def test_unknown_option_after_a_name(self) -> None:
        code = self.successResultOf(self.run_cli("get", "a.txt", "--frob"))
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assert_one_error_line("frob")
        self.assertEqual(self.reactor.tcpClients, [])


class EverydayUsageTests(CommandTestCase):
    """Usage errors found before any connection: exit 2, one line."""

    def test_usage_errors(self) -> None:
        folder = self.mktemp()
        os.mkdir(folder)
        for argv in (
            ["get", ""],
            ["get", "a.txt", ""],
            ["get", "a\x01b"],
            ["get", "--fsync", "a.txt"],
            ["get", "--json", "a.txt"],
            ["get", "--progress", "--no-progress", "a.txt"],
            # -o DIR with several names: each must be a relative path, and
            # no two may meet.
            ["get", "-o", folder, "a.txt", "/etc/passwd"],
            ["get", "-o", folder, "a.txt", "../b.txt"],
            ["get", "-o", folder, "a.txt", "x/./b.txt"],
            ["get", "-o", folder, "a.txt", "x//b.txt"],
            ["get", "-o", folder, "x/a.txt", "x/a.txt"],
            ["get", "-o", folder, "x", "x/a.txt"],
            ["get", "-o", folder, "x/a.txt", "x"],
            ["get", "-o", folder, "a.txt", "b" * 256 + "/c"],
            ["get", "-o", folder, ".."],
        ):
            self.console = FakeConsole()
            code = self.successResultOf(self.run_cli("--relay", "127.0.0.1:9", *argv))
            self.assertEqual(code, cli.EXIT_USAGE, argv)
            self.assert_one_error_line()
            self.assertEqual(self.console.out, b"")
            self.assertEqual(self.reactor.tcpClients, [], argv)
        self.assertEqual(os.listdir(folder), [])

    def test_names_escaped_once(self) -> None:
        """A name with a control is shown as shown() writes it, between
        quotes, not escaped again by repr (``'q\\\\u001bq'``)."""
        self.successResultOf(self.run_cli("get", "q\x1bq"))
        self.assert_one_error_line("'q\\u001bq': ")
        self.assertNotIn("\\\\", self.console.err_lines[0])
        folder = self.mktemp()
        os.mkdir(folder)
        self.console = FakeConsole()
        self.successResultOf(self.run_cli("get", "-o", folder, "a", "a\u202e/.."))
        self.assert_one_error_line("'a\\u202e/..'", "cannot be written")

    def test_collision_names_both(self) -> None:
        folder = self.mktemp()
        os.mkdir(folder)
        self.successResultOf(self.run_cli("get", "-o", folder, "x/a", "y", "x/a"))
        self.assert_one_error_line("'x/a'", "given twice")

    def test_version_everywhere(self) -> None:
        for argv in (["--version"], ["get", "--version"], ["ls", "a", "--version"]):
            output = io.StringIO()
            self.patch(sys, "stdout", output)
            failure = self.failureResultOf(self.run_cli(*argv), SystemExit)
            self.assertEqual(failure.value.code, 0)
            self.assertEqual(output.getvalue(), f"p2p {cli.__version__}\n", argv)


class KeepPathsTests(CommandTestCase):
    """``-o DIR`` with several names writes DIR/NAME for each, keeping the
    names' folders (``wget -x``)."""

    A = b"the a file\n" * 20
    B = b"the other b file\n" * 20

    def test_relative_paths_kept(self) -> None:
        folder = self.mktemp()
        os.mkdir(folder)
        d = self.run_cli(
            "-q", "--relay", "127.0.0.1:9", "get", "-o", folder, "a/x", "b/x"
        )
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(serve(self.reactor, 1, self.A), b"GET a/x\n")
        self.assertEqual(serve(self.reactor, 2, self.B), b"GET b/x\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        with open(os.path.join(folder, "a", "x"), "rb") as stream:
            self.assertEqual(stream.read(), self.A)
        with open(os.path.join(folder, "b", "x"), "rb") as stream:
            self.assertEqual(stream.read(), self.B)
        self.assertEqual(sorted(os.listdir(folder)), ["a", "b"])

    def test_each_folder_checked_once(self) -> None:
        """Whether a partial file can be made in a folder is asked of the
        file system once per folder and run, not once per name."""
        folder = self.mktemp()
        os.mkdir(folder)
        asked: list[str] = []
        access = os.access

        def counted(path, mode, **kwargs):
            asked.append(path)
            return access(path, mode, **kwargs)

        self.patch(os, "access", counted)
        d = self.run_cli(
            "-q", "--relay", "127.0.0.1:9", "get", "-j", "1", "-o", folder,
            "x", "y", "a/z",
        )  # fmt: skip
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        for index, data in enumerate((self.A, self.B, self.A), start=1):
            serve(self.reactor, index, data)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(asked, [folder, os.path.join(folder, "a")])
        with open(os.path.join(folder, "y"), "rb") as stream:
            self.assertEqual(stream.read(), self.B)

    def test_folder_made_for_a_name_not_found_is_removed(self) -> None:
        folder = self.mktemp()
        os.mkdir(folder)
        d = self.run_cli(
            "-q", "--relay", "127.0.0.1:9", "get", "-o", folder, "a/x", "b"
        )
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        refuse_file(self.reactor, 1)
        serve(self.reactor, 2, self.B)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assertEqual(os.listdir(folder), ["b"])

    def test_missing_folder_named_as_missing(self) -> None:
        """-o into a folder that does not exist says so (not "not a
        folder"), with no request made."""
        missing = os.path.join(self.mktemp(), "sub")
        for target in (missing + os.sep, os.path.join(missing, "x")):
            self.console = FakeConsole()
            code = self.successResultOf(
                self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "-o", target, "t")
            )
            self.assertEqual(code, cli.EXIT_OUTPUT)
            self.assert_one_error_line(
                f"cannot write {target}: {missing}: no such folder"
            )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_symbolic_link_on_the_way_refused(self) -> None:
        folder = self.mktemp()
        os.mkdir(folder)
        os.symlink("/tmp", os.path.join(folder, "a"))
        code = self.successResultOf(self.run_cli("get", "-o", folder, "a/x", "b"))
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assert_one_error_line("not a folder")
        self.assertEqual(self.reactor.tcpClients, [])


class OneListingTests(CommandTestCase):
    """However many names, the relay is asked once: with several names the
    listing carries the peers' name filters (``PEERS files=1``) and names
    are matched here; one name costs one hint request."""

    def test_one_name_asks_a_hint(self) -> None:
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt")
        self.assertEqual(self.answer_peers(0, (PEER_A, "127.0.0.1", 4001)), b"PEERS\n")
        hint = self.answer_peers(1)
        self.assertEqual(
            hint, wire.Peers(hint=hints.name_hint("a.txt")).to_line() + b"\n"
        )
        serve(self.reactor, 2, GetTests.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)

    def test_one_name_asks_both_at_once(self) -> None:
        """The list and the name's hint are asked at once, not one after
        the other (a round trip sooner); the hint may answer first."""
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertTrue(self.answer_peers(1).startswith(b"PEERS hint="))
        self.assertNoResult(d)
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        serve(self.reactor, 2, GetTests.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assert_no_timers()

    def test_early_hint_stopped_when_the_list_fails(self) -> None:
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt")
        self.refuse(0)
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assert_no_timers()
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_early_hint_stopped_without_peers(self) -> None:
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt")
        self.answer_peers(0)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assert_no_timers()

    def test_several_names(self) -> None:
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt", "b.txt")
        listing = self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(listing, b"PEERS files=1\n")
        serve(self.reactor, 1, GetTests.CONTENT)
        serve(self.reactor, 2, GetTests.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, GetTests.CONTENT * 2)
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_filters_choose_the_first_peer(self) -> None:
        """Each name goes first to the peer whose filter holds it."""
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt", "b.txt")
        self.answer_peers(
            0,
            (PEER_A, "127.0.0.1", 4001, ["a.txt"]),
            (PEER_B, "127.0.0.1", 4002, ["b.txt"]),
        )
        serve(self.reactor, 1, GetTests.CONTENT)
        serve(self.reactor, 2, GetTests.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        ports = [client[1] for client in self.reactor.tcpClients[1:]]
        self.assertEqual(ports, [4001, 4002])

    def test_relay_without_filters(self) -> None:
        """A relay from before filters answers 400: listed again without,
        and each name asks its hint."""
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt", "b.txt")
        protocol, transport = self.connect(0, b"P2P/1 relay")
        self.assertEqual(transport.value(), b"PEERS files=1\n")
        protocol.dataReceived(b"ERR 400 unknown option 'files'\n")
        self.assertEqual(self.answer_peers(1, (PEER_A, "127.0.0.1", 4001)), b"PEERS\n")
        self.assertTrue(self.answer_peers(2).startswith(b"PEERS hint="))
        serve(self.reactor, 3, GetTests.CONTENT)
        self.assertTrue(self.answer_peers(4).startswith(b"PEERS hint="))
        serve(self.reactor, 5, GetTests.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)

    def test_old_listing_asked_again(self) -> None:
        """A listing older than a lease is not trusted: asked again."""
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt", "b.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        protocol, _ = self.connect(1, b"P2P/2 peer")
        # A peer indexing the file (showing progress) for a minute.
        for step in range(1, 8):
            self.reactor.advance(9.5)
            progress = wire.Indexing(step * MIB, 10 * MIB)
            protocol.dataReceived(progress.to_line() + b"\n")
        self.assertGreater(self.reactor.seconds(), session.LISTING_MAX_AGE_SECONDS)
        protocol.dataReceived(peer_reply(GetTests.CONTENT))
        listing = self.answer_peers(2, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(listing, b"PEERS files=1\n")
        serve(self.reactor, 3, GetTests.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)


class JobsTests(CommandTestCase):
    """``p2p get -o DIR`` with several names fetches up to --jobs at once."""

    CONTENT = b"some content\n"

    def run_jobs(self, *argv: str, names=("a", "b", "c")):
        self.folder = self.mktemp()
        os.mkdir(self.folder)
        runners: list[cli.Runner] = []
        d = cli.run(
            self.reactor,
            ["-q", "--relay", "127.0.0.1:9", "get", "-o", self.folder, *argv, *names],
            self.console,
            runners.append,
        )
        self.runner = runners[0]
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        return d

    def test_at_most_jobs_at_once(self) -> None:
        d = self.run_jobs("-j", "2")
        self.assertEqual(len(self.reactor.tcpClients), 3, "the relay, then a and b")
        self.assertEqual(serve(self.reactor, 2, self.CONTENT), b"GET b\n")
        self.assertEqual(len(self.reactor.tcpClients), 4, "c starts as b ends")
        self.assertEqual(serve(self.reactor, 3, self.CONTENT), b"GET c\n")
        self.assertEqual(serve(self.reactor, 1, self.CONTENT), b"GET a\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(sorted(os.listdir(self.folder)), ["a", "b", "c"])

    def test_default(self) -> None:
        names = [f"n{number}" for number in range(cli.DEFAULT_JOBS + 1)]
        self.run_jobs(names=names)
        self.assertEqual(len(self.reactor.tcpClients), 1 + cli.DEFAULT_JOBS)

    def test_bounds(self) -> None:
        for jobs in ("0", str(cli.MAX_JOBS + 1)):
            d = self.run_cli("get", "-j", jobs, "-o", "x", "a", "b")
            self.assertEqual(self.successResultOf(d), cli.EXIT_USAGE)
            self.assertIn("--jobs must be between 1 and", self.console.err_lines[-1])

    def test_stdout_one_at_a_time(self) -> None:
        """To stdout, contents come one after the other, whatever --jobs."""
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "-j", "4", "a", "b")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(len(self.reactor.tcpClients), 2)
        serve(self.reactor, 1, b"first\n")
        serve(self.reactor, 2, b"second\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, b"first\nsecond\n")

    def test_interrupted_says_what_each_leaves(self) -> None:
        """Ctrl-C with several fetches running: a line for each."""
        self.run_jobs("-j", "2")
        self.runner.interrupted()
        lines = self.console.err_lines
        self.assertEqual(
            lines,
            [
                "p2p: a: interrupted; nothing was kept",
                "p2p: b: interrupted; nothing was kept",
            ],
        )
        self.assertEqual(os.listdir(self.folder), [])

    def test_interrupted_with_json(self) -> None:
        """
        Ctrl-C with --json: every name started gets its object, in order,
        the interrupted ones with status ``interrupted``; one that ends
        afterwards (as a stopped fetch does) adds nothing, and the names
        not started get none.
        """
        d = self.run_jobs("-j", "2", "--json", names=("a", "b", "c", "d"))
        serve(self.reactor, 2, self.CONTENT)  # b, done, waits for a's object
        self.assertEqual(self.console.out, b"")
        self.runner.interrupted()
        objects = [json.loads(line) for line in self.console.out.splitlines()]
        self.assertEqual(
            [(o["name"], o["status"]) for o in objects],
            [("a", "interrupted"), ("b", "ok"), ("c", "interrupted")],
        )
        self.assertEqual(objects[0]["output"], os.path.join(self.folder, "a"))
        self.assertEqual(
            (objects[0]["kept"], objects[0]["error"]), (None, "interrupted")
        )
        refuse_file(self.reactor, 1)  # a ends, stopped: not found
        refuse_file(self.reactor, 3)
        self.assertEqual(len(self.console.out.splitlines()), 3)
        self.assertEqual(
            self.console.err_lines[-1], "p2p: c: interrupted; nothing was kept"
        )
        self.successResultOf(d)

    def test_connections_kept_but_not_after_an_error(self) -> None:
        """A connection that carried a file, or an ERR 404, is kept for the
        next name (p2p.pool counts the 404s against the peer's error
        budget); one that carried another ERR is closed."""
        d = self.run_jobs("-j", "1", names=("a", "b", "c", "d"))
        protocol, transport = self.connect(1, b"P2P/2 peer")
        protocol.dataReceived(peer_reply(self.CONTENT))
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2, "b asked on it")
        self.assertEqual(transport.value(), b"GET a\nGET b\n")
        protocol.dataReceived(b"ERR 404 no such file\n")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2, "c asked on it")
        self.assertEqual(transport.value(), b"GET a\nGET b\nGET c\n")
        protocol.dataReceived(b"ERR 503 busy\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(serve(self.reactor, 2, self.CONTENT), b"GET d\n")
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)

    def test_relay_line_once(self) -> None:
        """One listing for every name: said once, not once per name."""
        folder = self.mktemp()
        os.mkdir(folder)
        d = self.run_cli("--relay", "127.0.0.1:9", "get", "-o", folder, "a", "b")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        serve(self.reactor, 1, self.CONTENT)
        serve(self.reactor, 2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        relay_lines = [line for line in self.console.err_lines if ": relay " in line]
        self.assertEqual(
            relay_lines, ["p2p: relay 127.0.0.1:9: 1 active peer(s), 0 suggested for a"]
        )

    def test_relay_failure_stops_the_rest(self) -> None:
        """The names not started yet are not tried once the relay failed."""
        folder = self.mktemp()
        os.mkdir(folder)
        d = self.run_cli(
            "-q", "--relay", "127.0.0.1:9", "get", "-j", "2", "-o", folder,
            "a", "b", "c",
        )  # fmt: skip
        self.refuse(0)
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assertEqual(len(self.reactor.tcpClients), 1, "the relay was asked once")
        self.assert_one_error_line("relay 127.0.0.1:9")


class InteractiveTests(CommandTestCase):
    """``p2p HOST PORT``: the relay is asked before the first prompt."""

    def setUp(self) -> None:
        super().setUp()
        lines: list[str] = []
        self.read = lines

        def synchronous(reactor, work):
            lines.append("read")
            return succeed(work())

        self.patch(cli, "in_daemon_thread", synchronous)

    def test_relay_down_fails_at_once(self) -> None:
        self.console = FakeConsole("sample1.txt\n")
        d = self.run_cli("127.0.0.1", "9")
        self.refuse(0)
        self.assertEqual(self.successResultOf(d), cli.EXIT_RELAY)
        self.assert_one_error_line("relay 127.0.0.1:9", "cannot connect")
        self.assertEqual(self.read, [], "no name was asked for")

    def test_says_which_relay_and_how_many_peers(self) -> None:
        self.console = FakeConsole("a.txt\n")
        d = self.run_cli("127.0.0.1", "9")
        self.assertNoResult(d)
        self.assertEqual(self.read, [])
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        self.assertEqual(
            self.console.err_lines, ["p2p: relay 127.0.0.1:9: 2 active peer(s)"]
        )
        # The name typed is fetched with that listing: a hint request next.
        self.assertTrue(self.answer_peers(1).startswith(b"PEERS hint="))
        serve(self.reactor, 2, GetTests.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, GetTests.CONTENT)

    def test_end_of_input_ends_the_prompt_line(self) -> None:
        """Ctrl-D at the prompt (a terminal echoes no newline): the prompt's
        line is ended, so the shell's prompt starts on a line of its own;
        an answered prompt gets no extra newline."""
        self.console = FakeConsole("")
        self.console.stdin = TtyStringIO("")
        d = self.run_cli("127.0.0.1", "9")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertTrue(
            self.console.stderr.getvalue().endswith(cli.PROMPT + "\n"),
            self.console.stderr.getvalue(),
        )

    def test_interrupted_at_the_prompt(self) -> None:
        """Ctrl-C while the prompt waits (the runner hears of the shutdown):
        the prompt's line is ended once."""
        self.patch(cli, "in_daemon_thread", lambda reactor, work: Deferred())
        self.console = FakeConsole()
        self.console.stdin = TtyStringIO()
        runners: list = []
        cli.run(self.reactor, ["127.0.0.1", "9"], self.console, runners.append)
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.assertTrue(self.console.stderr.getvalue().endswith(cli.PROMPT))
        [runner] = runners
        runner.interrupted()
        runner.interrupted()
        self.assertTrue(self.console.stderr.getvalue().endswith(cli.PROMPT + "\n"))

    def test_answered_prompt_not_ended_again(self) -> None:
        """A prompt whose line was typed (the terminal echoed the newline)
        gets no newline of ours."""
        console = FakeConsole()
        console.stdin = TtyStringIO()
        console.prompt()
        console.leave_prompt(answered=True)
        console.leave_prompt()
        self.assertEqual(console.stderr.getvalue(), cli.PROMPT)


class ProgressTests(CommandTestCase):
    """A progress bar on stderr when it is a terminal (or --progress)."""

    CONTENT = os.urandom(2 * pieces.PIECE_SIZE + 333)

    def setUp(self) -> None:
        super().setUp()
        # In memory a fetch takes no time: show the bar at once.
        self.patch(progress, "SHOW_AFTER_SECONDS", 0)

    def fetch(self, *argv: str, tty: bool) -> str:
        self.console = FakeConsole()
        if tty:
            self.console.stderr = TtyStringIO()
        self.reactor = MemoryReactorClock()
        d = self.run_cli("--relay", "127.0.0.1:9", "get", *argv, "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        serve(self.reactor, 2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.out, self.CONTENT)
        errors = self.console.stderr.getvalue()
        # The human lines stay, whole, whatever the bar does.
        self.assertIn("\np2p: a.txt: found at 127.0.0.1:4001", "\n" + errors)
        self.assertRegex(
            errors, rf"(^|\n|\r)p2p: a\.txt: {len(self.CONTENT)} bytes in .*\n$"
        )
        return errors

    def test_bar_on_a_terminal(self) -> None:
        errors = self.fetch(tty=True)
        self.assertIn("\r", errors)
        self.assertIn("a.txt", errors.split("p2p: a.txt: found")[1])
        self.assertIn("from 127.0.0.1:4001", errors)
        self.assertIn("/2.00M", errors)

    def test_none_for_a_quick_file(self) -> None:
        """A file that takes less than SHOW_AFTER_SECONDS gets no bar."""
        self.patch(progress, "SHOW_AFTER_SECONDS", 60)
        self.assertNotIn("\r", self.fetch(tty=True))

    def test_none_without_a_terminal(self) -> None:
        self.assertNotIn("\r", self.fetch(tty=False))

    def test_forced(self) -> None:
        self.assertIn("\r", self.fetch("--progress", tty=False))
        self.assertNotIn("\r", self.fetch("--no-progress", tty=True))

    def test_quiet_terminal(self) -> None:
        self.console = FakeConsole()
        self.console.stderr = TtyStringIO()
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "a.txt")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        self.answer_peers(1)
        serve(self.reactor, 2, self.CONTENT)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(self.console.stderr.getvalue(), "")


class JsonTests(CommandTestCase):
    """``--json``: one object per line on stdout, exact names."""

    NAME = "invoice\u202efdp.exe"

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.console.out.splitlines()]

    def test_peers(self) -> None:
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "peers", "--json")
        protocol, _ = self.connect(0, b"P2P/1 relay")
        protocol.dataReceived(
            f"OK 2\nPEER {PEER_A} 127.0.0.1 4001 age=7 name=p1\n"
            f"PEER {PEER_B} ::1 4002 age=0\n".encode()
        )
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertEqual(
            self.lines(),
            [
                {
                    "id": PEER_A,
                    "host": "127.0.0.1",
                    "port": 4001,
                    "age": 7,
                    "name": "p1",
                },
                {"id": PEER_B, "host": "::1", "port": 4002, "age": 0, "name": None},
            ],
        )

    def test_ls_carries_exact_names(self) -> None:
        d = self.run_cli("--relay", "127.0.0.1:9", "ls", "--json")
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001))
        protocol, _ = self.connect(1, b"P2P/2 peer")
        entry = wire.FileEntry(5, "a" * 64, self.NAME)
        protocol.dataReceived(b"OK 1\n" + entry.to_line() + b"\n")
        protocol.dataReceived(COMPLETE_STATUS)
        self.assertEqual(self.successResultOf(d), cli.EXIT_OK)
        self.assertTrue(self.console.out.isascii())
        self.assertEqual(
            self.lines(),
            [
                {
                    "peer": "127.0.0.1:4001",
                    "peer_id": PEER_A,
                    "name": self.NAME,
                    "size": 5,
                    "root": "a" * 64,
                }
            ],
        )

    def test_get(self) -> None:
        folder = self.mktemp()
        os.mkdir(folder)
        content = GetTests.CONTENT
        d = self.run_cli(
            "-q", "--relay", "127.0.0.1:9", "get", "--json", "-o", folder,
            self.NAME, "gone.txt",
        )  # fmt: skip
        self.answer_peers(0, (PEER_A, "127.0.0.1", 4001), (PEER_B, "127.0.0.1", 4002))
        # Both names at once (--jobs): each asks A first.
        self.assertEqual(self.reactor.tcpClients[1][1], 4001)
        self.assertEqual(self.reactor.tcpClients[2][1], 4001)
        self.refuse(1)
        refuse_file(self.reactor, 2)
        # gone.txt ends first: its JSON object still comes second.
        refuse_file(self.reactor, 4)
        self.assertEqual(self.console.out, b"")
        serve(self.reactor, 3, content)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        found, missing = self.lines()
        self.assertEqual(
            {k: v for k, v in found.items() if k not in ("seconds", "peers")},
            {
                "name": self.NAME,
                "status": "ok",
                "size": len(content),
                "root": root_of(content),
                "verified_against": "holder",
                "output": os.path.join(folder, self.NAME),
                "sources": [],
                "error": None,
                "kept": None,
                "resumed": 0,
            },
        )
        self.assertEqual(
            [(p["stage"], p["peer"], p["ok"], p["kind"]) for p in found["peers"]],
            [
                ("fetch", "127.0.0.1:4001", False, "unreachable"),
                ("fetch", "127.0.0.1:4002", True, None),
            ],
        )
        self.assertEqual(missing["status"], "not-found")
        self.assertEqual(missing["error"], "not found on any of 2 active peer(s)")
        self.assertEqual(
            [(p["kind"], p["reason"]) for p in missing["peers"]],
            [("refused", "refused: ERR 404 no such file")] * 2,
        )
