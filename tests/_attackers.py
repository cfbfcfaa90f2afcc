"""
Attack clients for the relay's attack tests and benchmark (not a test
module): connections bound to chosen loopback sources that send request
lines and count the answers.

On Linux every address of 127.0.0.0/8 is local, so a client bound to
127.1.0.1 and one bound to 127.2.0.1 are, to the relay, two sources in two
networks (L{p2p.netgroup}); nothing here ever leaves 127.0.0.0/8.

* L{Crowd}: connections from chosen sources, every one closed at the end;
  L{Crowd.exchange} is one ``nc -N``-style exchange (send, shut the sending
  side, read until the relay closes).
* L{Flood}: exchanges repeated from many slots at once, bounded in time and
  count, answers counted by L{kind}.
* L{hold} and L{keep_alive}: connections held open with a request now and
  then.
* L{stalled_readers}: connections (TLS or TCP) that pipeline requests and
  never read (a thread, blocking sockets).
* Run as a script (``python tests/_attackers.py ADDRESS --slots ...``) it is
  a L{Flood} in a process of its own, so that a flood does not compete with
  the measuring client for one reactor (and, niced, less with the relay
  for the CPU: see L{FLOOD_NICENESS}): it prints ``flooding`` once its
  first exchange is over, then one JSON line with what it got.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

# One exchange (connect, requests, answers, close) on loopback.
EXCHANGE_TIMEOUT_SECONDS = 10
# The relay's default per-source connection cap (p2p.limits).
CONNECTIONS_PER_SOURCE = 32


class ConnectionClosed(Exception):
    """The server closed the connection before the awaited lines came."""


class Client(LineOnlyReceiver):
    """
    One client connection: sends C{first} as soon as it is connected (and,
    with C{half_close}, then shuts its sending side, as ``nc -N`` does: the
    relay answers every request and closes), and collects the lines the
    server sends, banner included.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, clock, first: bytes = b"", half_close: bool = False) -> None:
        self.clock = clock
        self.first = first
        self.half_close = half_close
        self.lines: list[bytes] = []
        self.sent = 0
        self.lost = False
        self.lost_at: float | None = None
        # Called with this connection once it is lost.
        self.on_lost: Callable[[Client], object] | None = None
        self._line_waiters: list[tuple[int, Deferred[list[bytes]]]] = []
        self._close_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        if self.first:
            self.write(self.first)
        if self.half_close:
            self.transport.loseWriteConnection()

    def write(self, data: bytes) -> None:
        self.sent += len(data)
        self.transport.write(data)

    def send_line(self, line: bytes) -> None:
        self.write(line + self.delimiter)

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        for waiter in list(self._line_waiters):
            if len(self.lines) >= waiter[0]:
                self._line_waiters.remove(waiter)
                waiter[1].callback(self.lines[: waiter[0]])

    def wait_lines(
        self, count: int, timeout: float = EXCHANGE_TIMEOUT_SECONDS
    ) -> Deferred[list[bytes]]:
        """Fire with the first C{count} lines; fail if the connection closes
        before they came."""
        if len(self.lines) >= count:
            return succeed(self.lines[:count])
        d: Deferred[list[bytes]] = Deferred()
        if self.lost:
            d.errback(ConnectionClosed(f"closed after {self.lines!r}"))
            return d
        waiter = (count, d)
        self._line_waiters.append(waiter)
        return d.addTimeout(timeout, self.clock)

    async def reply(self, index: int) -> tuple[bytes, list[bytes]]:
        """The reply whose first line is line C{index}: the line, and the
        C{PEER} lines of an ``OK <count>`` listing."""
        (*_, header) = await self.wait_lines(index + 1)
        entries: list[bytes] = []
        if header.startswith(b"OK ") and header.split()[1].isdigit():
            count = int(header.split()[1])
            entries = (await self.wait_lines(index + 1 + count))[index + 1 :]
        return header, entries

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        self.lost_at = time.perf_counter()
        if self.on_lost is not None:
            self.on_lost(self)
        waiters, self._line_waiters = self._line_waiters, []
        for _, d in waiters:
            d.errback(ConnectionClosed(f"closed after {self.lines!r}"))
        close_waiters, self._close_waiters = self._close_waiters, []
        for d in close_waiters:
            if not d.called:  # not timed out already
                d.callback(None)

    def when_closed(self, timeout: float = EXCHANGE_TIMEOUT_SECONDS) -> Deferred[None]:
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d.addTimeout(timeout, self.clock)

    def close(self) -> Deferred[None]:
        """Abort the connection (if open); fires once it is gone."""
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()
        return self.when_closed()


