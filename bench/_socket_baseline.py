"""Baseline (a) for the transfer benchmark: the limit of a Python transfer.

``send FILE`` listens on 127.0.0.1, prints its port, and serves the file to
each connection with ``socket.sendfile`` (zero copy).  ``recv PORT SIZE``
receives SIZE bytes with ``recv_into`` into one reused buffer, hashing with
``hashlib.sha256`` as they arrive, and prints the seconds from connect to
the final digest.  Nothing is written to disk.
"""

from __future__ import annotations

import hashlib
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


def receive(port: int, size: int) -> None:
    started = time.perf_counter()
    connection = socket.create_connection(("127.0.0.1", port))
    buffer = bytearray(1024 * 1024)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    left = size
    while left:
        count = connection.recv_into(view, min(left, len(buffer)))
        if not count:
            raise SystemExit("connection closed early")
        digest.update(view[:count])
        left -= count
    connection.close()
    print(f"{time.perf_counter() - started:.6f} {digest.hexdigest()}")


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2])
    else:
        receive(int(sys.argv[2]), int(sys.argv[3]))
