#!/usr/bin/env python3
"""Many clients (benchmark 7): 200 concurrent gets of a 1 MiB file.

A relay and three peers run as real processes on 127.0.0.1, each peer
holding the same 1 MiB file.  This process starts 200 fetches at once, each
a full client run: the relay's peer list (phase 2), then the fallback
across the peers (phase 3), every piece verified.  Every fetch must succeed
with the source's digest.  Reported: aggregate throughput and the p99
completion time, against a baseline in the same run: the same 200
downloads over HTTP from ``twist web`` with Twisted's ``Agent`` (no
verification).

The clients use four loopback source addresses (127.0.0.2 to 127.0.0.5), as
many machines behind one relay would: each server admits at most 64
connections per source address by default.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    Daemon,
    MiB,
    NullStream,
    Report,
    Series,
    make_file,
    react_report,
    start_peer,
    start_relay,
    start_web,
)
from twisted.internet.defer import ensureDeferred, gatherResults  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402

from p2p import pieces  # noqa: E402
from p2p.client import list_peers  # noqa: E402
from p2p.fetch import Fetcher  # noqa: E402
from p2p.sink import PieceSink, StreamOutput  # noqa: E402

SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


async def ours(reactor, relay_port: int, count: int, expected: str, spool: str):
    """Run C{count} concurrent client fetches; their completion times."""

    def endpoint(source: str, host: str, port: int):
        return TCP4ClientEndpoint(reactor, host, port, 5, bindAddress=(source, 0))

    async def one(index: int) -> float:
        source = SOURCES[index % len(SOURCES)]
        started = time.perf_counter()
        relay = endpoint(source, "127.0.0.1", relay_port)
        peers = await list_peers(relay, reactor, 30)
        fetcher = Fetcher(
            reactor, endpoint_for=lambda peer: endpoint(source, peer.host, peer.port)
        )
        # Verified inline, on the reactor thread: 200 clients in one process
        # would otherwise be 200 worker threads.
        sink = PieceSink(StreamOutput(NullStream()))
        result = await fetcher.fetch("one.bin", peers, sink)
        if result.content.root_hex != expected:
            raise RuntimeError("a client got other content")
        return time.perf_counter() - started

    return await gatherResults([ensureDeferred(one(i)) for i in range(count)])


async def baseline(reactor, web_port: int, count: int, size: int):
    """The same downloads over HTTP from twist web, with Twisted's Agent."""
    import warnings

    from twisted.web.client import Agent, HTTPConnectionPool, readBody

    # readBody warns about HTTP/1.0-style transports; not our concern here.
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)
    url = f"http://127.0.0.1:{web_port}/one.bin".encode()

    async def one() -> float:
        started = time.perf_counter()
        response = await agent.request(b"GET", url)
        body = await readBody(response)
        if len(body) != size:
            raise RuntimeError("short HTTP body")
        return time.perf_counter() - started

    times = await gatherResults([ensureDeferred(one()) for _ in range(count)])
    await pool.closeCachedConnections()
    return times


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def measure(reactor, args) -> Report:
    report = Report()
    work = tempfile.mkdtemp(prefix="p2p-many-")
    share = os.path.join(work, "share")
    spool = os.path.join(work, "spool")
    os.mkdir(share)
    os.mkdir(spool)
    size = 1 * MiB
    make_file(os.path.join(share, "one.bin"), size)
    with open(os.path.join(share, "one.bin"), "rb") as stream:
        expected = pieces.hash_descriptor(stream.fileno(), size)[0].root_hex
    daemons: list[Daemon] = []
    try:
        relay, port = start_relay()
        daemons.append(relay)
        for index in range(3):
            daemons.append(start_peer(port, share, f"peer{index}"))
        web, web_port = start_web(share)
        daemons.append(web)
        ours_rates, ours_p99, base_rates, base_p99 = [], [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            times = await ours(reactor, port, args.clients, expected, spool)
            wall = time.perf_counter() - started
            ours_rates.append(args.clients * size / wall / 1e6)
            ours_p99.append(p99(times) * 1000)
            started = time.perf_counter()
            times = await baseline(reactor, web_port, args.clients, size)
            wall = time.perf_counter() - started
            base_rates.append(args.clients * size / wall / 1e6)
            base_p99.append(p99(times) * 1000)
        title = f"7. {args.clients} concurrent gets of a 1 MiB file over 3 peers"
        report.table(
            f"{title}: aggregate MB/s (higher is better)",
            Series("p2p (relay + fallback + verify)", ours_rates, "MB/s"),
            [Series("twist web + Agent (no verify)", base_rates, "MB/s")],
        )
        report.table(
            f"{title}: p99 completion, ms (lower is better)",
            Series("p2p", ours_p99, "ms"),
            [Series("twist web + Agent", base_p99, "ms")],
            higher_is_better=False,
            note=(
                f"all {args.clients} fetches succeeded with the source's root in "
                f"every run; median of medians {statistics.median(ours_p99):.0f} ms"
            ),
        )
    finally:
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer clients, one run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    args.clients = 40 if args.quick else 200
    args.repeats = 1 if args.quick else 3
    return react_report(measure, args)


if __name__ == "__main__":
    main()