class QuietFactory(Factory):
    """A factory that does not log each connection it starts and stops."""

    noisy = False

    def __init__(self, protocol: Client) -> None:
        self.instance = protocol

    def buildProtocol(self, addr: object) -> Client:
        return self.instance


class Samplers:
    """
    Source addresses for well-behaved clients, which must never be over
    their budgets however many requests they make: each address of
    127.240.0.0/12 (kept for them: attackers use lower ones) serves
    C{per_address} requests, two addresses per /24.  A ``PEERS`` costs two
    tokens, so 40 requests fit in a source's burst (100) and two sources in
    a network's (500).
    """

    def __init__(self, per_address: int = 40) -> None:
        self.per_address = per_address
        self.used = 0

    def next(self) -> str:
        n = self.used // self.per_address
        self.used += 1
        return f"127.{240 + (n // 512) % 16}.{(n // 2) % 256}.{n % 2 + 1}"


class BannerOnly(Protocol):
    """A fake peer: greets as a peer (so the relay's dial-back verifies its
    lease), then never says another word."""

    def __init__(self, held: set) -> None:
        self.held = held

    def connectionMade(self) -> None:
        self.held.add(self.transport)
        self.transport.write(b"P2P/2 peer\n")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.held.discard(self.transport)


class Crowd:
    """
    The attack clients of one test: connections bound to chosen loopback
    sources, every one of them closed by L{close_all} (the fixture's
    teardown), and plain sockets to close too.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.open: set[Client] = set()
        self.sockets: list[socket.socket] = []
        self.listening: list = []
        self.fakes_held: set = set()
        self.samplers = Samplers()

    async def connect(
        self,
        address: str,
        source: str,
        first: bytes = b"",
        half_close: bool = False,
    ) -> Client:
        """A connection from C{source} to C{address} (C{HOST:PORT})."""
        host, port = address.rsplit(":", 1)
        endpoint = TCP4ClientEndpoint(
            self.reactor, host, int(port), timeout=5, bindAddress=(source, 0)
        )
        client = Client(self.reactor, first, half_close)
        client.on_lost = self.open.discard
        self.open.add(client)
        try:
            await endpoint.connect(QuietFactory(client))
        except BaseException:
            self.open.discard(client)
            raise
        return client

    async def exchange(
        self, address: str, source: str, lines: Sequence[bytes]
    ) -> Client:
        """
        Send C{lines} on a new connection and shut its sending side; return
        the connection once the server closed it, with every line it sent
        (banner first): all the answers, or those it gave before closing
        on its own.
        """
        client = await self.connect(
            address, source, b"".join(line + b"\n" for line in lines), True
        )
        await client.when_closed()
        return client

    async def timed(self, address: str, source: str, line: bytes) -> float:
        """Seconds from connecting to the end of the answer to C{line}, for
        a listing (``OK <count>`` and its lines)."""
        started = time.perf_counter()
        client = await self.connect(address, source, line + b"\n", True)
        header, entries = await client.reply(1)
        assert header.startswith(b"OK "), (header, client.lines)
        elapsed = time.perf_counter() - started
        await client.when_closed()
        return elapsed

    async def well_behaved(
        self, address: str, count: int, over: Callable[[], bool] | None = None
    ) -> list[float]:
        """
        L{timed} ``PEERS`` from well-behaved clients (L{Samplers}), one
        after the other: C{count} of them, or as many as come before
        C{over()} is true.
        """
        taken: list[float] = []
        while len(taken) < count and not (over is not None and over()):
            source = self.samplers.next()
            taken.append(await self.timed(address, source, b"PEERS"))
        return taken

    def silent_listener(self, source: str) -> int:
        """A port on C{source} that accepts (in the kernel) and never says a
        word: a listening socket nobody accepts on."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sockets.append(listener)
        listener.bind((source, 0))
        listener.listen(64)
        return listener.getsockname()[1]

    def banner_listener(self, source: str) -> int:
        """A port on C{source} where a L{BannerOnly} fake peer answers."""
        factory = Factory.forProtocol(lambda: BannerOnly(self.fakes_held))
        factory.noisy = False
        port = self.reactor.listenTCP(0, factory, interface=source)
        self.listening.append(port)
        return port.getHost().port

    async def close_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        for transport in list(self.fakes_held):
            transport.abortConnection()
        await gatherResults(
            [port.stopListening() for port in self.listening], consumeErrors=True
        )
        await gatherResults(
            [client.close() for client in list(self.open)], consumeErrors=True
        )


