#!/usr/bin/env python3
"""Attacks on the relay (issue 9): what each gets, and what it costs others.

Real ``twist relay`` and ``twist peer`` processes and the ``p2p`` client on
127.0.0.1; the attackers bind to other loopback sources (127.x.y.z: to the
relay, other sources in other /24s) and never leave 127.0.0.0/8.  Each
figure is set against a baseline taken in the same run:

1. Sybil leases: ten /24s send REGISTER for closed ports (leases accepted
   against refused); an honest peer registers after them: its position in
   ``p2p peers`` and the time of ``p2p get`` against the same on a relay
   with no attacker.  Then the dial-back's limit: Sybil ports that answer
   with a peer's banner (and nothing else), with the filter bits of the
   name fetched, or without.
2. Connection flood: twenty sources hold every connection the caps allow;
   a well-behaved ``PEERS`` p50/p99 against the idle relay.
3. Request flood: 64 connections pipelining ``PEERS hint=`` (a niced
   process of its own, and one at normal priority: on loopback the flood
   shares the relay's CPU); the well-behaved p50/p99 against the idle
   relay, and the relay's CPU per flood connection.
4. Token guessing: guesses compared per second, against guesses sent, from
   one source and from ten /24s.
5. Log amplification: the relay's log bytes per second under a flood of
   refusals, against the bytes it received; and under a registration flood.
6. Stalled readers: 128 connections pipelining ``PEERS`` (about 24 KB each
   answer) without reading: the relay's RSS growth over TLS, against plain
   TCP, and what its sockets hold in the kernel (not in its RSS).
7. Idle connections: the relay's RSS with none and with N idle connections
   (N = 10,000 from 40 /24s; ``--quick``: 2,000), bytes per connection;
   the same over TLS.
8. Stalled downloads, against a peer: N connections (3,000 from 15 /24s;
   ``--quick``: 1,000) each send ``GET`` for a 20 GiB file (sparse;
   ``--quick``: 4 GiB), or ``LIST``, and read nothing: the peer's RSS
   growth, against N connections that ask for the file's header alone;
   over plain TCP, then over TLS (``ssl:``), where every byte is encrypted
   in the peer's memory; and what the peer's kernel send queues hold.

Every flood is bounded in time and count; every process is stopped by its
pid.  ``--quick`` shrinks the counts (about 50 s on our 2-core machine);
the default takes about 100 s.  The attack clients are those of the tests
(``tests/_attackers.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import (  # noqa: E402
    P2P,
    TWISTD,
    Daemon,
    MiB,
    Report,
    Series,
    peak_rss_bytes,
    react_report,
    rss_bytes,
    run_timed,
)
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from p2p import hints  # noqa: E402
from tests._attackers import (  # noqa: E402
    Crowd,
    Flood,
    chunks,
    closed_ports,
    flood_argv,
    hold,
    kind,
    p99,
    read_replies,
    replies,
    send_queue_bytes,
    stalled_readers,
    unverified_tls_context,
)
from tests._certs import Authority  # noqa: E402

LOOPBACK = "tcp:0:interface=127.0.0.1"
NAME = "sample1.txt"
SAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "p2p", "samples", NAME
)
ERRORS_PER_CONNECTION = 10
KiB = 1024


# -- processes ------------------------------------------------------------------


def start_relay(
    *args: str, listens: tuple[str, ...] = (LOOPBACK,), env: dict | None = None
) -> tuple[Daemon, list[str]]:
    """A relay on each of C{listens}; its addresses (HOST:PORT), in order."""
    argv = TWISTD + ["relay"]
    for listen in listens:
        argv += ["--listen", listen]
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        relay = Daemon("relay", argv + list(args)).start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    addresses: list[str] = []
    try:
        for _ in listens:
            line = relay.wait_for("listening on", 30, after=relay.mark)
            relay.mark = relay.lines.index(line) + 1
            addresses.append(line.rsplit(" ", 1)[1].strip())
    except BaseException:
        relay.stop()
        raise
    relay.mark = 0
    return relay, addresses


def start_peer(relay: str, work: str, label: str) -> Daemon:
    """A peer sharing NAME, registered at C{relay}."""
    share = os.path.join(work, label)
    os.mkdir(share)
    shutil.copy(SAMPLE, share)
    peer = Daemon(
        label,
        TWISTD
        + ["peer", "--relay", relay, "--share", share, "--listen", LOOPBACK]
        + ["--state", share + ".state"],
    ).start()
    try:
        peer.wait_for("registered at the relay", 30)
    except BaseException:
        peer.stop()
        raise
    return peer


def wait_match(daemon: Daemon, pattern: str, timeout: float, after: int = 0):
    """Block until a log line from C{after} on matches C{pattern}."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    with daemon.changed:
        while True:
            for line in daemon.lines[after:]:
                match = regex.search(line)
                if match:
                    return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not daemon.alive:
                raise RuntimeError(f"{daemon.name}: no {pattern!r} in {timeout} s")
            daemon.changed.wait(remaining)


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(relay: str, *args: str, timeout: float = 600):
    """(A thread.)  One ``p2p`` run, timed."""
    return run_timed(P2P + ["--relay", relay, *args], timeout=timeout)


