"""Turn the addresses users type, and the peers the relay lists, into endpoints."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.interfaces import (
    IReactorTCP,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)

from p2p import wire

DEFAULT_RELAY = "tcp:127.0.0.1:8000"
RELAY_ENVIRONMENT_VARIABLE = "P2P_RELAY"

_HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})"
)
# ASCII digits only: \d would also accept other scripts' digits.
_PORT = re.compile(r"[0-9]{1,5}")
MAX_PORT = 65535

# Twisted listens with a backlog of 50: 200 clients connecting at once
# overflowed it, and each dropped SYN cost its client a one-second
# retransmit (benchmark 7's p99).  Like nginx and Redis, ask for 511 (the
# kernel caps it at net.core.somaxconn) unless the description says.
DEFAULT_BACKLOG = 511
_BACKLOG_KINDS = frozenset({"tcp", "tcp6", "ssl"})


def _checked_port(text: str, low: int) -> str:
    if not low <= int(text) <= MAX_PORT:
        raise ValueError(f"port {text} is out of range ({low}-{MAX_PORT})")
    return text


def escape(text: str) -> str:
    """Escape C{text} for use as one field of an endpoint description."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def client_description(text: str) -> str:
    """
    Normalise a user-typed relay address to an endpoint description.

    Accepts an endpoint string (``tcp:host:port``, ``tls:...``, ``unix:...``),
    ``HOST:PORT``, ``[IPV6]:PORT`` or a bare port (on 127.0.0.1).

    :raise ValueError: for a port number outside 1-65535.
    """
    text = text.strip()
    if _PORT.fullmatch(text):
        return f"tcp:host=127.0.0.1:port={_checked_port(text, 1)}"
    match = _HOST_PORT.fullmatch(text)
    if match:
        host = match.group("v6") or match.group("host")
        port = _checked_port(match.group("port"), 1)
        return f"tcp:host={escape(host)}:port={port}"
    return text


def _fields(text: str, separator: str) -> list[str]:
    """C{text} split at each C{separator} that no backslash escapes, the
    escapes kept (endpoint descriptions escape with backslashes)."""
    fields, start, index = [], 0, 0
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == separator:
            fields.append(text[start:index])
            start = index + 1
        index += 1
    fields.append(text[start:])
    return fields


