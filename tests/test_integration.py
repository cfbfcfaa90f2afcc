"""
End-to-end tests: real relay, peer and ``p2p`` processes on loopback.

pytest-twisted runs these (the fixtures are in ``conftest.py``).  They are
plain functions, not TestCase classes, so ``python -m twisted.trial tests``
finds nothing to run here and the two runners never share a reactor.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from ._processes import (
    LOOPBACK,
    LOOPBACK6,
    Launcher,
    _bin,
    have_ipv6_loopback,
    sample,
)

# The whole test, startup and teardown of its own processes included.
TEST_TIMEOUT_SECONDS = 60

EXIT_OK, EXIT_NOT_FOUND, EXIT_RELAY = 0, 1, 3
PEER_LINE = re.compile(r"(?P<address>\S+:\d+) (?P<peer_id>[0-9a-f]{16}) (?P<name>\S+)")
LS_LINE = re.compile(r"\s*(?P<size>\d+) (?P<address>\S+:\d+)\s+(?P<name>\S+)")


def integration(test):
    """An async pytest-twisted test that fails after TEST_TIMEOUT_SECONDS."""

    @functools.wraps(test)
    async def bounded(*args, **kwargs):
        from twisted.internet import reactor

        d = Deferred.fromCoroutine(test(*args, **kwargs))
        return await d.addTimeout(TEST_TIMEOUT_SECONDS, reactor)

    return pytest_twisted.ensureDeferred(bounded)


def start_together(*coroutines) -> Deferred:
    """Run daemon start-ups concurrently (when their order does not matter)."""
    return gatherResults([Deferred.fromCoroutine(c) for c in coroutines])


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "internal error" not in stderr, stderr


# -- the seed scenario: one relay, three peers (module-scoped cluster) --------


@integration
async def test_get_falls_back_to_the_peer_that_has_the_file(seed, launcher):
    """
    (a) ``p2p get sample2.txt`` prints exactly the file.  The peers announce
    their names' filters, so the relay suggests peer2 and peer1 (registered
    first, without the file) is never asked.
    """
    peer1, peer2, _ = seed.peers
    result = await launcher.client("--relay", seed.relay.address, "get", "sample2.txt")
    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == sample("sample2.txt")
    assert "3 active peer(s), 1 suggested for sample2.txt" in result.stderr
    assert "skipped" not in result.stderr, result.stderr
    assert f"found at {peer2.address}" in result.stderr
    no_traceback(result.stderr)


@integration
async def test_peers_lists_every_peer(seed, launcher):
    """(b) ``p2p peers``: one ``HOST:PORT ID NAME`` line per peer."""
    result = await launcher.client("--relay", seed.relay.address, "peers")
    assert result.code == EXIT_OK, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 3, lines
    matches = [PEER_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [(m["address"], m["peer_id"]) for m in matches] == [
        (peer.address, peer.peer_id) for peer in seed.peers
    ]
    assert all(m["address"].startswith("127.0.0.1:") for m in matches)


@integration
async def test_get_output_saves_the_file(seed, launcher, tmp_path):
    """(g) ``p2p get -o PATH`` writes the file and nothing else."""
    target = tmp_path / "copy.txt"
    result = await launcher.client(
        "--relay", seed.relay.address, "get", "-o", str(target), "sample3.txt"
    )
    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == b""
    assert target.read_bytes() == sample("sample3.txt")
    # No spool file left beside it.
    assert sorted(os.listdir(tmp_path)) == ["copy.txt"]


@integration
async def test_ls_lists_every_file(seed, launcher):
    """(i) ``p2p ls``: ``SIZE HOST:PORT NAME`` for each peer's file."""
    result = await launcher.client("--relay", seed.relay.address, "ls")
    assert result.code == EXIT_OK, result.stderr
    lines = result.stdout.decode().splitlines()
    found = set()
    for line in lines:
        match = LS_LINE.fullmatch(line)
        assert match, line
        found.add((match["name"], int(match["size"]), match["address"]))
    assert found == {
        (name, len(sample(name)), peer.address)
        for peer in seed.peers
        for name in peer.files
    }


@integration
async def test_quiet_not_found_is_one_line(seed, launcher):
    """A name no peer has: status 1, and with -q one stderr line."""
    result = await launcher.client(
        "-q", "--relay", seed.relay.address, "get", "missing.txt"
    )
    assert result.code == EXIT_NOT_FOUND
    assert result.stdout == b""
    assert len(result.stderr_lines) == 1, result.stderr
    assert "not found on any of 3" in result.stderr


@integration
async def test_half_closed_connection_gets_every_answer(seed, launcher):
    """
    ``printf 'PEERS\\n...' | nc -N``: requests, then the client's end of
    input; the relay and a peer answer every request, then close.
    """
    peer = seed.peers[0]
    listing = 1 + len(peer.files)
    for address, requests, reply_lines in [
        # The banner, then the answers: OK 3 and three PEER lines, ...
        (seed.relay.address, ["PEERS", "PEERS limit=1", "PEERS"], 1 + 4 + 2 + 4),
        (peer.address, ["LIST", "GET missing.txt", "LIST"], 1 + listing + 1 + listing),
    ]:
        connection = await launcher.connect_raw(address)
        for request in requests:
            connection.send_line(request)
        connection.transport.loseWriteConnection()
        await connection.when_closed()
        assert len(connection.lines) == reply_lines, connection.lines
        assert connection.lines[-1].startswith(("PEER ", "FILE ")), connection.lines


