"""The peer's file server: ``GET``/``RESUME`` stream a file, ``LIST`` lists.

A file goes out as one header line (count, SHA-256, offset, size) and then
exactly ``count`` raw bytes, pulled from disk chunk by chunk as the socket
drains, so memory stays flat whatever the file size.  While a file is being
sent the connection reads no further requests.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IPullProducer,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import wire
from p2p.limits import (
    ConnectionLimits,
    IdleTimeouts,
    LimitedServerFactory,
    ServerLineProtocol,
)
from p2p.share import OpenedFile, ShareFolder
from p2p.transports import zero_copy_socket
from p2p.wire import Code, WireError

DEFAULT_IDLE_TIMEOUT_SECONDS = 30
# Large enough that per-chunk overhead is small, small enough to keep the
# process's memory flat (one chunk in flight per connection).
CHUNK_BYTES = 256 * 1024
# Most bytes one sendfile burst moves before yielding to other connections.
ZERO_COPY_BURST_BYTES = 8 * 1024 * 1024


class FileShrank(Exception):
    """The file ended before the promised byte count was sent."""


@implementer(IPullProducer)
class FileRangeProducer:
    """
    Pull producer writing C{count} bytes of C{fd} from C{offset}.

    Reads use C{os.pread}, so the descriptor's offset is never shared state.
    C{done} fires when every byte was written, or fails if the consumer went
    away (L{ConnectionLost}) or the file shrank (L{FileShrank}).

    With C{socket_fd} (a plain TCP connection's socket, see
    L{zero_copy_socket}) the bytes go from the file to the socket with
    ``os.sendfile``, never entering Python.  That is safe only while the
    transport's own buffer is empty, which is exactly when a TCP transport
    calls a pull producer back; the first call, made by C{registerProducer}
    behind the header line, still writes through the transport.
    """

    def __init__(
        self,
        fd: int,
        offset: int,
        count: int,
        consumer: IConsumer,
        on_progress: Callable[[], object] = lambda: None,
        chunk_bytes: int = CHUNK_BYTES,
        socket_fd: int | None = None,
    ) -> None:
        self.fd = fd
        self.position = offset
        self.remaining = count
        self.consumer = consumer
        self.on_progress = on_progress
        self.chunk_bytes = chunk_bytes
        self.socket_fd = socket_fd
        self._drained = False
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        if self.remaining == 0:
            self.done.callback(None)
        else:
            self.consumer.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        if self.socket_fd is not None and self._drained:
            self._send_zero_copy(self.socket_fd)
            return
        # Every later call comes from a transport whose buffer just emptied.
        self._drained = True
        chunk = os.pread(self.fd, min(self.chunk_bytes, self.remaining), self.position)
        if not chunk:
            self._finish(Failure(FileShrank()))
            return
        self.position += len(chunk)
        self.remaining -= len(chunk)
        self.consumer.write(chunk)
        self.on_progress()
        if self.remaining == 0:
            self._finish(None)

    def _send_zero_copy(self, socket_fd: int) -> None:
        sent = 0
        while self.remaining and sent < ZERO_COPY_BURST_BYTES:
            try:
                count = os.sendfile(
                    socket_fd,
                    self.fd,
                    self.position,
                    min(self.remaining, ZERO_COPY_BURST_BYTES - sent),
                )
            except BlockingIOError:
                break  # the socket buffer is full: wait until it drains
            except OSError as e:
                self._finish(Failure(ConnectionLost(f"sendfile: {e.strerror}")))
                return
            if count == 0:
                self._finish(Failure(FileShrank()))
                return
            sent += count
            self.position += count
            self.remaining -= count
        if sent:
            self.on_progress()
        if self.remaining == 0:
            self._finish(None)
        else:
            # Be called back (through doWrite, buffer empty) when writable.
            self.consumer.startWriting()

    def stopProducing(self) -> None:
        if not self.done.called:
            self.done.errback(ConnectionLost("the consumer stopped the transfer"))

    def _finish(self, result: Failure | None) -> None:
        self.consumer.unregisterProducer()
        if result is None:
            self.done.callback(None)
        else:
            self.done.errback(result)


class PeerProtocol(ServerLineProtocol):
    """One client connection to a peer.

    Framing, idle timeout, line length and error budget come from
    L{ServerLineProtocol}.
    """

    role = "peer"
    log = Logger()

    def __init__(
        self,
        share: ShareFolder,
        clock: IReactorTime,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_SECONDS,
        on_lost: Callable[[], None] | None = None,
        idle_timeouts: IdleTimeouts | None = None,
    ) -> None:
        super().__init__(clock, idle_timeout, on_lost, idle_timeouts)
        self.share = share
        self._opened: OpenedFile | None = None
        self._header_sent = False
        self._lost = False

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        self._close_file()
        super().connectionLost(reason)

    def request_received(self, line: bytes) -> None:
        request = wire.parse_peer_request(line)
        if isinstance(request, wire.Get):
            self._serve(request)
        else:
            self._send_listing()

    def _send_listing(self) -> None:
        entries = self.share.list()
        lines = [wire.format_count(len(entries))]
        lines.extend(entry.to_line() for entry in entries)
        self.send_lines(lines)

    def _serve(self, request: wire.Get) -> None:
        opened = self.share.open(request.name)
        if request.offset > opened.size:
            opened.close()
            raise WireError(
                Code.BAD_OFFSET, f"offset beyond the end ({opened.size} bytes)"
            )
        self._opened = opened
        # Read no further requests until this file is out.
        self.pauseProducing()
        d = self.share.digest(opened)
        d.addCallback(self._send_file, opened, request.offset)
        d.addCallbacks(self._sent, self._send_failed, (opened,), None, (opened,))

    def _send_file(
        self, digest: str, opened: OpenedFile, offset: int
    ) -> Deferred[None]:
        if self._lost:
            raise ConnectionLost("client left before the transfer started")
        header = wire.FileHeader(opened.size - offset, digest, offset, opened.size)
        self.sendLine(header.to_line())
        self._header_sent = True
        self.log.info(
            "sending {name} ({count} bytes from byte {offset})",
            name=opened.name,
            count=header.count,
            offset=offset,
        )
        # The file producer takes the transport over (reading stays paused).
        self.release_transport()
        producer = FileRangeProducer(
            opened.fd,
            offset,
            header.count,
            self.transport,
            self.resetTimeout,
            socket_fd=zero_copy_socket(self.transport),
        )
        return producer.start()

    def _sent(self, _: None, opened: OpenedFile) -> None:
        self.log.info("sent {name} ({size} bytes)", name=opened.name, size=opened.size)
        self._close_file()
        self._read_next()

    def _send_failed(self, failure: Failure, opened: OpenedFile) -> None:
        # Read this before _close_file resets it: after the header, an error
        # line would land where the client expects file bytes.
        header_sent = self._header_sent
        self._close_file()
        if failure.check(ConnectionLost):
            self.log.info("client left during {name}", name=opened.name)
        elif failure.check(FileShrank):
            self.log.warn("{name} shrank while being sent", name=opened.name)
        elif not header_sent and failure.check(OSError):
            self.log.error(
                "cannot read {name}: {error}", name=opened.name, error=failure.value
            )
            self.send_error(Code.INTERNAL, "cannot read the file")
            self._read_next()
            return
        else:
            self.log.failure("sending {name} failed", failure, name=opened.name)
        # The byte stream can no longer match its header: end the connection.
        if not self._lost:
            self.transport.abortConnection()

    def _read_next(self) -> None:
        """Read requests again after a file, unless the connection is closing
        (the error budget may just have run out).  A half-closed connection
        closes here once nothing is left to answer (see resumeProducing)."""
        if not self._lost and not self.transport.disconnecting:
            self.resumeProducing()

    def _close_file(self) -> None:
        self._header_sent = False
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def timeoutConnection(self) -> None:
        if self._opened is None:
            super().timeoutConnection()
        else:
            # Mid-transfer an error line would corrupt the byte stream.
            self.transport.abortConnection()


class PeerFactory(LimitedServerFactory):
    """
    Builds a L{PeerProtocol} per client, all serving one share folder.

    :param limits: open-connection limits; past them a connection gets a
        L{RefusingProtocol} (``ERR 503``).  Default: 1000 in total, 64 per
        source address.
    """

    role = "peer"

    def __init__(
        self,
        share: ShareFolder,
        clock: IReactorTime,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_SECONDS,
        limits: ConnectionLimits | None = None,
    ) -> None:
        super().__init__(clock, idle_timeout, limits)
        self.share = share

    def build(self, host: str, on_lost: Callable[[], None]) -> PeerProtocol:
        return PeerProtocol(
            self.share, self.clock, self.idle_timeout, on_lost, self.idle_timeouts
        )
