"""How much a peer's producers hand a connection that buffers it (TLS).

Over plain TCP a peer's bytes go to the socket as the socket takes them
(``sendfile``, ``os.write``): a client that stops reading holds none of the
peer's memory.  Over TLS every byte is encrypted before it is written, and
what the socket does not take waits in the connection's buffer until the
client reads, or its idle timeout ends it.  Each pull of a producer there
hands over a chunk that a client may make the peer hold for that long:
3,000 TLS connections that sent ``GET`` for a 20 GiB file and read nothing
grew a peer by 525.8 MiB, against 84.7 MiB for as many asking for a header
alone (``bench/attack.py --step 8``); with what follows, by 212.9 MiB.

Large pulls are cheaper while clients do read: a 1 GiB fetch over TLS cost
the peer 1.5-1.9 s of CPU with 256 KiB pulls against 3.6-4.3 s with
one-record ones (by hand, on loopback).  So while at most L{ROOMY_STREAMS} connections
produce this way, each pull hands over a full chunk; past that, every pull
hands over one TLS record.  At most L{ROOMY_STREAMS} connections can then
hold a large chunk (one gets it only while fewer are producing), and every
other one a record, from however many addresses the clients come.

Twisted must let the pull through alone: its TLS transport gathers writes
under 64,000 bytes until the reactor's next turn
(L{p2p.transports.unbuffered_write}), and the TCP connection under it
pauses a producer only once it holds more than its C{bufferSize}, 64 KiB
by default (L{p2p.transports.limit_unsent}); either way a client that
reads nothing would still be handed four records.
"""

from __future__ import annotations

# The most plaintext one TLS record carries.
TLS_RECORD_BYTES = 16 * 1024
# Connections producing through a buffering transport that may still pull
# full chunks: 16 MiB at 256 KiB each.
ROOMY_STREAMS = 64


class BufferedPulls:
    """
    Counts a peer's producers writing through a buffering transport
    (L{opened}, L{closed}) and sizes their pulls (L{size}).
    """

    def __init__(
        self, roomy_streams: int = ROOMY_STREAMS, small: int = TLS_RECORD_BYTES
    ) -> None:
        self.roomy_streams = roomy_streams
        self.small = small
        self.streams = 0

    def opened(self) -> None:
        self.streams += 1

    def closed(self) -> None:
        self.streams -= 1

    def size(self, largest: int) -> int:
        """The bytes a pull may hand over now, at most C{largest}."""
        if self.streams <= self.roomy_streams:
            return largest
        return min(largest, self.small)
