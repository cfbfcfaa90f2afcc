#!/usr/bin/env python3
"""What ``--metrics`` costs the relay per request (docs/deployment.rst).

Two measurements, the relay without and with its request timing:

* in process (default): 10,000 leases in the in-memory table, request
  lines fed to one connection's protocol over a StringTransport, 20,000 per
  round, the variants in turn; best and median round, microseconds per
  request.  The third variant times with ``prometheus_client.Histogram``,
  the cost ``p2p.metrics.DurationHistogram`` avoids.
* ``--tcp``: two real relays (``--metrics`` on one), each loaded in turn
  by ``relay_rate.py``'s load generator (50 clients, a new connection per
  request), requests per second.

    python bench/metrics_cost.py [--rounds 15]
    python bench/metrics_cost.py --tcp [--rounds 3] [--seconds 5]

On a shared machine only the best rounds compare well.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REQUESTS_PER_ROUND = 20_000
BATCH = 100
LEASES = 10_000


def in_process(rounds: int) -> None:
    from prometheus_client import CollectorRegistry, Histogram
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from p2p import wire
    from p2p.limits import ConnectionLimits, ConnectionPolicy
    from p2p.metrics import REQUEST_DURATION_BUCKETS_SECONDS, DurationHistogram
    from p2p.registry import MemoryRegistry
    from p2p.relay import Relay, RelayFactory

    clock = Clock()
    clock.advance(1000)
    relay = Relay(MemoryRegistry(600, 0, 0, 0), clock, ttl=600)
    for n in range(LEASES):
        relay.register(wire.Register(port=1 + n % 1000), f"127.0.{n // 1000}.1")
    factory = RelayFactory(
        relay, None, ConnectionLimits(0, 0, 0), ConnectionPolicy(clock, None, 0, 0)
    )
    address = IPv4Address("TCP", "127.0.0.2", 5000)
    transport = StringTransport(peerAddress=address)
    protocol = factory.buildProtocol(address)
    protocol.makeConnection(transport)
    theirs = Histogram(
        "bench_seconds",
        "bench",
        buckets=REQUEST_DURATION_BUCKETS_SECONDS,
        registry=CollectorRegistry(),
    )
    variants = {
        "without --metrics": None,
        "with --metrics": DurationHistogram().observe,
        "prometheus_client.Histogram": theirs.observe,
    }
    requests = {
        "PEERS limit=20": b"PEERS limit=20\n" * BATCH,
        "REGISTER (renewal)": b"REGISTER 7000\n" * BATCH,
    }
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for request, batch in requests.items():
            for variant, observe in variants.items():
                relay.durations = observe
                started = time.perf_counter()
                for _ in range(REQUESTS_PER_ROUND // BATCH):
                    protocol.dataReceived(batch)
                    transport.clear()
                seconds = time.perf_counter() - started
                per_request = seconds / REQUESTS_PER_ROUND * 1e6
                results.setdefault((request, variant), []).append(per_request)
    for (request, variant), times in results.items():
        print(
            f"{request:20} {variant:28} best {min(times):6.2f} us/request, "
            f"median {statistics.median(times):6.2f}"
        )


def over_tcp(rounds: int, seconds: float) -> None:
    import relay_rate
    from _harness import RELAY_ONE_SOURCE, TWISTD, Daemon

    class Window:
        warmup = 1.0

    Window.seconds = seconds
    work = tempfile.mkdtemp(prefix="p2p-metrics-cost-")
    relays: dict[str, Daemon] = {}
    ports: dict[str, int] = {}
    try:
        for label, extra in (
            ("without --metrics", []),
            ("with --metrics", ["--metrics", "tcp:0:interface=127.0.0.1"]),
        ):
            port_file = os.path.join(work, f"{len(relays)}.port")
            daemon = Daemon(
                label,
                TWISTD
                + ["relay", "--ttl", "600", "--port-file", port_file]
                + ["--listen", "tcp:0:interface=127.0.0.1:backlog=1024"]
                + RELAY_ONE_SOURCE
                + extra,
            ).start()
            relays[label] = daemon
            deadline = time.monotonic() + 30
            while not os.path.exists(port_file):
                if time.monotonic() > deadline or not daemon.alive:
                    raise RuntimeError(f"{label}: the relay did not start")
                time.sleep(0.05)
            with open(port_file) as stream:
                port = int(stream.read().split()[1])
            os.sched_setaffinity(daemon.pid, {relay_rate.SERVER_CORE})
            preload = relay_rate.run_load(port, "preload", 0, 0, 0)
            if preload["done"] != LEASES or preload["errors"]:
                raise RuntimeError(f"{label}: preload failed: {preload}")
            ports[label] = port
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for kind in ("register", "peers"):
                for label, daemon in relays.items():
                    result = relay_rate.measure(daemon, ports[label], kind, Window, 20)
                    results.setdefault((kind, label), []).append(result["rate"])
        for (kind, label), rates in results.items():
            print(
                f"{kind:9} {label:18} best {max(rates):7.0f} req/s, "
                f"median {statistics.median(rates):7.0f}"
            )
    finally:
        for daemon in relays.values():
            daemon.stop()
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tcp", action="store_true", help="real relays over TCP")
    parser.add_argument("--rounds", type=int, help="rounds (default 15, --tcp 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="--tcp window")
    args = parser.parse_args()
    if args.tcp:
        over_tcp(args.rounds or 3, args.seconds)
    else:
        in_process(args.rounds or 15)


if __name__ == "__main__":
    main()
