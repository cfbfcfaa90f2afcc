"""
Real relay, peer and client processes for the integration tests.

The daemons run as ``twist relay`` / ``twist peer`` (``python -m twisted``:
no pidfile) on ephemeral loopback ports.  Tests wait for *events*: a
L{LoggedProcess} fires a Deferred when its child prints the awaited log line,
such as ``relay listening on HOST:PORT`` or ``registered at the relay as
ID``.  Every wait is bounded by a timeout.  Not a test module: trial skips it.

For fault tests: L{RawConnection} speaks the line protocols by hand,
L{Blackhole} is a port that drops SYNs, and L{when_created} fires when a file
appears (a client's spool file, say).
"""

from __future__ import annotations

import errno
import os
import re
import select
import shutil
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols.basic import LineOnlyReceiver
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

    def __init__(self, label: str, clock, stdout_lines: bool = True) -> None:
        self.label = label
        self.clock = clock
        # A client's stdout carries file content, not lines: with
        # stdout_lines=False it is only collected, and lines are stderr's.
        self.stdout_lines = stdout_lines
        self.lines: list[str] = []
        # When each line arrived, on the reactor clock (parallel to lines).
        self.times: list[float] = []
        # bytearrays: appending is amortised O(1), even for a large file.
        self._output = {1: bytearray(), 2: bytearray()}
        self._partial = {1: b"", 2: b""}
        self._waiters: list[tuple[re.Pattern, int, Deferred]] = []
        self._stdout_waiters: list[tuple[int, Deferred[None]]] = []
        self.ended: Deferred[int | None] = Deferred()
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.running = True
        self.started_at = clock.seconds()
        self.ended_at: float | None = None

    @property
    def stdout(self) -> bytes:
        return bytes(self._output[1])

    @property
    def stderr(self) -> bytes:
        return bytes(self._output[2])

    # Whether the child's stdin stays open (a prompt that waits for input).
    keep_stdin = False

    def connectionMade(self) -> None:
        if not self.keep_stdin:
            self.transport.closeStdin()

    def when_stdout(
        self, count: int, timeout: float = EVENT_TIMEOUT_SECONDS
    ) -> Deferred[None]:
        """Fire once the child wrote at least C{count} bytes to stdout."""
        if len(self._output[1]) >= count:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._stdout_waiters.remove(waiter))
        waiter = (count, d)
        self._stdout_waiters.append(waiter)
        return d.addTimeout(timeout, self.clock)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        fd = 1 if fd == 1 else 2
        self._output[fd] += data
        if fd == 1:
            for waiter in list(self._stdout_waiters):
                if len(self._output[1]) >= waiter[0]:
                    self._stdout_waiters.remove(waiter)
                    waiter[1].callback(None)
        if fd == 1 and not self.stdout_lines:
            return
        *complete, self._partial[fd] = (self._partial[fd] + data).split(b"\n")
        for raw in complete:
            self._add_line(raw)

    def _add_line(self, raw: bytes) -> None:
        self.lines.append(raw.decode("utf-8", "replace"))
        self.times.append(self.clock.seconds())
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

    def time_of(self, match: re.Match, since: int = 0) -> float:
        """When the line of a L{wait_for} match (with the same C{since}) arrived."""
        return self.times[self.lines.index(match.string, since)]

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
        self.ended_at = self.clock.seconds()
        # A last line without its newline still counts (but the collected
        # output stays exactly what the child wrote).
        for fd, rest in self._partial.items():
            if rest:
                self._partial[fd] = b""
                self._add_line(rest)
        if reason.check(ProcessDone, ProcessTerminated):
            self.exit_code = reason.value.exitCode
            self.signal = reason.value.signal
        waiters, self._waiters = self._waiters, []
        for _, _, d in waiters:
            self._failed("exited").chainDeferred(d)
        self.ended.callback(self.exit_code)

    def send_signal(self, signal_number: int) -> None:
        """Send any signal (SIGSTOP, SIGCONT...) to the running child."""
        assert self.running, f"{self.label} has already exited"
        self.transport.signalProcess(int(signal_number))

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
    # Wall time from spawn to exit, on the reactor clock.
    seconds: float = 0.0

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
        self.connections: list[RawConnection] = []
        self._count = 0

    def spawn(
        self,
        label: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        stdout_lines: bool = True,
        keep_stdin: bool = False,
    ) -> LoggedProcess:
        protocol = LoggedProcess(label, self.reactor, stdout_lines)
        protocol.keep_stdin = keep_stdin
        self.reactor.spawnProcess(
            protocol,
            argv[0],
            list(argv),
            env={
                **_child_environment(),
                # Peers keep their index under $XDG_STATE_HOME: the test's
                # own folder, outside every share.
                "XDG_STATE_HOME": os.path.join(self.workdir, "state"),
                # Clients cache the relays' peer lists under
                # $XDG_CACHE_HOME: the test's own (conftest), else a
                # folder of this launcher's; never the real home's.
                "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME")
                or os.path.join(self.workdir, "cache"),
                **(env or {}),
            },
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

    async def relay(
        self, *listen: str, ttl: int = 30, args: Sequence[str] = ()
    ) -> Daemon:
        """A relay on each C{listen} endpoint (default: 127.0.0.1, ephemeral);
        C{args}: more ``twistd relay`` options."""
        listen = listen or (LOOPBACK,)
        args = ["relay", "--ttl", str(ttl), *args]
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
        links: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        wait_registered: bool = True,
    ) -> Daemon:
        """
        A peer sharing copies of the sample C{files}, registered at C{relay}
        (C{args}: more ``twistd peer`` options).

        C{links} maps more share names to existing files, hard-linked (or
        copied, across file systems) into the share: large test files are
        written once, not once per peer.
        """
        self._count += 1
        name = name or f"peer{self._count}"
        share = os.path.join(self.workdir, name)
        os.mkdir(share)
        for filename in files:
            with open(os.path.join(share, filename), "wb") as stream:
                stream.write(sample(filename))
        for filename, source in (links or {}).items():
            try:
                os.link(source, os.path.join(share, filename))
            except OSError:
                shutil.copyfile(source, os.path.join(share, filename))
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
            *args,
        )
        listening = await process.wait_for(LISTENING)
        peer_id = None
        if wait_registered:
            peer_id = (await process.wait_for(REGISTERED)).group("peer_id")
        return Daemon(
            process,
            [listening.group("address")],
            peer_id=peer_id,
            share=share,
            files=[*files, *(links or {})],
        )

    def start_client(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        keep_stdin: bool = False,
    ) -> LoggedProcess:
        """
        Start the installed ``p2p`` console script and return at once.

        Its stdout (file content) is collected, not split into lines; its
        stderr lines can be waited for.  Its stdin is closed, unless
        C{keep_stdin} (a prompt then waits).  See L{client_result}.
        """
        return self.spawn(
            "p2p",
            [_bin("p2p"), *args],
            env=env,
            stdout_lines=False,
            keep_stdin=keep_stdin,
        )

    async def client_result(
        self, process: LoggedProcess, timeout: float = CLIENT_TIMEOUT_SECONDS
    ) -> ClientResult:
        """Wait for a client from L{start_client} to exit."""
        code = await process.when_ended(timeout)
        assert process.ended_at is not None
        return ClientResult(
            code,
            process.stdout,
            process.stderr.decode(),
            process.ended_at - process.started_at,
        )

    async def client(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> ClientResult:
        """Run the installed ``p2p`` console script to completion."""
        return await self.client_result(self.start_client(*args, env=env))

    async def connect_raw(
        self, address: str, timeout: float = EVENT_TIMEOUT_SECONDS
    ) -> RawConnection:
        """
        A plain TCP connection to an IPv4 C{HOST:PORT}, for speaking the
        protocol by hand; L{stop_all} closes it if the test did not.
        """
        host, port = address.rsplit(":", 1)
        endpoint = TCP4ClientEndpoint(self.reactor, host, int(port), timeout=timeout)
        connection = RawConnection(self.reactor)
        self.connections.append(connection)
        d = connectProtocol(endpoint, connection)
        await d.addTimeout(timeout, self.reactor)
        return connection

    async def stop_all(self) -> None:
        """
        Close raw connections, SIGKILL whatever still runs and wait until
        all of it is gone.
        """
        closing = [c.close() for c in self.connections]
        running = [p for p in self.processes if p.running]
        await gatherResults(
            [*closing, *[p.kill("KILL") for p in running]], consumeErrors=True
        )


class RawConnection(LineOnlyReceiver):
    """
    A client connection that speaks whatever the test writes.

    L{wait_lines} fires once the server sent that many lines in total (the
    banner counts); L{when_closed} fires when the connection is gone.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, clock) -> None:
        self.clock = clock
        self.lines: list[str] = []
        self._waiters: list[tuple[int, Deferred[list[str]]]] = []
        self._close_waiters: list[Deferred[None]] = []
        self.connected = False
        self.lost = False

    def connectionMade(self) -> None:
        self.connected = True

    def send_line(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + self.delimiter)

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line.decode("utf-8", "replace"))
        for waiter in list(self._waiters):
            count, d = waiter
            if len(self.lines) >= count:
                self._waiters.remove(waiter)
                d.callback(self.lines[:count])

    def wait_lines(
        self, count: int, timeout: float = EVENT_TIMEOUT_SECONDS
    ) -> Deferred[list[str]]:
        """Fire with the first C{count} lines the server sent."""
        if len(self.lines) >= count:
            return succeed(self.lines[:count])
        if not self.connected:
            return _failure(ProcessFailed(f"connection closed after {self.lines!r}"))
        waiter: tuple[int, Deferred[list[str]]] = (
            count,
            Deferred(lambda d: self._waiters.remove(waiter)),
        )
        self._waiters.append(waiter)
        return waiter[1].addTimeout(timeout, self.clock)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        self.lost = True
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(ProcessFailed(f"connection closed after {self.lines!r}"))
        close_waiters, self._close_waiters = self._close_waiters, []
        for d in close_waiters:
            if not d.called:  # not timed out already
                d.callback(None)

    def when_closed(self, timeout: float = STOP_TIMEOUT_SECONDS) -> Deferred[None]:
        """Fires once the connection is gone (whoever closed it)."""
        if self.lost or self.transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d.addTimeout(timeout, self.clock)

    def close(self, timeout: float = STOP_TIMEOUT_SECONDS) -> Deferred[None]:
        """Abort the connection (if still open); fires once it is gone."""
        if self.connected:
            self.transport.abortConnection()
        return self.when_closed(timeout)


def _failure(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d


# The start of struct tcp_info (linux/tcp.h): tcpi_state comes first.
_TCP_INFO = struct.Struct("8B")
TCP_SYN_SENT = 2


def _tcp_info(sock: socket.socket) -> tuple[int, ...] | None:
    if not hasattr(socket, "TCP_INFO"):
        return None
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    return _TCP_INFO.unpack(raw)


class Blackhole:
    """
    A loopback TCP port where connections are never completed.

    It listens with a backlog of 0 and never accepts; one connection fills
    its accept queue, after which the kernel drops new SYNs, so a client's
    connect hangs until its own timeout, as with a firewalled host.
    Use as a context manager: every socket is closed at the end.
    """

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.listener = self._socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        # The first fills the queue; the second only makes sure of it.
        for _ in range(2):
            self._connect()
        # Started now, checked by still_blackholed(): a connection that is
        # still not established after the test ran proves the port dropped it.
        self.probe = self._connect()

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sockets.append(sock)
        return sock

    def _connect(self) -> socket.socket:
        sock = self._socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", self.port))
        assert code in (0, errno.EINPROGRESS), os.strerror(code)
        return sock

    def still_blackholed(self) -> bool:
        """The probe connection has not completed (nor failed), right now."""
        _, writable, _ = select.select([], [self.probe], [], 0)
        if writable:
            return False
        info = _tcp_info(self.probe)
        return info is None or info[0] == TCP_SYN_SENT

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def have_inotify() -> bool:
    """Whether L{when_created} can work here (Linux inotify)."""
    try:
        from twisted.internet import inotify
    except (ImportError, SystemError):
        return False
    return inotify is not None


def when_created(
    reactor,
    folder: str,
    pattern: str,
    timeout: float = EVENT_TIMEOUT_SECONDS,
    modified: bool = False,
) -> Deferred[str]:
    """
    Fire with the name of the first file matching C{pattern} that is created
    (with C{modified}: written to) in C{folder} from now on (inotify: an
    event, no polling).  The watch is removed when the Deferred fires,
    fails or times out.
    """
    from twisted.internet import inotify
    from twisted.python.filepath import FilePath

    regex = re.compile(pattern)
    notifier = inotify.INotify(reactor)
    created: Deferred[str] = Deferred()

    def notified(_: object, path: FilePath, mask: int) -> None:
        name = path.basename()
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if not created.called and regex.fullmatch(name):
            created.callback(name)

    def unwatch(result: object) -> object:
        notifier.loseConnection()
        return result

    mask = inotify.IN_MODIFY if modified else inotify.IN_CREATE
    notifier.watch(FilePath(folder), mask=mask, callbacks=[notified])
    notifier.startReading()
    return created.addTimeout(timeout, reactor).addBoth(unwatch)


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