async def warm_samples(crowd: Crowd, address: str, count: int) -> list[float]:
    """C{count} well-behaved requests after a few unmeasured ones: the idle
    baseline must not pay for the relay's first requests (imports,
    caches)."""
    await crowd.well_behaved(address, 20)
    return await crowd.well_behaved(address, count)


def ms(values: list[float]) -> list[float]:
    return [v * 1000 for v in values]


def p50(values: list[float]) -> float:
    return statistics.median(values)


def fmt(counter: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counter.most_common())


# -- 1. Sybil --------------------------------------------------------------------


class BannerOnly(Protocol):
    """A Sybil 'peer': greets like a peer, then answers nothing."""

    def connectionMade(self) -> None:
        self.transport.write(b"P2P/2 peer\n")


class BannerFactory(Factory):
    noisy = False
    protocol = BannerOnly


async def sybil(reactor, args, report: Report, work: str) -> None:
    crowd = Crowd(reactor)
    daemons: list[Daemon] = []
    try:
        # The baseline: the honest peer alone on a relay.
        relay, (alone,) = await deferToThread(start_relay)
        daemons.append(relay)
        daemons.append(await deferToThread(start_peer, alone, work, "alone"))
        baseline = []
        for _ in range(args.repeats):
            run = await deferToThread(client, alone, "get", NAME)
            assert run.returncode == 0, run.stderr
            baseline.append(run.seconds)

        relay, (attacked,) = await deferToThread(
            start_relay, "--report-interval", "0.5"
        )
        daemons.append(relay)
        closed = closed_ports(args.sybil_requests)
        lines = [b"REGISTER %d" % port for port in closed]

        async def one(source: str) -> Counter[str]:
            got: Counter[str] = Counter()
            for batch in chunks(lines, ERRORS_PER_CONNECTION):
                answer = await crowd.exchange(attacked, source, batch)
                got.update(
                    kind(a)
                    for a in replies(answer.lines)
                    if not a.endswith(b"too many errors")
                )
            return got

        started = time.perf_counter()
        outcomes = await gatherResults(
            [Deferred.fromCoroutine(one(f"127.{n}.0.1")) for n in range(1, 11)]
        )
        flood_seconds = time.perf_counter() - started
        got = sum(outcomes, Counter())
        mark = len(relay.lines)
        daemons.append(await deferToThread(start_peer, attacked, work, "honest"))
        await deferToThread(
            wait_match, relay, r"\b[1-9]\d* answered the dial-back", 30, mark
        )
        listing = await deferToThread(client, attacked, "peers")
        listed = listing.stdout.decode().splitlines()
        position = [n for n, e in enumerate(listed) if e.startswith("127.0.0.1:")]
        under = []
        for _ in range(args.repeats):
            run = await deferToThread(client, attacked, "get", NAME)
            assert run.returncode == 0, run.stderr
            under.append(run.seconds)
        report.line(
            "1. Sybil leases: 10 sources in 10 /24s, "
            f"{args.sybil_requests} REGISTER each (closed ports)",
            f"{sum(got.values())} requests in {flood_seconds:.1f} s: {fmt(got)}\n"
            f"leases accepted {got['OK']} "
            f"({got['OK'] / max(1, sum(got.values())):.1%}); the honest peer, "
            f"registered after them, is at position {position} of "
            f"{len(listed)} in `p2p peers`",
            accepted=got["OK"],
            refused=sum(got.values()) - got["OK"],
            position=position,
        )
        report.table(
            "1. `p2p get` time, s (lower is better)",
            Series(f"under {got['OK']} Sybil leases", under, "s"),
            [Series("honest peer alone", baseline, "s")],
            higher_is_better=False,
        )

        # The dial-back's limit: ports that answer with a peer's banner.
        for targeted in (False, True):
            seconds, position, listed, said = await banner_sybils(
                reactor, args, crowd, work, daemons, targeted
            )
            what = "with the name's filter bits" if targeted else "without a filter"
            report.line(
                f"1b. {args.banner_fakes} Sybil leases (one /24) whose ports answer "
                f"the dial-back with a peer banner and nothing more, {what}",
                f"all verified; the honest peer, registered after them, is at "
                f"position {position} of {listed}; `p2p get` took {seconds:.1f} s "
                f"(alone: {p50(baseline):.2f} s); {said}",
                fakes=args.banner_fakes,
                targeted=targeted,
                position=position,
                seconds=seconds,
            )
    finally:
        await crowd.close_all()
        for daemon in daemons:
            daemon.stop()


