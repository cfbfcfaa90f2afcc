"""
Real relay, peer and client processes for the integration tests.

The daemons run as ``twist relay`` / ``twist peer`` (``python -m twisted``:
no pidfile) on ephemeral loopback ports.  Tests wait for *events*: a
L{LoggedProcess} fires a Deferred when its child prints the awaited log line,
such as ``relay listening on HOST:PORT`` or ``registered at the relay as
ID``.  Every wait is bounded by a timeout.  Not a test module: trial skips it.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

# Generous: a loaded CI machine may take a few seconds to start Python.
EVENT_TIMEOUT_SECONDS = 20
CLIENT_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 10
LOOPBACK = "tcp:0:interface=127.0.0.1"
LOOPBACK6 = r"tcp6:0:interface=\:\:1"

LISTENING = r"(?P<role>relay|peer) listening on (?P<address>\S+)"
REGISTERED = r"registered at the relay as (?P<peer_id>[0-9a-f]{16})"


class ProcessFailed(Exception):
    """A child exited, or stayed silent, before printing what was awaited."""


class LoggedProcess(ProcessProtocol):
    """
    Collects a child's output lines; L{wait_for} fires on a matching line.

    stdout and stderr are both read (twist logs to stdout, usage errors go
    to stderr) and kept apart for the client's sake.
    """

    def __init__(self, label: str, clock) -> None:
        self.label = label
        self.clock = clock
        self.lines: list[str] = []
        self.stdout = b""
        self.stderr = b""
        self._partial = {1: b"", 2: b""}
        self._waiters: list[tuple[re.Pattern, int, Deferred]] = []
        self.ended: Deferred[int | None] = Deferred()
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.running = True

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.stdout += data
        else:
            self.stderr += data
        *complete, self._partial[fd] = (self._partial[fd] + data).split(b"\n")
        for raw in complete:
            self.lines.append(raw.decode("utf-8", "replace"))
            self._check(len(self.lines) - 1)

    def _check(self, index: int) -> None:
        for waiter in list(self._waiters):
            pattern, since, d = waiter
            if index >= since:
                match = pattern.search(self.lines[index])
                if match:
                    self._waiters.remove(waiter)
                    d.callback(match)

    def mark(self) -> int:
        """A position in the output: L{wait_for} can ignore what came before."""
        return len(self.lines)

    def wait_for(
        self, pattern: str, since: int = 0, timeout: float = EVENT_TIMEOUT_SECONDS
    ) -> Deferred[re.Match]:
        """
        Fire with the match of the first line at or after C{since} that
        matches C{pattern}; fail with L{ProcessFailed} if the child exits
        first or nothing matches within C{timeout} seconds.
        """
        regex = re.compile(pattern)
        for line in self.lines[since:]:
            match = regex.search(line)
            if match:
                return succeed(match)
        if not self.running:
            return self._failed(f"exited before printing {pattern!r}")
        waiter: tuple[re.Pattern, int, Deferred] = (
            regex,
            since,
            Deferred(lambda d: self._waiters.remove(waiter)),
        )
        self._waiters.append(waiter)

        def timed_out(result: object, seconds: float) -> Deferred:
            return self._failed(f"printed no {pattern!r} within {seconds}s")

        return waiter[2].addTimeout(timeout, self.clock, timed_out)

    def _failed(self, why: str) -> Deferred:
        tail = "\n".join(self.lines[-25:])
        d: Deferred = Deferred()
        d.errback(ProcessFailed(f"{self.label} {why}; its output:\n{tail}"))
        return d

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        for fd, rest in self._partial.items():
            if rest:
                self.childDataReceived(fd, b"\n")
        if reason.check(ProcessDone, ProcessTerminated):
            self.exit_code = reason.value.exitCode
            self.signal = reason.value.signal
        waiters, self._waiters = self._waiters, []
        for _, _, d in waiters:
            self._failed("exited").chainDeferred(d)
        self.ended.callback(self.exit_code)

    def kill(self, signal_name: str = "KILL") -> Deferred[int | None]:
        """Send a signal; the Deferred fires once the child is gone."""
        if self.running:
            self.transport.signalProcess(signal_name)
        return self.when_ended()

    def when_ended(self, timeout: float = STOP_TIMEOUT_SECONDS) -> Deferred:
        """Fire with the exit status (None after a signal) once the child ended."""
        d: Deferred = Deferred()

        def ended(code: int | None) -> int | None:
            if not d.called:  # not timed out already
                d.callback(code)
            return code

        self.ended.addCallback(ended)
        return d.addTimeout(timeout, self.clock)


@dataclass
class Daemon:
    """A running relay or peer."""

    process: LoggedProcess
    addresses: list[str]
    peer_id: str | None = None
    share: str | None = None
    files: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@dataclass
class ClientResult:
    """How a ``p2p`` run ended and what it printed."""

    code: int | None
    stdout: bytes
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


def sample(name: str) -> bytes:
    """The content of one of the shipped sample files."""
    return (resources.files("p2p") / "samples" / name).read_bytes()


def _bin(name: str) -> str:
    """A console script of the environment running the tests."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name!r} is not installed next to {sys.executable}")
    return path


