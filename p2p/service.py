"""Services shared by the relay and the peer daemons."""

from __future__ import annotations

import os
import tempfile

from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2p import wire


class ListenFailed(SystemExit):
    """
    A daemon cannot listen on an address it was given: twistd exits with
    status 1 and this one line on stderr (a C{SystemExit} is how a service
    may end twistd at startup without a traceback).
    """

    def __init__(self, role: str, error: CannotListenError) -> None:
        reason = error.socketError
        detail = getattr(reason, "strerror", None) or str(reason)
        interface = error.interface or "*"
        address = wire.format_address(interface, error.port)
        super().__init__(f"twistd {role}: cannot listen on {address}: {detail}")
        self.role = role
        self.error = error


class ListeningService(Service):
    """
    Listen on an endpoint while running, and tell who wants to know the port.

    Like C{strports.service} it fails fast: when the endpoint cannot listen
    synchronously (a TCP port in use, say) C{startService} raises
    L{ListenFailed}, so twistd exits with one line on stderr instead of
    running with nothing listening.  Unlike it, it hands out
    the bound L{IListeningPort} (``tcp:0`` binds an ephemeral port the peer
    must announce) without reading private attributes.
    """

    log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, role: str
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.role = role
        self.port: IListeningPort | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        super().startService()
        outcome: list[IListeningPort | Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            self.running = False
            error = outcome[0].value
            if isinstance(error, CannotListenError):
                # One line, not twistd's 40-line traceback: the address
                # and the reason are all there is to say.
                raise ListenFailed(self.role, error)
            outcome[0].raiseException()
        if outcome:
            self._listening(outcome[0])
        else:
            d.addCallbacks(self._listening, self._listen_failed)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        self.log.info(
            "{role} listening on {address}",
            role=self.role,
            address=wire.format_address(address.host, address.port),
            port=address.port,
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)
        return port

    def _listen_failed(self, failure: Failure) -> None:
        self.log.failure("{role} cannot listen", failure, role=self.role)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    def when_listening(self) -> Deferred[IListeningPort]:
        """A Deferred that fires with the listening port."""
        if self.port is not None:
            d: Deferred[IListeningPort] = Deferred()
            d.callback(self.port)
            return d
        waiter: Deferred[IListeningPort] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


class PortFileService(Service):
    """
    Write ``HOST PORT`` lines for some listeners to a file once all listen.

    The file appears atomically (written aside, then renamed), so a script can
    wait for it and read every line; it is removed when the service stops.
    """

    log = Logger()

    def __init__(self, path: str, listeners: list[ListeningService]) -> None:
        self.path = path
        self.listeners = listeners

    def startService(self) -> None:
        super().startService()
        d = gatherResults(
            [listener.when_listening() for listener in self.listeners],
            consumeErrors=True,
        )
        d.addCallback(self._write)
        d.addErrback(self._not_written)

    def _not_written(self, failure: Failure) -> None:
        # A listener that failed logged why; a port file we cannot write is
        # worth saying, but the daemon keeps serving.
        error = (
            failure.value.subFailure.value
            if failure.check(FirstError)
            else failure.value
        )
        self.log.error(
            "cannot write the port file {path}: {error}", path=self.path, error=error
        )

    def _write(self, ports: list[IListeningPort]) -> None:
        lines = []
        for port in ports:
            address = port.getHost()
            lines.append(f"{address.host} {address.port}\n")
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".port-")
        with os.fdopen(fd, "w") as stream:
            stream.writelines(lines)
        os.replace(temporary, self.path)

    def stopService(self) -> None:
        super().stopService()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
