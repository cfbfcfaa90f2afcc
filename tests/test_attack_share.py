"""
Issue 9, point 1, against a real peer: a folder of the share swapped for a
symlink to a folder outside, in a loop, while a client asks for a file in
it over and over.

Before the fix the peer resolved names with ``realpath()`` and then opened
them: a swap between the two served the file outside (3,239 times in
21,945 requests, in 20 s), and a swap during ``realpath()`` raised an
OSError nothing caught (no reply, a traceback in the log).  Here a thread
swaps for a bounded time while the test sends ``GET e/secret`` on a fresh
connection each time: the secret must never arrive, every request must get
an answer, and the peer must log no traceback.

Every wait is on an event (a log line, a reply, the swapping thread's
end), bounded in time; the attack itself is bounded in time and count.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter

import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.basic import LineReceiver

from ._processes import EVENT_TIMEOUT_SECONDS, Launcher

ATTACK_SECONDS = 2.5
MAX_REQUESTS = 10_000
# Fewer would mean the attack hardly ran (a machine far too slow, or a bug
# in the test): the result would prove nothing.
MIN_REQUESTS = 50
# The swapping thread's pace: a pause after each swap, waiting on its stop
# event (so it ends at once).  Flat out, its renames flood the peer with
# inotify events and a request takes tens of milliseconds; at this pace the
# peer answers hundreds of requests a second (checked: realpath() then
# open() left requests unanswered in every run, and leaked in most).
SWAP_PAUSE_SECONDS = 0.0002
NAME = "e/secret"
PUBLIC = b"the public file, inside the share\n"
SECRET = b"TOP SECRET " + os.urandom(16).hex().encode() + b"\n"
OK_HEADER = re.compile(rb"\AOK (?P<count>\d+) .*\bhashes=(?P<hashes>\d+)\Z")


class NoReply(Exception):
    """The peer closed the connection without an answer."""


class OneGet(LineReceiver):
    """
    One ``GET`` on its own connection: reads the banner, asks, skips
    ``INDEXING`` lines, then takes an ``ERR`` line or an ``OK`` header and
    exactly the bytes it announces.  C{answer} fires once the connection is
    closed, with C{(first line, bytes after it)}.
    """

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, name: str) -> None:
        self.name = name
        self.answer: Deferred[tuple[bytes, bytes]] = Deferred(self._cancel)
        self.lines: list[bytes] = []
        self.body = bytearray()
        self.expected: int | None = None
        self.reply: tuple[bytes, bytes] | None = None

    def _cancel(self, d: Deferred) -> None:
        self.transport.abortConnection()

    def lineReceived(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        self.lines.append(line)
        if len(self.lines) == 1:  # the banner
            self.sendLine(b"GET " + self.name.encode() + b"\r")
        elif line.startswith(b"ERR "):
            self._replied(line)
        elif match := OK_HEADER.match(line):
            self.expected = int(match["count"]) + int(match["hashes"])
            self.setRawMode()
        elif not line.startswith(b"INDEXING "):
            self._replied(line)  # unexpected: the test says what it was

    def rawDataReceived(self, data: bytes) -> None:
        self.body += data
        assert self.expected is not None
        if len(self.body) >= self.expected:
            self._replied(self.lines[-1])

    def _replied(self, line: bytes) -> None:
        if self.reply is None:
            self.reply = (line, bytes(self.body))
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        if self.answer.called:
            return  # cancelled (timed out)
        if self.reply is None:
            self.answer.errback(NoReply(f"no answer to GET; lines: {self.lines!r}"))
        else:
            self.answer.callback(self.reply)


async def get(reactor, address: str, name: str) -> tuple[bytes, bytes]:
    """One ``GET C{name}`` to C{address}: (first line of the answer, bytes)."""
    host, port = address.rsplit(":", 1)
    endpoint = TCP4ClientEndpoint(reactor, host, int(port), timeout=5)
    protocol = OneGet(name)
    await connectProtocol(endpoint, protocol).addTimeout(EVENT_TIMEOUT_SECONDS, reactor)
    return await protocol.answer.addTimeout(EVENT_TIMEOUT_SECONDS, reactor)


def swap_until(stop: threading.Event, share: str) -> int:
    """
    (A thread.)  Exchange the share's folder C{e} and the symlink
    C{.e-link} (to the folder outside) until C{stop} is set; three renames,
    each atomic, so C{e} is the folder, missing, or the symlink.  Ends with
    C{e} the folder again.  Returns how many swaps it made.
    """
    folder, link, spare = (os.path.join(share, n) for n in ("e", ".e-link", ".e-"))
    swaps = 0
    while not stop.is_set() or swaps % 2:
        os.rename(folder, spare)
        os.rename(link, folder)
        os.rename(spare, link)
        swaps += 1
        stop.wait(SWAP_PAUSE_SECONDS)
    return swaps


@pytest_twisted.ensureDeferred
async def test_swapped_folder_never_serves_outside(launcher: Launcher, reactor):
    """
    ``GET e/secret`` repeated while ``e`` flips between a folder of the
    share and a symlink to a folder outside holding C{secret}: no byte of
    that secret is ever sent, every request is answered (an ``OK`` header
    with the file inside, or an ``ERR`` line), and the peer logs no
    traceback.
    """
    relay = await launcher.relay()
    peer = await launcher.peer(relay.address)
    outside = os.path.join(launcher.workdir, "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "secret"), "wb") as stream:
        stream.write(SECRET)
    os.mkdir(os.path.join(peer.share, "e"))
    with open(os.path.join(peer.share, "e", "secret"), "wb") as stream:
        stream.write(PUBLIC)
    os.symlink("../outside", os.path.join(peer.share, ".e-link"))
    # Served before the attack (indexed on demand if need be).
    line, body = await get(reactor, peer.address, NAME)
    assert line.startswith(b"OK ") and body.endswith(PUBLIC), (line, body)

    stop = threading.Event()
    swapping = threads.deferToThread(swap_until, stop, peer.share)
    answers: Counter[bytes] = Counter()
    leaked = unanswered = requests = 0
    started = reactor.seconds()
    try:
        while reactor.seconds() - started < ATTACK_SECONDS:
            if requests == MAX_REQUESTS:
                break
            requests += 1
            try:
                line, body = await get(reactor, peer.address, NAME)
            except NoReply:
                unanswered += 1
                continue
            leaked += SECRET in body or SECRET in line
            if line.startswith(b"OK "):
                answers[b"OK" if body.endswith(PUBLIC) else b"OK, other bytes"] += 1
            else:
                answers[line] += 1
    finally:
        stop.set()
        swaps = await swapping
    seconds = reactor.seconds() - started

    summary = (
        f"{requests} requests in {seconds:.1f} s, {swaps} swaps: {leaked} leaked,"
        f" {unanswered} unanswered, answers {dict(answers)}"
    )
    print(summary)
    assert leaked == 0, summary
    assert unanswered == 0, summary
    assert all(a == b"OK" or a.startswith(b"ERR ") for a in answers), summary
    assert requests >= MIN_REQUESTS, summary
    assert swaps > 0, summary
    log = "\n".join(peer.process.lines) + peer.process.stderr.decode()
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    # Still served, whole, once the attack is over.
    line, body = await get(reactor, peer.address, NAME)
    assert line.startswith(b"OK ") and body.endswith(PUBLIC), (line, body)
