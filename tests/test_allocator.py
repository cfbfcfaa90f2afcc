"""Tests for L{p2p.allocator}: glibc keeps the client's freed buffers."""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from p2p import allocator


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


class KeepFreedMemoryTests(SynchronousTestCase):
    def test_glibc_takes_the_settings(self) -> None:
        """
        On glibc, mallopt accepts both settings (checked in a child
        process, so this test's own allocator is left alone).
        """
        if not _glibc():
            raise self.skipTest("needs glibc")
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from p2p.allocator import keep_freed_memory as k; print(k())",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.assertEqual(out.strip(), "True")

    def test_elsewhere_does_nothing(self) -> None:
        """Not Linux: no attempt, False."""
        self.patch(allocator.sys, "platform", "darwin")
        self.assertFalse(allocator.keep_freed_memory())

    def test_no_mallopt_does_nothing(self) -> None:
        """A C library without mallopt (e.g. not glibc): False, no error."""

        class NoMallopt:
            def __init__(self, name) -> None:
                pass

        self.patch(allocator.sys, "platform", "linux")
        self.patch(allocator.ctypes, "CDLL", NoMallopt)
        self.assertFalse(allocator.keep_freed_memory())
