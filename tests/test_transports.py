"""
Tests for L{p2p.transports}: the plain-TCP shortcuts and their fallbacks.

A real L{tcp.Connection} over a socket pair (on a MemoryReactor, so nothing
runs by itself) shows what Twisted's own transport does: a write is queued
until C{doWrite}, which the test calls by hand.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2p.transports import plain_socket, unsent_output, write_now


class Queued(StringTransport):
    """A StringTransport that records its writes (the fallback path)."""


def connection_pair(test: SynchronousTestCase) -> tuple[tcp.Connection, socket.socket]:
    """A connected tcp.Connection and the socket at its other end."""
    ours, theirs = socket.socketpair()
    test.addCleanup(ours.close)
    test.addCleanup(theirs.close)
    theirs.setblocking(False)
    connection = tcp.Connection(ours, None, MemoryReactor())
    connection.connected = True  # as makeConnection would have it
    return connection, theirs


def drain(sock: socket.socket) -> bytes:
    """Everything readable from C{sock} now."""
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


class UnsentOutputTests(SynchronousTestCase):
    def test_real_socket_transport(self) -> None:
        """
        The attributes unsent_output reads are those of Twisted's own
        FileDescriptor (should they go, the servers fall back to the slower
        safe paths, and this test says so).
        """
        descriptor = FileDescriptor(MemoryReactor())
        descriptor.connected = True
        self.assertFalse(unsent_output(descriptor))
        descriptor.write(b"OK 0\n")
        self.assertTrue(unsent_output(descriptor))

    def test_unknown_transports(self) -> None:
        """Transports that cannot tell may always hold unsent bytes."""
        self.assertTrue(unsent_output(object()))
        self.assertTrue(unsent_output(StringTransport()))


class WriteNowTests(SynchronousTestCase):
    def test_sent_at_once(self) -> None:
        """Nothing queued: the bytes go straight to the socket."""
        connection, other_end = connection_pair(self)
        write_now(connection, b"P2P/1 relay\n")
        self.assertFalse(unsent_output(connection))
        self.assertEqual(drain(other_end), b"P2P/1 relay\n")

    def test_full_socket_queues_the_rest_in_order(self) -> None:
        """
        What the socket does not take is queued in the transport, and a
        later write_now queues behind it: the peer receives every byte in
        order.
        """
        connection, other_end = connection_pair(self)
        big = bytes(range(256)) * 40_000  # more than a socket buffer holds
        write_now(connection, big)
        self.assertTrue(unsent_output(connection))
        write_now(connection, b"after\n")
        received = bytearray()
        while unsent_output(connection):
            received += drain(other_end)
            connection.doWrite()
        received += drain(other_end)
        self.assertEqual(bytes(received), big + b"after\n")

    def test_queued_behind_earlier_writes(self) -> None:
        """Bytes already queued by transport.write go first."""
        connection, other_end = connection_pair(self)
        connection.write(b"first\n")
        write_now(connection, b"second\n")
        self.assertEqual(drain(other_end), b"")
        connection.doWrite()
        self.assertEqual(drain(other_end), b"first\nsecond\n")

    def test_broken_connection_left_to_the_transport(self) -> None:
        """A send that fails (peer gone) queues the bytes; no exception."""
        connection, other_end = connection_pair(self)
        other_end.close()
        write_now(connection, b"OK 0\n")
        self.assertTrue(unsent_output(connection))

    def test_other_transports_use_write(self) -> None:
        """A test transport (or TLS) gets an ordinary write."""
        transport = StringTransport()
        write_now(transport, b"OK 0\n")
        self.assertEqual(transport.value(), b"OK 0\n")

    def test_closing_connection_uses_write(self) -> None:
        """No shortcut once a close was asked for, or before connecting."""
        connection, _ = connection_pair(self)
        self.assertIsNotNone(plain_socket(connection))
        connection.disconnecting = True
        self.assertIsNone(plain_socket(connection))
        connection.disconnecting = False
        connection.connected = False
        self.assertIsNone(plain_socket(connection))
