"""The wire format (relay P2P/1, peer P2P/2): parse and format lines, nothing else.

No I/O and no reactor here, so every rule of ``docs/protocol.rst`` can be
tested as a pure function.  Lines are UTF-8 text ended by ``\\n`` (a trailing
``\\r`` is ignored, so ``nc -C`` and telnet work too).  Every server greets
with a banner ``P2P/<version> <role>``; every failure is ``ERR <code> <message>``.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import re
from dataclasses import dataclass, field
from enum import IntEnum

from p2p import hints

PROTOCOL = "P2P/1"
# Peers speak the second version: pieces, ranges and content roots.  The
# relay's protocol did not change, so it still greets with P2P/1.
PEER_PROTOCOL = "P2P/2"
PROTOCOLS = {"relay": PROTOCOL, "peer": PEER_PROTOCOL}
DELIMITER = b"\n"

# Requests are short; 1 KiB is far more than the longest legal request (a
# GET with a 255-byte name and a few path components) yet small enough that a
# hostile client cannot make us buffer much before we refuse it.
MAX_LINE_LENGTH = 1024

# What a LineReceiver must buffer to hold the longest legal line: LineReceiver
# counts a CR before the LF as part of the line, so a 1024-byte request sent
# with CRLF (nc -C, telnet) is 1025 bytes to it.  decode_line then enforces
# MAX_LINE_LENGTH on the line without its CR.
MAX_RECEIVE_LENGTH = MAX_LINE_LENGTH + 1

# The environment variable holding the relay's shared secret (``token=``),
# read by the daemons when no ``--token`` is given.  An environment variable
# is not visible to other local users the way a command line is (``ps``).
TOKEN_ENVIRONMENT_VARIABLE = "P2P_TOKEN"

# A share-relative file name: generous, but bounded so that a listing line and
# a GET line always fit in MAX_LINE_LENGTH.
MAX_NAME_LENGTH = 900

_DISPLAY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{1,256}")
_PEER_ID = re.compile(r"[0-9a-f]{16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]{1,20}")
_CURSOR = re.compile(r"[0-9a-f]{1,16}")
# C0 except tab, DEL and C1: all of Unicode's control characters.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")

# PEERS paging (``limit=`` and ``cursor=``, see protocol.rst): a page holds
# 1..MAX_PEERS_PER_PAGE entries, MAX_PEERS_PER_PAGE when limit= is absent.
MAX_PEERS_PER_PAGE = 1000


class Code(IntEnum):
    """Error codes carried by ``ERR`` replies (documented in protocol.rst)."""

    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    TIMEOUT = 408
    LINE_TOO_LONG = 413
    BAD_OFFSET = 416
    TOO_MANY = 429
    INTERNAL = 500
    UNKNOWN_COMMAND = 501
    UNAVAILABLE = 503
    VERSION = 505


class WireError(Exception):
    """A request or reply that breaks the protocol; becomes an ``ERR`` line."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{int(code)} {message}")
        self.code = code
        self.message = message

    def to_line(self) -> bytes:
        return format_error(self.code, self.message)


# -- generic helpers ---------------------------------------------------------


