"""Per-source request budgets and a brake on token guessing.

A connection limit bounds how many connections one source holds, not how
fast it asks: 64 connections pipelining ``PEERS hint=`` kept a relay at
100% CPU, and one address tried 13,000 tokens a second.  So each request
is charged to two token buckets, its source's and its network's (see
L{p2p.netgroup}); a request the buckets cannot pay is refused with ``ERR
429`` and a ``retry-after=`` in seconds, costing the server a parse and a
short reply.  Wrong tokens are braked separately (L{GuessBrake}): each one
in a row doubles the time the source must wait before its next token is
even compared.

Buckets live in bounded tables (least recently used dropped first): a
dropped bucket is a full one, which is what an idle source has anyway.  An
attacker with more networks than a table holds gets fresh buckets; the
connection limits and the error budget still bound each connection.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from p2p import netgroup

# Most buckets of each kind kept (about 150 bytes each).
MAX_TRACKED = 65_536


class BucketTable:
    """
    Token buckets by key: C{rate} tokens a second accrue, up to C{burst}.

    :param rate: tokens per second (0: no limit, every charge is paid).
    :param burst: most tokens a bucket holds, spent at once.
    """

    def __init__(self, rate: float, burst: float, size: int = MAX_TRACKED) -> None:
        if rate < 0 or burst < 0 or (rate and burst < 1):
            raise ValueError("a rate must be 0 (no limit) or positive, with a burst")
        self.rate = rate
        self.burst = burst
        self.size = size
        # key -> [tokens, time of the last refill]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def wait(self, key: str, cost: float, now: float) -> float:
        """
        Seconds until C{key}'s bucket could pay C{cost}: 0 if it can now
        (nothing is taken; see L{take}).
        """
        if not self.rate:
            return 0.0
        bucket = self._buckets.get(key)
        tokens = self.burst if bucket is None else self._level(bucket, now)
        cost = min(cost, self.burst)
        return 0.0 if tokens >= cost else (cost - tokens) / self.rate

    def take(self, key: str, cost: float, now: float) -> None:
        """Charge C{cost} to C{key}'s bucket (which may go below zero: a
        source that keeps asking while refused keeps waiting)."""
        if not self.rate:
            return
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.size:
                buckets.popitem(last=False)
            bucket = buckets[key] = [float(self.burst), now]
        else:
            buckets.move_to_end(key)
        bucket[0] = self._level(bucket, now) - cost
        bucket[1] = now

    def _level(self, bucket: list[float], now: float) -> float:
        return min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate)


class RequestBudget:
    """
    What a server's requests may cost, per source and per network.

    :param clock: the reactor's clock.
    :param per_source: tokens per second for one source, with
        C{burst_source} at most at once.
    :param per_network: the same for one network; requests marked
        C{exempt_network} (a renewal of an existing lease) skip it, so that a
        flood from a peer's neighbours cannot starve its renewals.
    """

    def __init__(
        self,
        clock: IReactorTime,
        per_source: float,
        burst_source: float,
        per_network: float,
        burst_network: float,
    ) -> None:
        self.clock = clock
        self.sources = BucketTable(per_source, burst_source)
        self.networks = BucketTable(per_network, burst_network)
        self.refused = 0

    def charge(self, host: str, cost: float, exempt_network: bool = False) -> float:
        """
        Charge a request of C{cost} tokens from C{host}.

        :return: 0 when it may go ahead (and was charged); otherwise the
            seconds to wait before asking again (nothing charged, so a
            refused request does not push the wait further out).
        """
        source, network = netgroup.groups(host)
        now = self.clock.seconds()
        wait = self.sources.wait(source, cost, now)
        if not exempt_network:
            wait = max(wait, self.networks.wait(network, cost, now))
        if wait:
            self.refused += 1
            return wait
        self.sources.take(source, cost, now)
        if not exempt_network:
            self.networks.take(network, cost, now)
        return 0.0


class GuessBrake:
    """
    Slows a token guesser down: after C{n} wrong tokens in a row from one
    source, its next token is compared only C{base * 2 ** (n - 1)} seconds
    (at most C{longest}) after the last wrong one; until then, requests
    carrying a token are refused with a retry-after.  A right token resets
    the count.  Ten wrong tokens cost a guesser about a minute.

    :param clock: the reactor's clock.
    """

    def __init__(
        self,
        clock: IReactorTime,
        base: float = 0.1,
        longest: float = 60.0,
        size: int = MAX_TRACKED,
    ) -> None:
        self.clock = clock
        self.base = base
        self.longest = longest
        self.size = size
        # source -> (wrong tokens in a row, time the next may be compared)
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        """Sources with wrong tokens on record."""
        return len(self._failures)

    def wait(self, host: str) -> float:
        """Seconds before a token from C{host} may be compared (0: now)."""
        record = self._failures.get(netgroup.source_of(host))
        if record is None:
            return 0.0
        return max(0.0, record[1] - self.clock.seconds())

    def wrong(self, host: str) -> None:
        """Note a wrong token from C{host}."""
        source = netgroup.source_of(host)
        failures = self._failures
        count = failures.pop(source, (0, 0.0))[0] + 1
        if len(failures) >= self.size:
            failures.popitem(last=False)
        pause = min(self.longest, self.base * 2 ** min(count - 1, 30))
        failures[source] = (count, self.clock.seconds() + pause)

    def right(self, host: str) -> None:
        """Note a right token from C{host}: its record is cleared."""
        self._failures.pop(netgroup.source_of(host), None)
