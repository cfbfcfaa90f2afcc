#!/usr/bin/env python3
"""Relay scale (benchmark 4): memory, expiry and listing at a million peers.

1. Relay RSS per registered peer: a fresh interpreter registers N distinct
   (host, port) pairs (N = 1,000,000; ``--quick``: 100,000) in a
   ``MemoryRegistry`` and reads VmRSS from ``/proc/self/status`` before and
   after.  Two address mixes: one lease per host (the internet's common
   case: every host string is distinct) and 1000 ports per host.  Baselines
   in the same run: (a) the previous layout (a ``(host, port)`` dict of
   slotted leases that store their peer id, a per-host counter dict and a
   heap of ``(expires, host, port)`` tuples) and (b) the least a table can
   hold, a dict ``(host, port) -> expiry``.  Target: <= 400 bytes per peer.
2. ``expire()`` when k = 1000 leases are due in a table of N = 100k and 1M
   (``--quick``: 10k and 100k): flat in N means O(expired).  Baseline: a
   scan of the table for due leases.
3. One ``PEERS limit=1000`` reply, the table's last full page (from a
   cursor 1001 peers before the end), time and bytes, at N = 1k and 1M
   (``--quick``: 1k and 100k): flat means the reply does not grow with the
   table.  Baseline: resuming after the cursor's entry in an
   insertion-ordered dict (skipping to it), what paging would cost without
   a seekable index.

Everything runs in this process (and fresh children of it for RSS); no
network.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import Report, Series  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from p2p import wire  # noqa: E402
from p2p.registry import MemoryRegistry  # noqa: E402
from p2p.relay import Relay  # noqa: E402

TTL = 60.0


class _PreviousLease:
    __slots__ = ("peer_id", "host", "port", "name", "registered", "renewed", "expires")

    def __init__(self, host, port, name, now, expires):
        self.peer_id = wire.peer_id_for(host, port)
        self.host = host
        self.port = port
        self.name = name
        self.registered = now
        self.renewed = now
        self.expires = expires


class PreviousRegistry:
    """Baseline (a): the registry's layout before this work (register only)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._leases: dict = {}
        self._per_host: dict = {}
        self._heap: list = []

    def register(self, host, port, name, now):
        expires = now + self.ttl
        lease = _PreviousLease(host, port, name, now, expires)
        self._leases[(host, port)] = lease
        self._per_host[host] = self._per_host.get(host, 0) + 1
        heapq.heappush(self._heap, (expires, host, port))
        return lease


