"""
A real ``redis-server`` for the Redis registry tests, on a free loopback port
in a temporary folder, with neither snapshots nor an append-only file.

Redis cannot listen on port 0 and report the port it got, so a free port is
found by binding a socket and closing it; the small window in which another
process may take it is covered by trying again on another port when Redis
says the address is in use.  Not a test module: trial skips it.
"""

from __future__ import annotations

import os
import shutil
import socket

from ._certs import Credentials
from ._processes import Launcher, LoggedProcess, ProcessFailed

REDIS_SERVER = shutil.which("redis-server")
SKIP_REASON = "redis-server is not installed (.ci/run installs it: apt-get)"
READY = r"Ready to accept connections"
ATTEMPTS = 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """
    One redis-server process at a time on a fixed port (so a test can kill
    it and start it again at the same address).

    :param tls: serve TLS only, with this certificate and key (then L{url}
        is ``rediss://localhost``).
    :param password: require it (``requirepass``).
    """

    def __init__(
        self,
        launcher: Launcher,
        folder: str,
        tls: Credentials | None = None,
        password: str | None = None,
    ) -> None:
        self.launcher = launcher
        self.folder = folder
        self.tls = tls
        self.password = password
        self.port = 0
        self.process: LoggedProcess | None = None

    @property
    def url(self) -> str:
        secret = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{secret}localhost:{self.port}/0"
        return f"redis://{secret}127.0.0.1:{self.port}/0"

    def _listen(self, port: int) -> list[str]:
        if self.tls is None:
            return ["--port", str(port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            self.tls.certificate,
            "--tls-key-file",
            self.tls.key,
            "--tls-auth-clients",
            "no",
        ]

    async def start(self) -> RedisServer:
        """Start on a free port, or (after L{kill}) on the same one."""
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(ATTEMPTS):
            port = self.port or free_port()
            process = self.launcher.spawn(
                "redis",
                [
                    REDIS_SERVER or "redis-server",
                    *self._listen(port),
                    *(["--requirepass", self.password] if self.password else []),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.folder,
                ],
            )
            try:
                await process.wait_for(READY)
            except ProcessFailed:
                if self.port or "in use" not in "\n".join(process.lines):
                    raise
                continue  # someone took the port meanwhile: another one
            self.port, self.process = port, process
            return self
        raise ProcessFailed(f"redis-server found no free port in {ATTEMPTS} tries")

    async def kill(self) -> None:
        """SIGKILL: gone at once, its data with it (no persistence)."""
        assert self.process is not None
        await self.process.kill("KILL")
        self.process = None
