"""TLS and mutual-TLS credentials for the server and the client SDK (PEM files).

Files are checked when the credentials are built, so an operator's mistake (a missing file,
a key that does not belong to the certificate, an expired certificate) is one line at
startup instead of a handshake failure later. :func:`tls_failure` tells a TLS failure that no
retry fixes from a transient outage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from secagg.errors import ConfigurationError
from secagg.service.errors import TlsError

__all__ = ["ClientTls", "ServerTls", "certificate_not_after", "tls_failure"]


def _read(path: str | Path | None, what: str = "TLS file") -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None


def _need(path: str | Path, what: str) -> bytes:
    data = _read(path, what)
    assert data is not None
    if b"-----BEGIN" not in data:
        raise ConfigurationError(f"{what} {path} is not a PEM file")
    return data


def _spki(public_key: object) -> bytes:
    der: bytes = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _public_der(pem: bytes) -> bytes | None:
    """The DER SubjectPublicKeyInfo of a PEM certificate or private key (None: unreadable;
    gRPC then reports the file itself)."""
    try:
        if b"CERTIFICATE-----" in pem:
            return _spki(x509.load_pem_x509_certificate(pem).public_key())
        return _spki(serialization.load_pem_private_key(pem, password=None).public_key())
    except (ValueError, TypeError):
        return None


def certificate_not_after(pem: bytes) -> float | None:
    """The ``notAfter`` time (Unix seconds, RFC 5280 s4.1.2.5) of the first certificate in
    ``pem``, or ``None`` if it cannot be parsed."""
    try:
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class ServerTls:
    """Server certificate and key; ``client_ca`` turns on mutual TLS.

    With mutual TLS, ``bind_names`` requires a participant's certificate common name to be
    its enrolled name, so a stolen identity key is useless without the matching certificate.
    """

    cert: str | Path
    key: str | Path
    client_ca: str | Path | None = None
    bind_names: bool = True

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def check(self, now: float | None = None) -> list[str]:
        """Read and check the files; returns warnings (an expired certificate).

        Raises
        ------
        ConfigurationError
            A file is missing or not PEM, or the key does not belong to the certificate.
        """
        cert = _need(self.cert, "server certificate")
        key = _need(self.key, "server key")
        if self.client_ca is not None:
            _need(self.client_ca, "client CA")
        cert_pub, key_pub = _public_der(cert), _public_der(key)
        if cert_pub is not None and key_pub is not None and cert_pub != key_pub:
            raise ConfigurationError(
                f"the server key {self.key} does not belong to the certificate {self.cert}"
            )
        warnings = []
        not_after = certificate_not_after(cert)
        now = time.time() if now is None else now
        if not_after is not None and not_after < now:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after))
            warnings.append(
                f"the server certificate {self.cert} expired at {stamp}: clients will refuse it"
            )
        return warnings

    def credentials(self) -> grpc.ServerCredentials:
        self.check()
        pair = (_need(self.key, "server key"), _need(self.cert, "server certificate"))
        return grpc.ssl_server_credentials(
            [pair],
            root_certificates=_read(self.client_ca, "client CA"),
            require_client_auth=self.mutual,
        )


@dataclass(frozen=True)
class ClientTls:
    """Trust anchor for the server, and a client certificate for mutual TLS.

    ``server_name`` overrides the name checked in the server certificate (when the target
    is an address the certificate does not list).
    """

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ConfigurationError("a client certificate and its key go together (--cert/--key)")
        ca = None if self.ca is None else _need(self.ca, "CA certificate")
        cert = None if self.cert is None else _need(self.cert, "client certificate")
        key = None if self.key is None else _need(self.key, "client key")
        if cert is not None and key is not None:
            cert_pub, key_pub = _public_der(cert), _public_der(key)
            if cert_pub is not None and key_pub is not None and cert_pub != key_pub:
                raise ConfigurationError(
                    f"the client key {self.key} does not belong to the certificate {self.cert}"
                )
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def options(self) -> list[tuple[str, str]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


_TLS_MARKERS = (
    "handshake failed",
    "ssl_error",
    "certificate_verify_failed",
    "hostname verification",
    "certificate",
)


def tls_failure(err: grpc.RpcError, tls: ClientTls | None) -> TlsError | None:
    """A :class:`TlsError` if ``err`` is a TLS failure that retrying cannot fix, else None.

    gRPC reports every failed connection as ``UNAVAILABLE``. A failed handshake names
    itself in the details (an untrusted CA, an expired certificate, a wrong server name);
    a server that refuses the client's certificate (mutual TLS) just closes the socket during
    the handshake, which over TLS is not what an outage looks like (that is "connection
    refused" or a timeout), so it is reported at once too.
    """
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    details = err.details() or ""
    low = details.lower()
    if "failed to connect" not in low:
        return None
    reason = details.rsplit(": ", 1)[-1] if ": " in details else details
    if any(m in low for m in _TLS_MARKERS):
        tail = details.split("last error: ", 1)[-1]
        return TlsError(f"TLS handshake with the server failed: {tail}")
    if tls is not None and "socket closed" in low:
        who = (
            "refuses this client certificate (is it from the server's client CA?)"
            if tls.cert is not None
            else "requires a client certificate (mutual TLS: give --cert/--key)"
        )
        return TlsError(
            f"the server closed the connection during the TLS handshake ({reason}): it {who}, "
            "or does not speak TLS"
        )
    return None