def decode_line(line: bytes) -> str:
    """
    Decode one received line, dropping a trailing CR.

    :raise WireError: 413 for more than C{MAX_LINE_LENGTH} bytes (the CR not
        counted); 400 for bytes that are not UTF-8 or control characters.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > MAX_LINE_LENGTH:
        raise WireError(Code.LINE_TOO_LONG, "line too long")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(Code.BAD_REQUEST, "line is not valid UTF-8") from None
    # C0 (except tab), DEL and C1: all of Unicode's control characters.  C1
    # matters too: U+0085 is whitespace to str.split(), U+009B a terminal CSI.
    # (A regex search: a per-character Python loop was 10% of a request.)
    if _CONTROL.search(text):
        raise WireError(Code.BAD_REQUEST, "control characters are not allowed")
    return text


def encode_line(text: str) -> bytes:
    """Encode one line to send (without its delimiter)."""
    data = text.encode("utf-8")
    if len(data) > MAX_LINE_LENGTH or "\n" in text or "\r" in text:
        raise ValueError(f"not a valid protocol line: {text[:60]!r}")
    return data


@functools.lru_cache(maxsize=8)
def banner(role: str) -> bytes:
    """The greeting a server sends as soon as a connection is made."""
    return encode_line(f"{PROTOCOLS.get(role, PROTOCOL)} {role}")


def check_banner(line: bytes, role: str) -> None:
    """Raise L{WireError} unless C{line} is the banner of a C{role} server."""
    text = decode_line(line)
    parts = text.split(" ")
    if not parts or not parts[0].startswith("P2P/"):
        raise WireError(Code.VERSION, f"not a P2P server (greeting {text[:40]!r})")
    expected = PROTOCOLS.get(role, PROTOCOL)
    if parts[0] != expected:
        raise WireError(
            Code.VERSION,
            f"unsupported protocol version {parts[0]!r} (this client speaks "
            f"{expected} to a {role})",
        )
    if len(parts) < 2 or parts[1] != role:
        raise WireError(Code.BAD_REQUEST, f"expected a {role}, not {text[:40]!r}")


def format_error(code: Code | int, message: str) -> bytes:
    message = " ".join(message.split())[:200] or "error"
    return encode_line(f"ERR {int(code)} {message}")


def retry_later(message: str, seconds: float) -> WireError:
    """
    ``ERR 429 <message>; retry-after=<seconds>``: a limit that lifts by
    itself.  The wait is rounded up to a tenth of a second.
    """
    wait = max(0.1, math.ceil(seconds * 10) / 10)
    return WireError(Code.TOO_MANY, f"{message}; retry-after={wait:g}")


def retry_after(message: str) -> float | None:
    """The wait an ``ERR 429`` message asks for, in seconds, or C{None}."""
    _, found, value = message.rpartition("retry-after=")
    if not found:
        return None
    try:
        wait = float(value)
    except ValueError:
        return None
    return wait if 0 <= wait < 86400 else None


# Words an error may quote back: the protocol's own commands and option
# keys, nothing else.  Any other word may be a secret (a token of letters
# sent as the first word, or as a bare argument), and refusals are logged.
KNOWN_VERBS = frozenset(
    {
        "REGISTER",
        "UNREGISTER",
        "PEERS",
        "GET",
        "RANGE",
        "BLOB",
        "PIECES",
        "LIST",
        "STATUS",
    }
)
KNOWN_OPTION_KEYS = frozenset(
    {"name", "host", "token", "files", "limit", "cursor", "hint"}
)


def unknown_command(verb: str) -> WireError:
    """
    501 for C{verb}: named only when it is one of the protocol's commands
    (one the other role serves, as a relay asked for ``GET``).
    """
    if verb in KNOWN_VERBS:
        return WireError(Code.UNKNOWN_COMMAND, f"{verb} is not served here")
    return WireError(Code.UNKNOWN_COMMAND, "unknown command")


def split_verb(text: str) -> tuple[str, str]:
    """
    Split a request into its upper-cased verb (commands are case-insensitive)
    and the rest of the line.  A line that starts with a space or a tab, or
    a tab after the verb, is refused with a message saying so: words are
    separated by single spaces.
    """
    verb, _, rest = text.partition(" ")
    if not verb:
        raise WireError(Code.BAD_REQUEST, "request starts with a space")
    if "\t" in verb:
        where = (
            "starts with a tab" if verb[0] == "\t" else "has a tab after the command"
        )
        raise WireError(
            Code.BAD_REQUEST, f"request {where}: separate words with single spaces"
        )
    return verb.upper(), rest


def split_arguments(rest: str) -> list[str]:
    """The space-separated words after a verb (trailing spaces ignored);
    400 for a double space or a tab between them (what the protocol does
    not allow)."""
    rest = rest.rstrip(" ")
    if not rest:
        return []
    args = rest.split(" ")
    if "" in args or "\t" in rest:
        raise WireError(Code.BAD_REQUEST, "separate words with single spaces (no tabs)")
    return args


def parse_int(text: str, what: str, low: int = 0, high: int = 2**63 - 1) -> int:
    # isdigit() alone would take other scripts' digits ("\u0663"); ASCII
    # digits only, at most 20 (as the _DIGITS pattern says, but cheaper).
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise WireError(Code.BAD_REQUEST, f"{what} must be a decimal number")
    value = int(text)
    if not low <= value <= high:
        raise WireError(Code.BAD_REQUEST, f"{what} must be in {low}..{high}")
    return value


def parse_port(text: str) -> int:
    return parse_int(text, "port", 1, 65535)


def parse_options(tokens: list[str], allowed: frozenset[str]) -> dict[str, str]:
    """Parse ``key=value`` tokens; unknown or repeated keys are errors."""
    options: dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or key not in allowed:
            # Name the key only when it is one of the protocol's (never the
            # value, never another word: either may be a secret).
            if sep and key in KNOWN_OPTION_KEYS:
                raise WireError(Code.BAD_REQUEST, f"{key}= is not accepted here")
            raise WireError(Code.BAD_REQUEST, "unexpected argument")
        if key in options:
            raise WireError(Code.BAD_REQUEST, f"repeated option {key!r}")
        options[key] = value
    return options


def parse_display_name(text: str) -> str:
    if not _DISPLAY_NAME.fullmatch(text):
        raise WireError(
            Code.BAD_REQUEST, "name must be 1-64 characters of A-Z a-z 0-9 . _ -"
        )
    return text


def parse_host(text: str) -> str:
    """Accept an IP literal only, normalised (IPv4-mapped IPv6 becomes IPv4)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise WireError(Code.BAD_REQUEST, "host must be an IP address") from None
    return normalise_host(str(address))


