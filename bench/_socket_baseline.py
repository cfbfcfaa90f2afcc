"""Baselines for the transfer benchmark: the limit of a Python transfer.

``send FILE`` listens on 127.0.0.1, prints its port, and serves the file to
each connection with ``socket.sendfile`` (zero copy); ``send FILE
--unsent BYTES`` sets ``TCP_NOTSENT_LOWAT`` on each connection first, as
the peer does (baseline (a*)).  ``recv PORT SIZE
[OUT]`` receives SIZE bytes with ``recv_into`` into one reused buffer and
nothing else (baseline (a): no hashing, no disk), or also writes them to
OUT (baseline (b)); it prints the seconds from connect to the last byte.
``recv-hash PORT SIZE`` receives 1 MiB pieces with ``recv_into`` into one
buffer and hashes each with BLAKE3 as soon as it is whole, on the same
thread, as the client's pieces are checked, writing nothing (baseline (d):
the least a verifying Python receiver does, without any protocol); with
OUT, it also writes each piece to that file once hashed (baseline (e'),
with the mark below: the least ``p2p get -o`` does).  ``write OUT SIZE``
writes SIZE bytes of one reused 1 MiB buffer into OUT, a new file, with no
network and no hashing (baseline (f): what the file system takes, as
``dd if=/dev/zero bs=1M`` measures it); it prints its seconds.

``--mark BYTES`` after either receiver's arguments sets the socket's
receive low-water mark (``SO_RCVLOWAT``), as the client does while a
content comes in fast (p2p.batching): each ``recv_into`` then waits for
that many bytes (or the rest of its buffer) instead of returning with
whatever arrived, so the receiver wakes a fraction as often.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def send(path: str, unsent: int = 0) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    print(server.getsockname()[1], flush=True)
    while True:
        connection, _ = server.accept()
        if unsent:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, unsent)
        with connection, open(path, "rb") as stream:
            connection.sendfile(stream)


def connect(port: int, mark: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port))
    if mark > 1:
        # A blocking recv waits for min(mark, its buffer's room): the last
        # bytes never wait for a mark they cannot reach.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
    return connection


def output(out: str | None) -> int | None:
    """The file a receiver writes to, made empty (None: no file)."""
    return os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if out else None


def receive(port: int, size: int, out: str | None = None, mark: int = 1) -> None:
    started = time.perf_counter()
    connection = connect(port, mark)
    buffer = bytearray(1024 * 1024)
    view = memoryview(buffer)
    fd = output(out)
    left = size
    while left:
        count = connection.recv_into(view, min(left, len(buffer)))
        if not count:
            raise SystemExit("connection closed early")
        if fd is not None:
            os.write(fd, view[:count])
        left -= count
    connection.close()
    if fd is not None:
        os.close(fd)
    print(f"{time.perf_counter() - started:.6f}")


def receive_and_hash(
    port: int, size: int, out: str | None = None, mark: int = 1
) -> None:
    from blake3 import blake3

    piece = 1024 * 1024
    buffer = bytearray(piece)
    started = time.perf_counter()
    connection = connect(port, mark)
    fd = output(out)
    left = size
    while left:
        view = memoryview(buffer)[: min(left, piece)]
        got = 0
        while got < len(view):
            count = connection.recv_into(view[got:])
            if not count:
                raise SystemExit("connection closed early")
            got += count
        blake3(view).digest()
        if fd is not None:
            os.write(fd, view)
        left -= got
    connection.close()
    if fd is not None:
        os.close(fd)
    print(f"{time.perf_counter() - started:.6f}")


def write(out: str, size: int) -> None:
    buffer = bytes(1024 * 1024)
    started = time.perf_counter()
    fd = output(out)
    assert fd is not None
    left = size
    while left:
        left -= os.write(fd, memoryview(buffer)[: min(left, len(buffer))])
    os.close(fd)
    print(f"{time.perf_counter() - started:.6f}")


def take_option(arguments: list[str], name: str, default: int) -> int:
    """The integer after C{name} in C{arguments} (both removed), or
    C{default}."""
    if name not in arguments:
        return default
    at = arguments.index(name)
    value = int(arguments[at + 1])
    del arguments[at : at + 2]
    return value


if __name__ == "__main__":
    arguments = sys.argv[1:]
    mark = take_option(arguments, "--mark", 1)
    unsent = take_option(arguments, "--unsent", 0)
    if arguments[0] == "send":
        send(arguments[1], unsent)
    elif arguments[0] == "write":
        write(arguments[1], int(arguments[2]))
    elif arguments[0] == "recv-hash":
        receive_and_hash(
            int(arguments[1]), int(arguments[2]), *arguments[3:4], mark=mark
        )
    else:
        receive(int(arguments[1]), int(arguments[2]), *arguments[3:4], mark=mark)
