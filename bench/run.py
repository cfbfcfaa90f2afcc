#!/usr/bin/env python3
"""Run every benchmark and print its tables; ``--json`` keeps the results.

    python bench/run.py            # the full suite (several minutes)
    python bench/run.py --quick    # under a minute: proves each runs

Each benchmark compares our system with its baselines in the same run on
the same machine and prints the ratios; figures drift between runs on
shared machines, ratios much less.  ``--quick`` is what CI runs: it checks
that every benchmark runs and produces numbers, never a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# In the order of the issue that asked for them.
BENCHMARKS = [
    "hashes",
    "transfer",
    "sources",
    "indexing",
    "relay_rate",
    "relay_scale",
    "fallback",
    "fetch_cost",
    "many_clients",
    "attack",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small and fast")
    parser.add_argument("--json", help="write every table here")
    parser.add_argument("only", nargs="*", help=f"some of: {', '.join(BENCHMARKS)}")
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    tables = []
    failed = []
    for name in args.only or BENCHMARKS:
        script = os.path.join(here, f"{name}.py")
        if not os.path.exists(script):
            print(f"\n## {name}: not written yet", flush=True)
            continue
        started = time.perf_counter()
        # Each in its own process: a reactor runs once per process.
        with tempfile.NamedTemporaryFile(suffix=".json") as results:
            argv = [sys.executable, script, "--json", results.name]
            if args.quick:
                argv.append("--quick")
            code = subprocess.call(argv)
            with open(results.name) as stream:
                text = stream.read()
        found = json.loads(text)["tables"] if text else []
        if code != 0 or not found:
            print(
                f"{name} failed (exit {code}) or produced no numbers", file=sys.stderr
            )
            failed.append(name)
        tables.extend(found)
        print(f"({name}: {time.perf_counter() - started:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"quick": args.quick, "tables": tables}, stream, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
