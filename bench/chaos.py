#!/usr/bin/env python3
"""A chaos check users can run: fetch files while peers and the relay die.

Starts a relay and N peers as real ``twist`` processes on 127.0.0.1, gives
every file to two peers, then runs a bounded number of ``p2p get`` fetches.
While each fetch runs, a random fault may strike after a random delay: a
peer killed (SIGKILL or SIGTERM), a dead peer restarted, or the relay
killed and restarted on its port.  A fetch must succeed, byte-identical to
the source, whenever one of its file's holders stayed alive and registered
(and the relay stayed up) from the fetch's start to its end::

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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    ONE_SOURCE,
    P2P,
    RELAY_ONE_SOURCE,
    TWISTD,
    Daemon,
    MiB,
    listening_port,
)

# Small files and large ones: a fault is likely to land in the middle of
# the large ones' transfers.
SIZES = [0, 1, 1000, 64 * 1024, 2 * MiB, 32 * MiB, 64 * MiB, 128 * MiB]


def make_files(folder: str, count: int, rng: random.Random) -> dict[str, bytes]:
    files = {}
    for index in range(count):
        files[f"file{index:02d}.bin"] = rng.randbytes(rng.choice(SIZES))
    for name, content in files.items():
        with open(os.path.join(folder, name), "wb") as stream:
            stream.write(content)
    return files


class Cluster:
    """The relay and the peers, and what each has been through."""

    def __init__(self, work: str, peers: int, ttl: int) -> None:
        self.work = work
        self.ttl = ttl
        self.relay = Daemon(
            "relay",
            TWISTD + ["relay", "--listen", "tcp:0:interface=127.0.0.1",
                      "--ttl", str(ttl), *RELAY_ONE_SOURCE],
        )  # fmt: skip
        self.peers: list[Daemon] = []
        # One condition for every daemon, so a wait can watch them all.
        self.changed = self.relay.changed
        self.relay_starts = 0
        self.port = 0
        for index in range(peers):
            share = os.path.join(work, f"peer{index}")
            os.mkdir(share)
            self.peers.append(Daemon(f"peer{index}", [], share, changed=self.changed))

    def start(self) -> None:
        self.relay.start()
        self.port = listening_port(self.relay)
        self.relay_starts += 1
        # A restarted relay must come back on the same port.
        self.relay.argv = TWISTD + [
            "relay", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--ttl", str(self.ttl), *RELAY_ONE_SOURCE,
        ]  # fmt: skip
        for peer in self.peers:
            peer.argv = TWISTD + [
                "peer", "--relay", f"127.0.0.1:{self.port}", "--share", peer.cwd,
                "--listen", "tcp:0:interface=127.0.0.1", *ONE_SOURCE,
            ]  # fmt: skip
            self.start_peer(peer)

    def start_peer(self, peer: Daemon) -> None:
        peer.start()
        peer.wait_for("registered at the relay", 30)

    def restart_relay(self, sig: int) -> None:
        self.relay.stop(sig)
        self.relay.start()
        listening_port(self.relay)
        self.relay_starts += 1
        # Each live peer's next renewal registers it at the new relay (a peer
        # that missed no renewal does not notice; the relay's log shows it).
        for peer in self.peers:
            if peer.alive:
                peer_id = self.peer_id(peer)
                self.relay.wait_for(f"peer {peer_id} registered", 3 * self.ttl)

    def wait_sending(
        self, candidates: list[Daemon], name: str, timeout: float
    ) -> Daemon | None:
        """The first of C{candidates} to log that it is sending C{name} (or,
        for a small file, that it sent it)."""
        marks = {id(peer): len(peer.lines) for peer in candidates}
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for peer in candidates:
                    new = peer.lines[marks[id(peer)] :]
                    # Only a transfer of 1 MiB or more logs its start;
                    # a smaller one is over when it is logged.
                    if any(
                        f"sending {name} " in line or f"sent {name} " in line
                        for line in new
                    ):
                        return peer
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)

    def peer_id(self, peer: Daemon) -> str:
        line = peer.wait_for("registered at the relay as", 30)
        return line.split("registered at the relay as ", 1)[1].split()[0]

    def registered(self, peer: Daemon) -> bool:
        """Alive and listed by the relay as it runs now."""
        if not peer.alive:
            return False
        marker = f"peer {self.peer_id(peer)} registered"
        with self.relay.changed:
            return any(marker in line for line in self.relay.lines)

    def stop(self) -> None:
        for daemon in [self.relay, *self.peers]:
            daemon.stop(signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--fetches", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=180, help="overall limit")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ttl", type=int, default=6, help="relay lease length")
    parser.add_argument("--verbose", action="store_true", help="explain failures")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    work = tempfile.mkdtemp(prefix="p2p-chaos-")
    cluster = Cluster(work, args.peers, args.ttl)
    try:
        return run(args, rng, seed, work, cluster)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args, rng: random.Random, seed: int, work: str, cluster: Cluster) -> int:
    started = time.monotonic()
    source = os.path.join(work, "source")
    os.mkdir(source)
    files = make_files(source, args.files, rng)
    holders: dict[str, list[int]] = {}
    for position, name in enumerate(sorted(files)):
        holders[name] = sorted({position % args.peers, (position + 1) % args.peers})
        for index in holders[name]:
            shutil.copyfile(
                os.path.join(source, name), os.path.join(cluster.peers[index].cwd, name)
            )
    cluster.start()

    times: list[float] = []
    counts = dict(fetches=0, succeeded=0, corrupted=0, lost=0, excused=0, resumed=0)
    faults = dict(kills=0, mid_transfer=0, restarts=0, relay_restarts=0)
    while counts["fetches"] < args.fetches:
        if time.monotonic() - started > args.seconds:
            print(f"time limit of {args.seconds}s reached", file=sys.stderr)
            break
        dead = [peer for peer in cluster.peers if not peer.alive]
        if dead and rng.random() < 0.6:
            # Bring a dead peer back, so most files keep a live holder.
            cluster.start_peer(rng.choice(dead))
            faults["restarts"] += 1
        name = rng.choice(sorted(files))
        at_start = {i for i in holders[name] if cluster.registered(cluster.peers[i])}
        relay_starts = cluster.relay_starts
        counts["fetches"] += 1
        fetch_started = time.monotonic()
        fetch = subprocess.Popen(
            P2P + ["--relay", f"127.0.0.1:{cluster.port}", "--connect-timeout", "2",
                   "--idle-timeout", "5", "get", name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        action = rng.random()
        if action < 0.25:
            # Kill whichever holder starts sending, in the middle of it.
            live = [cluster.peers[i] for i in holders[name]]
            sender = cluster.wait_sending([p for p in live if p.alive], name, 3)
            if sender is not None and sum(p.alive for p in cluster.peers) > 1:
                sender.stop(signal.SIGKILL)
                faults["kills"] += 1
                faults["mid_transfer"] += 1
            action = 1.0
        else:
            # Otherwise the fault strikes after a random delay (the client
            # spends its first ~0.3 s starting Python).
            time.sleep(rng.uniform(0.2, 0.9))
        if action < 0.45:
            # Most often a holder of the file in flight: mid-transfer kills
            # are the interesting ones.
            targets = [cluster.peers[i] for i in holders[name]]
            victim = rng.choice(targets if rng.random() < 0.6 else cluster.peers)
            if victim.alive and sum(p.alive for p in cluster.peers) > 1:
                victim.stop(rng.choice([signal.SIGKILL, signal.SIGTERM]))
                faults["kills"] += 1
        elif action < 0.51:
            cluster.restart_relay(rng.choice([signal.SIGKILL, signal.SIGTERM]))
            faults["relay_restarts"] += 1
        out, err = fetch.communicate(timeout=120)
        elapsed = time.monotonic() - fetch_started
        survivors = {i for i in at_start if cluster.peers[i].alive}
        expected = bool(survivors) and cluster.relay_starts == relay_starts
        if b"resuming at byte" in err:
            counts["resumed"] += 1
        if fetch.returncode == 0:
            if out == files[name]:
                counts["succeeded"] += 1
                times.append(elapsed)
            else:
                counts["corrupted"] += 1
                print(f"CORRUPTED {name}: {len(out)} bytes", file=sys.stderr)
        elif expected:
            counts["lost"] += 1
            why = err.decode(errors="replace").strip()
            print(f"LOST {name} (exit {fetch.returncode}): {why}", file=sys.stderr)
        else:
            counts["excused"] += 1
            if args.verbose:
                why = err.decode(errors="replace").strip().splitlines()[-1:]
                print(f"excused {name}: {why}", file=sys.stderr)

    print(
        f"fetches: {counts['fetches']}, succeeded: {counts['succeeded']}, "
        f"corrupted: {counts['corrupted']}, lost: {counts['lost']}"
    )
    print(
        f"failed while no holder survived or the relay restarted (allowed): "
        f"{counts['excused']}; resumed from another peer: {counts['resumed']}"
    )
    print(
        f"faults: peer kills {faults['kills']} "
        f"({faults['mid_transfer']} mid-transfer), "
        f"peer restarts {faults['restarts']}, "
        f"relay restarts {faults['relay_restarts']}"
    )
    if times:
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(
            f"fetch time: median {statistics.median(ordered) * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms; "
            f"total {time.monotonic() - started:.1f} s; seed {seed}"
        )
    return 1 if counts["corrupted"] or counts["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
