"""Tests for ``p2p.wire``: pure parsing and formatting of protocol lines."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2p import wire
from p2p.wire import Code, RemoteError, WireError

PEER_ID = wire.peer_id_for("10.0.0.5", 9000)
SHA = "ab" * 32

# Property tests must be reproducible and must not write a database into the
# working tree (trial runs in _trial_temp, pytest in the checkout).
deterministic = settings(derandomize=True, database=None, max_examples=100)


class WireAssertions:
    """Mixin: assert that a call fails with a ``WireError`` of a given code."""

    def assertWireError(self, code: Code, f, *args, **kwargs) -> WireError:
        """Call ``f`` and check it raises ``WireError`` carrying ``code``."""
        error = self.assertRaises(WireError, f, *args, **kwargs)
        self.assertIs(error.code, code, f"{error} from {f.__name__}{args!r}")
        return error

    def assertAllRefused(self, f, code: Code, lines) -> None:
        """Every line in ``lines`` makes ``f`` raise a ``code`` ``WireError``."""
        for line in lines:
            with naming(line):
                self.assertWireError(code, f, line)


class naming:
    """Context manager: re-raise an AssertionError naming the offending input.

    (trial's reporter has no ``addSubTest``, so loops over cases use this
    to say which case failed.)
    """

    def __init__(self, value) -> None:
        self.value = value

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if kind is not None and issubclass(kind, AssertionError):
            raise AssertionError(f"input {self.value!r}: {error}") from error
        return False


class DecodeLineTests(WireAssertions, SynchronousTestCase):
    """``wire.decode_line``: the UTF-8 and control-character gate."""

    def test_plain(self) -> None:
        """An ASCII line decodes unchanged."""
        self.assertEqual(wire.decode_line(b"PEERS"), "PEERS")

    def test_trailing_cr_dropped(self) -> None:
        """One trailing CR (from CRLF clients like nc -C) is ignored."""
        self.assertEqual(wire.decode_line(b"PEERS\r"), "PEERS")

    def test_only_one_cr_dropped(self) -> None:
        """A second CR is part of the line, hence a control character."""
        self.assertWireError(Code.BAD_REQUEST, wire.decode_line, b"PEERS\r\r")

    def test_utf8(self) -> None:
        """Non-ASCII UTF-8 is accepted and decoded."""
        self.assertEqual(wire.decode_line("GET ré.txt".encode()), "GET ré.txt")

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are a 400."""
        for line in [b"\xff", b"GET \xc3\x28", b"PEERS \x80", "é".encode("latin-1")]:
            with naming(line):
                error = self.assertWireError(Code.BAD_REQUEST, wire.decode_line, line)
                self.assertIn("UTF-8", error.message)

    def test_control_characters(self) -> None:
        """C0 controls (except tab), an inner CR, DEL and C1 controls are a 400."""
        for line in [
            b"PEERS\x00",
            b"\x01PEERS",
            b"PEERS \x1b[31m",
            b"PE\rERS",
            b"PEERS\x7f",
            b"PEERS\x0b",
            "PEERS\x80".encode(),
            "REGISTER 9000\x85name=a".encode(),
            "GET a\x9b31m".encode(),
        ]:
            with naming(line):
                error = self.assertWireError(Code.BAD_REQUEST, wire.decode_line, line)
                self.assertIn("control", error.message)

    def test_other_unicode_allowed(self) -> None:
        """Printable characters just outside the control ranges pass."""
        for text in ["GET \xa0", "GET ~", "GET \u2028"]:
            self.assertEqual(wire.decode_line(text.encode()), text)

    def test_tab_allowed(self) -> None:
        """Tab is the one control character let through (file names)."""
        self.assertEqual(wire.decode_line(b"GET a\tb"), "GET a\tb")

    def test_longest_line(self) -> None:
        """Exactly MAX_LINE_LENGTH bytes pass, with or without a CR after."""
        line = b"x" * wire.MAX_LINE_LENGTH
        self.assertEqual(wire.decode_line(line), line.decode())
        self.assertEqual(wire.decode_line(line + b"\r"), line.decode())

    def test_too_long(self) -> None:
        """
        One byte more than MAX_LINE_LENGTH (the CR not counted) is a 413,
        checked before decoding: it is the answer whatever the bytes are.
        """
        for line in [
            b"x" * (wire.MAX_LINE_LENGTH + 1),
            b"x" * (wire.MAX_LINE_LENGTH + 1) + b"\r",
            b"x" * wire.MAX_LINE_LENGTH + b"\r\r",
            b"\xff" * (wire.MAX_LINE_LENGTH + 1),
            "é".encode() * (wire.MAX_LINE_LENGTH // 2 + 1),
        ]:
            with naming(line[-8:]):
                error = self.assertWireError(Code.LINE_TOO_LONG, wire.decode_line, line)
                self.assertEqual(error.to_line(), b"ERR 413 line too long")

    def test_receive_length(self) -> None:
        """
        A LineReceiver must buffer one byte more than the protocol's limit:
        it counts the CR of a CRLF line end as part of the line.
        """
        self.assertEqual(wire.MAX_RECEIVE_LENGTH, wire.MAX_LINE_LENGTH + 1)


class EncodeLineTests(SynchronousTestCase):
    """``wire.encode_line``: what we send is always one legal line."""

    def test_encodes_utf8(self) -> None:
        """Text is encoded as UTF-8, with no delimiter appended."""
        self.assertEqual(wire.encode_line("FILE 1 é"), "FILE 1 é".encode())

    def test_longest_line(self) -> None:
        """A line of exactly MAX_LINE_LENGTH bytes is allowed."""
        text = "x" * wire.MAX_LINE_LENGTH
        self.assertEqual(wire.encode_line(text), text.encode())

    def test_too_long(self) -> None:
        """One byte more than MAX_LINE_LENGTH is a programming error."""
        self.assertRaises(
            ValueError, wire.encode_line, "x" * (wire.MAX_LINE_LENGTH + 1)
        )

    def test_multibyte_counts_bytes(self) -> None:
        """The limit counts encoded bytes, not characters."""
        text = "é" * (wire.MAX_LINE_LENGTH // 2 + 1)
        self.assertRaises(ValueError, wire.encode_line, text)

    def test_newlines_refused(self) -> None:
        """An embedded LF or CR would split the line: refused."""
        self.assertRaises(ValueError, wire.encode_line, "OK\nERR 500 x")
        self.assertRaises(ValueError, wire.encode_line, "OK\r")


class BannerTests(WireAssertions, SynchronousTestCase):
    """``wire.banner`` and ``wire.check_banner``."""

    def test_banner(self) -> None:
        """The banner is the protocol version and the server's role."""
        self.assertEqual(wire.banner("relay"), b"P2P/1 relay")
        self.assertEqual(wire.banner("peer"), b"P2P/2 peer")

    def test_accepts_own_banner(self) -> None:
        """check_banner accepts what banner produces, with or without CR."""
        wire.check_banner(wire.banner("relay"), "relay")
        wire.check_banner(wire.banner("peer") + b"\r", "peer")

    def test_extra_words_ignored(self) -> None:
        """Words after the role are reserved for future use: ignored."""
        wire.check_banner(b"P2P/1 relay tls=1 whatever", "relay")

    def test_wrong_version(self) -> None:
        """Another P2P version is a 505 naming that version."""
        for line in [b"P2P/2 relay", b"P2P/10 relay", b"P2P/ relay", b"P2P/1.1 relay"]:
            with naming(line):
                error = self.assertWireError(
                    Code.VERSION, wire.check_banner, line, "relay"
                )
                self.assertIn("version", error.message)

    def test_not_p2p(self) -> None:
        """A greeting from some other service is a 505 too."""
        for line in [
            b"SSH-2.0-OpenSSH_9.6",
            b"HTTP/1.1 400 Bad Request",
            b"",
            b"p2p/1",
        ]:
            with naming(line):
                error = self.assertWireError(
                    Code.VERSION, wire.check_banner, line, "relay"
                )
                self.assertIn("not a P2P server", error.message)

    def test_wrong_role(self) -> None:
        """The right version from the wrong kind of server is a 400."""
        self.assertWireError(
            Code.BAD_REQUEST, wire.check_banner, b"P2P/1 peer", "relay"
        )
        self.assertWireError(Code.BAD_REQUEST, wire.check_banner, b"P2P/1", "relay")
        self.assertWireError(
            Code.BAD_REQUEST, wire.check_banner, b"P2P/1  relay", "relay"
        )

    def test_banner_not_utf8(self) -> None:
        """A banner that is not UTF-8 is a 400 from the decoding gate."""
        self.assertWireError(
            Code.BAD_REQUEST, wire.check_banner, b"P2P/1 \xffrelay", "relay"
        )


class ErrorTests(SynchronousTestCase):
    """``wire.format_error``, ``wire.WireError`` and ``wire.Code``."""

    def test_format(self) -> None:
        """An error line is ``ERR <code> <message>``."""
        self.assertEqual(
            wire.format_error(Code.NOT_FOUND, "no such file"), b"ERR 404 no such file"
        )
        self.assertEqual(wire.format_error(418, "teapot"), b"ERR 418 teapot")

    def test_whitespace_collapsed(self) -> None:
        """Runs of whitespace (including newlines) become single spaces."""
        self.assertEqual(
            wire.format_error(Code.INTERNAL, "  a\n b\t\tc  "), b"ERR 500 a b c"
        )

    def test_empty_message(self) -> None:
        """An empty message still yields a three-field line."""
        self.assertEqual(wire.format_error(Code.INTERNAL, " "), b"ERR 500 error")

    def test_truncated(self) -> None:
        """Messages are cut at 200 characters, keeping the line bounded."""
        line = wire.format_error(Code.BAD_REQUEST, "x" * 5000)
        self.assertEqual(line, b"ERR 400 " + b"x" * 200)

    def test_wire_error(self) -> None:
        """WireError keeps code and message and renders its own ERR line."""
        error = WireError(Code.FORBIDDEN, "go away")
        self.assertIs(error.code, Code.FORBIDDEN)
        self.assertEqual(error.message, "go away")
        self.assertEqual(str(error), "403 go away")
        self.assertEqual(error.to_line(), b"ERR 403 go away")

    def test_codes(self) -> None:
        """The documented codes have their HTTP-like values."""
        self.assertEqual(
            {code.name: int(code) for code in Code},
            {
                "BAD_REQUEST": 400,
                "UNAUTHORIZED": 401,
                "FORBIDDEN": 403,
                "NOT_FOUND": 404,
                "TIMEOUT": 408,
                "LINE_TOO_LONG": 413,
                "BAD_OFFSET": 416,
                "TOO_MANY": 429,
                "INTERNAL": 500,
                "UNKNOWN_COMMAND": 501,
                "UNAVAILABLE": 503,
                "VERSION": 505,
            },
        )


class FieldTests(WireAssertions, SynchronousTestCase):
    """The field parsers shared by all messages."""

    def test_split_verb(self) -> None:
        """The verb is upper-cased; the rest is kept verbatim."""
        self.assertEqual(wire.split_verb("get A  b"), ("GET", "A  b"))
        self.assertEqual(wire.split_verb("LIST"), ("LIST", ""))

    def test_split_verb_empty(self) -> None:
        """An empty verb (empty line or leading space) is a 400."""
        self.assertWireError(Code.BAD_REQUEST, wire.split_verb, "")
        self.assertWireError(Code.BAD_REQUEST, wire.split_verb, " PEERS")

    def test_parse_int(self) -> None:
        """Decimal digits within the bounds are accepted."""
        self.assertEqual(wire.parse_int("0", "n"), 0)
        self.assertEqual(wire.parse_int("007", "n"), 7)
        self.assertEqual(wire.parse_int("9" * 18, "n"), int("9" * 18))
        self.assertEqual(wire.parse_int("5", "n", 5, 5), 5)

    def test_parse_int_malformed(self) -> None:
        """Signs, decimals, spaces, non-ASCII digits and 21 digits are a 400."""
        for text in ["", "-1", "+1", "1.0", " 1", "1 ", "0x10", "١٢", "1" * 21, "1e3"]:
            with naming(text):
                error = self.assertWireError(
                    Code.BAD_REQUEST, wire.parse_int, text, "size"
                )
                self.assertIn("size", error.message)

    def test_parse_int_bounds(self) -> None:
        """Values outside low..high are a 400 naming the range."""
        self.assertWireError(Code.BAD_REQUEST, wire.parse_int, "4", "n", 5, 9)
        self.assertWireError(Code.BAD_REQUEST, wire.parse_int, "10", "n", 5, 9)
        error = self.assertWireError(
            Code.BAD_REQUEST, wire.parse_int, "9" * 20, "offset"
        )
        self.assertIn("offset must be in", error.message)

    def test_parse_port(self) -> None:
        """Ports are 1..65535."""
        self.assertEqual(wire.parse_port("1"), 1)
        self.assertEqual(wire.parse_port("65535"), 65535)
        self.assertAllRefused(wire.parse_port, Code.BAD_REQUEST, ["0", "65536", "x"])

    def test_parse_options(self) -> None:
        """key=value tokens become a dict; the value may contain '='."""
        self.assertEqual(
            wire.parse_options(["a=1", "b=x=y", "c="], frozenset("abc")),
            {"a": "1", "b": "x=y", "c": ""},
        )
        self.assertEqual(wire.parse_options([], frozenset("a")), {})

    def test_parse_options_malformed(self) -> None:
        """Unknown keys, bare words and repeats are a 400."""
        allowed = frozenset({"a"})
        for tokens in [["b=1"], ["a"], ["=1"], ["a=1", "a=2"], ["A=1"]]:
            with naming(tokens):
                self.assertWireError(
                    Code.BAD_REQUEST, wire.parse_options, tokens, allowed
                )

    def test_display_name(self) -> None:
        """Names are 1-64 characters of a small safe alphabet."""
        for name in ["a", "Peer-1.home_x", "x" * 64]:
            self.assertEqual(wire.parse_display_name(name), name)
        self.assertAllRefused(
            wire.parse_display_name,
            Code.BAD_REQUEST,
            ["", "x" * 65, "a b", "ré", "a/b", "a=b", "a;b"],
        )

    def test_parse_host(self) -> None:
        """IP literals are accepted in canonical form."""
        self.assertEqual(wire.parse_host("10.0.0.5"), "10.0.0.5")
        self.assertEqual(wire.parse_host("2001:DB8:0:0::1"), "2001:db8::1")
        self.assertEqual(wire.parse_host("::1"), "::1")

    def test_parse_host_ipv4_mapped(self) -> None:
        """IPv4-mapped IPv6 becomes the plain IPv4 address."""
        self.assertEqual(wire.parse_host("::ffff:10.0.0.5"), "10.0.0.5")
        self.assertEqual(wire.parse_host("::FFFF:a00:5"), "10.0.0.5")

    def test_parse_host_malformed(self) -> None:
        """Host names, ports, CIDR and leading-zero octets are a 400."""
        self.assertAllRefused(
            wire.parse_host,
            Code.BAD_REQUEST,
            [
                "",
                "example.com",
                "10.0.0.256",
                "10.0.0.5:80",
                "[::1]",
                "10.0.0.0/8",
                "010.0.0.1",
                "1",
            ],
        )

    def test_normalise_host(self) -> None:
        """Canonical text for IPs; mapped IPv6 and scopes are simplified."""
        self.assertEqual(wire.normalise_host("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(wire.normalise_host("2001:0db8::0001"), "2001:db8::1")
        self.assertEqual(wire.normalise_host("fe80::1%eth0"), "fe80::1")
        self.assertEqual(wire.normalise_host("192.0.2.1"), "192.0.2.1")

    def test_normalise_host_not_ip(self) -> None:
        """Anything that is not an IP is returned untouched."""
        self.assertEqual(wire.normalise_host("example.com"), "example.com")

    def test_peer_id(self) -> None:
        """Peer ids are 16 hex digits, stable, and differ per address."""
        first = wire.peer_id_for("10.0.0.5", 9000)
        self.assertRegex(first, r"\A[0-9a-f]{16}\Z")
        self.assertEqual(first, wire.peer_id_for("10.0.0.5", 9000))
        self.assertNotEqual(first, wire.peer_id_for("10.0.0.5", 9001))
        self.assertNotEqual(first, wire.peer_id_for("10.0.0.6", 9000))

    def test_format_address(self) -> None:
        """IPv6 hosts are bracketed so the port stays unambiguous."""
        self.assertEqual(wire.format_address("10.0.0.5", 80), "10.0.0.5:80")
        self.assertEqual(wire.format_address("2001:db8::1", 80), "[2001:db8::1]:80")


class ParseOkTests(WireAssertions, SynchronousTestCase):
    """``wire.parse_ok``: the common front of every reply."""

    def test_ok(self) -> None:
        """``OK`` and ``OK <fields>`` yield the fields."""
        self.assertEqual(wire.parse_ok("OK"), [])
        self.assertEqual(wire.parse_ok("OK 1 a=b"), ["1", "a=b"])

    def test_err(self) -> None:
        """``ERR <code> <message>`` raises RemoteError with both parts."""
        error = self.assertRaises(RemoteError, wire.parse_ok, "ERR 404 no such file")
        self.assertEqual((error.code, error.message), (404, "no such file"))
        self.assertEqual(str(error), "404 no such file")

    def test_err_without_message(self) -> None:
        """A bare code is still understood as a remote error."""
        error = self.assertRaises(RemoteError, wire.parse_ok, "ERR 500")
        self.assertEqual((error.code, error.message), (500, ""))

    def test_malformed(self) -> None:
        """Anything else, including bad ERR codes, is a 400."""
        self.assertAllRefused(
            wire.parse_ok,
            Code.BAD_REQUEST,
            ["", "OKAY", "ok", "ERR", "ERR x oops", "ERR 40 short", "ERR 4040 long"],
        )


class RelayRequestTests(WireAssertions, SynchronousTestCase):
    """``wire.parse_relay_request`` and the relay request types."""

    parse = staticmethod(wire.parse_relay_request)

    def test_register_minimal(self) -> None:
        """``REGISTER <port>`` alone leaves every option unset."""
        self.assertEqual(self.parse(b"REGISTER 9000"), wire.Register(9000))

    def test_register_options(self) -> None:
        """Every option is parsed, in any order."""
        self.assertEqual(
            self.parse(b"REGISTER 9000 token=s3cr/t+= host=10.0.0.7 name=box-1"),
            wire.Register(9000, name="box-1", host="10.0.0.7", token="s3cr/t+="),
        )

    def test_register_lenient_framing(self) -> None:
        """A lower-case verb and a trailing CR are accepted."""
        self.assertEqual(
            self.parse(b"register 9000 name=a\r"), wire.Register(9000, name="a")
        )

    def test_register_host_normalised(self) -> None:
        """A claimed IPv4-mapped IPv6 host is normalised to IPv4."""
        request = self.parse(b"REGISTER 9000 host=::ffff:10.0.0.7")
        self.assertEqual(request.host, "10.0.0.7")

    def test_register_round_trip(self) -> None:
        """to_line output parses back to an equal request."""
        for request in [
            wire.Register(1),
            wire.Register(65535, name="n"),
            wire.Register(80, host="2001:db8::1"),
            wire.Register(80, name="n", host="10.0.0.1", token="t"),
        ]:
            self.assertEqual(self.parse(request.to_line()), request)
        self.assertEqual(
            wire.Register(80, name="n", host="10.0.0.1", token="t").to_line(),
            b"REGISTER 80 name=n host=10.0.0.1 token=t",
        )

    def test_register_malformed(self) -> None:
        """Each broken REGISTER is a 400."""
        self.assertAllRefused(
            self.parse,
            Code.BAD_REQUEST,
            [
                b"REGISTER",
                b"REGISTER ",
                b"REGISTER 0",
                b"REGISTER 65536",
                b"REGISTER -1",
                b"REGISTER http",
                b"REGISTER name=a",
                b"REGISTER 9000 extra",
                b"REGISTER 9000 port=1",
                b"REGISTER 9000 name=",
                b"REGISTER 9000 name=a b",
                b"REGISTER 9000 name=" + b"x" * 65,
                b"REGISTER 9000 name=a name=b",
                b"REGISTER 9000 host=peer.example",
                b"REGISTER 9000 host=",
                b"REGISTER 9000 token=",
                b"REGISTER 9000 token=a;b",
                b"REGISTER 9000 token=" + b"t" * 257,
            ],
        )

    def test_unregister(self) -> None:
        """``UNREGISTER <port> [token=...]`` parses and round-trips."""
        self.assertEqual(self.parse(b"UNREGISTER 9000"), wire.Unregister(9000))
        self.assertEqual(
            self.parse(b"unregister 9000 token=t"), wire.Unregister(9000, "t")
        )
        for request in [wire.Unregister(1), wire.Unregister(65535, token="x=")]:
            self.assertEqual(self.parse(request.to_line()), request)

    def test_unregister_host(self) -> None:
        """
        ``UNREGISTER <port> host=<ip>`` names a claimed host (normalised);
        with a token too, in either order.  The older forms keep working:
        the second positional field is still the token.
        """
        self.assertEqual(
            self.parse(b"UNREGISTER 9000 host=::ffff:10.0.0.7"),
            wire.Unregister(9000, host="10.0.0.7"),
        )
        self.assertEqual(
            self.parse(b"UNREGISTER 9000 token=t host=2001:db8::1"),
            wire.Unregister(9000, "t", "2001:db8::1"),
        )
        request = wire.Unregister(9000, token="t", host="10.0.0.7")
        self.assertEqual(request.to_line(), b"UNREGISTER 9000 host=10.0.0.7 token=t")
        for request in [
            wire.Unregister(80, host="10.0.0.1"),
            wire.Unregister(80, token="t", host="2001:db8::1"),
        ]:
            self.assertEqual(self.parse(request.to_line()), request)

    def test_unregister_malformed(self) -> None:
        """Each broken UNREGISTER is a 400."""
        self.assertAllRefused(
            self.parse,
            Code.BAD_REQUEST,
            [
                b"UNREGISTER",
                b"UNREGISTER 0",
                b"UNREGISTER x",
                b"UNREGISTER 9000 name=a",
                b"UNREGISTER 9000 host=peer.example",
                b"UNREGISTER 9000 host=",
                b"UNREGISTER 9000 host=10.0.0.5 host=10.0.0.5",
                b"UNREGISTER 9000 token=",
                b"UNREGISTER 9000 token=a token=b",
                b"UNREGISTER 9000 9001",
            ],
        )

    def test_peers(self) -> None:
        """``PEERS [token=...]`` parses and round-trips."""
        self.assertEqual(self.parse(b"PEERS"), wire.Peers())
        self.assertEqual(self.parse(b"peers token=abc\r"), wire.Peers("abc"))
        for request in [wire.Peers(), wire.Peers(token="abc")]:
            self.assertEqual(self.parse(request.to_line()), request)
        self.assertEqual(wire.Peers().to_line(), b"PEERS")

    def test_peers_paged(self) -> None:
        """``limit=`` and ``cursor=`` parse, in any order, and round-trip."""
        self.assertEqual(
            self.parse(b"PEERS cursor=1f limit=20 token=abc"),
            wire.Peers("abc", limit=20, cursor="1f"),
        )
        for request in [
            wire.Peers(limit=1),
            wire.Peers(limit=1000, cursor="0"),
            wire.Peers(cursor="ffffffffffffffff", token="abc"),
        ]:
            self.assertEqual(self.parse(request.to_line()), request)
            self.assertTrue(request.paged)
        self.assertFalse(wire.Peers(token="abc").paged)
        self.assertEqual(
            wire.Peers(limit=5, cursor="a").to_line(), b"PEERS limit=5 cursor=a"
        )

    def test_peers_paged_malformed(self) -> None:
        """Out-of-range limits and malformed cursors are a 400."""
        self.assertAllRefused(
            self.parse,
            Code.BAD_REQUEST,
            [
                b"PEERS limit=0",
                b"PEERS limit=1001",
                b"PEERS limit=x",
                b"PEERS limit=",
                b"PEERS cursor=",
                b"PEERS cursor=G",
                b"PEERS cursor=AB",
                b"PEERS cursor=12345678901234567",
                b"PEERS limit=1 limit=1",
            ],
        )

    def test_peers_malformed(self) -> None:
        """Each broken PEERS is a 400."""
        self.assertAllRefused(
            self.parse,
            Code.BAD_REQUEST,
            [b"PEERS 10", b"PEERS name=a", b"PEERS token=", b"PEERS token=a b"],
        )

    def test_unknown_command(self) -> None:
        """Unknown verbs, including peer verbs sent to a relay, are a 501."""
        for line in [b"HELLO", b"GET x", b"LIST", b"REGISTERX 9000", b"X" * 100]:
            with naming(line):
                error = self.assertWireError(Code.UNKNOWN_COMMAND, self.parse, line)
                self.assertLessEqual(len(error.message), 60)

    def test_empty(self) -> None:
        """An empty line or a leading space is a 400, not a 501."""
        self.assertAllRefused(self.parse, Code.BAD_REQUEST, [b"", b"\r", b" PEERS"])

    def test_bad_bytes(self) -> None:
        """Non-UTF-8 and control characters are a 400 before verb lookup."""
        self.assertAllRefused(
            self.parse,
            Code.BAD_REQUEST,
            [b"\xffPEERS", b"REGISTER 9000 name=\xe9", b"PEERS\x00", b"PEERS\x1b"],
        )

    def test_tokens_never_echoed(self) -> None:
        """
        Refusals are logged, so their messages never repeat a token, not
        even a malformed one or the value of a misspelt ``tokn=``.
        """
        secret = "hunter2-secret"
        for line in [
            f"REGISTER 9000 token={secret};",
            f"REGISTER 9000 tokn={secret}",
            f"UNREGISTER 9000 Token={secret}",
            f"PEERS token={secret} token={secret}",
            f"PEERS toke={secret}",
        ]:
            with naming(line):
                error = self.assertWireError(
                    Code.BAD_REQUEST, self.parse, line.encode()
                )
                self.assertNotIn(secret, str(error))

    def test_tokens_not_in_repr(self) -> None:
        """
        A request's repr (what a log event or a traceback would show) leaves
        its token out.
        """
        for request in [
            wire.Register(9000, token="hunter2"),
            wire.Unregister(9000, token="hunter2"),
            wire.Peers(token="hunter2"),
        ]:
            self.assertNotIn("hunter2", repr(request))
            self.assertEqual(request.token, "hunter2")

    def test_parse_token(self) -> None:
        """Tokens are 1-256 characters of a URL/base64-safe alphabet."""
        for token in ["a", "s3cr/t+=", "A-Z_a.z~0", "t" * 256]:
            self.assertEqual(wire.parse_token(token), token)
        for token in ["", "a b", "a;b", "é", "t" * 257, "a\x00"]:
            with naming(token):
                error = self.assertWireError(Code.BAD_REQUEST, wire.parse_token, token)
                if token:
                    self.assertNotIn(token, error.message)

    @deterministic
    @given(
        port=st.integers(1, 65535),
        name=st.none() | st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z"),
        host=st.none() | st.ip_addresses().map(str),
        token=st.none() | st.from_regex(r"\A[A-Za-z0-9._~+/=-]{1,256}\Z"),
    )
    def test_register_round_trip_property(self, port, name, host, token) -> None:
        """Any valid Register survives to_line/parse (hosts come back canonical)."""
        request = wire.Register(port, name, host, token)
        parsed = self.parse(request.to_line())
        expected_host = None if host is None else wire.normalise_host(host)
        self.assertEqual(parsed, wire.Register(port, name, expected_host, token))


class RegisteredTests(WireAssertions, SynchronousTestCase):
    """``wire.Registered``: the relay's answer to REGISTER."""

    def test_to_line(self) -> None:
        """The reply carries the id, lease times and observed address."""
        reply = wire.Registered(PEER_ID, 60, 20, "10.0.0.5")
        self.assertEqual(
            reply.to_line(), f"OK {PEER_ID} ttl=60 renew=20 observed=10.0.0.5".encode()
        )

    def test_round_trip(self) -> None:
        """from_line inverts to_line, for IPv4 and IPv6 observations."""
        for observed in ["10.0.0.5", "2001:db8::1"]:
            reply = wire.Registered(PEER_ID, 60, 20, observed)
            self.assertEqual(wire.Registered.from_line(reply.to_line()), reply)

    def test_fields_any_order_and_cr(self) -> None:
        """Options may come in any order; a trailing CR is ignored."""
        line = f"OK {PEER_ID} observed=10.0.0.5 renew=1 ttl=10000000\r".encode()
        self.assertEqual(
            wire.Registered.from_line(line),
            wire.Registered(PEER_ID, 10**7, 1, "10.0.0.5"),
        )

    def test_observed_ipv4_mapped(self) -> None:
        """An IPv4-mapped observation is normalised to IPv4."""
        line = f"OK {PEER_ID} ttl=60 renew=20 observed=::ffff:10.0.0.5".encode()
        self.assertEqual(wire.Registered.from_line(line).observed, "10.0.0.5")

    def test_remote_error(self) -> None:
        """An ERR reply raises RemoteError rather than WireError."""
        error = self.assertRaises(
            RemoteError, wire.Registered.from_line, b"ERR 429 relay full"
        )
        self.assertEqual((error.code, error.message), (429, "relay full"))

    def test_malformed(self) -> None:
        """Each broken reply is a 400."""
        good = {"ttl": "60", "renew": "20", "observed": "10.0.0.5"}

        def line(peer_id=PEER_ID, **changes) -> bytes:
            fields = {**good, **changes}
            words = [f"{k}={v}" for k, v in fields.items() if v is not None]
            return " ".join(["OK", peer_id, *words]).encode()

        self.assertAllRefused(
            wire.Registered.from_line,
            Code.BAD_REQUEST,
            [
                b"OK",
                b"HELLO",
                b"OK \xff",
                line(peer_id="XYZ"),
                line(peer_id=PEER_ID.upper()),
                line(peer_id=PEER_ID[:-1]),
                line(ttl=None),
                line(renew=None),
                line(observed=None),
                line(ttl="0"),
                line(ttl="10000001"),
                line(renew="0"),
                line(ttl="x"),
                line(observed="relay.example"),
                line() + b" ttl=60",
                line() + b" extra=1",
                line() + b" bare",
            ],
        )


class PeerEntryTests(WireAssertions, SynchronousTestCase):
    """``wire.PeerEntry``: one line of a PEERS listing."""

    def test_to_line(self) -> None:
        """The name is appended only when there is one."""
        self.assertEqual(
            wire.PeerEntry(PEER_ID, "10.0.0.5", 9000, 3).to_line(),
            f"PEER {PEER_ID} 10.0.0.5 9000 age=3".encode(),
        )
        self.assertEqual(
            wire.PeerEntry(PEER_ID, "10.0.0.5", 9000, 0, "box").to_line(),
            f"PEER {PEER_ID} 10.0.0.5 9000 age=0 name=box".encode(),
        )

    def test_round_trip(self) -> None:
        """from_line inverts to_line."""
        for entry in [
            wire.PeerEntry(PEER_ID, "10.0.0.5", 9000),
            wire.PeerEntry(PEER_ID, "2001:db8::1", 1, 12345, "n.a-m_e"),
        ]:
            self.assertEqual(wire.PeerEntry.from_line(entry.to_line()), entry)

    def test_host_normalised(self) -> None:
        """IPv4-mapped hosts in a listing are normalised to IPv4."""
        line = f"PEER {PEER_ID} ::ffff:10.0.0.5 9000 age=1\r".encode()
        entry = wire.PeerEntry.from_line(line)
        self.assertEqual(entry.host, "10.0.0.5")
        self.assertEqual(entry.address, "10.0.0.5:9000")

    def test_address(self) -> None:
        """address is HOST:PORT, bracketing IPv6."""
        self.assertEqual(
            wire.PeerEntry(PEER_ID, "2001:db8::1", 9000).address, "[2001:db8::1]:9000"
        )

    def test_malformed(self) -> None:
        """Each broken PEER line is a 400."""
        head = f"PEER {PEER_ID}"
        self.assertAllRefused(
            wire.PeerEntry.from_line,
            Code.BAD_REQUEST,
            [
                b"",
                f"{head} 10.0.0.5 9000".encode(),
                f"PEERS {PEER_ID} 10.0.0.5 9000 age=1".encode(),
                b"PEER nothex0000000000 10.0.0.5 9000 age=1",
                f"{head} peer.example 9000 age=1".encode(),
                f"{head} 10.0.0.5 0 age=1".encode(),
                f"{head} 10.0.0.5 9000 name=a".encode(),
                f"{head} 10.0.0.5 9000 age=-1".encode(),
                f"{head} 10.0.0.5 9000 age=1 name=".encode(),
                f"{head} 10.0.0.5 9000 age=1 name=a name=b".encode(),
                f"{head} 10.0.0.5 9000 age=1 ttl=5".encode(),
                f"{head}  10.0.0.5 9000 age=1".encode(),
                f"{head} 10.0.0.5 9000 age=1\x00".encode(),
            ],
        )

    @deterministic
    @given(
        host=st.ip_addresses().map(str),
        port=st.integers(1, 65535),
        age=st.integers(0, 2**63 - 1),
        name=st.none() | st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z"),
    )
    def test_round_trip_property(self, host, port, age, name) -> None:
        """Any valid entry survives to_line/from_line (hosts come back canonical)."""
        host = wire.normalise_host(host)
        entry = wire.PeerEntry(wire.peer_id_for(host, port), host, port, age, name)
        self.assertEqual(wire.PeerEntry.from_line(entry.to_line()), entry)


class CountTests(WireAssertions, SynchronousTestCase):
    """``wire.format_count`` and ``wire.parse_count``: listing headers."""

    def test_round_trip(self) -> None:
        """``OK <count>`` within the maximum parses back."""
        self.assertEqual(wire.format_count(3), b"OK 3")
        self.assertEqual(wire.parse_count(wire.format_count(0), 10), 0)
        self.assertEqual(wire.parse_count(b"OK 10\r", 10), 10)

    def test_remote_error(self) -> None:
        """An ERR in place of the header raises RemoteError."""
        self.assertRaises(RemoteError, wire.parse_count, b"ERR 503 busy", 10)

    def test_malformed(self) -> None:
        """Missing, extra, non-numeric or excessive counts are a 400."""
        for line in [b"OK", b"OK 1 2", b"OK x", b"OK 11", b"OK -1", b"PEERS 1"]:
            with naming(line):
                self.assertWireError(Code.BAD_REQUEST, wire.parse_count, line, 10)


class ListingHeaderTests(WireAssertions, SynchronousTestCase):
    """``OK <count> [next=<cursor>]`` and the cursor codec."""

    def test_next(self) -> None:
        """A header with next= gives the count and the cursor."""
        line = wire.format_count(2, "1a")
        self.assertEqual(line, b"OK 2 next=1a")
        self.assertEqual(wire.parse_listing_header(line, 10), (2, "1a"))
        self.assertEqual(wire.parse_listing_header(b"OK 2", 10), (2, None))
        # parse_count (used for every listing) accepts and ignores next=.
        self.assertEqual(wire.parse_count(line, 10), 2)

    def test_malformed(self) -> None:
        """A bad cursor, an unknown option or a repeated next= is a 400."""
        for line in [
            b"OK 1 next=",
            b"OK 1 next=XY",
            b"OK 1 more=1",
            b"OK 1 next=1 next=2",
        ]:
            with naming(line):
                self.assertWireError(
                    Code.BAD_REQUEST, wire.parse_listing_header, line, 10
                )

    def test_cursor_codec(self) -> None:
        """Positions round-trip through their cursor text."""
        for position in [0, 1, 255, 2**63, 2**64 - 1]:
            self.assertEqual(wire.parse_cursor(wire.format_cursor(position)), position)
        self.assertEqual(wire.format_cursor(255), "ff")
        for bad in ["", "-1", "0x1", "FF", "1" * 17, "g"]:
            with naming(bad):
                self.assertWireError(Code.BAD_REQUEST, wire.parse_cursor, bad)


class PeerRequestTests(WireAssertions, SynchronousTestCase):
    """``wire.parse_peer_request``: GET, RANGE, BLOB, PIECES, LIST and
    STATUS."""

    parse = staticmethod(wire.parse_peer_request)

    def test_get(self) -> None:
        """The name is the rest of the line, spaces included."""
        self.assertEqual(self.parse(b"GET a b.txt"), wire.Get("a b.txt"))
        self.assertEqual(self.parse(b"get dir/x\r"), wire.Get("dir/x"))
        self.assertEqual(self.parse("GET é".encode()), wire.Get("é"))

    def test_range(self) -> None:
        """RANGE carries an offset and a length before the name."""
        self.assertEqual(self.parse(b"RANGE 10 5 a b"), wire.Range(10, 5, "a b"))
        self.assertEqual(self.parse(b"RANGE 0 0 a"), wire.Range(0, 0, "a"))

    def test_blob_and_pieces(self) -> None:
        """BLOB and PIECES name a content by its root."""
        self.assertEqual(
            self.parse(f"BLOB {SHA} 1048576 20".encode()),
            wire.Blob(SHA, 1048576, 20),
        )
        self.assertEqual(self.parse(f"PIECES {SHA}".encode()), wire.Pieces(SHA))

    def test_status(self) -> None:
        """STATUS takes nothing."""
        self.assertEqual(self.parse(b"STATUS"), wire.Status())
        self.assertEqual(wire.Status().to_line(), b"STATUS")
        with self.assertRaises(wire.WireError) as caught:
            self.parse(b"STATUS now")
        self.assertEqual(caught.exception.code, wire.Code.BAD_REQUEST)

    def test_index_status(self) -> None:
        """The reply's keys round-trip; keys a later peer may add are
        ignored, a missing or malformed one is a protocol error, and an
        ERR reply raises it."""
        status = wire.IndexStatus(12, 3, True)
        self.assertEqual(status.to_line(), b"OK indexed=12 pending=3 scanning=1")
        self.assertEqual(wire.IndexStatus.from_line(status.to_line()), status)
        self.assertFalse(status.complete)
        self.assertTrue(wire.IndexStatus(12, 0, False).complete)
        self.assertFalse(wire.IndexStatus(12, 0, True).complete)
        self.assertEqual(
            wire.IndexStatus.from_line(b"OK hashing=5 indexed=1 pending=0 scanning=0"),
            wire.IndexStatus(1, 0, False),
        )
        for bad in (
            b"OK indexed=1 pending=0",
            b"OK indexed=x pending=0 scanning=0",
            b"OK indexed=1 pending=0 scanning=2",
            b"indexed=1 pending=0 scanning=0",
        ):
            with self.assertRaises(wire.WireError, msg=bad):
                wire.IndexStatus.from_line(bad)
        with self.assertRaises(wire.RemoteError):
            wire.IndexStatus.from_line(b"ERR 501 unknown command")

    def test_list(self) -> None:
        """LIST takes an optional limit and cursor."""
        self.assertEqual(self.parse(b"LIST"), wire.ListFiles())
        self.assertEqual(self.parse(b"list  "), wire.ListFiles())
        self.assertEqual(self.parse(b"LIST limit=5 cursor=1f"), wire.ListFiles(5, "1f"))

    def test_round_trip(self) -> None:
        """to_line output parses back."""
        self.assertEqual(wire.Get("a").to_line(), b"GET a")
        self.assertEqual(wire.Range(5, 7, "a").to_line(), b"RANGE 5 7 a")
        self.assertEqual(wire.ListFiles().to_line(), b"LIST")
        for request in [
            wire.Get("a b"),
            wire.Range(2**40, 3, "x y"),
            wire.Blob(SHA, 0, 2**40),
            wire.Pieces(SHA),
            wire.ListFiles(),
            wire.ListFiles(1000, "ff"),
        ]:
            self.assertEqual(self.parse(request.to_line()), request)

    def test_longest_name(self) -> None:
        """A name of exactly MAX_NAME_LENGTH bytes is accepted."""
        name = "n" * wire.MAX_NAME_LENGTH
        self.assertEqual(self.parse(b"GET " + name.encode()), wire.Get(name))

    def test_malformed(self) -> None:
        """Each broken peer request is a 400."""
        self.assertAllRefused(
            self.parse,
            Code.BAD_REQUEST,
            [
                b"GET",
                b"GET ",
                b"GET " + b"n" * (wire.MAX_NAME_LENGTH + 1),
                b"GET " + "é".encode() * (wire.MAX_NAME_LENGTH // 2 + 1),
                b"RANGE",
                b"RANGE 10",
                b"RANGE 10 5",
                b"RANGE 10 5 ",
                b"RANGE x 5 a",
                b"RANGE 1 -5 a",
                b"BLOB",
                f"BLOB {SHA}".encode(),
                f"BLOB {SHA} 0".encode(),
                f"BLOB {SHA} 0 1 2".encode(),
                f"BLOB {SHA.upper()} 0 1".encode(),
                f"BLOB {SHA[:-1]} 0 1".encode(),
                b"PIECES",
                f"PIECES {SHA} x".encode(),
                b"PIECES name.txt",
                b"LIST x",
                b"LIST limit=0",
                b"LIST limit=1001",
                b"LIST cursor=xyz",
                b"GET \xff",
                b"GET a\x00",
                b"",
            ],
        )

    def test_unknown_command(self) -> None:
        """Relay verbs, the first version's RESUME and nonsense are a 501."""
        self.assertAllRefused(
            self.parse,
            Code.UNKNOWN_COMMAND,
            [b"PEERS", b"REGISTER 1", b"FETCH a", b"RESUME 10 a"],
        )


class IndexingTests(WireAssertions, SynchronousTestCase):
    """``wire.Indexing``: the progress line before a header."""

    def test_round_trip(self) -> None:
        progress = wire.Indexing(5, 10)
        self.assertEqual(progress.to_line(), b"INDEXING 5 10")
        self.assertEqual(wire.Indexing.from_line(progress.to_line()), progress)

    def test_other_lines(self) -> None:
        """Another line is not progress; a broken progress line is a 400."""
        self.assertIsNone(wire.Indexing.from_line(b"OK 1"))
        self.assertAllRefused(
            wire.Indexing.from_line,
            Code.BAD_REQUEST,
            [b"INDEXING 1", b"INDEXING x 2", b"INDEXING 1 2 3"],
        )


class FileHeaderTests(WireAssertions, SynchronousTestCase):
    """``wire.FileHeader``: the line before a file's bytes."""

    def test_round_trip(self) -> None:
        """to_line/from_line agree, for whole files and ranges."""
        for header in [
            wire.FileHeader(10, SHA, 0, 10, 1048576, 0),
            wire.FileHeader(4, SHA, 6, 10, 1048576),
            wire.FileHeader(0, SHA, 10, 10, 1048576),
            wire.FileHeader(3145728, SHA, 0, 3145728, 1048576, 96),
        ]:
            self.assertEqual(wire.FileHeader.from_line(header.to_line()), header)
        self.assertEqual(
            wire.FileHeader(4, SHA, 6, 10, 1048576).to_line(),
            f"OK 4 root={SHA} offset=6 size=10 piece=1048576 hashes=0".encode(),
        )

    def test_remote_error(self) -> None:
        """An ERR reply raises RemoteError."""
        error = self.assertRaises(
            RemoteError, wire.FileHeader.from_line, b"ERR 416 bad offset"
        )
        self.assertEqual(error.code, 416)

    def test_malformed(self) -> None:
        """Missing fields, bad roots and inconsistent sizes are a 400; so is
        a first-version header."""
        tail = "piece=1048576 hashes=0"
        self.assertAllRefused(
            wire.FileHeader.from_line,
            Code.BAD_REQUEST,
            [
                b"OK",
                b"OK 10",
                f"OK 10 root={SHA} offset=0 size=10".encode(),
                f"OK 10 root={SHA} size=10 {tail}".encode(),
                f"OK 10 offset=0 size=10 {tail}".encode(),
                f"OK x root={SHA} offset=0 size=10 {tail}".encode(),
                f"OK 10 root={SHA.upper()} offset=0 size=10 {tail}".encode(),
                f"OK 10 root={SHA[:-1]} offset=0 size=10 {tail}".encode(),
                f"OK 10 root={SHA} offset=1 size=10 {tail}".encode(),
                f"OK 10 root={SHA} offset=0 size=10 {tail} extra=1".encode(),
                f"OK 10 root={SHA} offset=0 offset=0 size=10 {tail}".encode(),
                f"FILE 10 root={SHA} offset=0 size=10 {tail}".encode(),
                f"OK 10 sha256={SHA} offset=0 size=10".encode(),
            ],
        )

    def test_short_range(self) -> None:
        """A range may end before the content does (count < size - offset)."""
        header = wire.FileHeader(2, SHA, 3, 10, 1048576)
        self.assertEqual(wire.FileHeader.from_line(header.to_line()), header)


class PiecesHeaderTests(WireAssertions, SynchronousTestCase):
    """``wire.PiecesHeader``: the line before a piece list."""

    def test_round_trip(self) -> None:
        header = wire.PiecesHeader(64, SHA, 2000000, 1048576)
        self.assertEqual(
            header.to_line(), f"OK 64 root={SHA} size=2000000 piece=1048576".encode()
        )
        self.assertEqual(wire.PiecesHeader.from_line(header.to_line()), header)

    def test_malformed(self) -> None:
        self.assertAllRefused(
            wire.PiecesHeader.from_line,
            Code.BAD_REQUEST,
            [
                b"OK",
                f"OK 32 root={SHA} size=1".encode(),
                b"OK 32 root=x size=1 piece=2",
            ],
        )


class FileEntryTests(WireAssertions, SynchronousTestCase):
    """``wire.FileEntry``: one line of a LIST reply."""

    def test_round_trip(self) -> None:
        """The name is the rest of the line, spaces included."""
        entry = wire.FileEntry(12, SHA, "a b/c é.txt")
        self.assertEqual(entry.to_line(), f"FILE 12 {SHA} a b/c é.txt".encode())
        self.assertEqual(wire.FileEntry.from_line(entry.to_line() + b"\r"), entry)

    def test_malformed(self) -> None:
        """Wrong verb, bad size or root, or a missing name is a 400."""
        self.assertAllRefused(
            wire.FileEntry.from_line,
            Code.BAD_REQUEST,
            [
                f"FILES 1 {SHA} a".encode(),
                f"FILE x {SHA} a".encode(),
                f"FILE 1 {SHA}".encode(),
                f"FILE 1 {SHA} ".encode(),
                b"FILE 1 a",
                b"FILE",
                b"",
                b"F\xff",
            ],
        )


class RootTests(SynchronousTestCase):
    """``wire.is_root``: what names a content, for the client and the wire."""

    def test_is_root(self) -> None:
        self.assertTrue(wire.is_root("ab" * 32))
        for bad in ("AB" * 32, "ab" * 31, "zz" * 32, "ab" * 32 + " ", ""):
            self.assertFalse(wire.is_root(bad), bad)


class SeparatorTests(SynchronousTestCase):
    """Words are separated by single spaces; the errors say what is wrong
    (issue 10: a leading space read as "empty request", a tab made the whole
    line an unknown command echoed upper-cased)."""

    def assertRefused(self, line: bytes, message: str) -> None:
        for parse in (wire.parse_relay_request, wire.parse_peer_request):
            error = self.assertRaises(wire.WireError, parse, line)
            self.assertEqual(
                (error.code, error.message), (wire.Code.BAD_REQUEST, message)
            )

    def test_leading_space(self) -> None:
        self.assertRefused(b" PEERS", "request starts with a space")

    def test_tabs(self) -> None:
        self.assertRefused(
            b"PEERS\tlimit=2",
            "request has a tab after the command: separate words with single spaces",
        )
        self.assertRefused(
            b"\tPEERS", "request starts with a tab: separate words with single spaces"
        )

    def test_double_space_between_arguments(self) -> None:
        error = self.assertRaises(
            wire.WireError, wire.parse_relay_request, b"PEERS limit=2  cursor=1"
        )
        self.assertEqual(error.message, "separate words with single spaces (no tabs)")

    def test_trailing_spaces_and_case(self) -> None:
        """Trailing spaces are ignored, and commands are case-insensitive."""
        self.assertEqual(
            wire.parse_relay_request(b"peers limit=2 "), wire.Peers(limit=2)
        )
        self.assertEqual(wire.parse_peer_request(b"list "), wire.ListFiles())
