#!/usr/bin/env python3
"""Why BLAKE3 and 1 MiB pieces (issue 8): hash rates measured here.

The content's pieces are hashed by the peer when it indexes its share and
by the client as each piece arrives, so the hash's rate bounds both.  This
hashes the same 256 MiB of random bytes (``--quick``: 64 MiB), held in
memory, in pieces of 256 KiB, 1 MiB and 4 MiB, with SHA-256 (``hashlib``,
``sha256sum``-compatible) and BLAKE3 (the ``blake3`` package, one thread,
as a piece is hashed on one thread), best of three runs each.  BLAKE3 at
1 MiB is ours; every other row is a baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import MiB, Report, Series  # noqa: E402
from blake3 import blake3  # noqa: E402


def rate(data: bytes, piece: int, make) -> float:
    """MB/s hashing C{data} piece by piece with C{make()} objects."""
    view = memoryview(data)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for offset in range(0, len(data), piece):
            make(view[offset : offset + piece]).digest()
        best = min(best, time.perf_counter() - started)
    return len(data) / best / 1e6


def main(argv: list[str] | None = None, report: Report | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="less data")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    report = report or Report()
    data = os.urandom((64 if args.quick else 256) * MiB)
    rows = []
    for name, make in (("BLAKE3", blake3), ("SHA-256", hashlib.sha256)):
        for piece in (256 * 1024, MiB, 4 * MiB):
            label = f"{name}, {piece // 1024} KiB pieces"
            rows.append(Series(label, [rate(data, piece, make)], "MB/s"))
    ours = next(r for r in rows if r.label == "BLAKE3, 1024 KiB pieces")
    report.table(
        "8.0 Hash rate on one core, by piece size, MB/s (higher is better)",
        ours,
        [r for r in rows if r is not ours],
        note="ours = BLAKE3 at 1 MiB pieces (the piece size in p2p/pieces.py)",
    )
    if args.json:
        report.write_json(args.json)
    return report


if __name__ == "__main__":
    main()