# -- failures: their own relay and peers --------------------------------------


@integration
async def test_killed_peer_is_skipped(launcher: Launcher):
    """
    (c) A peer SIGKILLed after registering is still listed by the relay
    (its lease runs on); the client skips it and fetches from a live peer,
    and a file only the dead peer had is not found anywhere.
    """
    relay = await launcher.relay()
    dead = await launcher.peer(relay.address, ["sample1.txt", "sample3.txt"])
    alive = await launcher.peer(relay.address, ["sample1.txt"])
    await dead.process.kill("KILL")

    result = await launcher.client("--relay", relay.address, "get", "sample1.txt")
    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == sample("sample1.txt")
    assert "2 active peer(s)" in result.stderr
    assert f"skipped {dead.address}: cannot connect" in result.stderr
    assert f"found at {alive.address}" in result.stderr
    no_traceback(result.stderr)

    result = await launcher.client("-q", "--relay", relay.address, "get", "sample3.txt")
    assert result.code == EXIT_NOT_FOUND, result.stderr
    assert result.stdout == b""
    assert len(result.stderr_lines) == 1, result.stderr
    assert "sample3.txt: not found on any of 2" in result.stderr


@integration
async def test_stopped_peer_unregisters(launcher: Launcher):
    """(d) A peer stopped with SIGTERM unregisters before it exits."""
    relay = await launcher.relay()
    leaving, staying = await start_together(
        launcher.peer(relay.address, ["sample1.txt"]),
        launcher.peer(relay.address, ["sample2.txt"]),
    )
    since = relay.process.mark()
    await leaving.process.kill("TERM")
    # twist stops the reactor (services stop, the peer unregisters), then
    # re-raises SIGTERM so that its exit status tells how it ended.
    assert leaving.process.signal == signal.SIGTERM, leaving.process.lines
    assert any("unregistered from the relay" in x for x in leaving.process.lines)
    assert any("Main loop terminated" in x for x in leaving.process.lines)
    await relay.process.wait_for(rf"peer {leaving.peer_id} unregistered", since)

    result = await launcher.client("--relay", relay.address, "peers")
    assert result.code == EXIT_OK, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{staying.address} {staying.peer_id}")


@integration
async def test_relay_on_ipv4_and_ipv6(launcher: Launcher, tmp_path):
    """
    (e) A relay listening on 127.0.0.1 and ::1 serves clients on either;
    a client asking via [::1]:PORT gets both peers and their files.
    """
    if not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    relay = await launcher.relay(LOOPBACK, LOOPBACK6)
    relay4, relay6 = relay.addresses
    assert relay4.startswith("127.0.0.1:")
    assert relay6.startswith("[::1]:")
    peer4, peer6 = await start_together(
        launcher.peer(relay4, ["sample1.txt"]),
        launcher.peer(relay6, ["sample2.txt"], listen=LOOPBACK6),
    )
    assert peer6.address.startswith("[::1]:")

    result = await launcher.client("--relay", relay6, "peers")
    assert result.code == EXIT_OK, result.stderr
    addresses = {line.split()[0] for line in result.stdout.decode().splitlines()}
    assert addresses == {peer4.address, peer6.address}

    result = await launcher.client(
        "--relay", relay6, "get", "-o", str(tmp_path), "sample1.txt", "sample2.txt"
    )
    assert result.code == EXIT_OK, result.stderr
    assert (tmp_path / "sample1.txt").read_bytes() == sample("sample1.txt")
    assert (tmp_path / "sample2.txt").read_bytes() == sample("sample2.txt")


@integration
async def test_relay_down(launcher: Launcher):
    """
    (f) Nothing listening at the relay address: status 3, one stderr line.

    The port is bound but not listening, so connecting is refused, and no
    other process can take the port while the test runs.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        for command in (["get", "sample1.txt"], ["peers"], ["ls"]):
            result = await launcher.client("--relay", address, *command)
            assert result.code == EXIT_RELAY, (command, result.stderr)
            assert result.stdout == b""
            assert len(result.stderr_lines) == 1, result.stderr
            assert "cannot connect" in result.stderr
            no_traceback(result.stderr)


@integration
async def test_interactive_client_checks_the_relay_first(launcher: Launcher):
    """
    ``p2p HOST PORT`` with no relay there fails at once, with one line,
    before asking for any name (its stdin is closed: it would otherwise
    end quietly, status 0, without ever asking the relay).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        result = await launcher.client("127.0.0.1", str(closed.getsockname()[1]))
    assert result.code == EXIT_RELAY, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    assert "cannot connect" in result.stderr
    no_traceback(result.stderr)


