"""Interfaces that decouple the protocols from their state."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRegistry(Interface):
    """The relay's table of peer leases.

    The relay protocol talks only to this interface, so a shared store (for
    several relays) can replace the in-memory table without touching it.
    Times are seconds on the relay's clock; the registry never reads a clock
    itself.
    """

    def register(host, port, name, now, files=None):
        """
        Create or renew the lease of the peer listening at C{host}:C{port}.

        C{files} is the peer's announced name filter (256 raw bytes, see
        L{p2p.hints}) or C{None}; a renewal replaces the one held.

        :return: the L{p2p.registry.Lease} now in force.
        :raise p2p.registry.RegistryFull: when a limit forbids a new lease.
        """

    def unregister(host, port):
        """
        End the lease of C{host}:C{port} at once.

        :return: the ended lease, or C{None} if there was none.
        """

    def expire(now):
        """
        End every lease whose time is up.

        Cost is proportional to the number of leases that expire, not to the
        size of the table.

        :return: the list of expired leases.
        """

    def active(now, limit):
        """
        :return: at most C{limit} unexpired leases, in listing order (as
            L{page}).
        """

    def page(now, after, limit, files=False):
        """
        A page of the unexpired leases in listing order, starting after the
        lease whose C{seq} is C{after} (0: from the start): verified leases
        first, each tier by listing key (L{p2p.registry.listing_key}: every
        network's first lease, then every network's second, and so on).
        The registry keeps no state per caller: C{after} says where to
        resume.  A lease registered after C{after} was taken appears on a
        later page if its key is larger; an expired or unregistered one on
        no page.  With C{files}, each
        lease carries its name filter (``PEERS files=1``); without, a store
        may leave the filters out.

        Cost must not grow with the size of the table beyond O(log n).

        :return: C{(leases, more)}: at most C{limit} leases, and whether
            further leases follow the last of them.
        """

    def likely_holders(now, hint, limit, scan):
        """
        The unexpired leases whose announced filter may hold the name whose
        hint is C{hint} (L{p2p.hints.name_hint}): at most C{limit} of them,
        found among the first C{scan} leases in listing order (as L{page};
        so the cost is O(scan) whatever the size of the table), the first
        two of each network before any network's third.  Leases without a
        filter never match.

        :return: a list of leases.
        """

    def __len__():
        """The number of leases held (expired ones may linger until expire)."""


class ISharedRegistry(IRegistry):
    """A lease table kept outside the relay (Redis), shared by several relays.

    The methods of L{IRegistry} take the same arguments and mean the same,
    but C{register}, C{unregister}, C{expire}, C{active}, C{page},
    C{likely_holders} and C{mark_verified} return Deferreds, each costing
    one round trip to the store, which fail with
    L{p2p.registry.RegistryUnavailable} when it does not answer in time.
    Every such call also ends the leases due by its C{now} and reports them
    to the callback given to L{report_expired_to}; the relay logs them.
    C{len()} is the table size the store reported last.  C{page} takes a
    keyword C{files}: only with C{files=True} do its leases carry their
    name filters (a memory registry's always do).
    """

    def report_expired_to(callback):
        """Call C{callback(leases)} with the leases each call ended."""

    def find(host, port):
        """
        This relay's own record of the lease of C{host}:C{port} (an object
        with C{expires}), without asking the store: the relay decides how
        to charge a request before its one round trip.
        """

    def holds(host):
        """Whether C{host} holds a lease this relay granted or renewed."""

    def holds_verified(host):
        """
        Whether C{host} holds a lease this relay granted or renewed whose
        peer answered a dial-back: what earns a place in the connection
        reserve (an unverified lease costs one line to get).
        """

    def position(lease):
        """The cursor of C{lease} in a listing (see L{IRegistry.page})."""

    def mark_verified(host, port):
        """
        The peer at C{host}:C{port} answered the relay's dial-back: list its
        lease with the verified ones.  Fires with the lease, or C{None}.
        """


class ILease(Interface):
    """One peer's registration."""

    peer_id = Attribute("Stable id derived from the peer's address.")
    host = Attribute("The address the relay observed (or a trusted claim).")
    port = Attribute("The port the peer serves on.")
    name = Attribute("Optional display name, or None.")
    seq = Attribute(
        "Listing key (p2p.registry.listing_key): a positive int, the lease's "
        "round above its registration number, never reused by the same "
        "registry (the paging position)."
    )
    registered = Attribute("When the lease was first granted.")
    renewed = Attribute("When the lease was last renewed.")
    expires = Attribute("When the lease ends unless renewed.")
    files = Attribute(
        "The announced name filter (256 raw bytes, see p2p.hints), or None."
    )


class IFetchObserver(Interface):
    """
    Hears what a L{p2p.session.ClientSession} does while it fetches a name,
    as it happens; the command line shows it (lines on stderr, a progress
    bar).  Every C{name} is the exact name (or ROOT) asked for, never
    escaped: showing it safely is the observer's business (L{p2p.text}).
    The outcome itself is the L{p2p.session.GetResult} the fetch fires
    with.
    """

    def listed(name, relay, peers, suggested):
        """
        The relay listed C{peers} active peers (a count) and, by name,
        suggested C{suggested} of them for C{name} (C{None} for a ROOT:
        hints are by name).
        """

    def no_suggestion(relay, reason):
        """The relay could not say which peers may hold a name (C{reason});
        the fetch goes on without a suggestion."""

    def question_failed(name, peer, reason, seconds):
        """C{peer} (a L{p2p.wire.PeerEntry}) could not say which content it
        holds under C{name}: C{reason}, after C{seconds}."""

    def disagreement(name, choice):
        """The holders asked offer different contents under C{name}; the
        L{p2p.choice.Choice} says which and what was taken."""

    def waiting_for_reader(name, path):
        """The ``-o`` target is a FIFO nobody reads yet: waiting for one."""

    def skipped(name, attempt):
        """An L{p2p.fetch.Attempt} at C{name} failed; the next goes on."""

    def indexing(name, peer, progress):
        """C{peer} is still indexing C{name} (a L{p2p.wire.Indexing})."""

    def found(name, attempt):
        """A peer's header for C{name} came (an L{p2p.fetch.Attempt} whose
        C{seconds} is the time to it); its bytes follow."""

    def serving(name, peers):
        """The peers (L{p2p.wire.PeerEntry}) now sending C{name}'s pieces."""

    def progress(name, received, total):
        """C{received} of C{total} bytes of C{name} are verified and stored
        (pieces kept from an earlier run included)."""

    def dropped(name, report):
        """A holder was stopped being used (a L{p2p.swarm.SourceReport})."""
