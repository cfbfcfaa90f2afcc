"""Shared machinery for the benchmarks: daemons, timed commands, tables.

Every server a benchmark starts is a child process watched through its log
lines (events, never sleeps) and stopped by its pid.  Results are printed as
tables of "ours", each baseline, the ratio, and min-max over repeated runs
with the median quoted; ``Report.write_json`` keeps them for tracking.
"""

from __future__ import annotations

import atexit
import compileall
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

# Start-up as installed: pip compiles a package's modules when it installs
# it, but an editable install (the README's) compiles them when first run,
# and not at all where PYTHONDONTWRITEBYTECODE is set (as on our benchmark
# machine): every `p2p` command would compile the whole package again,
# about 0.15 s.  Compiled once here, up front, as pip would.
compileall.compile_dir(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "p2p"),
    quiet=1,
)

# The clients and peers a benchmark starts keep their peer-list cache and
# state in a folder of this run's (inherited through the environment), never
# in the user's ~/.cache or ~/.local/state.
_PRIVATE_HOME = tempfile.mkdtemp(prefix="p2p-bench-")
os.environ["XDG_CACHE_HOME"] = os.path.join(_PRIVATE_HOME, "cache")
os.environ["XDG_STATE_HOME"] = os.path.join(_PRIVATE_HOME, "state")
atexit.register(shutil.rmtree, _PRIVATE_HOME, ignore_errors=True)

# twist (python -m twisted) writes no pid file; text logs carry our events.
TWISTD = [sys.executable, "-m", "twisted", "--log-format=text"]
P2P = [sys.executable, "-m", "p2p"]
LOOPBACK = "tcp:0:interface=127.0.0.1"
# The totals line `p2p get` ends a fetch with ("N bytes in S.SS s (...").
TOTALS = re.compile(rb"(\d+) bytes in ([0-9.]+) s \(")
# Every client of a benchmark comes from 127.0.0.1, one source in one
# network: the limits per source and per network, meant for the open
# network, are set out of reach (their checks still run, so their cost is
# measured).  The relay's limits on leases per source and network too.
ONE_SOURCE = [
    "--max-connections-per-host", "1000000",
    "--max-connections-per-network", "1000000",
    "--requests-per-second", "1e9",
    "--network-requests-per-second", "1e9",
]  # fmt: skip
RELAY_ONE_SOURCE = [
    *ONE_SOURCE,
    "--max-per-host", "0",
    "--max-per-network", "0",
    "--name-queries-per-second", "1e9",
]  # fmt: skip
MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass
class Daemon:
    """A child process whose log lines we watch for events."""

    name: str
    argv: list[str]
    cwd: str | None = None
    process: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    # Index of the first log line of interest (e.g. since a restart).
    mark: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> Daemon:
        self.lines = []
        self.mark = 0
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # A 1 MiB pipe (Linux; 64 KiB by default): a reader thread that the
        # loaded machine leaves unscheduled for a moment must not block the
        # daemon's log writes, hence its reactor (seen: a peer serving small
        # files spent most of its time in the write of its log line).
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        return self

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self.changed:
                if process is self.process:
                    self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float, after: int | None = None) -> str:
        """Block until a log line (from index C{after}) contains C{text}."""
        start = self.mark if after is None else after
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines[start:]:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.alive:
                    tail = "".join(self.lines[-5:])
                    raise RuntimeError(
                        f"{self.name}: no {text!r} within {timeout}s\n{tail}"
                    )
                self.changed.wait(remaining)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if not self.alive:
            return
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def listening_port(daemon: Daemon, timeout: float = 30) -> int:
    line = daemon.wait_for("listening on", timeout)
    return int(line.rsplit(":", 1)[1])


def start_relay(
    *extra: str, listen: str = LOOPBACK, default_limits: bool = False
) -> tuple[Daemon, int]:
    """
    A relay, its per-source limits lifted (all the load of a benchmark
    comes from one address) unless C{default_limits}: what users get.
    """
    lifted = [] if default_limits else RELAY_ONE_SOURCE
    relay = Daemon(
        "relay", TWISTD + ["relay", "--listen", listen, *lifted, *extra]
    ).start()
    return relay, listening_port(relay)


def start_peer(
    relay_port: int,
    share: str,
    name: str = "peer",
    *extra: str,
    indexed: bool = True,
    timeout: float = 30,
    default_limits: bool = False,
) -> Daemon:
    """
    A peer serving C{share}, its index beside it (C{share}.state).  With
    C{indexed}, return once its first scan and hashing are done (its
    ``indexed the share`` line): what "once indexed" means in the figures.
    Its per-source limits are lifted unless C{default_limits}.
    """
    peer = Daemon(
        name,
        TWISTD
        + ["peer", "--relay", f"127.0.0.1:{relay_port}", "--share", share]
        + ["--listen", LOOPBACK, "--state", share.rstrip("/") + f".{name}.state"]
        + ([] if default_limits else ONE_SOURCE)
        + list(extra),
    ).start()
    peer.wait_for("registered at the relay", timeout)
    if indexed:
        peer.wait_for("indexed the share", timeout)
    return peer


async def indexed_factory(reactor, folder: str, **options):
    """
    An in-process L{p2p.peer.PeerFactory} serving C{folder}, its index (in
    memory, hashing in a thread pool of its own) complete when it returns.
    C{options} go to the factory (a throttle, say).  The pool stops with
    the reactor.
    """
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    from p2p.index import ShareIndex
    from p2p.peer import PeerFactory
    from p2p.share import ShareFolder

    pool = ThreadPool(0, 2, "bench-index")
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    share = ShareFolder(folder)
    index = ShareIndex(
        share,
        ":memory:",
        reactor,
        lambda work: deferToThreadPool(reactor, pool, work),
        watch=False,
    )
    await index.start()
    await index.when_idle()
    return PeerFactory(share, index, reactor, **options)


