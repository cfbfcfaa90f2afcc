"""
End-to-end: several relays and the client's cached peer list, with real
relay, peer and ``p2p`` processes on loopback (pytest-twisted; trial finds
nothing to run here).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import time

from p2p.relay_cache import PeerCache

from ._processes import Launcher, sample
from .test_integration import integration, no_traceback, start_together

EXIT_OK = 0


def registered_at(relay: str) -> str:
    """The peer's log line for its registration at C{relay}."""
    return (
        r"registered at the relay as (?P<peer_id>[0-9a-f]{16}) "
        rf"\(at {re.escape(relay)},"
    )


@integration
async def test_several_relays_and_the_cache(launcher: Launcher):
    """
    A peer registered at two relays is listed by both; ``p2p get`` with
    the first relay down (a closed port) goes through the second and says
    so; with both down it fetches from the cached peer, saying how old the
    list is.
    """
    first, second = await start_together(launcher.relay(), launcher.relay())
    peer = await launcher.peer(
        first.address, ["sample1.txt"], args=["--relay", second.address]
    )
    ids = []
    for relay in (first, second):
        ids.append((await peer.process.wait_for(registered_at(relay.address)))[1])
    # Asked by hand (a p2p process each would cost a second of start-up).
    for relay, peer_id in zip((first, second), ids, strict=True):
        connection = await launcher.connect_raw(relay.address)
        connection.send_line("PEERS")
        lines = await connection.wait_lines(3)
        assert lines[1] == "OK 1", lines
        assert lines[2].split()[1:4] == [peer_id, *peer.address.rsplit(":", 1)]
        await connection.close()

    # Bound, not listening: connecting is refused, and no other process can
    # take the port while the test runs.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{closed.getsockname()[1]}"
        relays = ["--relay", down, "--relay", second.address]

        result = await launcher.client(*relays, "get", "sample1.txt")
        assert result.code == EXIT_OK, result.stderr
        assert result.stdout == sample("sample1.txt")
        assert (
            f"relay {second.address} answered (after {down}: cannot connect"
            in result.stderr
        )
        no_traceback(result.stderr)
        # The launcher gives every process the test's own $XDG_CACHE_HOME.
        folder = os.path.join(os.environ["XDG_CACHE_HOME"], "p2p-relay")
        cache = PeerCache(folder, [down, second.address], time.time)
        assert stat.S_IMODE(os.stat(cache.path).st_mode) == 0o600

        await second.process.kill("KILL")
        result = await launcher.client(*relays, "get", "sample1.txt")
    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == sample("sample1.txt")
    assert "relays unreachable; using the peer list cached 0 min ago" in result.stderr
    assert f"found at {peer.address}" in result.stderr
    no_traceback(result.stderr)