# Cached: every connection's source address goes through here (twice: the
# connection limits and the relay), and ipaddress parsing costs ~10 us, a
# tenth of a whole request.  Bounded, so a scan from many addresses only
# evicts entries.
@functools.lru_cache(maxsize=4096)
def normalise_host(host: str) -> str:
    """Canonical text of an IP address; IPv4-mapped IPv6 becomes plain IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def peer_id_for(host: str, port: int) -> str:
    """A stable id for the peer listening at C{host}:C{port}."""
    return hashlib.sha256(f"{host} {port}".encode()).hexdigest()[:16]


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with IPv6 hosts in brackets."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_ok(text: str) -> list[str]:
    """Split an ``OK`` reply into its fields, or raise the ``ERR`` it carries."""
    if text == "OK" or text.startswith("OK "):
        return text.split(" ")[1:]
    if text.startswith("ERR "):
        code_text, _, message = text[4:].partition(" ")
        if _DIGITS.fullmatch(code_text) and len(code_text) == 3:
            raise RemoteError(int(code_text), message)
    raise WireError(Code.BAD_REQUEST, f"unexpected reply {text[:60]!r}")


class RemoteError(Exception):
    """The other side answered ``ERR <code> <message>``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


# -- relay requests ----------------------------------------------------------


# Tokens are secrets: field(repr=False) keeps them out of every repr, so a
# request object that ends up in a log event or a traceback does not leak one.
#
# The relay's requests and its REGISTER reply are made once per request,
# so they are plain slotted dataclasses: a frozen one assigns each field
# through object.__setattr__, which made building them ~2.5x dearer (a
# couple of microseconds of a relay request).  Treat them as values all
# the same.


@dataclass(slots=True)
class Register:
    """``REGISTER <port> [name=<name>] [host=<ip>] [token=<token>] [files=<filter>]``

    C{files} is the optional name filter of the peer's share (512 lowercase
    hex digits, see L{p2p.hints}); it is sent last, so the line stays
    readable in a log cut short.
    """

    port: int
    name: str | None = None
    host: str | None = None
    token: str | None = field(default=None, repr=False)
    files: str | None = field(default=None, repr=False)

    def to_line(self) -> bytes:
        words = ["REGISTER", str(self.port)]
        if self.name:
            words.append(f"name={self.name}")
        if self.host:
            words.append(f"host={self.host}")
        if self.token:
            words.append(f"token={self.token}")
        if self.files:
            words.append(f"files={self.files}")
        return encode_line(" ".join(words))


