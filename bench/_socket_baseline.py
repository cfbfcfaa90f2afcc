"""Baselines for the transfer benchmark: the limit of a Python transfer.

``send FILE`` listens on 127.0.0.1, prints its port, and serves the file to
each connection with ``socket.sendfile`` (zero copy).  ``recv PORT SIZE
[OUT]`` receives SIZE bytes with ``recv_into`` into one reused buffer and
nothing else (baseline (a): no hashing, no disk), or also writes them to
OUT (baseline (b)); it prints the seconds from connect to the last byte.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def send(path: str) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    print(server.getsockname()[1], flush=True)
    while True:
        connection, _ = server.accept()
        with connection, open(path, "rb") as stream:
            connection.sendfile(stream)


def receive(port: int, size: int, out: str | None = None) -> None:
    started = time.perf_counter()
    connection = socket.create_connection(("127.0.0.1", port))
    buffer = bytearray(1024 * 1024)
    view = memoryview(buffer)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if out else None
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


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2])
    else:
        receive(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
