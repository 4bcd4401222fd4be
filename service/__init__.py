"""The secagg gRPC service: server, client SDK, store, audit log and CLI.

``from secagg.service import Client`` is the SDK entry point; the names below are imported
lazily so that ``secagg simulate`` (in process) does not load gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secagg.service.client import Aggregate, Client, Policy, RetryPolicy
    from secagg.service.tls import ClientTls, ServerTls

__all__ = ["Aggregate", "Client", "ClientTls", "Policy", "RetryPolicy", "ServerTls"]

_HOME = {
    "Aggregate": "secagg.service.client",
    "Client": "secagg.service.client",
    "Policy": "secagg.service.client",
    "RetryPolicy": "secagg.service.client",
    "ClientTls": "secagg.service.tls",
    "ServerTls": "secagg.service.tls",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'secagg.service' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
