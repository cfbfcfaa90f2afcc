"""
The client side's import graph: shared pieces live in shared modules, so
the peer's announcer and the TLS helpers never load the client's
protocols, and the demo never loads the command line.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase


def loaded_after(module: str) -> set[str]:
    """The p2p modules a fresh interpreter has loaded after importing
    C{module}."""
    code = (
        f"import sys, {module}; "
        "print(' '.join(m for m in sys.modules if m.startswith('p2p')))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(output.split())


class ImportGraphTests(SynchronousTestCase):
    def test_announce_and_tls_do_not_load_the_client(self) -> None:
        for module in ("p2p.announce", "p2p.tls"):
            self.assertNotIn("p2p.client", loaded_after(module), module)

    def test_demo_and_session_do_not_load_the_command_line(self) -> None:
        for module in ("p2p.demo", "p2p.session"):
            self.assertNotIn("p2p.cli", loaded_after(module), module)