@dataclass(slots=True)
class Unregister:
    """``UNREGISTER <port> [host=<ip>] [token=<token>]``

    C{host} (after C{token}, so the older positional form
    ``Unregister(port, token)`` keeps its meaning) names a claimed host; a
    relay honours it only with ``--allow-claimed-host``.
    """

    port: int
    token: str | None = field(default=None, repr=False)
    host: str | None = None

    def to_line(self) -> bytes:
        words = ["UNREGISTER", str(self.port)]
        if self.host:
            words.append(f"host={self.host}")
        if self.token:
            words.append(f"token={self.token}")
        return encode_line(" ".join(words))


@dataclass(slots=True)
class Peers:
    """``PEERS [hint=<hint>|files=1] [limit=<n>] [cursor=<cursor>] [token=<token>]``

    A request with C{limit} or C{cursor} is *paged*: its reply header may
    carry ``next=<cursor>``.  One with neither gets the pre-paging reply
    (at most 1000 peers, never ``next=``), so older clients keep working.
    A request with C{hint} (16 hex digits, L{p2p.hints.name_hint}) asks for
    the likely holders of one name only: never paged, so it takes no
    C{cursor}.  One with C{files} (``files=1``) asks for each peer's name
    filter too (``files=`` on its ``PEER`` line), so that a client with
    many names matches them itself, from one listing.
    """

    token: str | None = field(default=None, repr=False)
    limit: int | None = None
    cursor: str | None = None
    hint: str | None = None
    files: bool = False

    @property
    def paged(self) -> bool:
        return self.hint is None and (self.limit is not None or self.cursor is not None)

    def to_line(self) -> bytes:
        words = ["PEERS"]
        if self.hint is not None:
            words.append(f"hint={self.hint}")
        if self.files:
            words.append("files=1")
        if self.limit is not None:
            words.append(f"limit={self.limit}")
        if self.cursor is not None:
            words.append(f"cursor={self.cursor}")
        if self.token:
            words.append(f"token={self.token}")
        return encode_line(" ".join(words))


def format_cursor(position: int) -> str:
    """
    The ``cursor=`` text for a listing position (the registration sequence
    number of the last entry sent).  Clients treat it as opaque.
    """
    return format(position, "x")


def parse_cursor(text: str) -> int:
    """The position a cursor encodes; 400 unless 1-16 lowercase hex digits."""
    if not _CURSOR.fullmatch(text):
        raise WireError(Code.BAD_REQUEST, "malformed cursor")
    return int(text, 16)


RelayRequest = Register | Unregister | Peers


def parse_token(text: str) -> str:
    """
    Accept a token the wire can carry: 1-256 characters of
    ``A-Z a-z 0-9 . _ ~ + / = -``.  The error never repeats the value.
    """
    if not _TOKEN.fullmatch(text):
        raise WireError(
            Code.BAD_REQUEST,
            "malformed token (1-256 characters of A-Z a-z 0-9 . _ ~ + / = -)",
        )
    return text


def _parse_token(options: dict[str, str]) -> str | None:
    token = options.get("token")
    return parse_token(token) if token is not None else None


def _parse_optional_host(options: dict[str, str]) -> str | None:
    host = options.get("host")
    return parse_host(host) if host is not None else None


_REGISTER_OPTIONS = frozenset({"name", "host", "token", "files"})
_UNREGISTER_OPTIONS = frozenset({"host", "token"})
_PEERS_OPTIONS = frozenset({"token", "limit", "cursor", "hint", "files"})


