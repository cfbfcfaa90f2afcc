"""
Fewer, larger reads while a peer sends fast.

A client's reactor wakes for its socket as soon as any byte arrives.  On
loopback a fast peer's 1 GiB came in 8,000 to 10,000 reads of about 130 KB,
each a turn of the reactor (``epoll_wait``, ``doRead``, the receiver's
bookkeeping): on 2 cores, which the peer and the client's threads share,
those turns kept the transfer below the raw loopback limit
(bench/transfer.py, docs/performance.rst).

While a content comes in fast, L{ReceiveBatching} raises the socket's
low-water mark (``SO_RCVLOWAT``, L{p2p.transports.set_receive_low_water})
to L{BATCH_BYTES}, so the reactor wakes once per batch.  Bytes below the
mark wait unread, which must never hold a transfer up or hide a peer's
progress, so the mark goes back to 1 byte:

* when fewer bytes than the mark remain of the content (its end would
  never reach it);
* when nothing was read for L{CHECK_SECONDS}: a peer that slowed down has
  its bytes read again as they come, so the idle timeout and the minimum
  rate (L{p2p.pace}) judge what it sent, never what waited in the kernel;
* when the fetch ends (L{ReceiveBatching.stop}), so a connection kept for
  the next fetch (L{p2p.pool}) reads its reply line at once.

The mark goes up again after a read of at least L{FAST_READ_BYTES}: data
is flowing fast again.  Where the mark cannot be set (TLS, test
transports) nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

# Reads per GiB on loopback: about 2,000 instead of 8,000 to 10,000 (perf
# stat; a read takes what came meanwhile, often more than the mark; 512 KiB
# gained nothing more), and at most a quarter of a piece waiting.
BATCH_BYTES = 256 * 1024
# A read this large says the peer is sending fast (one byte at a time,
# loopback reads were 130 KB on average; a peer capped at 20 MB/s sends
# 2 MB bursts).
FAST_READ_BYTES = 64 * 1024
# How long bytes may wait below the mark when the peer slows down: far
# below the idle timeout (10 s) and the minimum rate's stretch (10 s).
CHECK_SECONDS = 0.25


class ReceiveBatching:
    """
    The low-water mark of one connection's socket while it receives a
    content: call L{received} after every read of it, L{stop} when the
    fetch ends.

    @ivar mark: the mark set now (1: every byte wakes the reactor).
    """

    def __init__(
        self,
        set_mark: Callable[[int], bool],
        clock: IReactorTime,
        batch: int = BATCH_BYTES,
    ) -> None:
        self._set_mark = set_mark
        self.clock = clock
        self.batch = batch
        self.mark = 1
        # False once the mark could not be set: not asked again.
        self._settable = True
        self._read_since_check = False
        self._check: IDelayedCall | None = None

    def received(self, count: int, remaining: int) -> None:
        """C{count} content bytes were read; C{remaining} are still to come."""
        if self.mark > 1:
            if remaining < self.mark:
                self._lower()
            else:
                self._read_since_check = True
        elif (
            count >= FAST_READ_BYTES and remaining >= 2 * self.batch and self._settable
        ):
            if self._set_mark(self.batch):
                self.mark = self.batch
                self._read_since_check = False
                self._check = self.clock.callLater(CHECK_SECONDS, self._checked)
            else:
                self._settable = False

    def stop(self) -> None:
        """The fetch ended: every byte wakes the reactor again."""
        if self.mark > 1:
            self._lower()

    def _lower(self) -> None:
        self.mark = 1
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
        self._set_mark(1)  # a connection closed meanwhile needs none

    def _checked(self) -> None:
        self._check = None
        if not self._read_since_check:
            self._lower()  # the peer slowed down (or we paused): every byte
            return
        self._read_since_check = False
        self._check = self.clock.callLater(CHECK_SECONDS, self._checked)
