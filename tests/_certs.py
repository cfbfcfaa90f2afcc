"""
Throwaway certificates for the TLS tests (not a test module).

Everything is generated on the fly with ``cryptography`` into a temporary
folder: a CA, certificates it signs, and self-signed ones nobody trusts.  No
private key is ever committed.  Keys are ECDSA P-256: generating one takes
microseconds, where an RSA key takes tens of milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2p.endpoints import escape

# Wide margins: a test machine's clock may be a little off.
VALIDITY = datetime.timedelta(days=2)
CLOCK_SKEW = datetime.timedelta(hours=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: str, data: bytes, mode: int = 0o644) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    return path


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Credentials:
    """A certificate and its private key, as PEM files."""

    certificate: str
    key: str

    def listen(self, interface: str = "127.0.0.1", port: int = 0) -> str:
        """An ``ssl:`` server endpoint description serving this certificate."""
        return (
            f"ssl:{port}:interface={escape(interface)}"
            f":privateKey={escape(self.key)}:certKey={escape(self.certificate)}"
        )


def _leaf(
    subject: str,
    public_key,
    issuer: x509.Name,
    signing_key: ec.EllipticCurvePrivateKey,
    ips: Sequence[str],
    dns: Sequence[str],
    expired: bool,
    authority_key: ec.EllipticCurvePublicKey,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        start, end = now - 2 * VALIDITY, now - VALIDITY
    else:
        start, end = now - CLOCK_SKEW, now + VALIDITY
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority_key), False
        )
    )
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips
    ]
    names += [x509.DNSName(name) for name in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(signing_key, hashes.SHA256())


class Authority:
    """
    A throwaway certificate authority living in C{directory}.

    :ivar certificate: path of the CA certificate (``ca.pem``), what a client
        is told to trust with ``p2p --peer-ca``.
    :ivar trust_dir: a folder holding only that certificate, for the
        ``trustRoots=`` argument of a ``tls:`` endpoint (Twisted loads every
        ``*.pem`` file of a folder there).
    """

    def __init__(self, directory: str, name: str = "p2p test CA") -> None:
        self.directory = directory
        self._key = _key()
        self.name = _name(name)
        now = datetime.datetime.now(datetime.UTC)
        public_key = self._key.public_key()
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .sign(self._key, hashes.SHA256())
        )
        os.makedirs(directory, exist_ok=True)
        self.certificate = _write(
            os.path.join(directory, "ca.pem"), _pem(self._certificate)
        )
        self.trust_dir = os.path.join(directory, "trust")
        os.mkdir(self.trust_dir)
        _write(os.path.join(self.trust_dir, "ca.pem"), _pem(self._certificate))

    def issue(
        self,
        label: str,
        ips: Sequence[str] = (),
        dns: Sequence[str] = (),
        common_name: str | None = None,
        expired: bool = False,
    ) -> Credentials:
        """
        A server certificate signed by this CA, with subjectAltName entries
        for C{ips} and C{dns} (none at all when both are empty).
        """
        key = _key()
        certificate = _leaf(
            common_name or label,
            key.public_key(),
            self.name,
            self._key,
            ips,
            dns,
            expired,
            self._key.public_key(),
        )
        return _save(self.directory, label, certificate, key)


def self_signed(
    directory: str, label: str, ips: Sequence[str] = ("127.0.0.1",)
) -> Credentials:
    """A certificate that signs itself: no client trusts it."""
    key = _key()
    certificate = _leaf(
        label,
        key.public_key(),
        _name(label),
        key,
        ips,
        (),
        False,
        key.public_key(),
    )
    return _save(directory, label, certificate, key)


def _save(
    directory: str, label: str, certificate: x509.Certificate, key
) -> Credentials:
    os.makedirs(directory, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Credentials(
        certificate=_write(os.path.join(directory, f"{label}.pem"), _pem(certificate)),
        key=_write(os.path.join(directory, f"{label}.key"), key_pem, 0o600),
    )