def parse_relay_request(line: bytes) -> RelayRequest:
    """Parse one line sent to a relay."""
    verb, rest = split_verb(decode_line(line))
    args = split_arguments(rest)
    if verb == "REGISTER":
        if not args:
            raise WireError(Code.BAD_REQUEST, "usage: REGISTER <port> [name=<name>]")
        port = parse_port(args[0])
        if len(args) == 1:
            # A renewal's usual form: nothing more to look at.
            return Register(port)
        options = parse_options(args[1:], _REGISTER_OPTIONS)
        name = options.get("name")
        files = options.get("files")
        if files is not None and not hints.is_filter(files):
            raise WireError(Code.BAD_REQUEST, "files= must be 512 lowercase hex digits")
        return Register(
            port=port,
            name=parse_display_name(name) if name is not None else None,
            host=_parse_optional_host(options),
            token=_parse_token(options),
            files=files,
        )
    if verb == "UNREGISTER":
        if not args:
            raise WireError(Code.BAD_REQUEST, "usage: UNREGISTER <port>")
        port = parse_port(args[0])
        options = parse_options(args[1:], _UNREGISTER_OPTIONS)
        return Unregister(
            port=port,
            token=_parse_token(options),
            host=_parse_optional_host(options),
        )
    if verb == "PEERS":
        if len(args) == 1 and args[0].startswith("limit="):
            # What a fetching client asks: one page, nothing else to check.
            return Peers(limit=parse_int(args[0][6:], "limit", 1, MAX_PEERS_PER_PAGE))
        options = parse_options(args, _PEERS_OPTIONS)
        limit = options.get("limit")
        cursor = options.get("cursor")
        hint = options.get("hint")
        if cursor is not None:
            parse_cursor(cursor)
        if hint is not None:
            if not hints.is_hint(hint):
                raise WireError(
                    Code.BAD_REQUEST, "hint= must be 16 lowercase hex digits"
                )
            if cursor is not None:
                raise WireError(Code.BAD_REQUEST, "hint= takes no cursor=")
        files = options.get("files")
        if files is not None:
            if files != "1":
                raise WireError(Code.BAD_REQUEST, "files= must be 1")
            if hint is not None:
                raise WireError(Code.BAD_REQUEST, "hint= takes no files=")
        return Peers(
            files=files is not None,
            hint=hint,
            token=_parse_token(options),
            limit=(
                parse_int(limit, "limit", 1, MAX_PEERS_PER_PAGE)
                if limit is not None
                else None
            ),
            cursor=cursor,
        )
    raise unknown_command(verb)


# -- relay replies -----------------------------------------------------------


@dataclass(slots=True)
class Registered:
    """``OK <peer-id> ttl=<s> renew=<s> observed=<ip>``"""

    peer_id: str
    ttl: int
    renew: int
    observed: str

    def to_line(self) -> bytes:
        # Every field is a hex id, a number or an IP address: nothing to
        # check before encoding.
        return (
            f"OK {self.peer_id} ttl={self.ttl} renew={self.renew} "
            f"observed={self.observed}"
        ).encode()

    @classmethod
    def from_line(cls, line: bytes) -> Registered:
        fields = parse_ok(decode_line(line))
        if not fields or not _PEER_ID.fullmatch(fields[0]):
            raise WireError(Code.BAD_REQUEST, "malformed REGISTER reply")
        options = parse_options(fields[1:], frozenset({"ttl", "renew", "observed"}))
        if set(options) != {"ttl", "renew", "observed"}:
            raise WireError(Code.BAD_REQUEST, "incomplete REGISTER reply")
        return cls(
            peer_id=fields[0],
            ttl=parse_int(options["ttl"], "ttl", 1, 10**7),
            renew=parse_int(options["renew"], "renew", 1, 10**7),
            observed=parse_host(options["observed"]),
        )


@dataclass(frozen=True)
class PeerEntry:
    """``PEER <peer-id> <ip> <port> age=<s> [name=<name>] [files=<filter>]``

    C{files} is the peer's announced name filter (256 raw bytes), sent
    only to ``PEERS files=1``.
    """

    peer_id: str
    host: str
    port: int
    age: int = 0
    name: str | None = None
    files: bytes | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def to_line(self) -> bytes:
        text = f"PEER {self.peer_id} {self.host} {self.port} age={self.age}"
        if self.name:
            text += f" name={self.name}"
        if self.files is not None:
            text += f" files={self.files.hex()}"
        return encode_line(text)

    @classmethod
    def from_line(cls, line: bytes) -> PeerEntry:
        fields = decode_line(line).split(" ")
        if len(fields) < 5 or fields[0] != "PEER" or not _PEER_ID.fullmatch(fields[1]):
            raise WireError(Code.BAD_REQUEST, "malformed PEER line")
        options = parse_options(fields[4:], _PEER_LINE_OPTIONS)
        if "age" not in options:
            raise WireError(Code.BAD_REQUEST, "PEER line without age")
        name = options.get("name")
        files = options.get("files")
        if files is not None and not hints.is_filter(files):
            raise WireError(Code.BAD_REQUEST, "files= must be 512 lowercase hex digits")
        return cls(
            peer_id=fields[1],
            host=parse_host(fields[2]),
            port=parse_port(fields[3]),
            age=parse_int(options["age"], "age"),
            name=parse_display_name(name) if name is not None else None,
            files=bytes.fromhex(files) if files is not None else None,
        )


