"""What the servers may ask of a Twisted transport beyond ``ITransport``.

Two shortcuts for plain TCP connections, each falling back to the ordinary
transport API for anything else (TLS, which must encrypt every byte; test
transports; a future Twisted whose internals moved):

* L{write_now} sends at once when nothing is queued, as asyncio's
  transports do, instead of queueing the bytes until the reactor's next
  round (``transport.write`` always queues).  A one-request connection to
  the relay writes twice; queueing cost each write a turn of the reactor
  and two ``epoll_ctl`` calls, about a fifth of the relay's time per
  request.
* L{zero_copy_socket} names the socket a peer may ``sendfile`` into.

L{unsent_output} says whether a transport still holds bytes: the servers
ask it when the client's end of input arrives (see
L{p2p.limits.ServerLineProtocol.__conform__}).

L{read_in_large_chunks} makes a plain TCP transport read up to 1 MiB per
``recv`` instead of Twisted's 64 KiB: a client receiving a large file then
runs its Python receive path a sixteenth as often (bench/transfer.py's
CPU-per-GiB table shows what the receiving side costs).

L{set_receive_low_water} sets how many bytes a plain TCP socket must hold
before the reactor is told it is readable (``SO_RCVLOWAT``): see
L{p2p.batching} for when a client asks for more than one.

L{read_into_buffers} lets a protocol that offers buffers
(L{BufferedReceiver}) have a plain TCP transport ``recv_into`` them, so a
client assembles a large file's pieces in a few reused buffers instead of
a fresh bytes object per read: no allocation, no page faults, no heap
fragmentation while gigabytes pass (see L{p2p.sink.PieceSink.lend}).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from errno import EWOULDBLOCK
from typing import Protocol as TypingProtocol

from twisted.internet import main, tcp
from twisted.internet.interfaces import ISSLTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol


def is_plain_tcp(transport: object) -> bool:
    """Whether C{transport} is Twisted's own TCP transport, without TLS."""
    return isinstance(transport, tcp.Connection) and not ISSLTransport.providedBy(
        transport
    )


def plain_socket(transport: object) -> socket.socket | None:
    """
    The socket of a connected plain TCP transport that is not closing;
    C{None} for anything else.
    """
    if (
        is_plain_tcp(transport)
        and transport.connected  # type: ignore[attr-defined]
        and not transport.disconnecting  # type: ignore[attr-defined]
    ):
        return transport.socket  # type: ignore[attr-defined]
    return None


def zero_copy_socket(transport: object) -> int | None:
    """
    The socket to ``sendfile`` into, for a plain TCP connection; C{None}
    for anything else (TLS must encrypt every byte; test transports).
    """
    if not is_plain_tcp(transport):
        return None
    return transport.fileno()  # type: ignore[attr-defined]


def unsent_bytes(transport: object) -> int | None:
    """
    How many bytes C{transport} holds unsent; C{None} if it cannot say.

    Twisted's socket transports (L{twisted.internet.abstract.FileDescriptor})
    keep unsent bytes in C{dataBuffer} past C{offset}, and in a list buffer
    of C{_tempDataLen} bytes.  Any other transport (TLS, a test's
    StringTransport), or a future Twisted without those attributes: C{None}.
    """
    try:
        return (
            len(transport.dataBuffer)  # type: ignore[attr-defined]
            - transport.offset  # type: ignore[attr-defined]
            + transport._tempDataLen  # type: ignore[attr-defined]
        )
    except (AttributeError, TypeError):
        return None


def unsent_output(transport: object) -> bool:
    """Whether C{transport} may still hold bytes it has not sent (C{True}
    when it cannot say, which is always safe)."""
    return unsent_bytes(transport) != 0