def kind(line: bytes) -> str:
    """A reply line's category: ``OK``, or the ``ERR`` line without its
    variable parts (retry-after, a network in brackets, numbers)."""
    text = line.decode("utf-8", "replace")
    if text.startswith("OK"):
        return "OK"
    text = re.sub(r"\(.*?\)", "(...)", text.split(";", 1)[0])
    return text[:7] + re.sub(r"\d+", "N", text[7:])


def replies(lines: Sequence[bytes]) -> list[bytes]:
    """The answer lines of a one-line-answer exchange (banner and listing
    entries left out)."""
    return [line for line in lines[1:] if not line.startswith(b"PEER ")]


def p99(samples: Sequence[float]) -> float:
    """The 99th percentile, by nearest rank."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def listening_ports() -> set[int]:
    """TCP ports something on this machine listens on (any address)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            stream = open(table)
        except OSError:
            continue
        with stream:
            next(stream)
            for row in stream:
                fields = row.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def closed_ports(count: int, start: int = 20000) -> list[int]:
    """C{count} ports where nothing listens, on any address, right now: the
    relay's dial-backs to them are refused at once."""
    taken = listening_ports()
    return [port for port in range(start, 65536) if port not in taken][:count]


def send_queue_bytes(port: int) -> int:
    """
    The bytes the kernel holds unsent (or unacknowledged) in the send
    queues of this machine's IPv4 TCP sockets whose local port is C{port}:
    a loopback server's connections, not counted in its RSS.
    """
    total = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[4].split(":")[0], 16)  # tx_queue
    return total