_PEER_LINE_OPTIONS = frozenset({"age", "name", "files"})


def format_count(count: int, next_cursor: str | None = None) -> bytes:
    """
    ``OK <count>``: the header of a listing of C{count} lines; with
    C{next_cursor}, ``OK <count> next=<cursor>`` (more entries remain).
    """
    if next_cursor is None:
        return encode_line(f"OK {count}")
    return encode_line(f"OK {count} next={next_cursor}")


def parse_listing_header(line: bytes, maximum: int) -> tuple[int, str | None]:
    """
    Parse ``OK <count> [next=<cursor>]``: the count (above C{maximum} is a
    protocol error) and the cursor of the next page, or C{None} at the end.
    """
    fields = parse_ok(decode_line(line))
    if not fields:
        raise WireError(Code.BAD_REQUEST, "malformed listing header")
    options = parse_options(fields[1:], frozenset({"next"}))
    next_cursor = options.get("next")
    if next_cursor is not None:
        parse_cursor(next_cursor)
    return parse_int(fields[0], "count", 0, maximum), next_cursor


def parse_count(line: bytes, maximum: int) -> int:
    """Parse ``OK <count> [next=<cursor>]``; return the count only."""
    return parse_listing_header(line, maximum)[0]


# -- peer requests -----------------------------------------------------------
#
# Peers speak P2P/2 (see PEER_PROTOCOL): content is described by a BLAKE3
# root and piece digests (p2p.pieces), and any byte range of a named file or
# of a content root can be asked for, so a client can take different pieces
# from different holders and check each piece as it arrives.


@dataclass(frozen=True)
class Get:
    """``GET <name>`` (name: rest of the line): the whole file.

    The reply header is followed by the piece digests (when the file has
    more than one piece), then by the file's bytes.
    """

    name: str

    def to_line(self) -> bytes:
        return encode_line(f"GET {self.name}")


@dataclass(frozen=True)
class Range:
    """``RANGE <offset> <length> <name>`` (name: rest of the line)."""

    offset: int
    length: int
    name: str

    def to_line(self) -> bytes:
        return encode_line(f"RANGE {self.offset} {self.length} {self.name}")


@dataclass(frozen=True)
class Blob:
    """``BLOB <root> <offset> <length>``: a byte range of a content, by root."""

    root: str
    offset: int
    length: int

    def to_line(self) -> bytes:
        return encode_line(f"BLOB {self.root} {self.offset} {self.length}")


@dataclass(frozen=True)
class Pieces:
    """``PIECES <root>``: the piece digests of a content."""

    root: str

    def to_line(self) -> bytes:
        return encode_line(f"PIECES {self.root}")


@dataclass(frozen=True)
class ListFiles:
    """``LIST [limit=<n>] [cursor=<cursor>]``: one page of the shared files."""

    limit: int | None = None
    cursor: str | None = None

    def to_line(self) -> bytes:
        words = ["LIST"]
        if self.limit is not None:
            words.append(f"limit={self.limit}")
        if self.cursor is not None:
            words.append(f"cursor={self.cursor}")
        return encode_line(" ".join(words))


@dataclass(frozen=True)
class Status:
    """``STATUS``: how far the peer's index of its share got."""

    def to_line(self) -> bytes:
        return b"STATUS"


