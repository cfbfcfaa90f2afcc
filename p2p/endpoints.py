"""Turn the addresses users type into Twisted endpoints."""

from __future__ import annotations

import os
import re

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint

DEFAULT_RELAY = "tcp:127.0.0.1:8000"
RELAY_ENVIRONMENT_VARIABLE = "P2P_RELAY"

_HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})"
)
_PORT = re.compile(r"\d{1,5}")


def escape(text: str) -> str:
    """Escape C{text} for use as one field of an endpoint description."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def client_description(text: str) -> str:
    """
    Normalise a user-typed relay address to an endpoint description.

    Accepts an endpoint string (``tcp:host:port``, ``tls:...``, ``unix:...``),
    ``HOST:PORT``, ``[IPV6]:PORT`` or a bare port (on 127.0.0.1).
    """
    text = text.strip()
    if _PORT.fullmatch(text):
        return f"tcp:host=127.0.0.1:port={text}"
    match = _HOST_PORT.fullmatch(text)
    if match:
        host = match.group("v6") or match.group("host")
        return f"tcp:host={escape(host)}:port={match.group('port')}"
    return text


def server_description(text: str) -> str:
    """A bare port number means ``tcp:PORT``, as the seed's relay takes it."""
    text = text.strip()
    if _PORT.fullmatch(text):
        return f"tcp:{text}"
    return text


def relay_from_environment(explicit: str | None = None) -> str:
    """The relay description: explicit option, then $P2P_RELAY, then default."""
    return explicit or os.environ.get(RELAY_ENVIRONMENT_VARIABLE) or DEFAULT_RELAY


def client_endpoint(reactor, text: str) -> IStreamClientEndpoint:
    """
    :raise ValueError: with a readable message for an unusable description.
    """
    description = client_description(text)
    try:
        return clientFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"bad endpoint {text!r}: {e}") from None


def server_endpoint(reactor, text: str) -> IStreamServerEndpoint:
    description = server_description(text)
    try:
        return serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"bad listening endpoint {text!r}: {e}") from None