def _unescaped(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def relay_identity(text: str) -> str:
    """
    One spelling of a relay address, for keys such as its cached peer list:
    ``127.0.0.1:8000``, ``tcp:127.0.0.1:8000`` and
    ``tcp:host=127.0.0.1:port=8000`` name the same relay.  Plain TCP only;
    any other description (TLS, UNIX sockets) is its own identity.
    """
    description = client_description(text)
    kind, _, rest = description.partition(":")
    if kind.lower() != "tcp":
        return description
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for field in _fields(rest, ":"):
        name, *value = _fields(field, "=")
        if value:
            keywords[_unescaped(name)] = _unescaped(field[len(name) + 1 :])
        else:
            positional.append(_unescaped(field))
    host = keywords.get("host", positional[0] if positional else None)
    port = keywords.get("port", positional[1] if len(positional) > 1 else None)
    if host is None or port is None or not _PORT.fullmatch(port):
        return description
    return f"tcp:host={escape(host.lower())}:port={int(port)}"


def server_description(text: str) -> str:
    """
    A bare port number means ``tcp:PORT``, as the seed's relay takes it.

    :raise ValueError: for a port number outside 0-65535.
    """
    text = text.strip()
    if _PORT.fullmatch(text):
        return f"tcp:{_checked_port(text, 0)}"
    return text


def with_default_backlog(description: str) -> str:
    """C{description}, with ``backlog=`` L{DEFAULT_BACKLOG} for a TCP or SSL
    listener that does not name one."""
    kind = description.split(":", 1)[0].lower()
    if kind in _BACKLOG_KINDS and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def relays_from_environment(explicit: Sequence[str] = ()) -> list[str]:
    """
    The relays to use, in order: the repeated ``--relay`` options, else
    $P2P_RELAY read as a comma-separated list, else the default.  Each is
    named once (a repeat would only be asked twice).
    """
    if explicit:
        texts = [text.strip() for text in explicit]
    else:
        variable = os.environ.get(RELAY_ENVIRONMENT_VARIABLE, "")
        texts = [text.strip() for text in variable.split(",")]
    return list(dict.fromkeys(text for text in texts if text)) or [DEFAULT_RELAY]


def relay_option(help: str) -> Callable[[Any, str], None]:
    """
    An ``opt_relay`` method for a L{twisted.python.usage.Options}: each
    ``--relay`` adds to the list in C{options["relay"]} (read it with
    L{relays_from_environment}).  C{help} is the option's help: one line,
    as Twisted prints a docstring's indentation too.
    """

    def opt_relay(options: Any, relay: str) -> None:
        options.setdefault("relay", []).append(relay)

    opt_relay.__doc__ = help
    return opt_relay


def client_endpoint(reactor, text: str) -> IStreamClientEndpoint:
    """
    :raise ValueError: with a readable message for an unusable description.
    """
    # Endpoint parsers fail in many ways: ValueError, TypeError or KeyError
    # for bad arguments, NameError for tls: without pyOpenSSL.
    try:
        description = client_description(text)
        endpoint = clientFromString(reactor, description)
    except Exception as e:
        raise ValueError(f"bad endpoint {text!r}: {_readable(e)}") from None
    if description.split(":", 1)[0].lower() == "tls":
        # Imported only here: TLS brings in pyOpenSSL and cryptography.
        from p2p.tls import checked_tls_endpoint

        endpoint = checked_tls_endpoint(description, endpoint)
    return endpoint


def peer_endpoint(
    reactor: IReactorTCP, peer: wire.PeerEntry, timeout: float
) -> IStreamClientEndpoint:
    """A plain TCP endpoint for a peer from the relay's list."""
    if ":" in peer.host:
        return TCP6ClientEndpoint(reactor, peer.host, peer.port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, peer.host, peer.port, timeout=timeout)


#: Builds the client endpoint for a peer (plain TCP, or TLS: L{p2p.tls}).
EndpointFor = Callable[[wire.PeerEntry], IStreamClientEndpoint]


# "TCP4ClientEndpoint.__init__() missing 1 required positional argument:
# 'port'": a parameter the description left out.
_MISSING = re.compile(r"missing \d+ required positional arguments?: (.*)")


def _readable(error: Exception) -> str:
    """An endpoint parser's error, in the words of the description."""
    found = _MISSING.search(str(error))
    if str(error).startswith("Unknown endpoint type"):
        # "127.0.0.1" parsed as an endpoint type: what was meant, likely, is
        # one of the forms below.
        return (
            "expected HOST:PORT, [IPV6]:PORT, a port, or an endpoint string "
            "(tcp:HOST:PORT, tls:HOST:PORT, unix:PATH)"
        )
    if isinstance(error, TypeError) and found:
        names = re.findall(r"'(\w+)'", found.group(1))
        return "no " + " and no ".join(f"{name}=" for name in names) + " given"
    return str(error)


def server_endpoint(reactor, text: str) -> IStreamServerEndpoint:
    """
    :raise ValueError: with a readable message for an unusable description.
    """
    try:
        return serverFromString(reactor, with_default_backlog(server_description(text)))
    except Exception as e:
        raise ValueError(f"bad listening endpoint {text!r}: {_readable(e)}") from None


# Options must reject a bad endpoint while parsing: twistd and twist print a
# traceback for a UsageError raised later, from makeService.  Parsing needs no
# reactor (the endpoint constructors only store it), and importing the global
# one during option parsing would pre-empt twistd's --reactor choice.
_NO_REACTOR = None


def check_client(text: str) -> None:
    """:raise ValueError: unless C{text} is a usable client description."""
    client_endpoint(_NO_REACTOR, text)


def check_server(text: str) -> None:
    """:raise ValueError: unless C{text} is a usable server description."""
    server_endpoint(_NO_REACTOR, text)
