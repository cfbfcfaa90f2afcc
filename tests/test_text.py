"""Tests for L{p2p.text}: names shown to a person cannot spoof the terminal."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from p2p.text import quoted, shown

# (name as received, as shown)
TABLE = [
    ("report.pdf", "report.pdf"),
    ("a dir/été 2024.txt", "a dir/été 2024.txt"),
    ("日本語.txt", "日本語.txt"),
    # Bidirectional controls: the override that makes this look like a PDF.
    ("invoice\u202efdp.exe", "invoice\\u202efdp.exe"),
    ("\u202a\u202b\u202c\u202d", "\\u202a\\u202b\\u202c\\u202d"),
    ("\u2066\u2067\u2068\u2069", "\\u2066\\u2067\\u2068\\u2069"),
    ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),
    # Zero-width and other invisible characters.
    ("pay\u200bpal", "pay\\u200bpal"),
    ("\u200c\u200d\u2060\ufeff", "\\u200c\\u200d\\u2060\\ufeff"),
    ("soft\u00adhyphen", "soft\\u00adhyphen"),
    ("filler\u3164here", "filler\\u3164here"),
    ("cgj\u034f", "cgj\\u034f"),
    ("vs\ufe0f", "vs\\ufe0f"),
    ("tag\U000e0041", "tag\\U000e0041"),
    # Controls (a TAB is the one a protocol line may carry) and separators.
    ("tab\there", "tab\\u0009here"),
    ("esc\x1b[31mred", "esc\\u001b[31mred"),
    ("csi\x9b", "csi\\u009b"),
    ("line\u2028para\u2029", "line\\u2028para\\u2029"),
    # Spaces that look like the ASCII one.
    ("no\u00a0break", "no\\u00a0break"),
    ("wide\u3000space", "wide\\u3000space"),
    # Unassigned and private-use code points.
    ("\U000effff\ue000", "\\U000effff\\ue000"),
    # A backslash is doubled: the name below is not the one above.
    ("invoice\\u202efdp.exe", "invoice\\\\u202efdp.exe"),
    ("C:\\temp", "C:\\\\temp"),
]


class ShownTests(SynchronousTestCase):
    def test_table(self) -> None:
        for name, expected in TABLE:
            self.assertEqual(shown(name), expected, repr(name))

    def test_unambiguous(self) -> None:
        """Different names are never shown alike."""
        names = [name for name, _ in TABLE]
        self.assertEqual(len({shown(name) for name in names}), len(set(names)))

    def test_only_printable_ascii_and_visible_characters(self) -> None:
        """What comes out is printable, whatever went in."""
        everything = "".join(map(chr, range(0x3000))) + "\ufeff\U000e0001"
        self.assertTrue(shown(everything).isprintable())

    def test_backslash_kept_for_whole_lines(self) -> None:
        """With backslash=False (lines of our own, which may quote names
        already escaped) only the dangerous characters change."""
        line = "relay tcp6:8000:interface=\\:\\:1: ERR 404 \u202eevil"
        self.assertEqual(
            shown(line, backslash=False),
            "relay tcp6:8000:interface=\\:\\:1: ERR 404 \\u202eevil",
        )
        self.assertEqual(shown(shown("a\u202eb"), backslash=False), "a\\u202eb")


class QuotedTests(SynchronousTestCase):
    """L{quoted}: a name between quotes, escaped once."""

    def test_escaped_once(self) -> None:
        """A control shows as one escape, not repr's escape of it."""
        self.assertEqual(quoted("q\x1bq"), "'q\\u001bq'")
        self.assertEqual(quoted("a\\b"), "'a\\\\b'")

    def test_edges_visible(self) -> None:
        """An empty name and edge spaces can be seen."""
        self.assertEqual(quoted(""), "''")
        self.assertEqual(quoted(" a "), "' a '")