@dataclass(frozen=True)
class IndexStatus:
    """
    The reply to ``STATUS``: ``OK indexed=<n> pending=<n> scanning=<0|1>``.

    @ivar indexed: files in the index (what ``LIST`` lists).
    @ivar pending: files found on disk, new or changed, waiting to be
        hashed or being hashed: not listed yet, or listed as they were.
    @ivar scanning: whether the peer's first walk of its share is still
        running (more files may be found).
    """

    indexed: int
    pending: int
    scanning: bool

    @property
    def complete(self) -> bool:
        """Whether ``LIST`` lists every file the peer will serve."""
        return not self.pending and not self.scanning

    def to_line(self) -> bytes:
        return encode_line(
            f"OK indexed={self.indexed} pending={self.pending} "
            f"scanning={int(self.scanning)}"
        )

    @classmethod
    def from_line(cls, line: bytes) -> IndexStatus:
        """Parse the reply; keys this client does not know are ignored (a
        later peer may say more), missing ones are a protocol error."""
        fields: dict[str, str] = {}
        for token in parse_ok(decode_line(line)):
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        try:
            return cls(
                parse_int(fields["indexed"], "indexed"),
                parse_int(fields["pending"], "pending"),
                parse_int(fields["scanning"], "scanning", 0, 1) == 1,
            )
        except KeyError as e:
            raise WireError(
                Code.BAD_REQUEST, f"STATUS reply without {e.args[0]}="
            ) from None


PeerRequest = Get | Range | Blob | Pieces | ListFiles | Status

# LIST pages hold 1..MAX_FILES_PER_PAGE entries (that many without limit=).
MAX_FILES_PER_PAGE = 1000
_LIST_OPTIONS = frozenset({"limit", "cursor"})


def _parse_name(text: str) -> str:
    if not text:
        raise WireError(Code.BAD_REQUEST, "missing file name")
    if len(text.encode("utf-8")) > MAX_NAME_LENGTH:
        raise WireError(Code.BAD_REQUEST, "file name too long")
    return text


def is_root(text: str) -> bool:
    """Whether C{text} names a content: 64 lowercase hex digits."""
    return _SHA256.fullmatch(text) is not None


def parse_root_text(text: str) -> str:
    """Accept a content root: 64 lowercase hex digits."""
    if not is_root(text):
        raise WireError(Code.BAD_REQUEST, "root must be 64 lowercase hex digits")
    return text


def _parse_span(offset_text: str, length_text: str) -> tuple[int, int]:
    return parse_int(offset_text, "offset"), parse_int(length_text, "length")


def parse_peer_request(line: bytes) -> PeerRequest:
    """Parse one line sent to a peer."""
    verb, rest = split_verb(decode_line(line))
    if verb == "GET":
        return Get(name=_parse_name(rest))
    if verb == "RANGE":
        offset_text, _, rest = rest.partition(" ")
        length_text, _, name = rest.partition(" ")
        offset, length = _parse_span(offset_text, length_text)
        return Range(offset, length, _parse_name(name))
    if verb == "BLOB":
        args = rest.split(" ")
        if len(args) != 3:
            raise WireError(Code.BAD_REQUEST, "usage: BLOB <root> <offset> <length>")
        offset, length = _parse_span(args[1], args[2])
        return Blob(parse_root_text(args[0]), offset, length)
    if verb == "PIECES":
        if not rest or " " in rest:
            raise WireError(Code.BAD_REQUEST, "usage: PIECES <root>")
        return Pieces(parse_root_text(rest))
    if verb == "LIST":
        options = parse_options(split_arguments(rest), _LIST_OPTIONS)
        limit = options.get("limit")
        cursor = options.get("cursor")
        if cursor is not None:
            parse_cursor(cursor)
        return ListFiles(
            limit=(
                parse_int(limit, "limit", 1, MAX_FILES_PER_PAGE)
                if limit is not None
                else None
            ),
            cursor=cursor,
        )
    if verb == "STATUS":
        if rest:
            raise WireError(Code.BAD_REQUEST, "usage: STATUS")
        return Status()
    raise unknown_command(verb)


# -- peer replies ------------------------------------------------------------


