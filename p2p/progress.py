"""A progress bar per file on stderr, drawn by tqdm.

``p2p get`` shows one while a file's pieces arrive, when stderr is a
terminal (``--progress`` and ``--no-progress`` force it on or off): the
name, the verified bytes and the total, the rate, the time left and the
peers sending.  The lines ``p2p`` prints meanwhile (a peer skipped, the
final summary) are written above it, never through it.

tqdm, not rich: it has no dependencies of its own (rich brings Pygments
and markdown-it-py), imports in about 20 ms, and writes plain
carriage-return updates to any file object, which is all a byte counter
needs.  It is imported only when bars may be shown, before any fetch (so
that its import is not counted in the first file's time).
"""

from __future__ import annotations

import time
from typing import IO

from p2p import wire
from p2p.text import shown

# Redraw at most this often: a bar must cost nothing next to the transfer.
REDRAW_SECONDS = 0.2
# A file that takes less than this gets no bar (it would only flicker).
SHOW_AFTER_SECONDS = 0.5
# Longest name shown in front of a bar (the rest is cut, marked with "...").
LABEL_CHARACTERS = 32


def _label(name: str) -> str:
    label = shown(name)
    if len(label) > LABEL_CHARACTERS:
        label = label[: LABEL_CHARACTERS - 3] + "..."
    return label


def _bar_class():
    from tqdm import tqdm

    class Bar(tqdm):
        # No monitor thread: our bars are updated on the reactor thread and
        # closed at the end of each fetch.
        monitor_interval = 0

    return Bar


class ProgressBar:
    """
    At most one bar at a time, on C{stream}: L{update} draws it (the first
    call creates it), L{close} removes it, L{write} prints a line above it.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._bar_class = _bar_class()
        self._bar = None
        self._name: str | None = None
        # The name whose bar is not shown yet, and since when it waits.
        self._waiting: tuple[str, float] | None = None
        # Who sends which name (told before its first bytes come).
        self._peers: tuple[str | None, str] = (None, "")

    def update(self, name: str, received: int, total: int) -> None:
        """C{received} of C{total} bytes of C{name} are in (the bar shows
        once the file has taken L{SHOW_AFTER_SECONDS}).  While one file's
        bar is shown, the others fetched at once (p2p get --jobs) wait."""
        bar = self._bar
        if bar is None or self._name != name:
            if bar is not None:
                return
            now = time.monotonic()
            if self._waiting is None or self._waiting[0] != name:
                self._waiting = (name, now)
            if now - self._waiting[1] < SHOW_AFTER_SECONDS:
                return
            self._waiting = None
            self._name = name
            self._bar = bar = self._bar_class(
                total=total,
                initial=received,
                desc=_label(name),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                mininterval=REDRAW_SECONDS,
            )
            if self._peers[0] == name:
                bar.set_postfix_str(self._peers[1])
            return
        if bar.total != total:
            bar.reset(total=total)
        if received >= bar.n:
            bar.update(received - bar.n)
        else:  # the content started over (another holder's)
            bar.n = received
            bar.refresh()

    def serving(self, name: str, peers: list[wire.PeerEntry]) -> None:
        """The peers sending C{name} now."""
        if len(peers) == 1:
            text = f"from {peers[0].address}"
        else:
            text = f"from {len(peers)} peers"
        self._peers = (name, text)
        if self._bar is not None and self._name == name:
            self._bar.set_postfix_str(text)

    def write(self, text: str) -> None:
        """Print C{text} (whole lines) above the bar, if one is shown."""
        bar = self._bar
        if bar is not None:
            bar.clear()
        self.stream.write(text)
        self.stream.flush()
        if bar is not None:
            bar.refresh()

    def close(self, name: str | None = None) -> None:
        """Remove the bar (a summary line takes its place); with C{name},
        only if it is that file's."""
        if name is not None and name != self._name:
            if self._waiting is not None and self._waiting[0] == name:
                self._waiting = None
            return
        if self._bar is not None:
            self._bar.close()
        self._bar = None
        self._name = None
        self._waiting = None