class MinimalTable:
    """Baseline (b): address -> expiry time, nothing else."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._expiry: dict = {}

    def register(self, host, port, name, now):
        self._expiry[(host, port)] = now + self.ttl


LAYOUTS = {
    "ours": MemoryRegistry,
    "previous": PreviousRegistry,
    "minimal": MinimalTable,
}


def address(index: int, mix: str) -> tuple[str, int]:
    """The index-th distinct address; a fresh host string, as from the wire."""
    if mix == "distinct":
        return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}", 9000 + (
            index >> 24
        )
    host = index // 1000
    return f"10.1.{host >> 8}.{host & 255}", 10000 + index % 1000


def vm_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def rss_child(layout: str, mix: str, count: int) -> None:
    """In a fresh interpreter: bytes of RSS per registered peer, as JSON."""
    table = LAYOUTS[layout](TTL)
    gc.collect()
    before = vm_rss()
    started = time.perf_counter()
    for index in range(count):
        host, port = address(index, mix)
        table.register(host, port, None, index / 1000)
    seconds = time.perf_counter() - started
    gc.collect()
    print(json.dumps({"bytes": (vm_rss() - before) / count, "seconds": seconds}))


def rss_per_peer(layout: str, mix: str, count: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", layout, mix, str(count)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def memory(report: Report, count: int) -> None:
    for mix, label in [("distinct", "one lease per host"), ("hosts", "1000 per host")]:
        results = {layout: rss_per_peer(layout, mix, count) for layout in LAYOUTS}
        ours = results["ours"]
        report.table(
            f"4.1 Relay RSS per registered peer, {count:,} peers, {label}, "
            "bytes (lower is better)",
            Series("ours (MemoryRegistry)", [ours["bytes"]], "B"),
            [
                Series("(a) previous layout", [results["previous"]["bytes"]], "B"),
                Series("(b) dict addr -> expiry", [results["minimal"]["bytes"]], "B"),
            ],
            higher_is_better=False,
            note=(
                f"target <= 400 B per peer; registering took "
                f"{ours['seconds'] / count * 1e6:.2f} us per peer "
                f"(previous layout {results['previous']['seconds'] / count * 1e6:.2f})"
            ),
        )


def fill(registry: MemoryRegistry, count: int, now: float) -> None:
    for index in range(count):
        host, port = address(index, "distinct")
        registry.register(host, port, None, now)


def expiry(report: Report, sizes: list[int], due: int, repeats: int) -> None:
    ours: dict[int, list[float]] = {}
    scan: dict[int, list[float]] = {}
    for size in sizes:
        registry = MemoryRegistry(TTL)
        fill(registry, size - due, 10**6)
        ours[size], scan[size] = [], []
        for repeat in range(repeats):
            now = 1000.0 * repeat
            for index in range(due):
                registry.register("192.168.0.1", 1 + index, None, now)
            started = time.perf_counter()
            expired = registry.expire(now + TTL)
            ours[size].append((time.perf_counter() - started) * 1000)
            assert len(expired) == due, len(expired)
            # Baseline: find the due leases by scanning every lease.
            for index in range(due):
                registry.register("192.168.0.1", 1 + index, None, now)
            leases = list(registry)
            started = time.perf_counter()
            found = [lease for lease in leases if lease.expires <= now + TTL]
            scan[size].append((time.perf_counter() - started) * 1000)
            assert len(found) == due
            registry.expire(now + TTL)
            del leases, found
        del registry
        gc.collect()
    small, large = sizes
    scaling_table(
        report,
        f"4.2 expire() with {due} leases due, table of {large:,}, ms (lower is better)",
        ours,
        ("(a) scan", scan),
        f"ours N={large:,} over N={small:,}: {growth(ours, sizes):.2f}x "
        f"(flat: ~1, the table grew {large // small}x); the scan grows with N.",
    )


def listing(report: Report, sizes: list[int], repeats: int) -> None:
    clock = Clock()
    clock.advance(100.0)
    ours: dict[int, list[float]] = {}
    dict_seek: dict[int, list[float]] = {}
    cached: dict[int, list[float]] = {}
    sizes_bytes: dict[int, int] = {}
    for size in sizes:
        registry = MemoryRegistry(TTL)
        fill(registry, size, clock.seconds())
        # The last full page: the cursor of the peer 1001st from the end.
        leases = list(registry)
        start = max(0, size - 1001)
        middle = leases[start]
        del leases
        position = middle.seq if size > 1000 else 0
        request = wire.Peers(limit=1000, cursor=wire.format_cursor(position))
        ours[size], cached[size] = [], []
        for _ in range(repeats):
            # A fresh relay: its cache of formatted lines is empty, as for a
            # page nobody asked for lately (the worst case).
            relay = Relay(registry, clock, ttl=int(TTL))
            relay.log = _Quiet()
            started = time.perf_counter()
            lines = relay.peers(request)
            reply = b"\n".join(lines) + b"\n"
            ours[size].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            b"\n".join(relay.peers(request))
            cached[size].append((time.perf_counter() - started) * 1000)
        sizes_bytes[size] = len(reply)
        # Baseline: an insertion-ordered dict, resumed after the cursor's key.
        table = {(lease.host, lease.port): lease for lease in registry}
        key = (middle.host, middle.port)
        dict_seek[size] = []
        for _ in range(repeats):
            started = time.perf_counter()
            values = iter(table.items())
            if size > 1000:
                for found, _lease in values:
                    if found == key:
                        break
            page = list(itertools.islice(values, 1000))
            dict_seek[size].append((time.perf_counter() - started) * 1000)
            assert len(page) == 1000, len(page)
        del registry, table
        gc.collect()
    small, large = sizes
    scaling_table(
        report,
        f"4.3 One PEERS limit=1000 reply (the last full page), N={large:,}, ms "
        "(lower is better)",
        ours,
        ("(a) dict seek", dict_seek),
        f"reply bytes: {sizes_bytes[large]:,} at N={large:,}, "
        f"{sizes_bytes[small]:,} at N={small:,}; the same page again, its "
        f"lines cached: {statistics.median(cached[large]):.3g} ms "
        f"at N={large:,}, {statistics.median(cached[small]):.3g} ms at "
        f"N={small:,}; ours N={large:,} over N={small:,}: "
        f"{growth(ours, sizes):.2f}x",
    )


def growth(ours: dict[int, list[float]], sizes: list[int]) -> float:
    """Our median at the larger size over our median at the smaller."""
    small, large = sizes
    return statistics.median(ours[large]) / statistics.median(ours[small])


def scaling_table(
    report: Report,
    title: str,
    ours: dict[int, list[float]],
    baseline: tuple[str, dict[int, list[float]]],
    note: str,
) -> None:
    """Ours and a baseline, each at a small and a large table, in ms."""
    label, theirs = baseline
    small, large = sorted(ours)
    report.table(
        title,
        Series(f"ours, N={large:,}", ours[large], "ms"),
        [
            Series(f"ours, N={small:,}", ours[small], "ms"),
            Series(f"{label}, N={large:,}", theirs[large], "ms"),
            Series(f"{label}, N={small:,}", theirs[small], "ms"),
        ],
        higher_is_better=False,
        note=note,
    )


class _Quiet:
    """A logger that drops events: the benchmark times the reply, not logs."""

    def info(self, *args, **kwargs) -> None:
        pass


def main(argv: list[str] | None = None, report: Report | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k peers, few runs")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        layout, mix, count = args.rss_child
        rss_child(layout, mix, int(count))
        return Report()
    report = report or Report()
    if args.quick:
        memory(report, 100_000)
        expiry(report, [10_000, 100_000], 1000, 3)
        listing(report, [1000, 100_000], 5)
    else:
        memory(report, 1_000_000)
        expiry(report, [100_000, 1_000_000], 1000, 5)
        listing(report, [1000, 1_000_000], 20)
    if args.json:
        report.write_json(args.json)
    return report


if __name__ == "__main__":
    main()
