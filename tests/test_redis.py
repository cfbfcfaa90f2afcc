"""
Several relays on one Redis (``twistd relay --registry redis://...``), with
real relay, peer, client and redis-server processes on loopback.

pytest-twisted runs these (fixtures in ``conftest.py``; redis-server from
L{tests._redis}, skipped only when it is not installed).
"""

from __future__ import annotations

import re

from ._processes import Launcher, sample
from ._redis import RedisServer
from .test_integration import (
    EXIT_OK,
    PEER_LINE,
    integration,
    no_traceback,
    start_together,
)

UNAVAILABLE = r"registry unavailable: redis://127\.0\.0\.1:\d+/0 does not answer"
AVAILABLE_AGAIN = r"registry available again"


async def shared_relay(launcher: Launcher, redis: RedisServer, ttl: int = 30):
    relay = await launcher.relay(ttl=ttl, args=["--registry", redis.url])
    await relay.process.wait_for(r"registry: redis://")
    return relay


async def listed(launcher: Launcher, relay) -> list[str]:
    """The peer ids ``p2p peers`` lists through C{relay}."""
    result = await launcher.client("--relay", relay.address, "peers")
    assert result.code == EXIT_OK, result.stderr
    no_traceback(result.stderr)
    return sorted(
        PEER_LINE.match(line).group("peer_id")
        for line in result.stdout.decode().splitlines()
    )


@integration
async def test_two_relays_seed_scenario_and_restart(launcher, redis) -> None:
    """
    Three peers register at relay A; relay B, on the same Redis, lists them
    at once and a client fetching through B gets the file from the peer
    that holds it, suggested by name.  Then relay A is killed and started
    again: it lists every lease at once.
    """
    relay_a, relay_b = await start_together(
        shared_relay(launcher, redis), shared_relay(launcher, redis)
    )
    peers = await start_together(
        *[launcher.peer(relay_a.address, [f"sample{i}.txt"]) for i in (1, 2, 3)]
    )
    assert await listed(launcher, relay_b) == sorted(p.peer_id for p in peers)
    result = await launcher.client("--relay", relay_b.address, "get", "sample2.txt")
    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == sample("sample2.txt")
    assert "3 active peer(s), 1 suggested for sample2.txt" in result.stderr
    assert f"found at {peers[1].address}" in result.stderr
    no_traceback(result.stderr)
    # Relay A killed and started again lists them all at once: no lease
    # was lost (the peers have not renewed meanwhile).
    await relay_a.process.kill("KILL")
    again = await shared_relay(launcher, redis)
    assert await listed(launcher, again) == sorted(p.peer_id for p in peers)


@integration
async def test_redis_killed_and_restarted(launcher, redis, reactor) -> None:
    """
    Redis goes away mid-run: the relay answers ERR 503 within a second,
    says so once in its log, keeps running, and serves again by itself once
    Redis is back (the peer's next renewal registers it anew: this Redis
    keeps nothing on disk).
    """
    relay = await shared_relay(launcher, redis, ttl=3)
    peer = await launcher.peer(relay.address, ["sample1.txt"])
    await redis.kill()
    connection = await launcher.connect_raw(relay.address)
    await connection.wait_lines(1)  # the banner
    for received in (2, 3):
        started = reactor.seconds()
        connection.send_line("PEERS")
        reply = (await connection.wait_lines(received))[-1]
        assert reply == "ERR 503 registry unavailable"
        assert reactor.seconds() - started < 1.0
    await relay.process.wait_for(UNAVAILABLE)
    since = relay.process.mark()
    await redis.start()
    await relay.process.wait_for(AVAILABLE_AGAIN, since)
    # The peer's next REGISTER (a renewal to the peer) finds no lease in
    # the new Redis and creates one: a new peer to the relay.
    await relay.process.wait_for(f"peer {peer.peer_id} registered", since)
    connection.send_line("PEERS")
    reply = (await connection.wait_lines(5))[3:]
    assert reply[0] == "OK 1" and peer.peer_id in reply[1]
    assert relay.process.running
    outages = [line for line in relay.process.lines if re.search(UNAVAILABLE, line)]
    assert len(outages) == 1, relay.process.lines
    assert "Traceback" not in "\n".join(relay.process.lines)
