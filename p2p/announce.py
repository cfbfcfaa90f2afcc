"""The peer's side of a lease: register, renew, re-register, unregister.

Each exchange is its own short connection (the seed's connect-announce-close
shape), so this is a timer, not a long-lived ``ClientService`` link.  A failed
attempt is retried with capped exponential backoff and jitter; the peer keeps
serving files whatever the relay does.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2p import wire
from p2p.errors import describe
from p2p.request import request_lines
from p2p.service import ListeningService

FIRST_RETRY_SECONDS = 1.0
# Before the relay has told us its renewal interval, retries are capped here.
DEFAULT_MAX_RETRY_SECONDS = 20.0
UNREGISTER_TIMEOUT_SECONDS = 5.0
# How soon a changed name filter reaches the relay: changes in a burst (a
# share being indexed) are sent together, at most one REGISTER per period.
FILTER_REFRESH_SECONDS = 2.0


class Announcer(Service):
    """
    Keep a lease at the relay for the port a L{ListeningService} bound.

    :param relay: where the relay listens.
    :param listening: the peer's file server; its bound port is announced.
    :param clock: the reactor (for timers and timeouts).
    :param name: optional display name sent with each registration.
    :param token: the relay's shared secret, sent as ``token=`` with
        REGISTER and UNREGISTER (never logged).
    :param jitter: returns a float in [0, 1); spreads the peers' renewals.
    :param relay_text: the relay's address as configured, for the log
        (a peer may keep leases at several relays, one announcer each).
    :param files: returns the name filter of the share (L{p2p.hints.build_filter},
        512 hex digits) or C{None}, or a Deferred of either (the daemon builds
        it on a thread: walking a large share must not stall the reactor);
        called before every REGISTER, renewals included, so the relay's copy
        follows the share.  C{None} (the default): announce no filter.
    """

    log = Logger()

    def __init__(
        self,
        relay: IStreamClientEndpoint,
        listening: ListeningService,
        clock: IReactorTime,
        name: str | None = None,
        token: str | None = None,
        request_timeout: float = 10.0,
        jitter: Callable[[], float] = random.random,
        files: Callable[[], str | None] | None = None,
        relay_text: str = "the relay",
    ) -> None:
        self.relay = relay
        self.relay_text = relay_text
        self.listening = listening
        self.clock = clock
        # Not self.name: that is the service's name in its parent
        # (IService), which getServiceNamed looks up.
        self.display_name = name
        self.token = token
        self.request_timeout = request_timeout
        self.jitter = jitter
        self.files = files
        self.port: int | None = None
        self.lease: wire.Registered | None = None
        # The relay's renew interval, kept after the lease is lost: it caps
        # the retry backoff for as long as the relay stays down.
        self.renew_interval: float | None = None
        self.failures = 0
        self._timer: IDelayedCall | None = None
        self._in_flight: Deferred | None = None
        self._registered_waiters: list[Deferred[wire.Registered]] = []

    def startService(self) -> None:
        super().startService()
        d = self.listening.when_listening()
        d.addCallbacks(self._start, self._not_listening)

    def _not_listening(self, failure: Failure) -> None:
        # The listening service logs the cause; just say why we stay quiet.
        self.log.error(
            "not announcing: the file server is not listening ({error})",
            error=describe(failure),
        )

    def _start(self, port) -> None:
        self.port = port.getHost().port
        if self.running and self._timer is None and self._in_flight is None:
            self._register()

    def when_registered(self) -> Deferred[wire.Registered]:
        """Fires with the next successful registration (or the current one)."""
        if self.lease is not None:
            return succeed(self.lease)
        d: Deferred[wire.Registered] = Deferred()
        self._registered_waiters.append(d)
        return d

    # Whether the names changed since the filter sent last was built.
    _files_changed = False

    def _register(self) -> None:
        self._timer = None
        self._files_changed = False
        d = maybeDeferred(self.files) if self.files is not None else succeed(None)
        d.addErrback(self._no_filter)
        d.addCallback(self._send_register)
        self._in_flight = d
        d.addCallback(lambda lines: wire.Registered.from_line(lines[0]))
        d.addCallbacks(self._registered, self._failed)
        d.addErrback(self._bug)
        d.addBoth(self._done)

    def _no_filter(self, failure: Failure) -> None:
        # An unreadable share must not stop the lease: register without a
        # filter (clients then find us by trying every peer).
        if failure.check(OSError):
            self.log.warn(
                "cannot list the share for the relay: {error}", error=failure.value
            )
        else:
            self.log.failure("cannot build the share's name filter", failure)
        return None

    def _send_register(self, files: str | None) -> Deferred[list[bytes]]:
        assert self.port is not None
        request = wire.Register(
            self.port, self.display_name, token=self.token, files=files
        )
        return request_lines(
            self.relay,
            "relay",
            request.to_line(),
            self.clock,
            timeout=self.request_timeout,
        )

    def _done(self, _: object) -> None:
        self._in_flight = None

    def _bug(self, failure: Failure) -> None:
        # Never let an unexpected error end the renewals silently.
        self.log.failure("unexpected error while registering", failure)
        self._schedule(self.renew_interval or DEFAULT_MAX_RETRY_SECONDS)

    def _registered(self, reply: wire.Registered) -> None:
        first = self.lease is None
        self.lease = reply
        self.renew_interval = reply.renew
        self.failures = 0
        if first:
            self.log.info(
                "registered at the relay as {peer_id} "
                "(at {relay}, seen as {observed}, lease {ttl}s)",
                peer_id=reply.peer_id,
                relay=self.relay_text,
                observed=reply.observed,
                ttl=reply.ttl,
            )
        else:
            self.log.debug(
                "lease renewed for {ttl}s at {relay}",
                ttl=reply.ttl,
                relay=self.relay_text,
            )
        waiters, self._registered_waiters = self._registered_waiters, []
        for waiter in waiters:
            waiter.callback(reply)
        # Renew a little early, by a random fraction of a tenth of the interval,
        # so that peers started together do not renew together.
        delay = reply.renew * (1 - 0.1 * self.jitter())
        if self._files_changed:
            delay = min(delay, FILTER_REFRESH_SECONDS)
        self._schedule(delay)

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return
        self.failures += 1
        cap = self.renew_interval or DEFAULT_MAX_RETRY_SECONDS
        delay = min(cap, FIRST_RETRY_SECONDS * 2 ** (self.failures - 1))
        delay *= 0.5 + 0.5 * self.jitter()
        if failure.check(wire.RemoteError) and failure.value.code == 429:
            # A relay that asks us to wait (its request budget, say) gets
            # at least the wait it asked for.
            asked = wire.retry_after(failure.value.message)
            if asked is not None:
                delay = max(delay, asked)
        self.lease = None
        if failure.check(wire.RemoteError) and failure.value.code == 401:
            # A configuration error, not an outage: say so louder.  Keep
            # retrying all the same (the relay's token may be changed).
            self.log.error(
                "the relay refused our token ({error}): check --token or "
                "${variable}; retrying in {delay:.1f}s (at {relay})",
                error=describe(failure),
                relay=self.relay_text,
                variable=wire.TOKEN_ENVIRONMENT_VARIABLE,
                delay=delay,
            )
        else:
            self.log.warn(
                "relay registration failed ({error}); retrying in {delay:.1f}s "
                "(at {relay})",
                error=describe(failure),
                relay=self.relay_text,
                delay=delay,
            )
        self._schedule(delay)

    def files_changed(self) -> None:
        """
        The share's names changed: renew within L{FILTER_REFRESH_SECONDS}
        (not at the next renewal, up to C{renew} seconds away) so that the
        relay suggests this peer for the files it just indexed.  Only while
        a lease is held; a failing relay keeps its backoff.
        """
        self._files_changed = True
        timer = self._timer
        if self.lease is None or timer is None or not timer.active():
            return  # the registration under way picks the change up
        if timer.getTime() - self.clock.seconds() > FILTER_REFRESH_SECONDS:
            timer.reset(FILTER_REFRESH_SECONDS)

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._timer = self.clock.callLater(delay, self._register)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._in_flight is not None:
            self._in_flight.cancel()
        waiters, self._registered_waiters = self._registered_waiters, []
        for waiter in waiters:
            waiter.errback(CancelledError("the peer stopped before registering"))
        if self.lease is None or self.port is None:
            return succeed(None)
        self.lease = None
        request = wire.Unregister(self.port, token=self.token)
        d = request_lines(
            self.relay,
            "relay",
            request.to_line(),
            self.clock,
            timeout=UNREGISTER_TIMEOUT_SECONDS,
        )
        d.addCallbacks(
            lambda _: self.log.info(
                "unregistered from the relay (at {relay})", relay=self.relay_text
            ),
            lambda f: self.log.warn(
                "could not unregister at {relay}: {error}",
                relay=self.relay_text,
                error=describe(f),
            ),
        )
        return d