@dataclass(frozen=True)
class Indexing:
    """``INDEXING <done> <total>``: the file asked for is still being hashed.

    Sent before a header, at least once a second, while the peer indexes
    the file; the header follows once the file is indexed.
    """

    done: int
    total: int

    def to_line(self) -> bytes:
        return encode_line(f"INDEXING {self.done} {self.total}")

    @classmethod
    def from_line(cls, line: bytes) -> Indexing | None:
        """The progress a line carries, or C{None} if it is not a progress line."""
        if not line.startswith(b"INDEXING "):
            return None
        fields = decode_line(line).split(" ")
        if len(fields) != 3:
            raise WireError(Code.BAD_REQUEST, "malformed INDEXING line")
        return cls(parse_int(fields[1], "done"), parse_int(fields[2], "total"))


_FILE_HEADER_OPTIONS = frozenset({"root", "offset", "size", "piece", "hashes"})
_PIECES_HEADER_OPTIONS = frozenset({"root", "size", "piece"})


@dataclass(frozen=True)
class FileHeader:
    """``OK <count> root=<hex> offset=<n> size=<n> piece=<n> hashes=<n>``

    Then C{hashes} bytes of piece digests (32 per piece; only a ``GET`` of
    a file of more than one piece carries them, 0 otherwise), then C{count}
    raw bytes of the content from C{offset}.  C{root}, C{size} and
    C{piece} (the piece size) describe the whole content.
    """

    count: int
    root: str
    offset: int
    size: int
    piece: int
    hashes: int = 0

    def to_line(self) -> bytes:
        return encode_line(
            f"OK {self.count} root={self.root} offset={self.offset} "
            f"size={self.size} piece={self.piece} hashes={self.hashes}"
        )

    @classmethod
    def from_line(cls, line: bytes) -> FileHeader:
        fields = parse_ok(decode_line(line))
        if not fields:
            raise WireError(Code.BAD_REQUEST, "malformed file header")
        options = parse_options(fields[1:], _FILE_HEADER_OPTIONS)
        if set(options) != _FILE_HEADER_OPTIONS:
            raise WireError(Code.BAD_REQUEST, "incomplete file header")
        header = cls(
            count=parse_int(fields[0], "count"),
            root=parse_root_text(options["root"]),
            offset=parse_int(options["offset"], "offset"),
            size=parse_int(options["size"], "size"),
            piece=parse_int(options["piece"], "piece"),
            hashes=parse_int(options["hashes"], "hashes"),
        )
        if header.offset + header.count > header.size:
            raise WireError(Code.BAD_REQUEST, "file header: offset + count > size")
        return header


@dataclass(frozen=True)
class PiecesHeader:
    """``OK <count> root=<hex> size=<n> piece=<n>``, then C{count} bytes of
    piece digests (32 per piece, in order)."""

    count: int
    root: str
    size: int
    piece: int

    def to_line(self) -> bytes:
        return encode_line(
            f"OK {self.count} root={self.root} size={self.size} piece={self.piece}"
        )

    @classmethod
    def from_line(cls, line: bytes) -> PiecesHeader:
        fields = parse_ok(decode_line(line))
        if not fields:
            raise WireError(Code.BAD_REQUEST, "malformed piece list header")
        options = parse_options(fields[1:], _PIECES_HEADER_OPTIONS)
        if set(options) != _PIECES_HEADER_OPTIONS:
            raise WireError(Code.BAD_REQUEST, "incomplete piece list header")
        return cls(
            count=parse_int(fields[0], "count"),
            root=parse_root_text(options["root"]),
            size=parse_int(options["size"], "size"),
            piece=parse_int(options["piece"], "piece"),
        )


@dataclass(frozen=True)
class FileEntry:
    """``FILE <size> <root> <name>`` (name: rest of the line)."""

    size: int
    root: str
    name: str

    def to_line(self) -> bytes:
        return encode_line(f"FILE {self.size} {self.root} {self.name}")

    @classmethod
    def from_line(cls, line: bytes) -> FileEntry:
        text = decode_line(line)
        verb, _, rest = text.partition(" ")
        size_text, _, rest = rest.partition(" ")
        root, _, name = rest.partition(" ")
        if verb != "FILE":
            raise WireError(Code.BAD_REQUEST, "malformed FILE line")
        return cls(
            size=parse_int(size_text, "size"),
            root=parse_root_text(root),
            name=_parse_name(name),
        )
