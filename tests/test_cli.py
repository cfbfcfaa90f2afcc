"""
Tests for the ``p2p`` command, in memory: a fake console and a
MemoryReactorClock whose connections the tests answer by hand.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import sys

from twisted.internet.address import IPv4Address
from twisted.internet.error import DNSLookupError, getConnectError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2p import cli
from p2p.request import DEFAULT_REQUEST_TIMEOUT_SECONDS

from ._support import set_relay_environment

# What a real refused connect() reports: an errno and its name.
REFUSED = (errno.ECONNREFUSED, "ECONNREFUSED")
PEER_A = "aaaaaaaaaaaaaaaa"
PEER_B = "bbbbbbbbbbbbbbbb"


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


def answer_peers(
    reactor: MemoryReactorClock, index: int, *entries: tuple[str, str, int]
) -> bytes:
    """Play the relay: answer PEERS with C{entries} (id, host, port)."""
    protocol, transport = connect(reactor, index, b"P2P/1 relay")
    request = transport.value()
    reply = [f"OK {len(entries)}"]
    reply += [f"PEER {i} {h} {p} age=0" for i, h, p in entries]
    protocol.dataReceived("".join(line + "\n" for line in reply).encode())
    return request


def serve(reactor: MemoryReactorClock, index: int, content: bytes) -> bytes:
    """Play a peer that has the file; return the request it got."""
    protocol, transport = connect(reactor, index, b"P2P/1 peer")
    request = transport.value()
    digest = hashlib.sha256(content).hexdigest()
    size = len(content)
    header = f"OK {size} sha256={digest} offset=0 size={size}\n"
    protocol.dataReceived(header.encode() + content)
    return request


class CommandTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        set_relay_environment(self, None)
        self.reactor = MemoryReactorClock()
        self.console = FakeConsole()

    def run_cli(self, *argv: str):
        return cli.run(self.reactor, list(argv), self.console)

    def connect(self, index: int, banner: bytes):
        return connect(self.reactor, index, banner)

    def refuse(self, index: int, reason: Exception | None = None) -> None:
        refuse(self.reactor, index, reason)

    def answer_peers(self, index: int, *entries: tuple[str, str, int]) -> bytes:
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


class UsageTests(CommandTestCase):
    """Usage errors: status 2, one line on stderr, nothing else happens."""

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
        ):
            self.console = FakeConsole()
            code = self.successResultOf(self.run_cli(*argv))
            self.assertEqual(code, cli.EXIT_USAGE, argv)
            self.assert_one_error_line()
            self.assertEqual(self.console.out, b"")
            self.assertEqual(self.reactor.tcpClients, [], argv)
            self.assert_no_timers()

    def test_message_names_the_problem(self) -> None:
        self.successResultOf(self.run_cli("frob"))
        self.assert_one_error_line("frob", "p2p --help")

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
        protocol, _ = self.connect(2, b"P2P/1 peer")
        protocol.dataReceived(b"ERR 404 no such file\n")
        self.refuse(3)
        self.assertEqual(self.successResultOf(d), cli.EXIT_NOT_FOUND)
        self.assert_one_error_line("a.txt", "not found on any of 2")
        self.assertFalse(os.path.exists("x"))
        self.assert_no_timers()

    def test_output_not_writable(self) -> None:
        folder = self.mktemp()
        os.mkdir(folder)
        target = os.path.join(folder, "sub", "a.txt")
        d = self.run_cli("-q", "--relay", "127.0.0.1:9", "get", "-o", target, "a.txt")
        self.assertEqual(self.successResultOf(d), cli.EXIT_OUTPUT)
        self.assert_one_error_line("cannot write")
        self.assertEqual(self.reactor.tcpClients, [], "checked before any request")

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
