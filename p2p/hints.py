"""Name hints: which peers may hold a file, without telling the relay its name.

A peer announces a *filter* of the names it shares with each ``REGISTER``
(``files=``); a client asks the relay for the peers whose filter may hold a
name (``PEERS hint=``).  Both sides speak in *hints*, never names:

* ``name_hint(name)`` is the first 16 hex digits (64 bits) of the SHA-256 of
  the UTF-8 name.  The relay sees only hints and filters, so it learns which
  peers share a name only for names it can guess.
* The filter is a Bloom filter of ``FILTER_BITS`` = 2048 bits (256 bytes, 512
  lowercase hex digits on the wire) with ``POSITIONS`` = 3 positions per
  name.  The positions are taken from the hint itself: read the 16 hex
  digits as a big-endian 64-bit integer ``h``; position ``i`` (0, 1, 2) is
  ``(h >> (11 * i)) & 2047``, i.e. three disjoint 11-bit fields of its low
  33 bits.  Bit ``p`` of the filter is bit ``p % 8`` (least significant
  first) of byte ``p // 8``.

A filter has no false negatives: a peer holding a name always matches it.
It has false positives, which grow with the names a peer holds (``n``):
about ``(1 - exp(-3n / 2048)) ** 3``, i.e. 0.25 % for 100 names, 4.5 % for
300 and 45 % for 1000.  A peer with many thousands of files saturates its
filter and then matches every hint: correct (the client still tries it),
just no gain.  A wrong or stale hint only changes the order in which a
client tries peers, never which peers it may try.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from p2p import netgroup

FILTER_BITS = 2048
FILTER_BYTES = FILTER_BITS // 8
POSITIONS = 3
_POSITION_BITS = 11  # log2(FILTER_BITS)
_MASK = FILTER_BITS - 1

_HINT = re.compile(r"[0-9a-f]{16}")
_FILTER = re.compile(f"[0-9a-f]{{{2 * FILTER_BYTES}}}")


def name_hint(name: str) -> str:
    """The hint for C{name}: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def is_hint(text: str) -> bool:
    """Whether C{text} is a well-formed hint (16 lowercase hex digits)."""
    return _HINT.fullmatch(text) is not None


def is_filter(text: str) -> bool:
    """Whether C{text} is a well-formed filter (512 lowercase hex digits)."""
    return _FILTER.fullmatch(text) is not None


def positions(hint: str) -> tuple[int, ...]:
    """The C{POSITIONS} filter bits that C{hint} sets (see the module doc)."""
    value = int(hint, 16)
    return tuple((value >> (_POSITION_BITS * i)) & _MASK for i in range(POSITIONS))


def filter_bytes(names: Iterable[str]) -> bytes:
    """The filter of C{names} as its 256 raw bytes."""
    bits = bytearray(FILTER_BYTES)
    sha256 = hashlib.sha256
    for name in names:
        # The hint's value straight from the digest's first 8 bytes (the
        # same number as int(name_hint(name), 16), without the hex).
        value = int.from_bytes(sha256(name.encode("utf-8")).digest()[:8], "big")
        for _ in range(POSITIONS):
            position = value & _MASK
            bits[position >> 3] |= 1 << (position & 7)
            value >>= _POSITION_BITS
    return bytes(bits)


def build_filter(names: Iterable[str]) -> str:
    """The filter of C{names} as sent in ``files=``: 512 lowercase hex digits."""
    return filter_bytes(names).hex()


def may_hold(filter: bytes, hint: str) -> bool:
    """
    Whether a peer with the raw filter C{filter} may hold the name whose
    hint is C{hint} (never C{False} for a name it holds).
    """
    return all(filter[p >> 3] >> (p & 7) & 1 for p in positions(hint))


def matcher(hint: str):
    """
    A fast C{may_hold(filter, hint)} for one hint and many filters: the
    relay's scan calls it once per lease.
    """
    (ai, am), (bi, bm), (ci, cm) = [(p >> 3, 1 << (p & 7)) for p in positions(hint)]

    def match(filter: bytes) -> bool:
        return bool(filter[ai] & am and filter[bi] & bm and filter[ci] & cm)

    return match


# A name's suggestions take each network's first two holders before any
# network's third (the relay's rule, p2p.registry, kept by a client that
# matches names itself).
SUGGESTED_PER_NETWORK = 2


def suggest(entries: Iterable, name: str, limit: int) -> list:
    """
    The client's side of ``PEERS hint=``, from a ``PEERS files=1`` listing:
    at most C{limit} of C{entries} (in listing order: verified first) whose
    filter may hold C{name}, spread over networks as the relay spreads them.
    """
    match = matcher(name_hint(name))
    return netgroup.spread(
        (e for e in entries if e.files is not None and match(e.files)),
        lambda entry: netgroup.network_of(entry.host),
        SUGGESTED_PER_NETWORK,
        limit,
    )
