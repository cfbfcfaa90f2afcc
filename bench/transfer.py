#!/usr/bin/env python3
"""Transfer benchmarks: throughput (1) and memory while transferring (2).

1. One peer serves one file; ``p2p get -o`` saves it, SHA-256 verified.
   Baselines in the same run: (a) the limit, a minimal Python sender using
   ``socket.sendfile()`` and a receiver doing ``recv_into`` plus
   ``hashlib.sha256`` (no disk writes); (b) what a user would pick instead,
   ``twist web --path`` served to ``curl -o`` (no verification).  The
   figure compared is the transfer itself: from connecting to the peer to
   the verified last byte, as the client reports it; the whole command's
   wall time (Python start-up, relay query, rename) is shown beside it.
2. Peak RSS of the peer and of the client while moving files of two sizes
   (1 GiB and 4 GiB; ``--quick``: 32 and 128 MiB): flat means the same.

Loopback only; every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    P2P,
    Daemon,
    GiB,
    MiB,
    Report,
    Series,
    make_file,
    peak_rss_bytes,
    run_timed,
    start_peer,
    start_relay,
    start_web,
)

FOUND = re.compile(rb"found at \S+(?: \(resuming at byte \d+\))? \((\d+) ms\)")
HERE = os.path.dirname(os.path.abspath(__file__))


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(4 * MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_ours(relay_port: int, name: str, out: str) -> tuple[float, float, int]:
    """One ``p2p get -o``: (transfer seconds, wall seconds, client peak RSS)."""
    if os.path.exists(out):
        os.unlink(out)  # replacing a big file costs its unlink: not ours
    run = run_timed(
        P2P + ["--relay", f"127.0.0.1:{relay_port}", "get", "-o", out, name]
    )
    if run.returncode != 0:
        raise RuntimeError(f"p2p get failed: {run.stderr.decode(errors='replace')}")
    match = FOUND.search(run.stderr)
    if match is None:
        raise RuntimeError(f"no transfer time in: {run.stderr!r}")
    return int(match.group(1)) / 1000, run.seconds, run.max_rss_bytes


def throughput(report: Report, work: str, size: int, repeats: int) -> None:
    share = os.path.join(work, "share")
    os.makedirs(share, exist_ok=True)
    source = os.path.join(share, "big.bin")
    make_file(source, size)
    expected = sha256_of(source)
    out = os.path.join(work, "out.bin")
    mb = size / 1e6
    daemons: list[Daemon] = []
    try:
        relay, port = start_relay()
        daemons.append(relay)
        daemons.append(start_peer(port, share))
        fetch_ours(port, "big.bin", out)  # warm-up: page cache, peer's digest
        ours, wall = [], []
        for _ in range(repeats):
            seconds, whole, _ = fetch_ours(port, "big.bin", out)
            ours.append(mb / seconds)
            wall.append(mb / whole)
        if sha256_of(out) != expected:
            raise RuntimeError("p2p get saved a different file")

        sender = Daemon(
            "sendfile",
            [sys.executable, os.path.join(HERE, "_socket_baseline.py"), "send", source],
        ).start()
        daemons.append(sender)
        sender_port = int(sender.wait_for("", 30).strip())
        limit = []
        for _ in range(repeats + 1):
            run = run_timed(
                [sys.executable, os.path.join(HERE, "_socket_baseline.py"), "recv",
                 str(sender_port), str(size)]
            )  # fmt: skip
            seconds, digest = run.stdout.split()
            if digest.decode() != expected:
                raise RuntimeError("baseline (a) received a different file")
            limit.append(mb / float(seconds))
        limit = limit[1:]  # the first run warmed up

        baselines = [Series("(a) sendfile -> sha256", limit, "MB/s")]
        if shutil.which("curl") is None:
            print("curl is not installed: baseline (b) skipped")
        else:
            curl = fetch_with_curl(share, out, mb, repeats, daemons)
            baselines.append(Series("(b) twist web -> curl -o", curl, "MB/s"))
        baselines.append(Series("p2p get -o (whole command)", wall, "MB/s"))
        report.table(
            f"1. Transfer throughput, {size // MiB} MiB file, MB/s (higher is better)",
            Series("p2p get -o (transfer)", ours, "MB/s"),
            baselines,
            note=(
                "ours/this = p2p transfer throughput over the row's; "
                "target >= 0.90 against (a)."
            ),
        )
    finally:
        for daemon in daemons:
            daemon.stop()
        for path in (source, out):
            if os.path.exists(path):
                os.unlink(path)


def fetch_with_curl(
    share: str, out: str, mb: float, repeats: int, daemons: list[Daemon]
) -> list[float]:
    """Baseline (b): twist web serving the share, curl -o saving the file."""
    web, web_port = start_web(share)
    daemons.append(web)
    curl = []
    for index in range(repeats + 1):
        if os.path.exists(out):
            os.unlink(out)
        run = run_timed(
            ["curl", "-s", "-o", out, f"http://127.0.0.1:{web_port}/big.bin"]
        )
        if run.returncode != 0:
            raise RuntimeError(f"curl failed: {run.stderr!r}")
        if index:
            curl.append(mb / run.seconds)
    return curl


def memory(report: Report, work: str, sizes: list[int]) -> None:
    share = os.path.join(work, "mem-share")
    os.makedirs(share, exist_ok=True)
    out = os.path.join(work, "mem-out.bin")
    rows = []
    try:
        for size in sizes:
            source = os.path.join(share, "big.bin")
            make_file(source, size)
            relay, port = start_relay()
            peer = start_peer(port, share)
            try:
                _, _, client_rss = fetch_ours(port, "big.bin", out)
                peer_rss = peak_rss_bytes(peer.pid)
            finally:
                peer.stop()
                relay.stop()
                os.unlink(source)
                if os.path.exists(out):
                    os.unlink(out)
            rows.append((size, peer_rss, client_rss))
    finally:
        shutil.rmtree(share, ignore_errors=True)
    text = "\n".join(
        f"{size // MiB:>6} MiB file: peer peak RSS {peer / MiB:6.1f} MiB, "
        f"client peak RSS {client / MiB:6.1f} MiB"
        for size, peer, client in rows
    )
    worst = max(max(peer, client) for _, peer, client in rows)
    growth = max(r[1] for r in rows) / min(r[1] for r in rows)
    text += (
        f"\nlargest peak: {worst / MiB:.1f} MiB (target < 64 MiB); "
        f"peer peak, largest file over smallest: {growth:.2f}x (flat: ~1.0)"
    )
    report.line(
        "2. Memory while transferring (peak RSS)",
        text,
        rows=[{"size": s, "peer_rss": p, "client_rss": c} for s, p, c in rows],
    )


def main(argv: list[str] | None = None, report: Report | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small files, one run")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--size", type=int, help="only benchmark 1, with a file of this many MiB"
    )
    parser.add_argument("--repeats", type=int, default=3, help="with --size")
    args = parser.parse_args(argv)
    report = report or Report()
    work = tempfile.mkdtemp(prefix="p2p-bench-")
    try:
        if args.size:
            throughput(report, work, args.size * MiB, args.repeats)
        elif args.quick:
            throughput(report, work, 32 * MiB, 1)
            memory(report, work, [32 * MiB, 128 * MiB])
        else:
            throughput(report, work, 1 * GiB, 3)
            memory(report, work, [1 * GiB, 4 * GiB])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        report.write_json(args.json)
    return report


if __name__ == "__main__":
    main()
