"""The relays a client may ask, in order: the first that answers is used.

``p2p --relay A --relay B`` asks A; only when A cannot be reached or fails
(any of L{p2p.errors.RELAY_FAILURES}) is B asked, and so on: a chain of
Deferreds whose errbacks move to the next relay.  A bug is not a relay
failure and propagates.  The relay that answered is remembered, so the
requests that follow from its answer (the name hints for a listing it
gave) go to it, and a paged listing never mixes relays (cursors are one
relay's own: L{p2p.client.list_peers} pages on the endpoint it is given).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

from p2p.endpoints import client_endpoint
from p2p.errors import RELAY_FAILURES, FailureKind, PeerFailed, describe

T = TypeVar("T")


@dataclass(frozen=True)
class RelayFailure:
    """One relay that could not answer, and why (one short line)."""

    relay: str
    reason: str


def reasons(failures: Sequence[RelayFailure]) -> str:
    """``A: cannot connect: ...; B: timed out``."""
    return "; ".join(f"{failure.relay}: {failure.reason}" for failure in failures)


class RelaysFailed(PeerFailed):
    """Every one of several relays failed; C{failures} says why, in order.

    A L{PeerFailed} (so one of L{p2p.errors.RELAY_FAILURES}): whoever
    handles a relay that cannot answer handles this too."""

    def __init__(self, failures: Sequence[RelayFailure]) -> None:
        super().__init__(reasons(failures), FailureKind.UNREACHABLE)
        self.failures = list(failures)


class RelayList:
    """
    The relays to ask, in order, and which one answered last.

    :param reactor: for the endpoints.
    :param relays: relay descriptions as typed (endpoint strings or
        ``HOST:PORT``); at least one.
    :raise ValueError: for an unusable description (it names which).
    """

    def __init__(self, reactor, relays: Sequence[str]) -> None:
        if not relays:
            raise ValueError("no relay to ask")
        self.texts = list(relays)
        self.endpoints = [client_endpoint(reactor, text) for text in self.texts]
        # The index of the relay whose answer is in use (None: none yet, or
        # every relay failed the last time).
        self.answered: int | None = None
        # Why the relays before it (or all of them) failed, the last time.
        self.failures: list[RelayFailure] = []

    @property
    def several(self) -> bool:
        return len(self.texts) > 1

    @property
    def text(self) -> str:
        """The relay in use; before any answered, the list asked."""
        if self.answered is not None:
            return self.texts[self.answered]
        return ", ".join(self.texts)

    @property
    def endpoint(self) -> IStreamClientEndpoint | None:
        """The endpoint of the relay that answered, if one did."""
        return None if self.answered is None else self.endpoints[self.answered]

    def first_answer(
        self, ask: Callable[[IStreamClientEndpoint], Deferred[T]]
    ) -> Deferred[T]:
        """
        C{ask(relay)} of each relay in turn until one fires with a result,
        which is the result.  With one relay its failure is the failure;
        with several, L{RelaysFailed} lists each relay's.
        """
        failures: list[RelayFailure] = []

        def attempt(index: int) -> Deferred[T]:
            d = maybeDeferred(ask, self.endpoints[index])
            d.addCallbacks(
                answered, failed, callbackArgs=(index,), errbackArgs=(index,)
            )
            return d

        def answered(result: T, index: int) -> T:
            self.answered, self.failures = index, failures
            return result

        def failed(failure: Failure, index: int) -> Deferred[T] | Failure:
            failure.trap(*RELAY_FAILURES)
            failures.append(RelayFailure(self.texts[index], describe(failure)))
            if index + 1 < len(self.endpoints):
                return attempt(index + 1)
            self.answered, self.failures = None, failures
            if not self.several:
                return failure
            return Failure(RelaysFailed(failures))

        return attempt(0)


class RelayObserver:
    """
    Hears which relay answered, and what became of the peer cache
    (L{p2p.relay_cache}).  This base class ignores everything; the ``p2p``
    command prints it.
    """

    def answered(self, relay: str, failures: list[RelayFailure]) -> None:
        """C{relay} answered, after C{failures} (of the relays before it);
        said only when several relays are configured."""

    def using_cache(self, age: float, failures: list[RelayFailure]) -> None:
        """Every relay failed: the peers cached C{age} seconds ago are used."""

    def cache_problem(self, problem: str) -> None:
        """The cache could not be read (and is ignored) or written."""