async def banner_sybils(
    reactor, args, crowd: Crowd, work: str, daemons: list[Daemon], targeted: bool
) -> tuple[float, list[int], int, str]:
    """
    Sybil leases whose ports send ``P2P/2 peer`` and nothing more (this
    process serves them), registered before an honest peer, all verified by
    the dial-back: the time of ``p2p get``, the honest peer's position and
    the length of the listing, and the client's "suggested" line.
    """
    relay, (address,) = await deferToThread(start_relay, "--report-interval", "0.5")
    daemons.append(relay)
    source = "127.30.0.1"
    listeners = [
        reactor.listenTCP(0, BannerFactory(), interface=source)
        for _ in range(args.banner_fakes)
    ]
    try:
        options = b" files=" + hints.build_filter([NAME]).encode() if targeted else b""
        lines = [b"REGISTER %d%s" % (p.getHost().port, options) for p in listeners]
        answer = await crowd.exchange(address, source, lines)
        assert all(a.startswith(b"OK") for a in replies(answer.lines)), answer.lines
        mark = len(relay.lines)
        label = "targeted" if targeted else "untargeted"
        daemons.append(await deferToThread(start_peer, address, work, label))

        def verified(mark: int = mark) -> None:
            total = 0
            while total < args.banner_fakes + 1:
                match = wait_match(relay, r"\b(\d+) answered the dial-back", 30, mark)
                total += int(match.group(1))
                mark = relay.lines.index(match.string, mark) + 1

        # In a thread: this process's reactor must answer the dial-backs.
        await deferToThread(verified)
        listing = await deferToThread(client, address, "peers")
        listed = listing.stdout.decode().splitlines()
        position = [n for n, e in enumerate(listed) if e.startswith("127.0.0.1:")]
        run = await deferToThread(client, address, "get", NAME)
        assert run.returncode == 0, run.stderr
        said = [
            line.split(": ", 2)[-1]
            for line in run.stderr.decode().splitlines()
            if "suggested for" in line
        ]
        return run.seconds, position, len(listed), said[0] if said else ""
    finally:
        for listener in listeners:
            await listener.stopListening()
        relay.stop()


# -- 2. Connection flood ---------------------------------------------------------


async def connection_flood(reactor, args, report: Report) -> None:
    crowd = Crowd(reactor)
    relay, (address,) = await deferToThread(start_relay)
    try:
        idle = await warm_samples(crowd, address, args.samples)
        sources = [f"127.20.0.{n}" for n in range(1, 11)]
        sources += [f"127.{n}.0.1" for n in range(21, 31)]
        held = await gatherResults(
            [Deferred.fromCoroutine(hold(crowd, address, s, 40)) for s in sources]
        )
        kept = sum(len(clients) for clients, _ in held)
        refused: Counter[str] = sum((r for _, r in held), Counter())
        during = await crowd.well_behaved(address, args.samples)
        report.table(
            f"2. Connection flood ({kept} held from 20 sources, {sum(refused.values())}"
            " refused): well-behaved PEERS p99, ms (lower is better)",
            Series("during the flood", [p99(ms(during))], "ms"),
            [Series("idle relay", [p99(ms(idle))], "ms")],
            higher_is_better=False,
            note=f"p50 {p50(ms(during)):.2f} ms during, {p50(ms(idle)):.2f} ms "
            f"idle; refused: {fmt(refused)}",
        )
    finally:
        await crowd.close_all()
        relay.stop()


