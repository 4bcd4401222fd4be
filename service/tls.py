"""TLS and mutual-TLS credentials for the server and the client SDK (PEM files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["ClientTls", "ServerTls"]


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


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

    def credentials(self) -> grpc.ServerCredentials:
        pair = (Path(self.key).read_bytes(), Path(self.cert).read_bytes())
        return grpc.ssl_server_credentials(
            [pair], root_certificates=_read(self.client_ca), require_client_auth=self.mutual
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
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca),
            private_key=_read(self.key),
            certificate_chain=_read(self.cert),
        )

    def options(self) -> list[tuple[str, str]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []
