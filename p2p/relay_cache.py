"""The client's copy of the last peer list a relay gave it.

When every relay is down, ``p2p get`` can still try the peers it last
heard of: most of them outlive a relay's restart.  One file per list of
relays (the same relays asked in another order or another set are another
list), under ``$XDG_CACHE_HOME/p2p-relay/`` (``~/.cache/p2p-relay/``).

The file is plain text: a header line with the time it was saved, then the
relay's own ``PEER`` lines.  Reading it goes through the wire parser, so a
cache holds addresses and nothing else, and is bounded
(L{MAX_CACHED_PEERS} entries, L{MAX_CACHE_BYTES}): a file that is anything
else is ignored with one line (L{CacheUnusable}), never trusted.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from p2p import wire
from p2p.endpoints import relay_identity
from p2p.regular import read_regular_file

CACHE_FOLDER_NAME = "p2p-relay"
# The most peers kept: as many as the client takes from a relay at all
# (p2p.client.list_peers).
MAX_CACHED_PEERS = 10_000
# A generous bound for that many PEER lines (each is at most
# wire.MAX_LINE_LENGTH, in practice under 100 bytes).
MAX_CACHE_BYTES = 4 * 1024 * 1024
_HEADER = "p2p-relay peer list 1 saved="

MINUTE_SECONDS = 60.0
HOUR_SECONDS = 60 * MINUTE_SECONDS
DAY_SECONDS = 24 * HOUR_SECONDS


def default_cache_folder() -> str:
    """``$XDG_CACHE_HOME/p2p-relay``, or ``~/.cache/p2p-relay``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, CACHE_FOLDER_NAME)


def format_age(seconds: float) -> str:
    """A cache's age for a person: ``12 min``, ``5 h``, ``3 days``."""
    seconds = max(seconds, 0.0)
    if seconds < 2 * HOUR_SECONDS:
        return f"{seconds // MINUTE_SECONDS:.0f} min"
    if seconds < 2 * DAY_SECONDS:
        return f"{seconds // HOUR_SECONDS:.0f} h"
    return f"{seconds // DAY_SECONDS:.0f} days"


class CacheUnusable(Exception):
    """The cache file exists but is not a peer list this client wrote."""


@dataclass
class CachedList:
    """A peer list read back, and when it was saved (Unix time)."""

    peers: list[wire.PeerEntry]
    saved: float


class PeerCache:
    """
    The cached peer list of one list of relays.

    :param folder: where cache files live (made, mode 0700, on first save).
    :param relays: the relay descriptions, in the order they are asked:
        they name the file (each as L{relay_identity} spells it).
    :param now: the wall clock (the reactor's C{seconds}), for the age.
    """

    def __init__(
        self, folder: str, relays: Sequence[str], now: Callable[[], float]
    ) -> None:
        # The same relay however it was typed (127.0.0.1:8000, the seed's
        # form, or tcp:127.0.0.1:8000, the default): one list, not two.
        identities = "\n".join(relay_identity(relay) for relay in relays)
        key = hashlib.sha256(identities.encode("utf-8", "surrogateescape"))
        self.path = os.path.join(folder, f"peers-{key.hexdigest()[:32]}.txt")
        self.now = now

    def save(self, peers: Sequence[wire.PeerEntry]) -> None:
        """
        Replace the cached list with C{peers} (the first
        L{MAX_CACHED_PEERS}, without their name filters): written to a
        temporary file, mode 0600, then renamed over the old one, so a
        reader never sees half a list.

        :raise OSError: when the folder or file cannot be written.
        """
        folder = os.path.dirname(self.path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        lines = [f"{_HEADER}{self.now():.3f}\n".encode()]
        # Addresses only: not the name filters of a ``PEERS files=1``
        # listing (six times the size, and stale sooner than an address).
        lines += [
            replace(peer, files=None).to_line() + b"\n"
            for peer in peers[:MAX_CACHED_PEERS]
        ]
        # mkstemp creates the file with mode 0600.
        descriptor, temporary = tempfile.mkstemp(prefix=".peers-", dir=folder)
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(b"".join(lines))
            os.replace(temporary, self.path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise

    def load(self) -> CachedList | None:
        """
        The cached list, or C{None} when there is none.

        :raise CacheUnusable: for a file that is not a list this client
            wrote (corrupt, too large, not a regular file, unreadable).
        """
        # Not through a symbolic link, never waiting on a FIFO put in its
        # place (refused, unread).
        try:
            data = read_regular_file(self.path, MAX_CACHE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CacheUnusable(e.strerror or str(e)) from None
        if len(data) > MAX_CACHE_BYTES:
            raise CacheUnusable("larger than a peer list can be")
        return _parsed(data)


def _parsed(data: bytes) -> CachedList:
    lines = data.split(b"\n")
    try:
        header = lines[0].decode("ascii")
    except UnicodeDecodeError:
        header = ""
    if not header.startswith(_HEADER):
        raise CacheUnusable("not a peer list")
    if lines.pop() != b"":
        raise CacheUnusable("truncated")
    try:
        saved = float(header[len(_HEADER) :])
    except ValueError:
        saved = math.nan
    if not math.isfinite(saved):
        raise CacheUnusable("no valid time in its header")
    if len(lines) - 1 > MAX_CACHED_PEERS:
        raise CacheUnusable(f"more than {MAX_CACHED_PEERS} peers")
    peers = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            peers.append(wire.PeerEntry.from_line(line))
        except (ValueError, wire.WireError):
            raise CacheUnusable(f"line {number} is not a peer") from None
    return CachedList(peers, saved)