# -- 3. Request flood ------------------------------------------------------------


async def request_flood(reactor, args, report: Report) -> None:
    crowd = Crowd(reactor)
    relay, (address,) = await deferToThread(start_relay)
    hint = "PEERS hint=" + hints.name_hint(NAME)
    sources = ["127.70.0.1", "127.70.0.2", "127.71.0.1", "127.71.0.2"]
    slots = [(source, 16, 50, hint) for source in sources]
    rows = {}
    try:
        idle = await warm_samples(crowd, address, args.samples)
        # What a well-behaved request costs the relay, to subtract from its
        # CPU during the floods (the samples go on meanwhile).
        cpu = cpu_seconds(relay.pid)
        await crowd.well_behaved(address, 200)
        per_sample = (cpu_seconds(relay.pid) - cpu) / 200
        for nice in (10, 0):
            cpu = cpu_seconds(relay.pid)
            flooder = Daemon(
                "flood", flood_argv(address, slots, args.flood_seconds, nice=nice)
            ).start()
            try:
                await deferToThread(flooder.wait_for, "flooding", 30)

                def over(flooder=flooder) -> bool:
                    return not flooder.alive or any(
                        line.startswith("{") for line in flooder.lines
                    )

                during = await crowd.well_behaved(address, 1500, over)
                await deferToThread(flooder.wait_for, '{"got"', 60)
            finally:
                flooder.stop()
            result = json.loads(
                next(line for line in flooder.lines if line.startswith('{"got"'))
            )
            got = Counter(result["got"])
            cpu = cpu_seconds(relay.pid) - cpu
            rows[nice] = (during, result, cpu, got, cpu - len(during) * per_sample)
        during, result, cpu, got, flood_cpu = rows[10]
        report.table(
            "3. Request flood (64 connections pipelining PEERS hint=, "
            f"{args.flood_seconds:g} s): well-behaved PEERS p99, ms (lower is better)",
            Series("during, flooder niced 10", [p99(ms(during))], "ms"),
            [
                Series(
                    "during, flooder at normal priority", [p99(ms(rows[0][0]))], "ms"
                ),
                Series("idle relay", [p99(ms(idle))], "ms"),
            ],
            higher_is_better=False,
            note=f"p50 {p50(ms(during)):.2f} ms (niced), {p50(ms(rows[0][0])):.2f} ms "
            f"(normal), {p50(ms(idle)):.2f} ms idle; {len(during)} and "
            f"{len(rows[0][0])} samples",
        )
        report.line(
            "3. Request flood: what the flood got, what it cost the relay",
            f"niced run: {result['exchanges']} connections in "
            f"{result['seconds']:.2f} s ({result['exchanges'] / result['seconds']:.0f}"
            f"/s): {fmt(got)}\nrelay CPU {cpu:.2f} s "
            f"({cpu / result['seconds']:.0%} of a core), of which "
            f"{len(during)} well-behaved requests took about "
            f"{len(during) * per_sample:.2f} s (at {per_sample * 1e3:.2f} ms each, "
            f"idle): {flood_cpu / result['exchanges'] * 1e3:.2f} ms per flood "
            f"connection (about {ERRORS_PER_CONNECTION + 1} answers each)",
            connections=result["exchanges"],
            ok=got["OK"],
            cpu_ms_per_connection=flood_cpu / result["exchanges"] * 1e3,
        )
    finally:
        await crowd.close_all()
        relay.stop()


# -- 4. Token guessing -----------------------------------------------------------