def _child_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "P2P_RELAY"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Launcher:
    """Starts relays, peers and clients under C{workdir}; stops them all."""

    def __init__(self, reactor, workdir: str) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.processes: list[LoggedProcess] = []
        self._count = 0

    def spawn(self, label: str, argv: Sequence[str]) -> LoggedProcess:
        protocol = LoggedProcess(label, self.reactor)
        self.reactor.spawnProcess(
            protocol,
            argv[0],
            list(argv),
            env=_child_environment(),
            path=self.workdir,
        )
        self.processes.append(protocol)
        return protocol

    def twist(self, label: str, *args: str) -> LoggedProcess:
        # twist, not twistd: no pidfile; text logs even when stdout is a pipe.
        # The working directory is a temporary one, so the plugin must come
        # from the installed package, not from "-m" putting the checkout on
        # sys.path.
        argv = [sys.executable, "-m", "twisted", "--log-format=text", *args]
        return self.spawn(label, argv)

    async def relay(self, *listen: str, ttl: int = 30) -> Daemon:
        """A relay on each C{listen} endpoint (default: 127.0.0.1, ephemeral)."""
        listen = listen or (LOOPBACK,)
        args = ["relay", "--ttl", str(ttl)]
        for description in listen:
            args += ["--listen", description]
        process = self.twist("relay", *args)
        addresses = []
        since = 0
        for _ in listen:
            match = await process.wait_for(LISTENING, since)
            addresses.append(match.group("address"))
            # The next listener's line comes after this one.
            since = process.lines.index(match.string, since) + 1
        return Daemon(process, addresses)

    async def peer(
        self,
        relay: str,
        files: Sequence[str] = (),
        name: str | None = None,
        listen: str = LOOPBACK,
    ) -> Daemon:
        """A peer sharing copies of the sample C{files}, registered at C{relay}."""
        self._count += 1
        name = name or f"peer{self._count}"
        share = os.path.join(self.workdir, name)
        os.mkdir(share)
        for filename in files:
            with open(os.path.join(share, filename), "wb") as stream:
                stream.write(sample(filename))
        process = self.twist(
            name,
            "peer",
            "--relay",
            relay,
            "--share",
            share,
            "--listen",
            listen,
            "--name",
            name,
        )
        listening = await process.wait_for(LISTENING)
        registered = await process.wait_for(REGISTERED)
        return Daemon(
            process,
            [listening.group("address")],
            peer_id=registered.group("peer_id"),
            share=share,
            files=list(files),
        )

    async def client(self, *args: str) -> ClientResult:
        """Run the installed ``p2p`` console script to completion."""
        process = self.spawn("p2p", [_bin("p2p"), *args])
        code = await process.when_ended(CLIENT_TIMEOUT_SECONDS)
        return ClientResult(code, process.stdout, process.stderr.decode())

    async def stop_all(self) -> None:
        """SIGKILL whatever still runs and wait until it is gone."""
        running = [p for p in self.processes if p.running]
        await gatherResults([p.kill("KILL") for p in running], consumeErrors=True)


def have_ipv6_loopback() -> bool:
    """Whether this machine can listen on ::1."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
