"""TLS for the client: endpoints that reach peers only after checking them.

The relay and the peers listen on ``ssl:`` endpoints; a client reaches the
relay through a ``tls:`` endpoint string and the peers through the endpoints
L{peer_endpoint_for} builds.  The relay lists peers by IP address, so a
peer's certificate must carry that address in a subjectAltName ``IP`` entry
and be signed by a CA the client trusts.  See ``docs/tls.rst``.

L{VerifiedTLSEndpoint} stands between a TLS endpoint and the application:

* its C{connect} fires only once the handshake is complete and the
  certificate was checked, so a caller's connect timeout covers the
  handshake too, and a rejected certificate fails the connection attempt
  with L{TLSFailed} and its reason instead of a bare "connection closed";
* it checks the certificate once more, failing closed.  Twisted 26.10
  ignores (only logs) any error from service_identity other than a name
  mismatch, so a CA-signed certificate *without* subjectAltName, or with a
  malformed one (``DNS:127.0.0.1``), is accepted for any host at all.
"""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from service_identity.cryptography import (
    extract_patterns,
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from service_identity.exceptions import VerificationError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import wire
from p2p.endpoints import EndpointFor, peer_endpoint

if TYPE_CHECKING:
    # Public in Twisted's documentation, but only defined in a private module.
    from twisted.internet._sslverify import IOpenSSLTrustRoot


class TLSFailed(ConnectError):
    """
    The TLS handshake failed, or the server's certificate was refused.

    A L{ConnectError}, so a client skips such a peer like one that refused
    the connection; C{reason} is one line for humans.
    """

    def __init__(self, reason: str) -> None:
        # p2p.errors.describe shows osError: "cannot connect: <reason>".
        super().__init__(osError=reason)
        self.reason = reason


def load_trust_root(path: str) -> IOpenSSLTrustRoot:
    """
    Trust the CA certificates in C{path}: a PEM file (every certificate in
    it), or a folder (every certificate in its ``*.pem`` files, as the
    ``trustRoots=`` argument of a ``tls:`` endpoint reads it).

    :raise ValueError: with a readable message when C{path} cannot be read or
        holds no certificate.  (Twisted's own ``trustRoots=`` silently trusts
        nothing in that case, so every connection fails.)
    """
    folder = os.path.isdir(path)
    if folder:
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*.pem")))
    else:
        files = [path]
    certificates: list[Certificate] = []
    for name in files:
        try:
            with open(name, "rb") as stream:
                data = stream.read()
        except OSError as e:
            raise ValueError(f"cannot read {name}: {e.strerror or e}") from None
        try:
            found = x509.load_pem_x509_certificates(data)
        except ValueError:
            if not folder:
                raise ValueError(f"{path}: not a PEM certificate file") from None
            continue  # a folder may hold other PEM files (keys)
        certificates.extend(
            Certificate.loadPEM(certificate.public_bytes(Encoding.PEM))
            for certificate in found
        )
    if not certificates:
        raise ValueError(f"{path}: no PEM certificate found")
    return trustRootFromCertificates(certificates)


def check_certificate(certificate: x509.Certificate, host: str | None) -> None:
    """
    Fail closed unless C{certificate} names C{host} in its subjectAltName: an
    ``IP`` entry for an address, a ``DNS`` entry for a name.  With C{host}
    None, only require well-formed, non-empty subjectAltNames: then
    Twisted's own check of the host it connected to is reliable.

    Signature and validity dates are OpenSSL's business, during the handshake.

    :raise TLSFailed: saying why.
    """
    # Any error at all means "not verified": this is the check that must not
    # fail open the way Twisted's verify callback does.
    try:
        patterns = extract_patterns(certificate)
    except Exception as e:
        raise TLSFailed(f"TLS: unusable certificate subjectAltName: {e}") from None
    if not patterns:
        raise TLSFailed("TLS: the certificate has no subjectAltName")
    if host is None:
        return
    try:
        if isIPAddress(host) or isIPv6Address(host):
            verify_certificate_ip_address(certificate, host)
        else:
            verify_certificate_hostname(certificate, host)
    except Exception:
        raise TLSFailed(f"TLS: the certificate is not for {host}") from None


def _handshake_failure(reason: Failure) -> TLSFailed:
    """Turn the reason a TLS connection was lost early into one readable line."""
    error = reason.value
    if isinstance(error, TLSFailed):
        return error
    if isinstance(error, VerificationError):
        # Twisted's check: the certificate names other hosts.
        hosts = []
        for mismatch in error.errors:
            wanted = mismatch.mismatched_id
            name = getattr(wanted, "ip", None) or getattr(wanted, "hostname", b"")
            hosts.append(name.decode() if isinstance(name, bytes) else str(name))
        return TLSFailed(f"TLS: the certificate is not for {', '.join(hosts)}")
    if isinstance(error, SSL.Error):
        # args[0] is OpenSSL's error queue: (library, function, reason) tuples.
        queue = error.args[0] if error.args and isinstance(error.args[0], list) else []
        reasons = [entry[-1] for entry in queue if entry and entry[-1]]
        text = "; ".join(reasons) or str(error) or "TLS error"
        if "certificate verify failed" in text:
            text += " (not signed by a trusted CA, expired or not yet valid)"
        return TLSFailed(f"TLS handshake failed: {text}")
    if isinstance(error, ConnectionClosed):
        return TLSFailed("TLS handshake failed: the connection closed")
    return TLSFailed(f"TLS handshake failed: {error}")


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    """
    The TLS layer's application protocol until the handshake is over.

    Once the certificate passed L{check_certificate}, it builds the real
    protocol, connects it to the TLS transport and forwards it the rest of
    the connection's events; before that, no byte reaches the real protocol.
    """

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt
        self.protocol: IProtocol | None = None
        self.failure: Failure | None = None

    def handshakeCompleted(self) -> None:
        attempt = self.attempt
        if self.protocol is not None or attempt.ready.called:
            return
        try:
            certificate = self.transport.getPeerCertificate()
            if certificate is None:
                raise TLSFailed("TLS: the server sent no certificate")
            check_certificate(certificate.to_cryptography(), attempt.host)
        except TLSFailed as e:
            self.failure = Failure(e)
            self.transport.abortConnection()
            return
        protocol = attempt.factory.buildProtocol(self.transport.getPeer())
        if protocol is None:
            self.failure = Failure(ConnectError("the protocol factory declined"))
            self.transport.abortConnection()
            return
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        attempt.ready.callback(protocol)

    def dataReceived(self, data: bytes) -> None:
        # The TLS layer delivers application data only after the handshake.
        if self.protocol is not None:
            self.protocol.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.protocol is not None:
            self.protocol.connectionLost(reason)
            return
        if not self.attempt.ready.called:
            # Our own refusal, else whatever ended the handshake.
            failure = self.failure or Failure(_handshake_failure(reason))
            self.attempt.ready.errback(failure)


class _Attempt(Factory):
    """One C{connect} of a L{VerifiedTLSEndpoint}; builds its L{_Handshake}."""

    noisy = False

    def __init__(self, factory: IProtocolFactory, host: str | None) -> None:
        self.factory = factory
        self.host = host
        self.handshake: _Handshake | None = None
        self.connecting: Deferred | None = None
        self.cancelled = False
        self.ready: Deferred[IProtocol] = Deferred(self._cancel)

    def buildProtocol(self, addr) -> _Handshake:
        self.handshake = _Handshake(self)
        return self.handshake

    def _cancel(self, _: Deferred) -> None:
        # Without a callback from here, Deferred.cancel fails ready with
        # CancelledError, which addTimeout turns into a TimeoutError.
        self.cancelled = True
        handshake = self.handshake
        if handshake is not None and handshake.transport is not None:
            handshake.transport.abortConnection()
        elif self.connecting is not None:
            self.connecting.cancel()

    def connect_failed(self, failure: Failure) -> None:
        if not self.cancelled and not self.ready.called:
            self.ready.errback(failure)


@implementer(IStreamClientEndpoint)
class VerifiedTLSEndpoint:
    """
    Wrap a TLS client endpoint (C{wrapClientTLS(...)}, or a ``tls:`` one from
    C{clientFromString}): C{connect} fires once the handshake completed and
    the certificate passed L{check_certificate} for C{host}.

    It fails with L{TLSFailed} when the handshake or the check fails, with
    the wrapped endpoint's error when the connection cannot be made, and,
    given a C{clock} and C{timeout}, with
    L{twisted.internet.defer.TimeoutError} when both together take longer
    than C{timeout} seconds.  Cancelling it aborts the attempt.

    Only for endpoints whose transport is TLS: over plain TCP there is no
    handshake and C{connect} would wait for one until cancelled.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        host: str | None,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.host = host
        self.clock = clock
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt = _Attempt(protocolFactory, self.host)
        # Fires with the _Handshake at TCP connection time; only its failure
        # matters here.
        attempt.connecting = self.endpoint.connect(attempt)
        attempt.connecting.addErrback(attempt.connect_failed)
        if self.clock is not None and self.timeout is not None:
            attempt.ready.addTimeout(self.timeout, self.clock)
        return attempt.ready


def checked_tls_endpoint(
    description: str, endpoint: IStreamClientEndpoint
) -> IStreamClientEndpoint:
    """
    Wrap C{endpoint}, parsed from C{description}, in a L{VerifiedTLSEndpoint}
    when C{description} is a ``tls:`` one; return any other unchanged.

    For the relay: closes the hole in Twisted's ``tls:`` endpoint (a
    certificate without, or with a malformed, subjectAltName is accepted for
    any host) and turns a refused certificate into a readable L{TLSFailed}.
    """
    if description.strip().split(":", 1)[0].lower() != "tls":
        return endpoint
    return VerifiedTLSEndpoint(endpoint, None)


def peer_endpoint_for(
    reactor,
    trust_root: str | IOpenSSLTrustRoot,
    connect_timeout: float,
) -> EndpointFor:
    """
    Endpoints that reach peers over TLS, for C{Fetcher(endpoint_for=...)}
    and for listing a peer's files.

    Each endpoint connects over TCP to the peer's address from the relay's
    list, then requires the peer's certificate to be signed by C{trust_root}
    and to name that address in a subjectAltName ``IP`` entry.  A peer that
    fails either check (or speaks plain TCP) is never sent a request: the
    connection fails with L{TLSFailed}, which a client treats as "skip this
    peer".  There is no fallback to plain TCP.

    :param reactor: provides TCP and time.
    :param trust_root: the CA certificate(s): a PEM file or a folder of
        ``*.pem`` files (see L{load_trust_root}), or a trust root object.
    :param connect_timeout: seconds for the TCP connection and the TLS
        handshake together.
    :raise ValueError: when C{trust_root} is a path that holds no certificate.
    """
    trust = load_trust_root(trust_root) if isinstance(trust_root, str) else trust_root

    def endpoint_for(peer: wire.PeerEntry) -> IStreamClientEndpoint:
        tcp = peer_endpoint(reactor, peer, connect_timeout)
        options = optionsForClientTLS(peer.host, trustRoot=trust)
        return VerifiedTLSEndpoint(
            wrapClientTLS(options, tcp), peer.host, reactor, connect_timeout
        )

    return endpoint_for