def write_now(
    transport: object, data: bytes, before_queue: Callable[[], object] | None = None
) -> bool:
    """
    C{transport.write(data)}, sending what the socket takes at once when
    C{transport} is a plain TCP connection with nothing queued.

    What the socket does not take (it is full, or the connection broke) is
    handed to C{transport.write}, behind nothing, so the order of bytes
    never changes; a broken connection is then noticed and closed by the
    transport, as it would have been anyway.

    :param before_queue: called just before bytes are handed to
        C{transport.write}: a producer registered there is one the
        transport pauses if those bytes fill its buffer (Twisted checks at
        C{write}, never at C{registerProducer}).
    :return: whether every byte went out at once (C{False}: some wait in
        the transport, or it cannot tell).
    """
    sock = plain_socket(transport)
    if sock is not None and not unsent_output(transport):
        try:
            sent = sock.send(data)
        except OSError:
            # EAGAIN, EINTR, or a reset: the transport sorts it out.
            sent = 0
        if sent == len(data):
            return True
        data = data[sent:]
    if before_queue is not None:
        before_queue()
    transport.write(data)  # type: ignore[attr-defined]
    return False


# What a receiving client reads per recv(): big enough that Python's cost
# per read is small next to the kernel's copy, small enough to stay in
# cache.
LARGE_READ_BYTES = 1024 * 1024


def read_in_large_chunks(transport: object, size: int = LARGE_READ_BYTES) -> bool:
    """
    Make a plain TCP C{transport} read up to C{size} bytes per ``recv``
    (Twisted's socket transports read C{bufferSize} bytes, 64 KiB by
    default, per call of C{doRead}).  Any other transport is left alone.

    :return: whether the read size was changed.
    """
    if not is_plain_tcp(transport):
        return False
    transport.bufferSize = size  # type: ignore[attr-defined]
    return True


def tcp_transport(transport: object) -> object | None:
    """
    The TCP connection under C{transport}: itself when it is Twisted's plain
    TCP transport, the one a TLS layer runs on (a L{TLSMemoryBIOProtocol} is
    that connection's protocol, its C{transport} the connection), else
    C{None}.
    """
    if isinstance(transport, tcp.Connection):
        return transport
    below = getattr(transport, "transport", None)
    if ISSLTransport.providedBy(transport) and isinstance(below, tcp.Connection):
        return below
    return None


