#!/usr/bin/env python3
"""Shared registry on Redis (issue 11): request rate, round trips, memory.

1. Relay request rate with ``--registry redis://`` against the same relay on
   its in-memory registry, and against ``redis-benchmark`` on the same Redis
   running the very scripts a request runs (``EVALSHA`` of the PEERS page
   and of a REGISTER renewal, 50 clients) plus ``PING``: the store's own
   ceiling.  The load is ``bench/relay_rate.py``'s (50 clients, a new
   connection per request, 10,000 peers preloaded, relays on core 0, the
   load generator on core 1); Redis runs on core 1 too (2 cores: nowhere
   else to put it), so it competes with the load generator.
2. Redis round trips per request, counted by Redis (``INFO commandstats``:
   ``EVALSHA`` and every other command) over 1,000 requests of each kind
   sent one after another, and Redis's own time per call (``usec_per_call``),
   next to the relay's CPU time per request (its CPU share / its rate): the
   per-request costs a larger deployment multiplies.
3. Memory per lease in Redis at 1,000,000 leases (``--quick``: 20,000), one
   lease per host (every source distinct: the per-source count hash holds
   one field per lease), without name filters: ``INFO memory`` used_memory
   before and after, loaded through ``redis-cli --pipe`` with the register
   script; ``MEMORY USAGE`` of one lease's hash.  Side by side:
   ``MemoryRegistry``'s RSS per lease for the same addresses
   (``bench/relay_scale.py``'s measurement, in a fresh interpreter).

redis-server runs with ``--save '' --appendonly no`` in a temporary folder
on a free loopback port; everything is stopped by its pid.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import relay_rate  # noqa: E402
import relay_scale  # noqa: E402
from _harness import Daemon, Report, Series  # noqa: E402

from p2p.redis_registry import EXPIRE_BATCH, SCRIPTS, register_arguments  # noqa: E402
from tests._redis import free_port  # noqa: E402

PREFIX = "p2p:"
# The commands the scripts call (Redis's statistics count them too).
INSIDE = {
    name.lower()
    for script in SCRIPTS.values()
    for name in re.findall(rb"redis\.call\('([A-Z]+)'", script.source)
    for name in [name.decode()]
}
TTL = 600
SEQUENTIAL_REQUESTS = 1000


def start_redis(work: str) -> tuple[Daemon, int]:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (apt-get redis-server)")
    for _ in range(5):
        port = free_port()
        redis = Daemon(
            "redis",
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", work],
        ).start()
        try:
            redis.wait_for("Ready to accept connections", 30)
        except RuntimeError:
            redis.stop()
            continue
        os.sched_setaffinity(redis.pid, {relay_rate.LOAD_CORE})
        return redis, port
    raise RuntimeError("redis-server found no free port")


def cli(port: int, *args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        input=stdin,
        capture_output=True,
        check=True,
    ).stdout.decode()


def info(port: int, section: str) -> dict[str, str]:
    fields = {}
    for line in cli(port, "INFO", section).splitlines():
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def commandstats(port: int) -> dict[str, dict[str, float]]:
    """Per command: calls, usec, usec_per_call."""
    stats = {}
    for key, value in info(port, "commandstats").items():
        parts = dict(item.split("=") for item in value.split(","))
        stats[key.removeprefix("cmdstat_")] = {
            name: float(parts[name]) for name in ("calls", "usec", "usec_per_call")
        }
    return stats


def request_lines(request: bytes, sock: socket.socket, buffer: bytes) -> bytes:
    """Send one request, read its whole reply; return what is left over."""
    sock.sendall(request)
    while b"\n" not in buffer:
        buffer += sock.recv(65536)
    header, _, buffer = buffer.partition(b"\n")
    if not header.startswith(b"OK"):
        raise RuntimeError(f"{request!r}: {header!r}")
    lines = 0
    if request.startswith(b"PEERS"):
        lines = int(header.split()[1])
    while buffer.count(b"\n") < lines:
        buffer += sock.recv(65536)
    for _ in range(lines):
        buffer = buffer.partition(b"\n")[2]
    return buffer


def round_trips(relay_port: int, redis_port: int, request: bytes) -> dict:
    """Redis commands per relay request, over SEQUENTIAL_REQUESTS of them on
    one connection (the relay's periodic sweep, one call per few seconds,
    counts too)."""
    cli(redis_port, "CONFIG", "RESETSTAT")
    with socket.create_connection(("127.0.0.1", relay_port)) as sock:
        buffer = b""
        while b"\n" not in buffer:
            buffer += sock.recv(65536)
        buffer = buffer.partition(b"\n")[2]
        for number in range(SEQUENTIAL_REQUESTS):
            line = request.replace(b"<n>", b"%d" % (1 + number % 1000))
            buffer = request_lines(line, sock, buffer)
    stats = commandstats(redis_port)
    stats.pop("config|resetstat", None)
    stats.pop("info", None)
    # Redis counts the commands a script runs as well: the round trips are
    # the others (the relay's code sends only EVALSHA, and SCRIPT LOAD
    # after a Redis restart).
    sent = {name: s["calls"] for name, s in stats.items() if name not in INSIDE}
    inside = sum(s["calls"] for name, s in stats.items() if name in INSIDE)
    return {
        "per_request": sum(sent.values()) / SEQUENTIAL_REQUESTS,
        "commands": sorted(sent),
        "inside_per_request": inside / SEQUENTIAL_REQUESTS,
        "usec_per_call": stats.get("evalsha", {}).get("usec_per_call", 0.0),
    }


def redis_benchmark(port: int, requests: int, *command: str) -> float:
    """redis-benchmark's requests per second for C{command}, 50 clients."""
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(requests)]
        + ["--csv", *command],
        capture_output=True,
        check=True,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {relay_rate.SERVER_CORE}),
    ).stdout
    rows = [line for line in out.splitlines() if line and not line.startswith('"test')]
    return float(rows[-1].split(",")[1].strip('"'))


