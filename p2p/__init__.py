"""Relay-based peer-to-peer file sharing on Twisted."""

__version__ = "0.1.0"