def cap_send_buffer(transport: object, size: int) -> bool:
    """
    Cap the kernel's send buffer of C{transport}'s TCP socket (TLS
    included) at C{size} bytes (Linux doubles it for its bookkeeping).  A
    server whose answers are small gives up nothing, and a client that
    stops reading can no longer make the kernel hold megabytes for it:
    Linux grows a send buffer up to ``tcp_wmem``'s maximum (4 MiB here), so
    128 stalled readers held 250-340 MiB outside any limit of the server.

    :return: whether a socket was found and capped.
    """
    return _set_socket_option(transport, socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _set_socket_option(transport: object, level: int, option: int, value: int) -> bool:
    """Set an option of C{transport}'s TCP socket (TLS included); whether
    there was one to set it on."""
    connection = tcp_transport(transport)
    if connection is None:
        return False
    try:
        connection.getHandle().setsockopt(level, option, value)
    except OSError:
        return False  # already closed
    return True


def limit_unsent(transport: object, size: int) -> bool:
    """
    Have the TCP connection under a TLS C{transport} pause its producer once
    it holds more than C{size} unsent bytes, instead of Twisted's 64 KiB
    (``bufferSize``, which is also what each ``recv`` asks for: a server
    reads short requests).  Every byte a TLS layer is given is encrypted
    into that buffer at once, and waits there while the client does not
    read (see L{p2p.pulls}).  Plain TCP and other transports are left
    alone.

    :return: whether the threshold was set.
    """
    if not ISSLTransport.providedBy(transport):
        return False
    connection = tcp_transport(transport)
    if connection is None:
        return False
    connection.bufferSize = size  # type: ignore[attr-defined]
    return True


def limit_unsent_in_kernel(transport: object, size: int) -> bool:
    """
    Have the kernel take no more bytes for C{transport}'s TCP socket (TLS
    included) while more than C{size} of them wait unsent
    (``TCP_NOTSENT_LOWAT``): the socket is not writable until the client's
    window lets them go.  Bytes in flight are not counted, so a client that
    reads keeps its full speed; one that stops reading no longer makes the
    kernel queue what Linux's autotuned send buffer allows (on loopback,
    about 550 KB of bytes a connection: 3,000 such clients of a peer took
    2.2 GB of the kernel's TCP memory, past the machine's ``tcp_mem``
    limit, which every TCP socket then pays).
    Anything that is not TCP, or a system without the option, is left
    alone.

    :return: whether the option was set.
    """
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if option is None:
        return False
    return _set_socket_option(transport, socket.IPPROTO_TCP, option, size)


def unbuffered_write(transport: object) -> Callable[[bytes], object]:
    """
    A function writing to C{transport} at once, for a producer that sizes
    its own writes.

    Twisted's TLS transport (L{BufferingTLSTransport}) gathers writes of
    under 64,000 bytes until the reactor's next turn, to make fewer TLS
    records of many small writes.  A producer handing over one record per
    pull then fills 64 KB before the connection sees any of it and can
    pause it: that much of the peer's memory for every client that reads
    nothing (see L{p2p.pulls}).  Here what the transport has gathered goes
    first, so bytes keep their order, then the bytes go straight to the TLS
    layer.  Any other transport, or a Twisted without the gathering this
    knows (tests/test_transports.py checks it), gets C{transport.write}.
    """
    write = transport.write  # type: ignore[attr-defined]
    aggregator = getattr(transport, "_aggregator", None)
    flush = getattr(aggregator, "flush", None)
    if not isinstance(transport, BufferingTLSTransport) or flush is None:
        return write
    write_record = TLSMemoryBIOProtocol.write

    def write_now(data: bytes) -> None:
        flush()
        write_record(transport, data)

    return write_now


def no_delay(transport: object) -> None:
    """
    Turn Nagle's algorithm off on C{transport} when it is TCP (TLS
    included): small answers written in several pieces must not wait for
    the other side's delayed ACK.  Other transports are left alone.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None:
        return
    try:
        set_no_delay(True)
    except OSError:
        pass  # the connection is already gone


def set_receive_low_water(transport: object, size: int) -> bool:
    """
    Have the reactor wake for C{transport}'s socket only once it holds
    C{size} bytes (or the connection ended, or the kernel's receive memory
    runs short: Linux wakes the reader then whatever the mark), by setting
    ``SO_RCVLOWAT``; 1 is the default, every byte.  Plain TCP only (a TLS
    layer reads records, not the bytes its protocol counts); a wrapper
    that lends a plain connection (L{p2p.pool}) may offer a method of the
    same name.

    :return: whether the mark was set.
    """
    sock = plain_socket(transport)
    if sock is None:
        lent = getattr(type(transport), "set_receive_low_water", None)
        return bool(lent(transport, size)) if lent is not None else False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
    except OSError:
        return False  # closed meanwhile, or a system without it
    return True


class BufferedReceiver(TypingProtocol):
    """
    A protocol that may offer the transport a buffer to receive into.

    While C{receive_buffer} returns a writable memoryview, a transport set
    up by L{read_into_buffers} receives into it and calls
    C{received_into} with the count instead of C{dataReceived}; while it
    returns C{None}, bytes come to C{dataReceived} as usual.
    """

    def receive_buffer(self) -> memoryview | None: ...

    def received_into(self, count: int) -> None: ...


def read_into_buffers(transport: object, receiver: BufferedReceiver) -> bool:
    """
    Make a plain TCP C{transport} ``recv_into`` the buffers C{receiver}
    offers, whenever it offers one; other transports (TLS, test
    transports) are left alone.  C{receiver} is the protocol the
    connection's bytes reach, maybe through a wrapper (an endpoint's
    connection runs Twisted's wrapping protocol, which only passes them
    on).

    This replaces the connection's C{doRead} with the same steps Twisted's
    L{tcp.Connection.doRead} takes (errors, end of input), on the socket
    Twisted exposes as C{socket}: tests/test_transports.py checks both
    against the installed Twisted.

    :return: whether the transport was set up.
    """
    if not is_plain_tcp(transport):
        return False
    connection: tcp.Connection = transport  # type: ignore[assignment]
    read_bytes = connection.doRead

    def doRead() -> object:
        view = receiver.receive_buffer()
        if view is None:
            return read_bytes()
        try:
            count = connection.socket.recv_into(view)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not count:
            return main.CONNECTION_DONE
        receiver.received_into(count)
        return None

    connection.doRead = doRead  # type: ignore[method-assign]
    return True
