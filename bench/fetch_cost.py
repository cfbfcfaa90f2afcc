#!/usr/bin/env python3
"""Connections per fetch (benchmark 6): how many peers a fetch contacts.

N peers share 2 files each (files spread evenly, none shared twice); a client
fetches M files chosen at random, and we count the peers it connects to per
successful fetch (every attempt goes through a counting ``endpoint_for``).

* **hint** (ours): the client's ``p2p get`` path: the relay's full list plus
  its likely holders (``PEERS hint=``, from the name filters the peers
  announced with ``files=``), likely holders tried first.  Target: 1.0.
* **blind** (same-run baseline): the seed's order, the relay's full list
  as is; costs about (N + 1) / 2.

Everything runs in this process on loopback: a real relay (``Relay`` +
``RelayFactory``) and N real peers (``PeerFactory``) on 127.0.0.1
sockets, on the same reactor as the client's L{p2p.fetch.Fetcher} with its
default stagger and timeouts.  Each peer registers through the relay's
request parser, with ``files=`` built from its share exactly as the peer
daemon's announcer builds it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import NullStream, Report, indexed_factory, react_report  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint  # noqa: E402

from p2p import wire  # noqa: E402
from p2p.client import likely_holders, list_peers, peer_endpoint  # noqa: E402
from p2p.fetch import Fetcher  # noqa: E402
from p2p.hints import build_filter  # noqa: E402
from p2p.registry import MemoryRegistry  # noqa: E402
from p2p.relay import Relay, RelayFactory  # noqa: E402
from p2p.session import hinted_order  # noqa: E402
from p2p.sink import PieceSink, StreamOutput  # noqa: E402

FILES_PER_PEER = 2
TIMEOUT_SECONDS = 10.0


async def cluster(reactor, work: str, count: int):
    """A relay and C{count} registered peers; returns the ports to close."""
    relay = Relay(MemoryRegistry(ttl=3600), reactor, ttl=3600)
    server = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    relay_port = await server.listen(RelayFactory(relay, None))
    ports = [relay_port]
    names = []
    for index in range(count):
        folder = os.path.join(work, f"n{count}-peer{index}")
        os.makedirs(folder)
        for j in range(FILES_PER_PEER):
            name = f"file-{index}-{j}.txt"
            names.append(name)
            with open(os.path.join(folder, name), "wb") as stream:
                stream.write(name.encode() * 20)
        factory = await indexed_factory(reactor, folder)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(factory)
        ports.append(port)
        request = wire.Register(
            port.getHost().port, files=build_filter(factory.index.names())
        ).to_line()
        relay.handle(wire.parse_relay_request(request), "127.0.0.1")
    relay_endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay_port.getHost().port)
    return relay_endpoint, names, ports


async def run_fetches(reactor, work, relay, names, hinted: bool, fetches: int, seed):
    """M fetches of random names: peers contacted per fetch, seconds per fetch."""
    contacted = [0]

    def endpoint_for(peer: wire.PeerEntry):
        contacted[0] += 1
        return peer_endpoint(reactor, peer, TIMEOUT_SECONDS)

    fetcher = Fetcher(reactor, endpoint_for=endpoint_for)
    rng = random.Random(seed)
    counts, seconds = [], []
    for _ in range(fetches):
        name = rng.choice(names)
        contacted[0] = 0
        started = time.perf_counter()
        peers = await list_peers(relay, reactor, TIMEOUT_SECONDS)
        if hinted:
            suggested = await likely_holders(relay, reactor, TIMEOUT_SECONDS, name)
            peers = hinted_order(suggested, peers)
        sink = PieceSink(StreamOutput(NullStream()))
        await fetcher.fetch(name, peers, sink)
        seconds.append(time.perf_counter() - started)
        counts.append(contacted[0])
    return counts, seconds


async def measure(reactor, args) -> Report:
    report = Report()
    work = tempfile.mkdtemp(prefix="p2p-fetch-cost-")
    lines = [
        f"{'N':>5} {'fetches':>8} {'hint: peers/fetch':>18} {'max':>4}"
        f" {'blind: peers/fetch':>19} {'(N+1)/2':>8}"
        f" {'hint ms':>8} {'blind ms':>9} {'target':>7}"
    ]
    results = []
    for count in args.n:
        relay, names, ports = await cluster(reactor, work, count)
        fetches = args.fetches
        hint, hint_s = await run_fetches(
            reactor, work, relay, names, True, fetches, count
        )
        blind, blind_s = await run_fetches(
            reactor, work, relay, names, False, fetches, count
        )
        for port in ports:
            await port.stopListening()
        average = statistics.mean(hint)
        verdict = "met" if average <= 1.0 else "MISSED"
        lines.append(
            f"{count:>5} {fetches:>8} {average:>18.2f} {max(hint):>4}"
            f" {statistics.mean(blind):>19.2f} {(count + 1) / 2:>8.1f}"
            f" {statistics.median(hint_s) * 1000:>8.2f}"
            f" {statistics.median(blind_s) * 1000:>9.2f} {'1.0':>7} {verdict}"
        )
        results.append(
            {"n": count, "fetches": fetches, "hint_avg": average,
             "hint_max": max(hint), "blind_avg": statistics.mean(blind),
             "hint_median_s": statistics.median(hint_s),
             "blind_median_s": statistics.median(blind_s)}
        )  # fmt: skip
    lines.append(
        "peers/fetch: peers connected to per successful fetch (averaged); "
        "ms: median time per fetch, relay requests included (hint: 2, blind: 1)"
    )
    report.line(
        "6. Connections per fetch: peers contacted per successful fetch",
        "\n".join(lines),
        results=results,
    )
    return report


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 3, 30 only")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    args.n = [3, 30] if args.quick else [3, 30, 300]
    args.fetches = 20 if args.quick else 100
    return react_report(measure, args)


if __name__ == "__main__":
    main()
