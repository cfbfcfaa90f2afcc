#!/usr/bin/env python3
"""Several holders at once (issue 8): rate against the holders' upload caps.

Three peers hold the same 512 MiB file (``--quick``: 64 MiB), each with
``--max-upload-rate 20M`` (20 MiB/s), as home uplinks would be.  ``p2p
get`` with its default ``--sources 4`` fetches pieces from all three at
once; the figure is its transfer rate as it reports it ("N bytes in S s",
from asking the first peer to the last verified piece: the caps bound the
transfer, not Python's start-up).  Baselines in the same run: the sum of
the three caps (target >= 0.9x), and one holder alone (``--sources 1``, a
128 MiB file; ``--quick``: 32 MiB) against its own cap (target: within
10%).

Loopback only; every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    P2P,
    TOTALS,
    Daemon,
    MiB,
    Report,
    Series,
    make_file,
    run_timed,
    start_peer,
    start_relay,
)

CAP = "20M"
CAP_BYTES = 20 * MiB


def fetch_rate(relay_port: int, name: str, *extra: str) -> tuple[float, str]:
    """One ``p2p get``: its reported transfer rate in MiB/s, and its stderr."""
    run = run_timed(
        P2P + ["--relay", f"127.0.0.1:{relay_port}", "get", *extra, name],
        stdout=subprocess.DEVNULL,
    )
    stderr = run.stderr.decode(errors="replace")
    if run.returncode != 0:
        raise RuntimeError(f"p2p get failed: {stderr}")
    match = TOTALS.search(run.stderr)
    if match is None:
        raise RuntimeError(f"no totals line in: {stderr}")
    return int(match.group(1)) / float(match.group(2)) / MiB, stderr


def measure(report: Report, work: str, size: int, alone: int, repeats: int) -> None:
    source = os.path.join(work, "big.bin")
    make_file(source, size)
    single = os.path.join(work, "single.bin")
    make_file(single, alone)
    daemons: list[Daemon] = []
    try:
        relay, port = start_relay()
        daemons.append(relay)
        shares = [os.path.join(work, f"share{index}") for index in range(3)]
        # Every link first: a new link changes the file's change time, and a
        # peer that indexed it already would hash it again.
        for share in shares:
            os.makedirs(share)
            for path in (source, single):
                os.link(path, os.path.join(share, os.path.basename(path)))
        for index, share in enumerate(shares):
            daemons.append(
                start_peer(port, share, f"peer{index}", "--max-upload-rate", CAP)
            )
        together, used = [], []
        for _ in range(repeats):
            rate, stderr = fetch_rate(port, "big.bin")
            together.append(rate)
            found = re.search(r"from (\d+) peers", stderr)
            used.append(int(found.group(1)) if found else 1)
        one = [
            fetch_rate(port, "single.bin", "--sources", "1")[0] for _ in range(repeats)
        ]
        cap = CAP_BYTES / MiB
        report.table(
            f"8.3a Three holders capped at 20 MiB/s each, {size // MiB} MiB, MiB/s",
            Series("p2p get (--sources 4)", together, "MiB/s"),
            [Series("sum of the three caps", [3 * cap], "MiB/s")],
            note=(f"target >= 0.90 of the sum; holders used per fetch: {used}"),
        )
        report.table(
            f"8.3b One holder capped at 20 MiB/s, {alone // MiB} MiB, MiB/s",
            Series("p2p get --sources 1", one, "MiB/s"),
            [Series("its cap", [cap], "MiB/s")],
            note="target: within 10% of the cap (0.90-1.10)",
        )
    finally:
        for daemon in daemons:
            daemon.stop()


def main(argv: list[str] | None = None, report: Report | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small files, one run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    report = report or Report()
    work = tempfile.mkdtemp(prefix="p2p-sources-")
    try:
        if args.quick:
            measure(report, work, 64 * MiB, 32 * MiB, 1)
        else:
            measure(report, work, 512 * MiB, 128 * MiB, 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        report.write_json(args.json)
    return report


if __name__ == "__main__":
    main()
