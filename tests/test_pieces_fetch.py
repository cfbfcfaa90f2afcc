"""
Issue 8 on real processes: indexing ahead, verified pieces, several holders.

* A huge sparse file is fetched right after its peer starts: the peer is
  still indexing it, says so, and the fetch succeeds.
* Three holders, one SIGKILLed mid-transfer and one serving garbage under
  the right root: the output is byte-identical all the same.
* A file rewritten on disk while it is being served is never passed off
  under its old root; the next fetch gets the new content.
* ``p2p ls`` walks every page of a share of more than one page.

Every wait is on an event (a log line, a process exit), bounded in time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections.abc import Iterator

import pytest
import pytest_twisted

from p2p import pieces

from ._processes import Launcher, _bin, sample

MiB = 1024 * 1024
EXIT_OK, EXIT_NOT_FOUND = 0, 1
# The figure; P2P_HUGE_TEST_GIB makes it smaller on a slow machine.
HUGE_GIB = int(os.environ.get("P2P_HUGE_TEST_GIB", "20"))
HUGE_TIMEOUT_SECONDS = 240
THREE_SOURCES_BYTES = 48 * MiB
TEST_TIMEOUT_SECONDS = 60

# Reads a fetched stream in 1 MiB blocks and prints its length and how many
# blocks held a byte that is not zero (a sparse file reads as all zeros).
# A comparison with fresh zeros (memcmp) keeps up with the client; counting
# zero bytes (bytes.count) would not.
ZERO_CHECK = (
    "import sys\n"
    "n = bad = 0\n"
    "read = sys.stdin.buffer.read\n"
    "while chunk := read(1 << 20):\n"
    "    n += len(chunk)\n"
    "    bad += chunk != bytes(len(chunk))\n"
    "print(n, bad)\n"
)


@pytest.fixture(scope="module")
def random_file(tmp_path_factory) -> Iterator[tuple[str, bytes]]:
    folder = tmp_path_factory.mktemp("random")
    path = str(folder / "big.bin")
    data = os.urandom(THREE_SOURCES_BYTES)
    with open(path, "wb") as stream:
        stream.write(data)
    yield path, data
    shutil.rmtree(folder)


def corrupt_every_piece(path: str) -> None:
    """
    Flip one byte in every piece of C{path}, keeping its size and its
    modification time.  The peer serving it finds the change (its change
    time) at its next request, not in the transfer in progress: what is
    left of that one goes out as garbage under the right root, as from a
    disk going bad under a peer.
    """
    info = os.stat(path)
    with open(path, "r+b") as stream:
        for offset in range(0, info.st_size, pieces.PIECE_SIZE):
            stream.seek(offset + 123)
            byte = stream.read(1)
            stream.seek(offset + 123)
            stream.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


@pytest_twisted.ensureDeferred
async def test_huge_sparse_file_right_after_the_peer_starts(launcher: Launcher):
    """
    The first ``p2p get`` of a huge file, asked the moment its peer is
    listening: the peer indexes it first (the client says so on stderr),
    then every byte arrives, verified.  A ``p2p ls`` before it lists
    what the peer indexed so far and says the listing is not all yet.
    """
    size = HUGE_GIB * 1024 * MiB
    relay = await launcher.relay()
    sparse = os.path.join(launcher.workdir, "huge.img")
    with open(sparse, "wb") as stream:
        stream.truncate(size)
    await launcher.peer(relay.address, links={"huge.img": sparse})
    listing = await launcher.client("--relay", relay.address, "ls")
    assert listing.code == EXIT_OK, listing.stderr
    assert "still indexing its share, not every file is listed yet" in (listing.stderr)
    assert "Traceback" not in listing.stderr
    script = (
        f"set -o pipefail; {_bin('p2p')} --relay {relay.address} get huge.img"
        f" | {sys.executable} -c '{ZERO_CHECK}'"
    )
    process = launcher.spawn("p2p", ["/bin/bash", "-c", script], stdout_lines=False)
    code = await process.when_ended(HUGE_TIMEOUT_SECONDS)
    stderr = process.stderr.decode()
    assert code == EXIT_OK, stderr
    assert process.stdout.decode().split() == [str(size), "0"], stderr
    assert "is indexing it" in stderr
    assert "every piece verified" in stderr
    assert "Traceback" not in stderr


@pytest_twisted.ensureDeferred
async def test_three_sources_survive_a_kill_and_garbage(
    launcher: Launcher, random_file, tmp_path
):
    """
    One holder is SIGKILLed mid-transfer and another serves garbage pieces
    under the right root (its file is damaged as it sends its first
    range): both are dropped, their pieces come from the third, and the
    output is byte-identical.
    """
    path, data = random_file
    relay = await launcher.relay()
    slow = ("--max-upload-rate", "16M")
    # Each holder's file is a copy of its own: linking one file into two
    # shares changes its change time, and the first peer would index it
    # again.  The liar's is the one it damages.
    copies = []
    for holder in ("honest", "doomed", "liar"):
        copies.append(str(tmp_path / f"{holder}.bin"))
        shutil.copyfile(path, copies[-1])
    honest, doomed, liar = [
        await launcher.peer(relay.address, links={"big.bin": copy}, args=slow)
        for copy in copies
    ]
    copy = copies[-1]
    for peer in (honest, doomed, liar):
        await peer.process.wait_for(r"indexed the share")

    since = doomed.process.mark()
    lying_since = liar.process.mark()
    client = launcher.start_client("--relay", relay.address, "get", "big.bin")
    sending = r"sending big\.bin \(\d+ bytes from byte"
    # The liar's disk goes bad as soon as it starts sending a unit (4 MiB,
    # a quarter of a second at its rate); the doomed holder dies then.
    await liar.process.wait_for(sending, lying_since)
    corrupt_every_piece(copy)
    await doomed.process.wait_for(sending, since)
    await doomed.process.kill("KILL")
    result = await launcher.client_result(client, timeout=TEST_TIMEOUT_SECONDS)

    assert result.code == EXIT_OK, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    assert re.search(
        rf"stopped using {re.escape(liar.address)}: corrupted: piece \d+ does not "
        "match its digest",
        result.stderr,
    ), result.stderr
    assert re.search(
        rf"stopped using {re.escape(doomed.address)}: "
        r"(broken transfer|cannot connect|connection closed)",
        result.stderr,
    ), result.stderr
    assert "every piece verified" in result.stderr


@pytest_twisted.ensureDeferred
async def test_file_changed_on_disk_while_served(launcher: Launcher, tmp_path):
    """
    A file rewritten in place while a client fetches it: the bytes that
    changed fail their pieces' digests, so nothing of the new content is
    passed off under the old root (the target is not written).  The peer
    indexes the file again, and the next run gets the new content whole.
    """
    first = os.urandom(16 * MiB)
    second = os.urandom(16 * MiB)
    relay = await launcher.relay()
    peer = await launcher.peer(relay.address, args=("--max-upload-rate", "4M"))
    served = os.path.join(peer.share, "doc.bin")
    with open(served, "wb") as stream:
        stream.write(first)
    # Not indexed yet, maybe: the peer indexes it when asked (INDEXING lines).
    out = tmp_path / "out"
    out.mkdir()
    target = out / "doc.bin"

    client = launcher.start_client(
        "--relay", relay.address, "get", "-o", str(target), "doc.bin"
    )
    await client.wait_for(rf"found at {re.escape(peer.address)} ")
    with open(served, "r+b") as stream:
        stream.write(second)
    result = await launcher.client_result(client, timeout=TEST_TIMEOUT_SECONDS)
    assert result.code == EXIT_NOT_FOUND, result.stderr
    assert "corrupted" in result.stderr
    assert not target.exists()

    again = await launcher.client(
        "--relay", relay.address, "get", "-o", str(target), "doc.bin"
    )
    assert again.code == EXIT_OK, again.stderr
    assert target.read_bytes() == second
    assert os.listdir(out) == ["doc.bin"]  # no partial or state file left


@pytest_twisted.ensureDeferred
async def test_ls_walks_every_page(launcher: Launcher):
    """A share of 2,500 files (three LIST pages) is listed whole."""
    relay = await launcher.relay()
    source = os.path.join(launcher.workdir, "one.txt")
    with open(source, "wb") as stream:
        stream.write(sample("sample1.txt"))
    links = {f"f{index:04}.txt": source for index in range(2499)}
    peer = await launcher.peer(relay.address, files=["sample1.txt"], links=links)
    await peer.process.wait_for(r"indexed the share: 2500 files")
    listing = await launcher.client("--relay", relay.address, "ls")
    assert listing.code == EXIT_OK, listing.stderr
    names = [line.split()[-1] for line in listing.stdout.decode().splitlines()]
    assert len(names) == 2500
    assert names[0] == "f0000.txt" and "sample1.txt" in names