def chunks(items: Sequence[bytes], size: int) -> Iterable[Sequence[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def vm_bytes(pid: int, field: str) -> int:
    """VmRSS, VmHWM... of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


class Flood:
    """
    Connections from chosen sources, each sending its lines at once and
    shutting its sending side, opened again as soon as the relay closed the
    last, until L{stop} or C{seconds} have passed (or C{max_exchanges}).

    :ivar got: the answers by L{kind}, plus ``closed: too many errors``
        (the relay cut the connection after its tenth refusal), ``with
        retry-after`` (answers that say when to ask again) and
        ``unanswered`` (requests sent on a connection the relay closed
        before answering them), and ``failed: <error>`` (exchanges that
        failed: no connection, a timeout...).
    """

    def __init__(
        self, crowd: Crowd, address: str, seconds: float, max_exchanges: int = 50_000
    ) -> None:
        self.crowd = crowd
        self.address = address
        self.seconds = seconds
        self.max_exchanges = max_exchanges
        self.slots: list[tuple[str, Sequence[bytes]]] = []
        self.got: Counter[str] = Counter()
        self.exchanges = 0
        self.sent = 0
        self.stopped = False
        self.started = self.ended = 0.0
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def add(self, source: str, lines: Sequence[bytes], slots: int = 1) -> None:
        """C{slots} connections at a time from C{source}, each sending
        C{lines}."""
        self.slots += [(source, lines)] * slots

    def stop(self) -> None:
        self.stopped = True

    @property
    def running(self) -> bool:
        return not self.stopped

    @property
    def duration(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    async def run(self) -> Flood:
        self.started = time.perf_counter()
        try:
            await gatherResults(
                [Deferred.fromCoroutine(self._slot(*slot)) for slot in self.slots]
            )
        finally:
            self.stopped = True
            self.ended = time.perf_counter()
            self._notify(force=True)
        return self

    def after(self, count: int) -> Deferred[None]:
        """Fires once C{count} exchanges are over, or the flood is."""
        if self.exchanges >= count or self.stopped:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((count, d))
        return d

    def _notify(self, force: bool = False) -> None:
        for waiter in list(self._waiters):
            if force or self.exchanges >= waiter[0]:
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    async def _slot(self, source: str, lines: Sequence[bytes]) -> None:
        while (
            not self.stopped
            and time.perf_counter() - self.started < self.seconds
            and self.exchanges < self.max_exchanges
        ):
            try:
                client = await self.crowd.exchange(self.address, source, lines)
            except Exception as e:
                # One exchange gone wrong (a timeout, a reset) does not end
                # the attack; it is counted, by error.
                self.exchanges += 1
                self.got[f"failed: {type(e).__name__}"] += 1
                self._notify()
                continue
            self.exchanges += 1
            self.sent += client.sent
            answers = replies(client.lines)
            if answers and answers[-1].endswith(b"too many errors"):
                self.got["closed: too many errors"] += 1
                answers.pop()
            self.got.update(kind(answer) for answer in answers)
            self.got["with retry-after"] += sum(b"retry-after=" in a for a in answers)
            if not answers or not answers[0].startswith(b"ERR 503"):
                self.got["unanswered"] += len(lines) - len(answers)
            self._notify()


async def hold(
    crowd: Crowd, address: str, source: str, attempts: int
) -> tuple[list[Client], Counter[str]]:
    """
    Open C{attempts} connections from C{source}, one after the other, each
    asking ``PEERS limit=1`` at once (before the first-request deadline);
    the connections the relay admitted, left open, and the refusals.
    """
    held: list[Client] = []
    refused: Counter[str] = Counter()
    for _ in range(attempts):
        client = await crowd.connect(address, source, b"PEERS limit=1\n")
        header, _ = await client.reply(1)
        if header.startswith(b"ERR 503"):
            refused[kind(header)] += 1
            await client.when_closed()
        else:
            assert header.startswith(b"OK "), client.lines
            held.append(client)
    return held, refused


async def keep_alive(clients: Sequence[Client]) -> Counter[str]:
    """Each of C{clients} asks ``PEERS limit=1`` again: its answer's kind
    (an ``ERR 429`` over budget is an answer too: the connection stays)."""

    async def ask(client: Client) -> str:
        index = len(client.lines)
        client.send_line(b"PEERS limit=1")
        header, _ = await client.reply(index)
        return kind(header)

    return Counter(
        await gatherResults([Deferred.fromCoroutine(ask(c)) for c in clients])
    )


def unverified_tls_context() -> ssl.SSLContext:
    """A TLS client context that checks no certificate (an attacker does
    not care)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def stalled_readers(
    host: str,
    port: int,
    sources: Sequence[str],
    pipelined: int,
    per_source: int = CONNECTIONS_PER_SOURCE,
    tls: bool = True,
    request: bytes = b"PEERS\n",
    banner: bytes = b"P2P/1 relay\n",
) -> list[socket.socket]:
    """
    (A thread: blocking sockets.)  C{per_source} connections (TLS, or plain
    TCP) from each of C{sources}; each reads the C{banner}, then sends
    C{pipelined} C{request}s (``PEERS`` to a relay by default) and never
    reads again.  A small receive buffer keeps what the kernels hold
    small: the server's own buffering is what is measured.  No certificate
    is checked (an attacker does not care).
    """
    context = unverified_tls_context()
    connections: list[socket.socket] = []
    try:
        for source in sources:
            for _ in range(per_source):
                raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                connections.append(raw)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                raw.settimeout(EXCHANGE_TIMEOUT_SECONDS)
                raw.bind((source, 0))
                raw.connect((host, port))
                connection = context.wrap_socket(raw) if tls else raw
                connections[-1] = connection
                greeting = connection.recv(64)
                if greeting != banner:
                    raise ConnectionClosed(f"unexpected greeting {greeting!r}")
                if pipelined:
                    connection.sendall(request * pipelined)
    except BaseException:
        for connection in connections:
            connection.close()
        raise
    return connections


def read_replies(connection: socket.socket, count: int) -> int:
    """
    (A thread.)  Read from a L{stalled_readers} connection until C{count} more
    listings (``OK <n>`` headers) came, or it closed; how many came.
    """
    seen = 0
    # Headers follow a line end; the first may follow the banner, read
    # already: start as if just after one.
    tail = b"\n"
    while seen < count:
        data = connection.recv(65536)
        if not data:
            break
        seen += (tail + data).count(b"\nOK ")
        tail = data[-3:]
    return seen


# -- a flood in a process of its own ---------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Flood a relay (loopback only).")
    parser.add_argument("address", help="the relay, HOST:PORT")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-exchanges", type=int, default=50_000)
    parser.add_argument(
        "--nice", type=int, default=0, help="lower this process's priority first"
    )
    parser.add_argument(
        "--slots",
        nargs=4,
        action="append",
        required=True,
        metavar=("SOURCE", "SLOTS", "DEPTH", "LINE"),
        help="SLOTS connections at a time from SOURCE, each sending LINE "
        "DEPTH times (repeatable)",
    )
    args = parser.parse_args(argv)
    if not args.address.startswith("127."):
        parser.error("loopback relays only")
    if args.nice:
        os.nice(args.nice)

    async def run(reactor) -> None:
        crowd = Crowd(reactor)
        flood = Flood(crowd, args.address, args.seconds, args.max_exchanges)
        for source, slots, depth, line in args.slots:
            flood.add(source, [line.encode()] * int(depth), int(slots))
        running = Deferred.fromCoroutine(flood.run())
        await flood.after(1)
        print("flooding", flush=True)
        try:
            await running
        finally:
            await crowd.close_all()
        result = {
            "got": dict(flood.got),
            "exchanges": flood.exchanges,
            "sent": flood.sent,
            "seconds": flood.duration,
        }
        print(json.dumps(result), flush=True)

    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    task.react(lambda reactor: ensureDeferred(run(reactor)))


# A flooding process's niceness.  On a real network the attacker's CPU is
# not the relay's; on loopback they share this machine's cores, and a
# flooder at the relay's priority takes the CPU the relay would answer
# others with (checked on 2 cores: the well-behaved p99 went from 3-20 ms
# to 50-130 ms, the relay's own CPU use unchanged).
FLOOD_NICENESS = 10


def flood_argv(
    address: str,
    slots: Sequence[tuple[str, int, int, str]],
    seconds: float,
    max_exchanges: int = 50_000,
    nice: int = FLOOD_NICENESS,
) -> list[str]:
    """The command line of a flooding process (see L{main}): C{slots} are
    (source, connections at a time, lines per connection, line)."""
    argv = [sys.executable, __file__, address, "--seconds", str(seconds)]
    argv += ["--max-exchanges", str(max_exchanges), "--nice", str(nice)]
    for source, count, depth, line in slots:
        argv += ["--slots", source, str(count), str(depth), line]
    return argv


if __name__ == "__main__":
    main()