async def token_guessing(reactor, args, report: Report) -> None:
    crowd = Crowd(reactor)
    token = os.urandom(18).hex()
    relay, (address,) = await deferToThread(start_relay, env={"P2P_TOKEN": token})
    guess = [b"REGISTER 9000 token=" + os.urandom(18).hex().encode()]
    try:
        figures = {}
        for label, sources in (
            ("1 source", ["127.90.0.1"]),
            ("10 sources in 10 /24s", [f"127.{n}.0.1" for n in range(140, 150)]),
        ):
            flood = Flood(crowd, address, args.flood_seconds)
            for source in sources:
                flood.add(
                    source, guess * ERRORS_PER_CONNECTION, slots=8 // len(sources) or 1
                )
            await flood.run()
            got = flood.got
            sent = sum(n for k, n in got.items() if k.startswith("ERR "))
            figures[label] = (
                got["ERR 401 wrong token"] / flood.duration,
                sent / flood.duration,
                got,
            )
        right = b"REGISTER 9001 token=" + token.encode()
        answer = replies((await crowd.exchange(address, "127.91.0.1", [right])).lines)
        one, many = figures["1 source"], figures["10 sources in 10 /24s"]
        report.table(
            f"4. Token guessing for {args.flood_seconds:g} s: guesses compared per "
            "second (lower is better)",
            Series("compared, 1 source", [one[0]], "/s"),
            [
                Series("compared, 10 sources in 10 /24s", [many[0]], "/s"),
                Series("sent and refused, 1 source", [one[1]], "/s"),
            ],
            higher_is_better=False,
            note=f"1 source: {fmt(one[2])}\n10 sources: {fmt(many[2])} "
            f"({many[1]:.0f} answered/s)\nthe brake doubles a source's wait "
            "after each wrong token, so its rate falls the longer it tries; "
            "sources add up.  The right token from another address: "
            f"{answer[0][:2].decode()}",
        )
    finally:
        await crowd.close_all()
        relay.stop()


# -- 5. Log amplification --------------------------------------------------------