class NullStream:
    """A binary stream that keeps nothing: output for fetches measured."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def start_web(share: str) -> tuple[Daemon, int]:
    """``twist web`` serving C{share} on 127.0.0.1: the HTTP baselines."""
    web = Daemon("twist web", TWISTD + ["web", "--path", share, "--listen", LOOPBACK])
    web.start()
    try:
        return web, int(web.wait_for("starting on", 30).rsplit(" ", 1)[1])
    except BaseException:
        web.stop()  # the caller never got it, so cannot stop it
        raise


@dataclass
class Run:
    """One timed child process."""

    seconds: float
    returncode: int
    stdout: bytes
    stderr: bytes
    max_rss_bytes: int
    # User plus system CPU the child used, all its threads.
    cpu_seconds: float = 0.0


def run_timed(argv: list[str], timeout: float = 600, **kwargs) -> Run:
    """Run C{argv} to completion; wall time and peak RSS (from wait4)."""
    started = time.perf_counter()
    kwargs.setdefault("stdout", subprocess.PIPE)
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, **kwargs)
    out: list[bytes] = []
    err: list[bytes] = []
    waited: dict = {}

    def drain(stream, chunks: list[bytes]) -> None:
        for chunk in iter(lambda: stream.read(65536), b""):
            chunks.append(chunk)

    def reap() -> None:
        # wait4, unlike Popen.wait, reports the child's own peak RSS.
        waited["result"] = os.wait4(process.pid, 0)
        waited["at"] = time.perf_counter()

    threads = [threading.Thread(target=drain, args=(process.stderr, err), daemon=True)]
    if process.stdout is not None:
        threads.append(
            threading.Thread(target=drain, args=(process.stdout, out), daemon=True)
        )
    for thread in threads:
        thread.start()
    reaper = threading.Thread(target=reap, daemon=True)
    reaper.start()
    reaper.join(timeout)
    if reaper.is_alive():
        process.kill()
        reaper.join()
    _, status, usage = waited["result"]
    process.returncode = os.waitstatus_to_exitcode(status)
    for thread in threads:
        thread.join()
    return Run(
        waited["at"] - started,
        process.returncode,
        b"".join(out),
        b"".join(err),
        usage.ru_maxrss * 1024,
        usage.ru_utime + usage.ru_stime,
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU a running process has used so far."""
    with open(f"/proc/{pid}/stat") as stream:
        fields = stream.read().rpartition(")")[2].split()
    # utime and stime: fields 14 and 15 of stat(5), counted from "state".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_bytes(pid: int) -> int:
    """A running process's peak resident set (VmHWM)."""
    return _status_bytes(pid, "VmHWM")


def rss_bytes(pid: int) -> int:
    """A running process's current resident set (VmRSS)."""
    return _status_bytes(pid, "VmRSS")


def _status_bytes(pid: int, field: str) -> int:
    """A size in bytes from /proc/PID/status (given there in kB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def make_file(path: str, size: int) -> None:
    """Random, incompressible content of C{size} bytes."""
    chunk = os.urandom(4 * MiB)
    with open(path, "wb") as stream:
        left = size
        while left > 0:
            stream.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)


@dataclass
class Series:
    """Repeated measurements of one thing."""

    label: str
    values: list[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self) -> str:
        return f"{min(self.values):.4g}-{max(self.values):.4g}"


class Report:
    """Collects tables; prints them and writes them as JSON."""

    def __init__(self) -> None:
        self.tables: list[dict] = []

    def table(
        self,
        title: str,
        ours: Series,
        baselines: list[Series],
        higher_is_better: bool = True,
        note: str = "",
    ) -> None:
        """Print ours against each baseline with ratios (ours / baseline)."""
        print(f"\n## {title}")
        header = f"{'':34} {'median':>12} {'min-max':>21} {'ours/this':>10}"
        print(header)
        rows = [ours, *baselines]
        entry: dict = {"title": title, "unit": ours.unit, "rows": []}
        for series in rows:
            ratio = ours.median / series.median if series.median else float("nan")
            ratio_text = "" if series is ours else f"{ratio:.2f}"
            print(
                f"{series.label:34} {series.median:>10.4g} {series.unit:<4} "
                f"{series.spread():>19} {ratio_text:>10}"
            )
            entry["rows"].append(
                {
                    "label": series.label,
                    "unit": series.unit,
                    "median": series.median,
                    "values": series.values,
                    "ratio_ours_over": None if series is ours else ratio,
                }
            )
        if note:
            print(note)
        entry["higher_is_better"] = higher_is_better
        entry["note"] = note
        self.tables.append(entry)

    def line(self, title: str, text: str, **values: object) -> None:
        """A result that is a single figure or statement, not a comparison."""
        print(f"\n## {title}\n{text}")
        self.tables.append({"title": title, "text": text, "values": values})

    def write_json(self, path: str) -> None:
        with open(path, "w") as stream:
            json.dump({"tables": self.tables}, stream, indent=2)


def react_report(measure, args) -> Report:
    """
    Run C{measure(reactor, args)} (a coroutine returning a L{Report}) on the
    global reactor, write ``args.json`` if asked, and return the report.
    """
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    holder: list[Report] = []

    async def run(reactor) -> None:
        holder.append(await measure(reactor, args))

    try:
        task.react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    if args.json:
        holder[0].write_json(args.json)
    return holder[0]