def resp(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def register_args(host: str, port: int, now: float) -> list[str | bytes]:
    """EVALSHA arguments of the register script (see p2p.redis_registry)."""
    return [
        "EVALSHA",
        SCRIPTS["register"].sha,
        "0",
        PREFIX,
        repr(now),
        str(EXPIRE_BATCH),
        *(
            value if isinstance(value, bytes) else str(value)
            for value in register_arguments(host, port, now + TTL)
        ),
    ]


def load_scripts(port: int) -> None:
    for script in SCRIPTS.values():
        cli(port, "SCRIPT", "LOAD", script.source.decode())


def memory_per_lease(port: int, count: int) -> dict:
    cli(port, "FLUSHALL")
    load_scripts(port)
    before = int(info(port, "memory")["used_memory"])
    now = time.time()
    commands = b"".join(
        resp(*register_args(*relay_scale.address(index, "distinct"), now))
        for index in range(count)
    )
    started = time.perf_counter()
    cli(port, "--pipe", stdin=commands)
    seconds = time.perf_counter() - started
    after = int(info(port, "memory")["used_memory"])
    leases = int(cli(port, "ZCARD", f"{PREFIX}due").strip())
    if leases != count:
        raise RuntimeError(f"loaded {leases} leases, not {count}")
    host, lease_port = relay_scale.address(0, "distinct")
    hash_bytes = int(
        cli(port, "MEMORY", "USAGE", f"{PREFIX}l:{host} {lease_port}").strip()
    )
    return {
        "bytes": (after - before) / count,
        "hash_bytes": hash_bytes,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None, report: Report | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short and small")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    report = report or Report()
    args.seconds, args.warmup, repeats = (2.0, 0.5, 1) if args.quick else (5.0, 1.0, 3)
    leases = 20_000 if args.quick else 1_000_000
    benchmark_requests = 20_000 if args.quick else 200_000
    work = tempfile.mkdtemp(prefix="p2p-redis-")
    daemons: list[Daemon] = []
    try:
        redis, redis_port = start_redis(work)
        daemons.append(redis)
        memory_relay, memory_port = relay_rate.start_relay(work, "info")
        daemons.append(memory_relay)
        url = f"redis://127.0.0.1:{redis_port}/0"
        shared_relay, shared_port = relay_rate.start_relay(
            work, "info", ["--registry", url], name="shared", ready="registry: redis://"
        )
        daemons.append(shared_relay)
        kinds = [("register", "REGISTER <port>"), ("peers", "PEERS limit=20")]
        results: dict = {}
        for _ in range(repeats):
            for kind, _label in kinds:
                for name, daemon, port in [
                    ("redis", shared_relay, shared_port),
                    ("memory", memory_relay, memory_port),
                ]:
                    cli(redis_port, "CONFIG", "RESETSTAT")
                    result = relay_rate.measure(daemon, port, kind, args, 20)
                    if name == "redis":
                        stats = commandstats(redis_port)
                        result["redis_usec"] = stats["evalsha"]["usec_per_call"]
                    results.setdefault((kind, name), []).append(result)
        # The store's ceiling, on the same table, for the same scripts.
        now = repr(time.time())
        page = ["EVALSHA", SCRIPTS["page"].sha, "0", PREFIX, now]
        page += [str(EXPIRE_BATCH), "0", "0", "20"]
        renewal = register_args("127.0.1.1", 1, time.time())
        ceilings = {
            "register": redis_benchmark(redis_port, benchmark_requests, *renewal),
            "peers": redis_benchmark(redis_port, benchmark_requests, *page),
        }
        ping = redis_benchmark(redis_port, benchmark_requests, "PING")
        trips = {
            "register": round_trips(shared_port, redis_port, b"REGISTER <n>\n"),
            "peers": round_trips(shared_port, redis_port, b"PEERS limit=20\n"),
            "hint": round_trips(
                shared_port, redis_port, b"PEERS hint=0123456789abcdef\n"
            ),
        }
        for number, (kind, label) in enumerate(kinds, 1):
            ours = results[(kind, "redis")]
            memory = results[(kind, "memory")]
            relay_us = [r["server_cpu"] / r["rate"] * 1e6 for r in ours]
            memory_us = [r["server_cpu"] / r["rate"] * 1e6 for r in memory]
            report.table(
                f"11.{number} Relay request rate, {label}, 10,000 peers, "
                f"{relay_rate.CONCURRENCY} clients, new connection per request, "
                "req/s (higher is better)",
                Series("relay, Redis registry", [r["rate"] for r in ours], "req/s"),
                [
                    Series(
                        "relay, in-memory registry",
                        [r["rate"] for r in memory],
                        "req/s",
                    ),
                    Series(
                        "redis-benchmark, the same script",
                        [ceilings[kind]],
                        "req/s",
                    ),
                ],
                note=(
                    f"Redis registry: p50 "
                    f"{statistics.median(r['p50_ms'] for r in ours):.2f} ms, p99 "
                    f"{statistics.median(r['p99_ms'] for r in ours):.2f} ms; relay "
                    f"CPU {statistics.median(r['server_cpu'] for r in ours):.0%} "
                    f"= {statistics.median(relay_us):.0f} us per request (in-memory: "
                    f"{statistics.median(memory_us):.0f} us); Redis "
                    f"{statistics.median(r['redis_usec'] for r in ours):.1f} us per "
                    f"EVALSHA under this load; "
                    f"{trips[kind]['per_request']:.3f} Redis round trips per "
                    f"request ({', '.join(trips[kind]['commands'])}); "
                    "redis-benchmark PING "
                    f"{ping:,.0f} req/s"
                ),
            )
        report.line(
            "11.3 Redis round trips per request (INFO commandstats, "
            f"{SEQUENTIAL_REQUESTS} requests each, one after another)",
            "\n".join(
                f"{label}: {trip['per_request']:.3f} round trips per request "
                f"({', '.join(trip['commands'])}; "
                f"{trip['inside_per_request']:.1f} commands inside the script), "
                f"Redis {trip['usec_per_call']:.1f} us per call"
                for label, trip in [
                    ("REGISTER (renewals)", trips["register"]),
                    ("PEERS limit=20", trips["peers"]),
                    ("PEERS hint= (scans up to 10,000 leases)", trips["hint"]),
                ]
            ),
            trips=trips,
        )
        for daemon in (memory_relay, shared_relay):
            daemon.stop()
            daemons.remove(daemon)
        stored = memory_per_lease(redis_port, leases)
        in_memory = relay_scale.rss_per_peer("ours", "distinct", leases)
        report.table(
            f"11.4 Memory per lease, {leases:,} leases, one per host, no name "
            "filters, bytes (lower is better)",
            Series("Redis (INFO used_memory)", [stored["bytes"]], "B"),
            [Series("MemoryRegistry (RSS)", [in_memory["bytes"]], "B")],
            higher_is_better=False,
            note=(
                f"one lease's hash alone: {stored['hash_bytes']} B (MEMORY USAGE); "
                "the rest is its members in the due and order sorted sets and "
                "its source's, network's and wide network's counts; a name "
                "filter adds about 270 B; loading took "
                f"{stored['seconds'] / leases * 1e6:.1f} us per lease through "
                "redis-cli --pipe"
            ),
        )
    finally:
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        report.write_json(args.json)
    return report


if __name__ == "__main__":
    main()
