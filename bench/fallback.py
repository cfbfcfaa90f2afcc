#!/usr/bin/env python3
"""Fallback latency (benchmark 5): what each skipped peer costs.

The holder of a small file is the (k+1)-th peer; the k peers before it are
(a) refused (a closed port), (b) blackholed (a listener whose backlog is
full, so SYNs are dropped) or (c) answering "not found" (a real peer with an
empty share), for k = 1, 3, 10.  The time until the file is in (first byte
and last byte are one segment apart for this file) is compared with the
holder being first (k = 0); the cost per skipped peer is the difference
divided by k.  Targets: (a) and (c) <= 5 ms per skipped peer; (b) bounded by
the stagger delay per skipped peer (0.25 s), not the connect timeout (5 s).

Everything runs in this process on loopback: the peers are real P2P/1
servers on the same reactor as the client's L{p2p.fetch.Fetcher}.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import NullStream, Report, indexed_factory, react_report  # noqa: E402
from twisted.internet.endpoints import TCP4ServerEndpoint  # noqa: E402

from p2p import wire  # noqa: E402
from p2p.fetch import DEFAULT_STAGGER_SECONDS, Fetcher  # noqa: E402
from p2p.sink import PieceSink, StreamOutput  # noqa: E402

NAME = "wanted.txt"


class Network:
    """Loopback servers of each kind, and the sockets to close afterwards."""

    def __init__(self, reactor, work: str) -> None:
        self.reactor = reactor
        self.sockets: list[socket.socket] = []
        self.ports = []
        holder = os.path.join(work, "holder")
        empty = os.path.join(work, "empty")
        os.makedirs(holder, exist_ok=True)
        os.makedirs(empty, exist_ok=True)
        with open(os.path.join(holder, NAME), "wb") as stream:
            stream.write(b"x" * 1000)
        self.holder_share = holder
        self.empty_share = empty

    async def serve(self, share: str) -> int:
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(await indexed_factory(self.reactor, share))
        self.ports.append(port)
        return port.getHost().port

    def refused(self) -> int:
        # Bound but not listening: connections are refused at once.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.sockets.append(sock)
        return sock.getsockname()[1]

    def blackholed(self) -> int:
        # A listener nobody accepts on, its backlog filled: further SYNs are
        # dropped and the connection attempt hangs until its timeout.
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        self.sockets.append(server)
        port = server.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            self.sockets.append(filler)
        return port

    async def close(self) -> None:
        for port in self.ports:
            await port.stopListening()
        for sock in self.sockets:
            sock.close()


def entry(port: int) -> wire.PeerEntry:
    return wire.PeerEntry(wire.peer_id_for("127.0.0.1", port), "127.0.0.1", port)


async def measure(reactor, args) -> Report:
    report = Report()
    work = tempfile.mkdtemp(prefix="p2p-fallback-")
    network = Network(reactor, work)
    holder = entry(await network.serve(network.holder_share))
    not_found = [entry(await network.serve(network.empty_share)) for _ in range(10)]
    kinds = {
        "(a) refused": [entry(network.refused()) for _ in range(10)],
        "(b) blackholed": [entry(network.blackholed()) for _ in range(10)],
        "(c) not found": not_found,
    }
    fetcher = Fetcher(reactor)  # the client's defaults: stagger, timeouts

    async def one(peers) -> float:
        sink = PieceSink(StreamOutput(NullStream()))
        started = time.perf_counter()
        await fetcher.fetch(NAME, peers, sink)
        elapsed = time.perf_counter() - started
        return elapsed

    repeats = args.repeats
    base = [await one([holder]) for _ in range(repeats)]
    base_median = statistics.median(base)
    lines = [
        f"holder first (k=0): median {base_median * 1000:.2f} ms over {repeats} runs",
        f"{'skipped peers':16} {'k':>3} {'median ms':>10} {'per skipped peer':>17}"
        f" {'target':>10}",
    ]
    results = []
    for kind, skipped in kinds.items():
        for k in args.k:
            runs = []
            for _ in range(
                repeats if "blackholed" not in kind else max(1, repeats // 5)
            ):
                runs.append(await one(skipped[:k] + [holder]))
            median = statistics.median(runs)
            per_peer = (median - base_median) / k
            target = DEFAULT_STAGGER_SECONDS if "blackholed" in kind else 0.005
            verdict = "met" if per_peer <= target * 1.05 else "MISSED"
            lines.append(
                f"{kind:16} {k:>3} {median * 1000:>10.2f} {per_peer * 1000:>14.2f} ms"
                f" {'<=' + format(target * 1000, 'g') + ' ms':>10} {verdict}"
            )
            results.append(
                {"kind": kind, "k": k, "median_s": median, "per_peer_s": per_peer,
                 "target_s": target, "runs": runs}
            )  # fmt: skip
    await network.close()
    report.line(
        "5. Fallback latency: time to the file behind k skipped peers",
        "\n".join(lines),
        base_median_s=base_median,
        results=results,
    )
    return report


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    args.repeats = 3 if args.quick else 25
    args.k = [1, 3, 10]
    return react_report(measure, args)


if __name__ == "__main__":
    main()
