#!/usr/bin/env python3
"""Relay request rate (benchmark 3): new connections per second.

50 concurrent clients, each request on a new TCP connection (connect, read
the banner, send one request, read the whole reply, close), against a relay
holding 10,000 registered peers, for two kinds of request:

* ``REGISTER <port>``: each client cycles through ports 1..1000 of its
  source address (new leases first, renewals once a port comes round again);
* ``PEERS limit=20``: one page of the peer list, as a fetching client asks
  for a handful of candidates (plain ``PEERS``, 1000 lines, is shown too in
  the full run).

Baseline in the same run: ``_relay_baseline.py``, a minimal Twisted
``LineReceiver`` answering one dict lookup per connection.  Rates are
completed requests per second over the measured window (after a warm-up);
latency is connect-to-last-byte, p50 and p99.

Setup, so that neither the load generator nor TCP is the bottleneck:

* the load generator is one process of non-blocking sockets on ``epoll``
  (``selectors``), pinned to core 1; each server is pinned to core 0
  (``os.sched_setaffinity``; the machine has 2 cores).  It reports its own
  CPU use and the server's: a server near 100% and a generator below it means
  the server was measured.
* client sockets bind source addresses 127.0.0.2 .. 127.0.0.33 with
  ``IP_BIND_ADDRESS_NO_PORT`` (the port is picked at connect time, so
  TIME_WAIT ports are reused per destination): one source address caps any
  server near 14,000 new connections/s.
* the relay runs at the default log level (info: a line per new peer, up
  to 600 a minute; ``--log-level=warn`` is measured too in the full run),
  ``--ttl 600`` (no lease expires during the run), and with its limits per
  source and per network set out of reach (every client is in
  127.0.0.0/24): their checks still run.  New leases are dialled back as
  usual (nothing listens on their ports, so each probe is refused at
  once).  Both servers listen with ``backlog=1024``.
* both servers write a reply the same way: at once when the socket takes
  it (``p2p.transports.write_now``), else through the transport.

Loopback only; every process is stopped by its pid.  ``--quick`` finishes in
under 20 s.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import RELAY_ONE_SOURCE, TWISTD, Daemon, Report, Series  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_CORE = 0
LOAD_CORE = 1
SOURCES = [f"127.0.0.{n}" for n in range(2, 34)]
PRELOAD_SOURCES = [f"127.0.1.{n}" for n in range(1, 11)]  # 10 x 1000 peers
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CONCURRENCY = 50


# -- the load generator (runs in its own process) ----------------------------


class _Connection:
    __slots__ = ("sock", "started", "buffer", "phase", "request", "slot")


def load(
    port: int, kind: str, concurrency: int, seconds: float, warmup: float, limit: int
) -> dict:
    """
    Keep C{concurrency} connections going for C{warmup + seconds}; report
    requests done in the measured window, their latencies and errors.

    C{kind}: ``register``, ``peers`` (``PEERS limit=<limit>``), ``peers-all``
    (plain ``PEERS``) or ``preload`` (register 1000 ports from each of
    PRELOAD_SOURCES once, then stop).
    """
    selector = selectors.EpollSelector()
    counters = [0] * concurrency
    # Interleaved, so that the connections in flight spread over the sources.
    preload = iter(
        [(source, port_) for port_ in range(1, 1001) for source in PRELOAD_SOURCES]
    )
    peers_request = b"PEERS limit=%d\n" % limit if kind == "peers" else b"PEERS\n"
    latencies: list[float] = []
    errors = 0
    done = 0
    open_count = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    usage_start = None

    def next_request(slot: int) -> tuple[str, bytes] | None:
        if kind == "preload":
            item = next(preload, None)
            if item is None:
                return None
            return item[0], b"REGISTER %d\n" % item[1]
        counter = counters[slot]
        counters[slot] = counter + 1
        source = SOURCES[(slot + counter * concurrency) % len(SOURCES)]
        if kind == "register":
            return source, b"REGISTER %d\n" % (1 + (counter + slot) % 1000)
        return source, peers_request

    def begin(slot: int) -> None:
        nonlocal open_count, errors
        item = next_request(slot)
        if item is None:
            return
        source, request = item
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        connection = _Connection()
        connection.sock = sock
        connection.started = time.perf_counter()
        connection.buffer = b""
        connection.phase = 0
        connection.request = request
        connection.slot = slot
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            errors += 1
            return
        selector.register(sock, selectors.EVENT_READ, connection)
        open_count += 1

    def finish(connection: _Connection, ok: bool) -> None:
        nonlocal open_count, errors, done
        selector.unregister(connection.sock)
        connection.sock.close()
        open_count -= 1
        now = time.perf_counter()
        if measure_from <= now < stop_at or kind == "preload":
            if ok:
                done += 1
                latencies.append(now - connection.started)
            else:
                errors += 1
        if now < stop_at or kind == "preload":
            begin(connection.slot)

    for slot in range(concurrency):
        begin(slot)
    while open_count:
        if usage_start is None and time.perf_counter() >= measure_from:
            usage_start = (
                resource.getrusage(resource.RUSAGE_SELF),
                time.perf_counter(),
            )
        for key, _ in selector.select(0.5):
            connection = key.data
            try:
                data = connection.sock.recv(262144)
            except OSError:
                finish(connection, False)
                continue
            if not data:
                finish(connection, False)
                continue
            buffer = connection.buffer + data
            if connection.phase == 0:
                if b"\n" not in buffer:
                    connection.buffer = buffer
                    continue
                banner, _, buffer = buffer.partition(b"\n")
                if not banner.startswith(b"P2P/1 relay"):
                    finish(connection, False)
                    continue
                connection.phase = 1
                connection.sock.send(connection.request)
                if not buffer:
                    connection.buffer = buffer
                    continue
            # A reply is complete at its header's line count (+1 for itself).
            end = buffer.find(b"\n")
            if end < 0:
                connection.buffer = buffer
                continue
            header = buffer[:end]
            if not header.startswith(b"OK"):
                finish(connection, False)
                continue
            lines = 1
            if connection.request.startswith(b"PEERS"):
                lines += int(header.split(b" ")[1])
            if buffer.count(b"\n") >= lines:
                finish(connection, True)
            else:
                connection.buffer = buffer
    wall = time.perf_counter() - (usage_start[1] if usage_start else start)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = 0.0
    if usage_start is not None:
        before = usage_start[0]
        cpu = (
            usage.ru_utime - before.ru_utime + usage.ru_stime - before.ru_stime
        ) / wall
    latencies.sort()
    return {
        "done": done,
        "errors": errors,
        "rate": done / seconds if kind != "preload" else done,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else 0.0,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0,
        "cpu": cpu,
    }


# -- the orchestration ---------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(port: int, kind: str, seconds: float, warmup: float, limit: int) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--load", str(port), kind]
    argv += [str(seconds), str(warmup), str(limit)]
    out = subprocess.run(
        argv,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.sched_setaffinity(0, {LOAD_CORE}),
    ).stdout
    return json.loads(out)


def measure(server: Daemon, port: int, kind: str, args, limit: int) -> dict:
    before = cpu_seconds(server.pid), time.perf_counter()
    result = run_load(port, kind, args.seconds, args.warmup, limit)
    spent = cpu_seconds(server.pid) - before[0]
    result["server_cpu"] = spent / (time.perf_counter() - before[1])
    if result["errors"]:
        raise RuntimeError(f"{server.name}: {result['errors']} failed {kind} requests")
    return result


def start_relay(
    work: str,
    log_level: str,
    extra: list[str] | None = None,
    name: str = "relay",
    ready: str | None = None,
) -> tuple[Daemon, int]:
    """A relay on core 0 holding the 10,000 preloaded peers (C{extra}: more
    options, e.g. another registry; C{ready}: a log line to wait for before
    the preload, e.g. a shared registry's, which answers ERR 503 until it
    has reached its store)."""
    port_file = os.path.join(work, f"{name}-{log_level}.port")
    relay = Daemon(
        name,
        TWISTD
        + [f"--log-level={log_level}", "relay", "--ttl", "600"]
        + ["--listen", "tcp:0:interface=127.0.0.1:backlog=1024"]
        + ["--port-file", port_file]
        + RELAY_ONE_SOURCE
        + (extra or []),
    ).start()
    deadline = time.monotonic() + 30
    while not os.path.exists(port_file):
        if time.monotonic() > deadline or not relay.alive:
            relay.stop()
            raise RuntimeError("the relay did not start: " + "".join(relay.lines[-5:]))
        time.sleep(0.05)
    with open(port_file) as stream:
        port = int(stream.read().split()[1])
    os.sched_setaffinity(relay.pid, {SERVER_CORE})
    if ready is not None:
        relay.wait_for(ready, 30, after=0)
    preload = run_load(port, "preload", 0, 0, 0)
    if preload["done"] != 10_000 or preload["errors"]:
        relay.stop()
        tail = "".join(relay.lines[-8:])
        raise RuntimeError(
            f"preload failed: {preload}; the relay's last lines:\n{tail}"
        )
    return relay, port


def start_baseline() -> tuple[Daemon, int]:
    baseline = Daemon(
        "baseline", [sys.executable, os.path.join(HERE, "_relay_baseline.py")]
    ).start()
    port = int(baseline.wait_for("", 30).strip())
    os.sched_setaffinity(baseline.pid, {SERVER_CORE})
    return baseline, port


def table(report: Report, title: str, ours: list[dict], base: list[dict], note: str):
    def series(label: str, results: list[dict]) -> Series:
        return Series(label, [r["rate"] for r in results], "req/s")

    def describe(label: str, results: list[dict]) -> str:
        return (
            f"{label}: p50 {statistics.median(r['p50_ms'] for r in results):.2f} ms, "
            f"p99 {statistics.median(r['p99_ms'] for r in results):.2f} ms; "
            f"server CPU {statistics.median(r['server_cpu'] for r in results):.0%}, "
            f"load generator CPU {statistics.median(r['cpu'] for r in results):.0%}"
        )

    def per_cpu(results: list[dict]) -> float:
        return statistics.median(r["rate"] / r["server_cpu"] for r in results)

    # The load generator (one core) may not saturate the baseline server:
    # requests per second of the server's own CPU compare the two fairly.
    fair = (
        f"per server CPU-second: ours {per_cpu(ours):.0f}, baseline "
        f"{per_cpu(base):.0f} requests, ours/baseline "
        f"{per_cpu(ours) / per_cpu(base):.2f}"
    )
    report.table(
        title,
        series("ours (relay)", ours),
        [series("baseline (LineReceiver)", base)],
        note="\n".join(
            [describe("ours", ours), describe("baseline", base), fair, note]
        ),
    )


def main(argv: list[str] | None = None, report: Report | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, one run")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--load", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        port, kind, seconds, warmup, limit = args.load
        result = load(
            int(port), kind, CONCURRENCY, float(seconds), float(warmup), int(limit)
        )
        print(json.dumps(result))
        return Report()
    report = report or Report()
    args.seconds, args.warmup, repeats = (2.0, 0.5, 1) if args.quick else (5.0, 1.0, 3)
    work = tempfile.mkdtemp(prefix="p2p-rate-")
    daemons: list[Daemon] = []
    try:
        relay, relay_port = start_relay(work, "info")
        daemons.append(relay)
        baseline, baseline_port = start_baseline()
        daemons.append(baseline)
        kinds = [("register", "REGISTER <port>"), ("peers", "PEERS limit=20")]
        results: dict = {}
        for _ in range(repeats):
            for kind, _label in kinds:
                for name, daemon, port in [
                    ("ours", relay, relay_port),
                    ("baseline", baseline, baseline_port),
                ]:
                    result = measure(daemon, port, kind, args, 20)
                    results.setdefault((kind, name), []).append(result)
        for number, (kind, label) in enumerate(kinds, 1):
            table(
                report,
                f"3.{number} Relay request rate, {label}, 10,000 peers registered, "
                f"{CONCURRENCY} clients, new connection per request, req/s "
                "(higher is better)",
                results[(kind, "ours")],
                results[(kind, "baseline")],
                "target: ours/baseline >= 0.90",
            )
        if not args.quick:
            extra = [measure(relay, relay_port, "peers-all", args, 0)]
            report.line(
                "3.3 Plain PEERS (1000 lines per reply), ours",
                f"{extra[0]['rate']:.0f} req/s, p99 {extra[0]['p99_ms']:.1f} ms, "
                f"server CPU {extra[0]['server_cpu']:.0%}",
                result=extra[0],
            )
            relay.stop()
            daemons.remove(relay)
            info, info_port = start_relay(work, "warn")
            daemons.append(info)
            logged = [measure(info, info_port, kind, args, 20) for kind, _ in kinds]
            report.line(
                "3.4 Ours with --log-level=warn (no line per new peer)",
                "\n".join(
                    f"{label}: {r['rate']:.0f} req/s, p99 {r['p99_ms']:.2f} ms"
                    for (_, label), r in zip(kinds, logged, strict=True)
                ),
                results=logged,
            )
    finally:
        for daemon in daemons:
            daemon.stop()
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)
    if args.json:
        report.write_json(args.json)
    return report


if __name__ == "__main__":
    main()
