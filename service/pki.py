"""X.509 for provisioning: a federation CA, the server's certificate, mTLS client certificates.

Made with ``cryptography`` (never hand-rolled): ECDSA P-256 keys, SHA-256 signatures, a CA
limited to path length 0, server certificates with the names clients dial as
subjectAltName (RFC 5280 s4.2.1.6; gRPC checks those, not the common name) and
``serverAuth``, client certificates whose common name is the site or operator name (the
server binds it to the enrolled name) and ``clientAuth``.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secagg.errors import ConfigurationError

__all__ = ["DEFAULT_DAYS", "Issued", "issue", "make_ca"]

DEFAULT_DAYS = 825
"""Certificate lifetime in days (the CA/Browser Forum's former ceiling for leaf certificates)."""


@dataclass(frozen=True)
class Issued:
    """A private key and its certificate, both PEM (the key unencrypted: write it 0600)."""

    key_pem: bytes
    cert_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .serial_number(secrets.randbits(159) | 1)  # RFC 5280 s4.1.2.2: positive, <= 20 bytes
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(federation: str, *, days: int = DEFAULT_DAYS) -> Issued:
    """A self-signed CA for ``federation`` (signs every server and client certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"secagg {federation} CA")
    cert = (
        _builder(name, name, days)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


def issue(
    ca: Issued,
    common_name: str,
    *,
    server_names: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
) -> Issued:
    """A certificate signed by ``ca``: a server's (``server_names`` given) or a client's."""
    try:
        ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    except ValueError as exc:
        raise ConfigurationError(f"unreadable CA key or certificate: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(_name(common_name), ca_cert.subject, days)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(_san(server_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))
