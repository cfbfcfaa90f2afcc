#!/usr/bin/env python3
"""A chaos check users can run: fetch files while peers and the relay die.

Starts a relay and N peers as real ``twistd`` processes on 127.0.0.1, gives
every file to two peers, then runs a bounded number of ``p2p get`` fetches
while killing (SIGKILL or SIGTERM) and restarting peers and the relay at
random.  Each fetch whose file was held by at least one live, registered
peer when it started must succeed and be byte-identical to the source::

    python bench/chaos.py --fetches 60 --seconds 120

prints ``fetches: N, succeeded: N, corrupted: 0, lost: 0`` and timings, and
exits 1 if anything was corrupted or lost.  Loopback only; bounded in count
and time; every process it starts is stopped by its pid.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

# twist (python -m twisted) writes no pid file; text logs carry our events.
TWISTD = [sys.executable, "-m", "twisted", "--log-format=text"]
P2P = [sys.executable, "-m", "p2p"]


@dataclass
class Daemon:
    """A twistd child process whose log lines we watch for events."""

    name: str
    argv: list[str]
    cwd: str
    process: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    # Index of the first log line since the relay last (re)started.
    mark: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> None:
        self.lines = []
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self.changed:
                if process is self.process:
                    self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float, after: int = 0) -> str:
        """Block until a log line (from index C{after}) contains C{text}."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines[after:]:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.alive:
                    raise RuntimeError(f"{self.name}: no {text!r} within {timeout}s")
                self.changed.wait(remaining)

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


def make_files(folder: str, count: int, rng: random.Random) -> dict[str, bytes]:
    files = {}
    for index in range(count):
        size = rng.choice([0, 1, 1000, 64 * 1024, 300 * 1024, 2 * 1024 * 1024])
        files[f"file{index:02d}.bin"] = rng.randbytes(size)
    for name, content in files.items():
        with open(os.path.join(folder, name), "wb") as stream:
            stream.write(content)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--fetches", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=120, help="overall time limit")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ttl", type=int, default=6, help="relay lease length")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    work = tempfile.mkdtemp(prefix="p2p-chaos-")
    daemons: list[Daemon] = []
    try:
        return run(args, rng, seed, work, daemons)
    finally:
        for daemon in daemons:
            daemon.stop(signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


def run(args, rng: random.Random, seed: int, work: str, daemons: list[Daemon]) -> int:
    started = time.monotonic()
    source = os.path.join(work, "source")
    os.mkdir(source)
    files = make_files(source, args.files, rng)
    relay_dir = os.path.join(work, "relay")
    os.mkdir(relay_dir)
    relay = Daemon(
        "relay",
        TWISTD
        + ["relay", "--listen", "tcp:0:interface=127.0.0.1", "--ttl", str(args.ttl)],
        relay_dir,
    )
    daemons.append(relay)
    relay.start()
    line = relay.wait_for("relay listening on", 20)
    port = int(line.rsplit(":", 1)[1])
    # A restarted relay must come back on the same port.
    relay.argv = TWISTD + [
        "relay", "--listen", f"tcp:{port}:interface=127.0.0.1", "--ttl", str(args.ttl)
    ]  # fmt: skip
    relay_address = f"127.0.0.1:{port}"
    peers: list[Daemon] = []
    holders: dict[str, list[int]] = {name: [] for name in files}
    for index in range(args.peers):
        share = os.path.join(work, f"peer{index}")
        os.mkdir(share)
        peer = Daemon(
            f"peer{index}",
            TWISTD + ["peer", "--relay", relay_address, "--share", share,
                      "--listen", "tcp:0:interface=127.0.0.1"],
            share,
        )  # fmt: skip
        peers.append(peer)
        daemons.append(peer)
    for position, name in enumerate(sorted(files)):
        for index in {position % args.peers, (position + 1) % args.peers}:
            shutil.copyfile(
                os.path.join(source, name), os.path.join(peers[index].cwd, name)
            )
            holders[name].append(index)
    for peer in peers:
        peer.start()
    for peer in peers:
        peer.wait_for("registered at the relay", 20)

    def registered(peer: Daemon) -> bool:
        # Registered since the relay last started (a log line we can see).
        with peer.changed:
            recent = peer.lines[peer.mark :]
            return any("registered at the relay" in line for line in recent)

    fetch_times: list[float] = []
    counts = dict(fetches=0, succeeded=0, corrupted=0, lost=0, unavailable=0)
    kills = restarts = relay_restarts = 0
    while counts["fetches"] < args.fetches:
        if time.monotonic() - started > args.seconds:
            print(f"time limit of {args.seconds}s reached", file=sys.stderr)
            break
        action = rng.random()
        if action < 0.15:
            victim = rng.choice(peers)
            if victim.alive and sum(p.alive for p in peers) > 1:
                victim.stop(rng.choice([signal.SIGKILL, signal.SIGTERM]))
                kills += 1
        elif action < 0.35:
            for peer in peers:
                if not peer.alive:
                    peer.start()
                    peer.mark = 0
                    peer.wait_for("registered at the relay", 30)
                    restarts += 1
                    break
        elif action < 0.40:
            relay.stop(rng.choice([signal.SIGKILL, signal.SIGTERM]))
            relay.start()
            relay.wait_for("relay listening on", 20)
            relay_restarts += 1
            for peer in peers:
                if peer.alive:
                    with peer.changed:
                        peer.mark = len(peer.lines)
            # Peers notice at their next renewal; wait for them (an event,
            # bounded by a couple of renewal intervals).
            for peer in peers:
                if peer.alive:
                    peer.wait_for("registered at the relay", 3 * args.ttl, peer.mark)

        name = rng.choice(sorted(files))
        expected = any(peers[i].alive and registered(peers[i]) for i in holders[name])
        counts["fetches"] += 1
        fetch_started = time.monotonic()
        result = subprocess.run(
            P2P + ["--relay", relay_address, "-q", "--connect-timeout", "2",
                   "--idle-timeout", "5", "get", name],
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        elapsed = time.monotonic() - fetch_started
        if result.returncode == 0:
            if result.stdout == files[name]:
                counts["succeeded"] += 1
                fetch_times.append(elapsed)
            else:
                counts["corrupted"] += 1
                print(f"CORRUPTED {name}: {len(result.stdout)} bytes", file=sys.stderr)
        elif expected:
            counts["lost"] += 1
            print(
                f"LOST {name} (exit {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}",
                file=sys.stderr,
            )
        else:
            counts["unavailable"] += 1

    print(
        f"fetches: {counts['fetches']}, succeeded: {counts['succeeded']}, "
        f"corrupted: {counts['corrupted']}, lost: {counts['lost']}"
    )
    print(f"not held by a live registered peer (may fail): {counts['unavailable']}")
    print(
        f"kills: {kills}, peer restarts: {restarts}, relay restarts: {relay_restarts}"
    )
    if fetch_times:
        ordered = sorted(fetch_times)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(
            f"fetch time: median {statistics.median(ordered) * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms; "
            f"total {time.monotonic() - started:.1f} s; seed {seed}"
        )
    return 1 if counts["corrupted"] or counts["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
