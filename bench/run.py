#!/usr/bin/env python3
"""Run every benchmark and print its tables; ``--json`` keeps the results.

    python bench/run.py            # the full suite (several minutes)
    python bench/run.py --quick    # under a minute: proves each runs

A full run also writes each benchmark's tables, as printed, to
``docs/bench/<name>.txt``, which ``docs/performance.rst`` includes: the
figures in the docs are always those of the last full run of the code they
sit beside (``--no-docs`` leaves them alone; a quick run never writes them).

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

# In the order of the issue that asked for them, but small_files first: it
# creates thousands of files, and on a file system like this machine's ext4
# without a journal, creating a file within five minutes of many deletions
# nearby (the other benchmarks' clean-ups) costs several times more, for
# curl and for us alike (see bench/small_files.py).
BENCHMARKS = [
    "small_files",
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
    "redis_registry",
]
DOCS_TABLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "bench"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small and fast")
    parser.add_argument("--json", help="write every table here")
    parser.add_argument(
        "--no-docs",
        action="store_true",
        help="do not write docs/bench/*.txt (a full run does by default)",
    )
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
        ticks = cpu_ticks()
        # Each in its own process: a reactor runs once per process.
        with tempfile.NamedTemporaryFile(suffix=".json") as results:
            argv = [sys.executable, script, "--json", results.name]
            if args.quick:
                argv.append("--quick")
            printed, code = run_echoing(argv)
            with open(results.name) as stream:
                text = stream.read()
        found = json.loads(text)["tables"] if text else []
        if code != 0 or not found:
            print(
                f"{name} failed (exit {code}) or produced no numbers", file=sys.stderr
            )
            failed.append(name)
        tables.extend(found)
        elapsed = time.perf_counter() - started
        stolen = stolen_share(ticks, cpu_ticks())
        print(f"({name}: {elapsed:.1f} s{stolen})", flush=True)
        if found and code == 0 and not args.quick and not args.no_docs:
            write_docs_tables(name, printed, f"{elapsed:.0f} s{stolen}")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"quick": args.quick, "tables": tables}, stream, indent=2)
    return 1 if failed else 0


def run_echoing(argv: list[str]) -> tuple[str, int]:
    """Run C{argv}, echoing its output as it comes; return it and the exit
    status."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return "".join(lines), process.wait()


def cpu_ticks() -> tuple[int, int] | None:
    """
    The CPU time the host stole from this machine since it booted, and all
    CPU time, in ticks (Linux's /proc/stat; None elsewhere).  A virtual
    machine's steal is time its host ran something else: a benchmark taken
    while much is stolen measures the host as much as the code.
    """
    try:
        with open("/proc/stat") as stream:
            values = [int(value) for value in stream.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (values[7] if len(values) > 7 else 0), sum(values)


def stolen_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> str:
    """The host's share of CPU time between two L{cpu_ticks} readings, as
    text for a table's first line; empty without /proc/stat."""
    if before is None or after is None or after[1] <= before[1]:
        return ""
    return f", host steal {100 * (after[0] - before[0]) / (after[1] - before[1]):.1f}%"


def write_docs_tables(name: str, printed: str, took: str) -> None:
    """Keep C{name}'s tables, as printed, for docs/performance.rst."""
    os.makedirs(DOCS_TABLES, exist_ok=True)
    tables = printed[printed.find("\n## ") + 1 :] if "\n## " in printed else printed
    header = (
        f"# python bench/run.py: {name}, {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {took}\n"
    )
    with open(os.path.join(DOCS_TABLES, f"{name}.txt"), "w") as stream:
        stream.write(header + tables.rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
