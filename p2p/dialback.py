"""The relay dials each new peer back before it vouches for it.

A lease costs its holder one line, so anyone can register thousands of
ports where nothing listens (or where something accepts and never
answers): listed in registration order, those leases hid honest peers and
sent every client through timeouts.  The relay therefore connects to each
newly registered address and reads its greeting; only a lease whose port
answered with a peer's banner (``P2P/<n> peer``) becomes *verified*, and
listings give verified leases first (see L{p2p.registry}).

The dialling is bounded so that it cannot be turned into a scanner or a
flood: it only dials the address a peer registered from (the observed
address, unless ``--allow-claimed-host``), at most C{rate} probes started a
second, C{concurrency} at once and C{per_network} per network
(L{p2p.netgroup}), taking networks in turn so that one network's thousand
leases cannot delay another's one; a probe lasts at most C{timeout}
seconds; pending probes are bounded per network and in all.  A probe that
fails is retried no sooner than C{retry_after} seconds later, at a renewal.

A peer that listens with TLS says nothing until the client speaks, so a
probe that hears nothing for C{tls_after} seconds starts TLS on the same
connection (no certificate check: the probe asks only "is a peer
there?") and reads the banner through it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from p2p import netgroup
from p2p.ratelimit import BucketTable

DEFAULT_CONCURRENCY = 32
DEFAULT_PER_NETWORK = 2
DEFAULT_TIMEOUT_SECONDS = 3.0
DEFAULT_RETRY_SECONDS = 60.0
MAX_PENDING_PER_NETWORK = 1024
MAX_PENDING = 100_000
TLS_AFTER_SECONDS = 0.5
DEFAULT_RATE = 100.0


class BannerProbe(LineReceiver):
    """Reads one greeting line and reports whether it is a peer's."""

    delimiter = b"\n"
    MAX_LENGTH = 128

    def __init__(self, done: Deferred, clock: IReactorTime, tls_after: float) -> None:
        self.done = done
        self.clock = clock
        self.tls_after = tls_after
        self._tls_call = None

    def connectionMade(self) -> None:
        self._tls_call = self.clock.callLater(self.tls_after, self._start_tls)

    def _start_tls(self) -> None:
        self._tls_call = None
        start_tls = getattr(self.transport, "startTLS", None)
        if start_tls is None:
            return
        from twisted.internet import ssl

        try:
            start_tls(ssl.CertificateOptions())
        except Exception:
            self.finish(False)

    def dataReceived(self, data: bytes) -> None:
        if self._tls_call is not None:
            self._tls_call.cancel()
            self._tls_call = None
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        words = line.rstrip(b"\r").split(b" ")
        self.finish(
            len(words) >= 2 and words[0].startswith(b"P2P/") and words[1] == b"peer"
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        self.finish(False)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._tls_call is not None:
            self._tls_call.cancel()
            self._tls_call = None
        self.finish(False)

    def finish(self, answered: bool) -> None:
        """Report C{answered} (once) and drop the connection."""
        if not self.done.called:
            self.done.callback(answered)
        if self.transport is not None and self.transport.connected:
            self.transport.abortConnection()


class _ProbeFactory(ClientFactory):
    """Hands one L{BannerProbe} its connection, or its failure."""

    noisy = False  # a log line per probe would be most of its cost

    def __init__(self, probe: BannerProbe) -> None:
        self.probe = probe

    def buildProtocol(self, addr: object) -> BannerProbe:
        return self.probe

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.probe.finish(False)


class DialBack:
    """
    Probes newly registered peers, a bounded number at a time (see the
    module docstring), and reports each outcome.

    :param reactor: for connections and time.
    :param on_answer: called with C{(host, port)} when a peer answered.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        on_answer: Callable[[str, int], object],
        concurrency: int = DEFAULT_CONCURRENCY,
        per_network: int = DEFAULT_PER_NETWORK,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retry_after: float = DEFAULT_RETRY_SECONDS,
        tls_after: float = TLS_AFTER_SECONDS,
        rate: float = DEFAULT_RATE,
    ) -> None:
        self.reactor = reactor
        # Probes started per second, bursts of a second's worth: however
        # fast leases come (a flood of registrations, a relay restarted
        # under ten thousand peers), probing costs the relay a bounded
        # share of its time; the leases wait unverified meanwhile.
        self.rate = rate
        self._starts = BucketTable(rate, max(1.0, rate), size=1)
        self._wake: IDelayedCall | None = None
        self.on_answer = on_answer
        self.concurrency = concurrency
        self.per_network = per_network
        self.timeout = timeout
        self.retry_after = retry_after
        self.tls_after = tls_after
        # network -> addresses waiting; networks are served in turn.
        self._pending: OrderedDict[str, deque[tuple[str, int]]] = OrderedDict()
        self._queued: set[tuple[str, int]] = set()
        self._running: dict[str, int] = {}
        self._in_flight = 0
        # address -> time before which a failed probe is not repeated.
        self._failed: OrderedDict[tuple[str, int], float] = OrderedDict()
        self.answered = self.silent = self.dropped = 0
        self.stopped = False

    @property
    def pending(self) -> int:
        """Probes waiting for their turn."""
        return len(self._queued) - self._in_flight

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, host: str, port: int) -> bool:
        """
        Ask for a probe of C{host}:C{port} (a new lease, or the renewal of
        an unverified one).  Ignored while one is queued or running, within
        C{retry_after} of a failed one, or when the queues are full.

        :return: whether a probe was queued.
        """
        address = (host, port)
        if self.stopped or address in self._queued:
            return False
        retry = self._failed.get(address)
        if retry is not None:
            if self.reactor.seconds() < retry:
                return False
            del self._failed[address]
        network = netgroup.network_of(host)
        queue = self._pending.get(network)
        if queue is None:
            queue = self._pending[network] = deque()
        if len(queue) >= MAX_PENDING_PER_NETWORK or len(self._queued) >= MAX_PENDING:
            self.dropped += 1
            if not queue:
                del self._pending[network]
            return False
        queue.append(address)
        self._queued.add(address)
        self._pump()
        return True

    def forget(self, host: str, port: int) -> None:
        """The lease ended: drop its failure record."""
        self._failed.pop((host, port), None)

    def stop(self) -> None:
        """Start no more probes (the relay is stopping)."""
        self.stopped = True
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        for queue in self._pending.values():
            self._queued.difference_update(queue)
        self._pending.clear()

    def _pump(self) -> None:
        """Start probes while there is room, one network at a time in turn."""
        pending, running = self._pending, self._running
        rounds = len(pending)
        while pending and self._in_flight < self.concurrency and rounds > 0:
            network, queue = next(iter(pending.items()))
            pending.move_to_end(network)
            rounds -= 1
            if running.get(network, 0) >= self.per_network:
                continue
            if not self._take_start():
                return
            host, port = queue.popleft()
            if not queue:
                del pending[network]
            rounds = len(pending)
            self._start(network, host, port)

    def _take_start(self) -> bool:
        """Take one probe's worth of the rate, or arrange to pump again when
        there is one."""
        now = self.reactor.seconds()
        wait = self._starts.wait("", 1, now)
        if not wait:
            self._starts.take("", 1, now)
            return True
        if self._wake is None:
            self._wake = self.reactor.callLater(wait, self._woken)
        return False

    def _woken(self) -> None:
        self._wake = None
        self._pump()

    def _start(self, network: str, host: str, port: int) -> None:
        self._in_flight += 1
        self._running[network] = self._running.get(network, 0) + 1
        d = self._probe(host, port)
        d.addCallback(self._done, network, host, port)
        d.addErrback(self._failed_probe, network, host, port)

    def _probe(self, host: str, port: int) -> Deferred:
        # connectTCP with a factory of our own rather than an endpoint: a
        # probe is one connection attempt, and the endpoint's wrapping
        # factory and Deferreds were a third of its cost (connectTCP takes
        # IPv6 literals too).
        done: Deferred = Deferred()
        probe = BannerProbe(done, self.reactor, self.tls_after)
        connector = self.reactor.connectTCP(
            host, port, _ProbeFactory(probe), timeout=self.timeout
        )
        timer = self.reactor.callLater(self.timeout, self._give_up, probe, connector)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(stop_timer)

    def _give_up(self, probe: BannerProbe, connector: IConnector) -> None:
        if getattr(connector, "state", None) == "connecting":
            connector.stopConnecting()
        probe.finish(False)

    def _done(self, answered: bool, network: str, host: str, port: int) -> None:
        self._finished(network, host, port)
        if answered:
            self.answered += 1
            self.on_answer(host, port)
        else:
            self.silent += 1
            if len(self._failed) >= MAX_PENDING:
                self._failed.popitem(last=False)
            self._failed[(host, port)] = self.reactor.seconds() + self.retry_after
        self._pump()

    def _failed_probe(
        self, failure: Failure, network: str, host: str, port: int
    ) -> None:
        self.log.failure(
            "dialling back {host}:{port} failed", failure, host=host, port=port
        )

    def _finished(self, network: str, host: str, port: int) -> None:
        self._in_flight -= 1
        self._queued.discard((host, port))
        left = self._running[network] - 1
        if left:
            self._running[network] = left
        else:
            del self._running[network]
