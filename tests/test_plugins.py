"""
twistd can find ``relay`` and ``peer``.

twistd hides a plugin that fails to import behind "Unknown command", so
these tests catch packaging and import errors the daemon would swallow.
"""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import tempfile

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import p2p
from p2p import peer_tap, relay_tap

TAPS = {"relay": relay_tap, "peer": peer_tap}


def service_makers() -> dict[str, list]:
    found: dict[str, list] = {}
    for maker in getPlugins(IServiceMaker):
        found.setdefault(maker.tapname, []).append(maker)
    return found


class DiscoveryTests(SynchronousTestCase):
    def test_tapnames(self) -> None:
        found = service_makers()
        for tapname in TAPS:
            self.assertIn(tapname, found)

    def test_tapnames_unique(self) -> None:
        """A duplicate tapname would silently replace ours in twistd."""
        found = service_makers()
        for tapname in TAPS:
            self.assertEqual(len(found[tapname]), 1, tapname)

    def test_makers_point_at_tap_modules(self) -> None:
        found = service_makers()
        for tapname, module in TAPS.items():
            (maker,) = found[tapname]
            verifyObject(IServiceMaker, maker)
            verifyObject(IPlugin, maker)
            self.assertIs(maker.options, module.Options)
            self.assertIs(maker.makeService, module.makeService)
            self.assertTrue(maker.description)

    def test_twistd_subcommands(self) -> None:
        """What ``twistd --help`` lists and ``twistd relay`` dispatches on."""
        commands = {
            name: options for name, _, options, _ in ServerOptions().subCommands
        }
        for tapname, module in TAPS.items():
            self.assertIn(tapname, commands)
            self.assertIsInstance(commands[tapname](), module.Options)


class PluginModuleTests(SynchronousTestCase):
    """The scanner imports every plugin module: ours must stay trivial."""

    def plugin_source(self) -> str:
        from twisted.plugins import p2p_plugins

        with open(p2p_plugins.__file__.removesuffix("c")) as stream:
            return stream.read()

    def test_imports_only_twisted(self) -> None:
        tree = ast.parse(self.plugin_source())
        imported = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.append(node.module or "")
        self.assertEqual(imported, ["twisted.application.service"])

    def test_no_init_files_in_checkout(self) -> None:
        """
        An installed ``twisted/plugins/__init__.py`` of ours would replace
        Twisted's own and break every plugin in the environment.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(p2p.__file__)))
        plugins = os.path.join(root, "twisted", "plugins")
        if not os.path.exists(os.path.join(plugins, "p2p_plugins.py")):
            self.skipTest("p2p is installed, not run from a checkout")
        self.assertFalse(os.path.exists(os.path.join(root, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(plugins, "__init__.py")))


class PortInUseTests(SynchronousTestCase):
    """``twistd relay`` or ``twistd peer`` on a port in use: exit status 1
    and one line saying so, no traceback (a real twistd process)."""

    def run_twistd(self, *args: str) -> subprocess.CompletedProcess:
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return subprocess.run(
            [
                twistd,
                "-n",
                "--pidfile=",
                *args,
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tempfile.mkdtemp(),
            env={
                **os.environ,
                "P2P_RELAY": "127.0.0.1:9",
                "XDG_STATE_HOME": tempfile.mkdtemp(),
            },
        ), port

    def assertOneLine(self, result, port: int, role: str) -> None:
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertIn(
            f"twistd {role}: cannot listen on 127.0.0.1:{port}: Address already in use",
            output,
        )
        self.assertNotIn("Traceback", output)

    def test_relay(self) -> None:
        result, port = self.run_twistd("relay")
        self.assertOneLine(result, port, "relay")

    def test_peer(self) -> None:
        result, port = self.run_twistd("peer")
        self.assertOneLine(result, port, "peer")
