#!/usr/bin/env python3
"""
Benchmark 10.1: many small files in one command, and a small file's latency.

    python bench/small_files.py [--quick] [--json FILE]

1,000 files of 4 KiB, spread over three peers (a third each), fetched in
one ``p2p get -o DIR NAME...`` run: files per second of the whole command,
against ``curl`` fetching the same 1,000 files from one ``twist web`` in one
process (``curl`` given many URLs reuses one connection for all of them,
one file after the other; ours keeps a connection per peer, asks the relay
once, and fetches up to ``--jobs`` names at once, 4 by default).  Both are
whole processes, started cold, timed from the shell's point of view.
Every run writes into a folder of its own, and none is removed before the
end: on this machine's ext4 (no journal), creating a file next to many
just-deleted ones scans them (the kernel's ``recently_deleted``, for five
minutes after a deletion), which made each file creation cost about 0.3 ms
more for curl and ours alike, a cost of the benchmark's cleanup, not of a
user's first fetch.  The
relay and the peers run with their default limits: what users get.

The per-file latency "once the process has started" comes from runs with
``--jobs 1`` (one file at a time, as a single ``get``): ``--json`` gives
each name's whole time, from its start (the relay's list for the first,
the file's creation, questions to several likely holders) to its last
verified byte written.  Target: files per second at least 0.5 of curl's, a median
per-file latency under 2 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    P2P,
    Report,
    Series,
    run_timed,
    start_peer,
    start_relay,
    start_web,
)

FILE_BYTES = 4096
PEERS = 3


def make_shares(work: str, count: int) -> tuple[list[str], list[str], str]:
    """C{count} files of 4 KiB, a third in each peer's share, and all of them
    in one folder for the web server; their names."""
    shares = [os.path.join(work, f"share{n}") for n in range(PEERS)]
    everything = os.path.join(work, "web")
    for folder in [*shares, everything]:
        os.makedirs(folder)
    names = []
    for number in range(count):
        name = f"f{number:04d}.bin"
        data = os.urandom(FILE_BYTES)
        for folder in (shares[number % PEERS], everything):
            with open(os.path.join(folder, name), "wb") as stream:
                stream.write(data)
        names.append(name)
    return shares, names, everything


def fresh_folder(work: str) -> str:
    """A new, empty output folder for one run (see the module doc)."""
    return tempfile.mkdtemp(prefix="out-", dir=work)


def ours(
    relay_port: int, names: list[str], out: str, jobs: int | None = None
) -> tuple[float, list[float]]:
    """One ``p2p get -o DIR`` of every name: its seconds, and each file's."""
    jobs_option = [] if jobs is None else ["--jobs", str(jobs)]
    run = run_timed(
        [*P2P, "--relay", f"127.0.0.1:{relay_port}", "get", "--json", "-o", out]
        + jobs_option
        + names
    )
    if run.returncode != 0:
        raise RuntimeError(f"p2p get failed: {run.stderr[-2000:]!r}")
    per_file = []
    for line in run.stdout.decode().splitlines():
        record = json.loads(line)
        if record.get("seconds") is not None:
            per_file.append(record["seconds"])
    if len(os.listdir(out)) != len(names):
        raise RuntimeError("p2p get did not write every file")
    return run.seconds, per_file


def curl(web_port: int, names: list[str], out: str) -> float:
    """One ``curl`` of every name from ``twist web`` (one connection)."""
    argv = ["curl", "--silent", "--fail", "--output-dir", out]
    for name in names:
        argv += ["-O", f"http://127.0.0.1:{web_port}/{name}"]
    run = run_timed(argv)
    if run.returncode != 0 or len(os.listdir(out)) != len(names):
        raise RuntimeError(f"curl failed: {run.stderr[-2000:]!r}")
    return run.seconds


def single_gets(relay_port: int, names: list[str], out: str) -> list[float]:
    """One ``p2p get -o FILE NAME`` process per name: each name's seconds as
    it reports them (its relay list and hint included, no kept connection)."""
    seconds = []
    for name in names:
        run = run_timed(
            [*P2P, "--relay", f"127.0.0.1:{relay_port}", "get", "--json"]
            + ["-o", os.path.join(out, name), name]
        )
        if run.returncode != 0:
            raise RuntimeError(f"p2p get failed: {run.stderr[-2000:]!r}")
        seconds.append(json.loads(run.stdout)["seconds"])
    return seconds


def measure(report: Report, work: str, count: int, repeats: int) -> None:
    shares, names, everything = make_shares(work, count)
    relay, relay_port = start_relay(default_limits=True)
    daemons = [relay]
    try:
        for number, share in enumerate(shares):
            daemons.append(
                start_peer(relay_port, share, f"peer{number}", default_limits=True)
            )
        web, web_port = start_web(everything)
        daemons.append(web)
        rates, one_at_a_time, curl_rates, latencies = [], [], [], []
        for _ in range(repeats):
            # Alternated, so that a noisy moment hits all alike.
            seconds, _ = ours(relay_port, names, fresh_folder(work))
            rates.append(count / seconds)
            curl_rates.append(count / curl(web_port, names, fresh_folder(work)))
            seconds, per_file = ours(relay_port, names, fresh_folder(work), jobs=1)
            one_at_a_time.append(count / seconds)
            latencies.extend(per_file)
        report.table(
            f"10.1 {count} files of 4 KiB from {PEERS} peers, one command, files/s",
            Series(f"p2p get -o DIR ({count} names)", rates, "f/s"),
            [
                Series("curl, one connection (twist web)", curl_rates, "f/s"),
                Series("p2p get -o DIR --jobs 1", one_at_a_time, "f/s"),
            ],
            note="whole processes, started cold, default limits; target >= 0.50 "
            "of curl",
        )
        if latencies:
            median_ms = statistics.median(latencies) * 1000
            p99_ms = sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1000
            report.line(
                "10.1b per-file latency inside one p2p get --jobs 1 (once started)",
                f"median {median_ms:.2f} ms, p99 {p99_ms:.2f} ms over "
                f"{len(latencies)} files (target: median < 2 ms)",
                median_ms=median_ms,
                p99_ms=p99_ms,
                files=len(latencies),
            )
        alone = single_gets(relay_port, names[: 10 * repeats], fresh_folder(work))
        median_ms = statistics.median(alone) * 1000
        report.line(
            "10.1c one name per p2p get (its own process), once started",
            f"median {median_ms:.2f} ms over {len(alone)} commands: the "
            "relay's list and the name's hint (asked at once), a new "
            "connection to the peer, the file (no target: for reference)",
            median_ms=median_ms,
            commands=len(alone),
        )
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 files, once")
    parser.add_argument("--json", help="write the tables here")
    args = parser.parse_args(argv)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="p2p-bench-small-") as work:
        if args.quick:
            measure(report, work, 100, 1)
        else:
            measure(report, work, 1000, 3)
    if args.json:
        report.write_json(args.json)
    return report


if __name__ == "__main__":
    main()
