#!/usr/bin/env python3
"""Baseline for the relay rate benchmark: the least a Twisted relay can do.

A minimal ``LineReceiver`` on 127.0.0.1 (port printed on stdout): it greets
with the relay banner, answers each line with one dict lookup (by verb) and
leaves the close to the client, exactly the shape of a P2P/1 request.  No
limits, no timeouts, no logging, no registry: what is left is the cost of a
Twisted TCP connection, which our relay must approach.  It writes as the
relay does (L{p2p.transports.write_now}: at once when the socket takes it),
so the two differ in what they do per request, not in how they write.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver

from p2p.transports import write_now

REPLIES = {
    b"REGISTER": b"OK 0123456789abcdef ttl=60 renew=20 observed=127.0.0.1\n",
    b"PEERS": b"OK 0\n",
}
UNKNOWN = b"ERR 501 unknown command\n"


class Baseline(LineReceiver):
    delimiter = b"\n"

    def connectionMade(self) -> None:
        write_now(self.transport, b"P2P/1 relay\n")

    def lineReceived(self, line: bytes) -> None:
        write_now(self.transport, REPLIES.get(line.split(b" ", 1)[0], UNKNOWN))


def main() -> None:
    factory = ServerFactory.forProtocol(Baseline)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