@integration
async def test_everyday_get(seed, launcher, tmp_path):
    """
    Options after the names, ``-o DIR`` with several names, and ``--json``:
    each file lands under DIR, stdout carries one JSON object per name.
    """
    out = tmp_path / "out"
    out.mkdir()
    result = await launcher.client(
        "get", "sample3.txt", "missing.txt", "sample1.txt",
        "-o", str(out), "--json", "--relay", seed.relay.address,
    )  # fmt: skip
    assert result.code == EXIT_NOT_FOUND, result.stderr
    assert sorted(os.listdir(out)) == ["sample1.txt", "sample3.txt"]
    assert (out / "sample3.txt").read_bytes() == sample("sample3.txt")
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["name"], o["status"]) for o in objects] == [
        ("sample3.txt", "ok"),
        ("missing.txt", "not-found"),
        ("sample1.txt", "ok"),
    ]
    assert objects[0]["size"] == len(sample("sample3.txt"))
    assert objects[0]["output"] == str(out / "sample3.txt")
    no_traceback(result.stderr)


@integration
async def test_reader_that_leaves(launcher: Launcher, tmp_path):
    """
    ``p2p get BIG | head -c 10`` and ``p2p get -o - BIG | head -c 10``: the
    reader leaves early, and p2p ends quietly (status 141, SIGPIPE's), as GNU tools do,
    instead of saying ``cannot write stdout: Broken pipe``.  ``-o -`` is
    stdout, as for curl.
    """
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    relay = await launcher.relay()
    peer = await launcher.peer(relay.address, links={"big.bin": str(big)})
    await peer.process.wait_for(r"indexed the share")
    p2p = f"{_bin('p2p')} -q --relay {relay.address} get"
    for command in (f"{p2p} big.bin", f"{p2p} -o - big.bin"):
        script = f"{command} | head -c 10 | wc -c; exit ${{PIPESTATUS[0]}}"
        process = launcher.spawn("p2p", ["/bin/bash", "-c", script], stdout_lines=False)
        code = await process.when_ended(TEST_TIMEOUT_SECONDS / 2)
        assert process.stdout.split() == [b"10"], command
        assert code == 141, (command, process.stderr)  # SIGPIPE's status
        assert process.stderr == b"", (command, process.stderr)
    assert not os.path.lexists(tmp_path / "-")  # (the clients' folder)


@integration
async def test_demo(launcher: Launcher):
    """(h) ``p2p demo sample1.txt`` runs everything in one process."""
    result = await launcher.client("demo", "sample1.txt")
    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == sample("sample1.txt")
    no_traceback(result.stderr)


@integration
@pytest.mark.parametrize(
    ("signal_number", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
async def test_demo_stopped_by_a_signal(
    launcher: Launcher, signal_number: int, status: int
):
    """
    ``p2p demo`` waiting at its prompt, stopped by Ctrl-C or SIGTERM:
    it narrates its end, removes its folder (the dealt copies with it) and
    exits 128 + the signal's number.
    """
    tmp = os.path.join(launcher.workdir, f"tmp-{signal_number}")
    os.mkdir(tmp)
    process = launcher.start_client("demo", env={"TMPDIR": tmp}, keep_stdin=True)
    await process.wait_for(r"phase 2")
    assert len(os.listdir(tmp)) == 1
    process.send_signal(signal_number)
    code = await process.when_ended()
    stderr = process.stderr.decode()
    assert code == status, stderr
    assert "the demo stops: peers unregister, the relay closes" in stderr
    assert os.listdir(tmp) == []
    no_traceback(stderr)


@integration
async def test_installed_twistd_entry_points(launcher: Launcher):
    """
    The installed ``twistd`` script, as a user runs it: ``twistd -n relay``,
    ``twistd -n peer HOST PORT`` (the seed's form), then ``p2p get``.
    Each daemon gets its own pid file, as two daemons in one folder need.
    """
    from ._processes import LISTENING, REGISTERED, _bin

    twistd = _bin("twistd")
    relay = launcher.spawn(
        "twistd relay",
        [twistd, "-n", "--pidfile=relay.pid", "relay", "--listen", LOOPBACK],
    )
    listening = await relay.wait_for(LISTENING)
    host, port = listening.group("address").rsplit(":", 1)
    share = os.path.join(launcher.workdir, "twistd-share")
    os.mkdir(share)
    with open(os.path.join(share, "sample3.txt"), "wb") as stream:
        stream.write(sample("sample3.txt"))
    peer = launcher.spawn(
        "twistd peer",
        [twistd, "-n", "--pidfile=peer.pid", "peer", "--share", share,
         "--listen", LOOPBACK, host, port],
    )  # fmt: skip
    await peer.wait_for(REGISTERED)
    result = await launcher.client("--relay", f"{host}:{port}", "get", "sample3.txt")
    assert result.code == EXIT_OK, result.stderr
    assert result.stdout == sample("sample3.txt")
    no_traceback(result.stderr)