def stopped_log(relay: Daemon, mark: int) -> list[str]:
    """
    (A thread.)  Stop C{relay} (SIGTERM) and wait for its last line: the
    lines it logged from C{mark} until it was told to stop, all read.
    """
    relay.stop()
    # Not Daemon.wait_for: it gives up once the process is gone, maybe
    # before its reader thread has read the last lines.
    deadline = time.monotonic() + 10
    with relay.changed:
        while not any("Main loop terminated" in x for x in relay.lines[mark:]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError("the relay's last log line never came")
            relay.changed.wait(remaining)
        lines = relay.lines[mark:]
    end = next(n for n, line in enumerate(lines) if "Received SIGTERM" in line)
    return lines[:end]


async def log_amplification(reactor, args, report: Report) -> None:
    crowd = Crowd(reactor)
    relay, (address,) = await deferToThread(start_relay)
    try:
        capped = "127.122.0.1"
        await hold(crowd, address, capped, 32)
        mark = len(relay.lines)
        hint = b"PEERS hint=" + hints.name_hint(NAME).encode()
        flood = Flood(crowd, address, args.flood_seconds)
        flood.add("127.120.0.1", [b"HELLO"] * ERRORS_PER_CONNECTION, slots=4)
        flood.add("127.120.0.2", [b"x" * 2000], slots=4)
        flood.add("127.121.0.1", [hint] * 50, slots=8)
        flood.add(capped, [b"PEERS"], slots=4)
        await flood.run()
        await crowd.close_all()
        during = await deferToThread(stopped_log, relay, mark)
        refused_bytes = sum(len(line.encode()) for line in during)
        refusals = sum(n for k, n in flood.got.items() if k.startswith("ERR "))
    finally:
        await crowd.close_all()
        relay.stop()

    # A registration flood: every new lease is a table change, logged up to
    # 600 a minute (and dialled back: no line per probe).
    relay, (address,) = await deferToThread(start_relay)
    try:
        mark = len(relay.lines)
        lines = [b"REGISTER %d" % port for port in closed_ports(64)]
        started = time.perf_counter()
        registered = 0
        for n in range(args.registration_networks):
            answer = await crowd.exchange(address, f"127.{150 + n}.0.1", lines)
            registered += sum(a.startswith(b"OK") for a in replies(answer.lines))
        seconds = time.perf_counter() - started
        await crowd.close_all()
        table = await deferToThread(stopped_log, relay, mark)
        table_bytes = sum(len(line.encode()) for line in table)
    finally:
        await crowd.close_all()
        relay.stop()
    report.table(
        f"5. Log amplification, {flood.duration:.1f} s of refusals: relay log "
        "bytes per second (lower is better)",
        Series("log written", [refused_bytes / flood.duration], "B/s"),
        [Series("bytes received", [flood.sent / flood.duration], "B/s")],
        higher_is_better=False,
        note=f"{refusals} refusals ({fmt(flood.got)}) logged as "
        f"{len(during)} lines, {refused_bytes} bytes: "
        f"{refused_bytes / flood.sent:.6f} log bytes per byte received; the "
        f"rest is one summary line a minute\nregistration flood: {registered} "
        f"new leases in {seconds:.1f} s logged as {len(table)} lines, "
        f"{table_bytes} bytes ({table_bytes / max(1, registered):.0f} B per "
        "lease; at most 600 lines a minute, then counted)",
    )


# -- 6. Stalled readers ----------------------------------------------------------


async def stalled(reactor, args, report: Report, work: str) -> None:
    crowd = Crowd(reactor)
    authority = Authority(os.path.join(work, "pki"))
    credentials = authority.issue("relay", ips=["127.0.0.1"])
    figures = {}
    for tls in (True, False):
        relay, (plain, secure) = await deferToThread(
            start_relay,
            "--no-dial-back",
            "--requests-per-second",
            "0",
            "--network-requests-per-second",
            "0",
            listens=(LOOPBACK, credentials.listen()),
        )
        connections = []
        try:
            ports = closed_ports(64)
            for n in range(110, 114):
                for m in (1, 2):
                    batch = [b"REGISTER %d" % port for port in ports]
                    await crowd.exchange(plain, f"127.{n}.0.{m}", batch)
            await crowd.well_behaved(plain, 1)
            before = rss_bytes(relay.pid)
            host, port = (secure if tls else plain).rsplit(":", 1)
            sources = ["127.100.0.1", "127.100.0.2", "127.101.0.1", "127.101.0.2"]
            connections = await deferToThread(
                stalled_readers, host, int(port), sources, args.pipelined, 32, tls
            )
            during = await crowd.well_behaved(plain, 20)
            peak = peak_rss_bytes(relay.pid)
            queued = send_queue_bytes(int(port))
            read = await gatherResults(
                [deferToThread(read_replies, c, 10) for c in connections[:4]]
            )
            assert read == [10] * 4, read
            figures[tls] = (before, peak, rss_bytes(relay.pid), during, queued)
        finally:
            for connection in connections:
                connection.close()
            relay.stop()
    await crowd.close_all()
    tls_figures, tcp_figures = figures[True], figures[False]
    report.table(
        f"6. 128 connections pipelining {args.pipelined} PEERS (24 KB answers) "
        "without reading: relay peak RSS growth, MiB (lower is better)",
        Series("over TLS", [(tls_figures[1] - tls_figures[0]) / MiB], "MiB"),
        [Series("over plain TCP", [(tcp_figures[1] - tcp_figures[0]) / MiB], "MiB")],
        higher_is_better=False,
        note=f"unbounded, the answers would take "
        f"{128 * args.pipelined * 24 * KiB / MiB:.0f} MiB; RSS before/peak/after "
        f"TLS {tls_figures[0] / MiB:.1f}/{tls_figures[1] / MiB:.1f}/"
        f"{tls_figures[2] / MiB:.1f} MiB, TCP {tcp_figures[0] / MiB:.1f}/"
        f"{tcp_figures[1] / MiB:.1f}/{tcp_figures[2] / MiB:.1f} MiB; PEERS p99 "
        f"meanwhile {p99(ms(tls_figures[3])):.1f} ms (TLS), "
        f"{p99(ms(tcp_figures[3])):.1f} ms (TCP); every reader that read again "
        "got its answers.\nNot in the RSS: the relay's kernel send queues held "
        f"{tls_figures[4] / MiB:.0f} MiB (TLS) and {tcp_figures[4] / MiB:.0f} MiB "
        "(TCP) for these 128 connections",
    )


# -- 7. Idle connections ---------------------------------------------------------


async def idle_connections(reactor, args, report: Report, work: str) -> None:
    crowd = Crowd(reactor)
    count = args.idle
    # Forty /24s of ten addresses, 25 connections each: no cap is reached.
    per_network = count // 40
    sources = [
        f"127.{160 + n}.0.{m}"
        for n in range(40)
        for m in range(1, per_network // 25 + 1)
    ]
    relay, (address,) = await deferToThread(
        start_relay,
        "--max-connections",
        str(count + 2000),
        "--idle-timeout",
        "600",
    )
    try:
        await crowd.well_behaved(address, 1)
        before = rss_bytes(relay.pid)
        started = time.perf_counter()
        held = await gatherResults(
            [Deferred.fromCoroutine(hold(crowd, address, s, 25)) for s in sources]
        )
        opened = sum(len(clients) for clients, _ in held)
        seconds = time.perf_counter() - started
        assert opened == len(sources) * 25, opened
        await crowd.well_behaved(address, 1)
        after = rss_bytes(relay.pid)
    finally:
        await crowd.close_all()
        relay.stop()
    tcp_per = (after - before) / opened

    authority = Authority(os.path.join(work, "pki-idle"))
    credentials = authority.issue("relay", ips=["127.0.0.1"])
    relay, (plain, secure) = await deferToThread(
        start_relay,
        "--idle-timeout",
        "600",
        listens=(LOOPBACK, credentials.listen()),
    )
    connections = []
    try:
        await crowd.well_behaved(plain, 1)
        tls_before = rss_bytes(relay.pid)
        host, port = secure.rsplit(":", 1)
        tls_sources = [
            f"127.{200 + n // 10}.0.{n % 10 + 1}" for n in range(args.idle_tls // 25)
        ]
        connections = await deferToThread(
            stalled_readers, host, int(port), tls_sources, 1, 25, True
        )
        await crowd.well_behaved(plain, 1)
        tls_after = rss_bytes(relay.pid)
    finally:
        for connection in connections:
            connection.close()
        await crowd.close_all()
        relay.stop()
    tls_per = (tls_after - tls_before) / len(connections)
    report.table(
        "7. Idle connection cost: relay RSS per open connection, KiB (lower is better)",
        Series(f"plain TCP, {opened:,} connections", [tcp_per / KiB], "KiB"),
        [Series(f"TLS, {len(connections):,} connections", [tls_per / KiB], "KiB")],
        higher_is_better=False,
        note=f"TCP: RSS {before / MiB:.1f} MiB with none, {after / MiB:.1f} MiB "
        f"with {opened:,} (opened in {seconds:.1f} s, each after one PEERS); "
        f"TLS: {tls_before / MiB:.1f} -> {tls_after / MiB:.1f} MiB (the "
        "default --max-connections is set from these).",
    )


# -- 8. Stalled downloads (the peer) --------------------------------------------

# Files in step 8's share besides the huge one, listed by LIST.
LISTED_FILES = 1000


def header_round_trip(port: int, tls: bool) -> None:
    """(A thread.)  One well-behaved ``RANGE 0 0`` on a new connection:
    its answer comes after the peer has read every request sent before."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        if tls:
            connection = unverified_tls_context().wrap_socket(connection)
        connection.sendall(b"RANGE 0 0 huge.img\n")
        reply = b""
        while reply.count(b"\n") < 2:
            data = connection.recv(4096)
            if not data:
                raise RuntimeError(f"the peer closed: {reply!r}")
            reply += data
        if b"\nOK 0 " not in reply:
            raise RuntimeError(f"unexpected reply {reply!r}")


async def stalled_downloads_step(reactor, args, report: Report, work: str) -> None:
    share = os.path.join(work, "huge-share")
    os.mkdir(share)
    size = int(args.huge_gib * 1024 * MiB)
    with open(os.path.join(share, "huge.img"), "wb") as stream:
        stream.truncate(size)
    # A LIST page's worth of files with 60-byte names (a full page of 1,000
    # of them is 141 KB).
    for number in range(LISTED_FILES):
        with open(os.path.join(share, f"{'n' * 54}-{number:05d}"), "wb"):
            pass
    credentials = Authority(os.path.join(work, "peer-pki")).issue(
        "peer", ips=["127.0.0.1"]
    )
    relay, (address,) = await deferToThread(start_relay, "--no-dial-back")
    # 200 sources in each /24, one connection each: under every per-source
    # and per-network cap, as an attacker with 15 networks would do.
    sources = [f"127.{120 + n // 200}.0.{n % 200 + 1}" for n in range(args.stalled)]
    requests = {
        "header alone": b"RANGE 0 0 huge.img\n",
        "GET": b"GET huge.img\n",
        "LIST": b"LIST\n",
    }
    # (tls, request) -> RSS before, RSS after, bytes in the kernel's send
    # queues after
    figures = {}
    try:
        for tls, (label, request) in itertools.product((False, True), requests.items()):
            # A peer of its own for each (what one attack freed, the next
            # would reuse unseen); all but the first find the share indexed.
            listen = credentials.listen() if tls else LOOPBACK
            peer = Daemon(
                "peer",
                TWISTD
                + ["peer", "--relay", address, "--share", share, "--listen", listen]
                + ["--state", share + ".state", "--idle-timeout", "600"],
            ).start()
            try:
                await deferToThread(peer.wait_for, "indexed the share", 600)
                port = int(peer.wait_for("listening on", 30).rsplit(":", 1)[1])
                await deferToThread(header_round_trip, port, tls)
                before = rss_bytes(peer.pid)
                # One connection from each source, reading nothing after the
                # banner: what the peer holds for them is measured.
                connections = await deferToThread(
                    stalled_readers,
                    "127.0.0.1",
                    port,
                    sources,
                    1,
                    1,
                    tls,
                    request,
                    b"P2P/2 peer\n",
                )
                try:
                    await deferToThread(header_round_trip, port, tls)
                    figures[tls, label] = (
                        before,
                        rss_bytes(peer.pid),
                        send_queue_bytes(port),
                    )
                finally:
                    for connection in connections:
                        connection.close()
            finally:
                peer.stop()
    finally:
        relay.stop()
    count = len(sources)

    def growth(tls: bool, label: str) -> float:
        before, after, _ = figures[tls, label]
        return (after - before) / MiB

    def queued(tls: bool, label: str) -> float:
        return figures[tls, label][2] / MiB

    for tls in (False, True):
        over = "TLS" if tls else "TCP"
        report.table(
            f"8{'b' if tls else 'a'}. {count:,} {over} connections from "
            f"{count // 200} /24s asking a peer for a {args.huge_gib:g} GiB file "
            f"({size // MiB * 32:,} B of piece list) and reading nothing: the "
            "peer's RSS growth, MiB (lower is better)",
            Series("GET (header, piece list, file)", [growth(tls, "GET")], "MiB"),
            [
                Series(
                    "a header alone (RANGE 0 0)", [growth(tls, "header alone")], "MiB"
                )
            ],
            higher_is_better=False,
            note=f"{count:,} LIST of {LISTED_FILES:,} files (60-byte names), "
            f"read by nobody: {growth(tls, 'LIST'):.1f} MiB; RSS before/after: "
            + ", ".join(
                f"{label} {figures[tls, label][0] / MiB:.1f}/"
                f"{figures[tls, label][1] / MiB:.1f} MiB"
                for label in requests
            ),
        )
    report.table(
        f"8c. The same {count:,} connections: what the peer's kernel send "
        "queues hold for them, outside its RSS, MiB (lower is better)",
        Series("GET over TCP", [queued(False, "GET")], "MiB"),
        [Series("a header alone over TCP", [queued(False, "header alone")], "MiB")],
        higher_is_better=False,
        note="LIST over TCP "
        f"{queued(False, 'LIST'):.1f} MiB; over TLS: GET {queued(True, 'GET'):.1f}, "
        f"LIST {queued(True, 'LIST'):.1f}, a header alone "
        f"{queued(True, 'header alone'):.1f} MiB (/proc/net/tcp's tx_queue: bytes "
        "sent and not acknowledged, or not sent yet)",
    )


# -- main ------------------------------------------------------------------------


async def measure(reactor, args) -> Report:
    report = Report()
    work = tempfile.mkdtemp(prefix="p2p-attack-")
    try:
        steps = (
            lambda: sybil(reactor, args, report, work),
            lambda: connection_flood(reactor, args, report),
            lambda: request_flood(reactor, args, report),
            lambda: token_guessing(reactor, args, report),
            lambda: log_amplification(reactor, args, report),
            lambda: stalled(reactor, args, report, work),
            lambda: idle_connections(reactor, args, report, work),
            lambda: stalled_downloads_step(reactor, args, report, work),
        )
        for number, step in enumerate(steps, start=1):
            if not args.step or number in args.step:
                await step()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller, about a minute")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--step",
        type=int,
        action="append",
        choices=range(1, 9),
        metavar="N",
        help="run only step N (1-8; repeat it for several; default: all)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = 1 if quick else 3
    args.samples = 50 if quick else 200
    args.sybil_requests = 300 if quick else 1000
    # Every banner-only Sybil costs a `p2p get` that tries it first its idle
    # timeout (10 s), 16 attempts in flight: 64 fakes, about 40 s.
    args.banner_fakes = 16 if quick else 64
    args.flood_seconds = 2.0 if quick else 3.0
    args.registration_networks = 4 if quick else 10
    args.pipelined = 100 if quick else 300
    args.idle = 2000 if quick else 10_000
    args.idle_tls = 250 if quick else 1000
    args.stalled = 1000 if quick else 3000
    args.huge_gib = 4 if quick else 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.idle + 1000 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return react_report(measure, args)


if __name__ == "__main__":
    main()
