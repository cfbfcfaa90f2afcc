"""What can go wrong with a relay or a peer, sorted, and one line for each.

Shared by every client-side module (the fetch, the swarm, the holders'
question, the CLI) and by the peer's announcer, which reports its own
relay failures the same way; it imports no protocol, so any of them can
use it without pulling in the others.

L{SKIPPABLE} names the failures that mean "this peer (or relay) cannot
help"; anything else is a bug and propagates.  L{FailureKind} sorts them
for the code that decides what to do next (and for ``--json``);
L{describe} says them to a person.
"""

from __future__ import annotations

import enum
import os

from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectingTimeout
from twisted.python.failure import Failure

from p2p import wire
from p2p.request import IncompleteReply
from p2p.wire import WireError


class FailureKind(enum.StrEnum):
    """
    Why a peer could not deliver.  The values are the words ``--json``
    prints (a C{StrEnum}: each member is also that string).
    """

    #: an ``ERR`` reply (``ERR 404 no such file``, ``ERR 503 busy``...)
    REFUSED = "refused"
    #: closed mid-transfer (silent: STALLED); the pieces that verified are kept
    BROKEN = "broken"
    #: a piece or the piece list did not verify: nothing of it was used
    CORRUPTED = "corrupted"
    #: the peer's file differs from the content being assembled (a peer
    #: asked by root that has none of it refuses: ``ERR 404``)
    OTHER_CONTENT = "other-content"
    #: a malformed reply
    PROTOCOL = "protocol"
    #: silent, or no header in time
    TIMEOUT = "timeout"
    #: silent mid-transfer for the idle timeout; the pieces that verified
    #: are kept
    STALLED = "stalled"
    #: below the minimum rate; the pieces that verified are kept
    SLOW = "slow"
    #: larger than ``--max-size`` or than the room on the target
    TOO_LARGE = "too-large"
    #: the connection could not be made (refused, unreachable, TLS refused)
    UNREACHABLE = "unreachable"
    #: an earlier run left verified pieces: ask this peer again, for the rest
    RESUME = "resume"
    #: the content is large: fetch it from several holders (L{p2p.swarm})
    HANDOVER = "handover"
    #: another peer answered first; this one may be asked again later
    ABANDONED = "abandoned"


class PeerFailed(Exception):
    """This peer could not deliver the file; the message says why, and
    C{kind} (a L{FailureKind}) sorts the reason for the fallback driver."""

    def __init__(self, reason: str, kind: FailureKind = FailureKind.REFUSED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = FailureKind(kind)


class OutputFailed(Exception):
    """The received bytes could not be stored locally (disk full, folder gone).

    Not a fault of the peer: the fetch stops instead of trying the next one.
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


# The failures that mean "move on to the next peer".  Python's own
# ConnectionError (refused, reset, aborted) covers endpoints that report a
# socket error without wrapping it in Twisted's ConnectError.  A TCP
# endpoint's connection attempt, cancelled, fails with
# ConnectingCancelledError rather than CancelledError.
SKIPPABLE = (
    PeerFailed,
    ConnectError,
    ConnectionError,
    ConnectionClosed,
    TimeoutError,
    CancelledError,
    ConnectingCancelledError,
    IncompleteReply,
    WireError,
    wire.RemoteError,
)

# What "the relay cannot be reached or misbehaved" looks like: the peer-level
# failures plus a name that does not resolve (peers are IP literals, so only
# the relay's address goes through DNS).
RELAY_FAILURES = (*SKIPPABLE, DNSLookupError)


def kind_of(failure: Failure) -> FailureKind:
    """The L{FailureKind} of an expected failure (one of L{SKIPPABLE})."""
    value = failure.value
    if isinstance(value, PeerFailed):
        return value.kind
    if isinstance(
        value,
        (ConnectingTimeout, TimeoutError, CancelledError, ConnectingCancelledError),
    ):
        return FailureKind.TIMEOUT
    if isinstance(value, (ConnectError, ConnectionRefusedError)):
        return FailureKind.UNREACHABLE
    if isinstance(value, wire.RemoteError):
        return FailureKind.REFUSED
    if isinstance(value, WireError):
        return FailureKind.PROTOCOL
    return FailureKind.BROKEN


def describe(failure: Failure) -> str:
    """One human line for an expected failure of a relay or a peer."""
    value = failure.value
    if isinstance(value, PeerFailed):
        return value.reason
    if isinstance(value, ConnectingTimeout):
        # Twisted's own connect timeout (the endpoint's) fired first.
        return "timed out"
    if isinstance(value, ConnectError):
        # osError is an errno for refusals, a message or None otherwise.
        reason = value.osError
        if isinstance(reason, int):
            reason = os.strerror(reason)
        return f"cannot connect: {reason or type(value).__name__}"
    if isinstance(value, (ConnectionRefusedError, ConnectionResetError)):
        return f"cannot connect: {value.strerror or type(value).__name__}"
    if isinstance(value, (TimeoutError, CancelledError, ConnectingCancelledError)):
        return "timed out"
    if isinstance(value, wire.RemoteError):
        return f"refused: ERR {value.code} {value.message}"
    if isinstance(value, WireError):
        return f"protocol error: {value.message}"
    return str(value) or type(value).__name__
