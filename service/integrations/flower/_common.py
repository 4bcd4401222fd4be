"""What the strategy, the mod and the run-config reader share: Flower's modules, the
message and record names, and the digests both sides compute."""

from __future__ import annotations

import hashlib
import importlib
import logging
from typing import Any

import numpy as np

log = logging.getLogger("secagg.service.integrations.flower")


def _flwr(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "secagg.service.integrations.flower needs Flower: pip install 'secagg[flower]'"
        ) from exc


flwr_app = _flwr("flwr.app")
flwr_strategy = _flwr("flwr.serverapp.strategy")

IDENTITY_QUERY = "query.secagg_identity"
"""Message type the strategy sends to learn a node's identity key."""
ROUND_ID_KEY = "secagg-round-id"
"""Train-config entry carrying the secagg round id (hex)."""
SECAGG_RECORD = "secagg"
"""ConfigRecord of a reply: round id, aggregate digest, contributor count, identity key."""
ERROR_CODE = 2
"""``flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION``."""


def fingerprint(arrays: Any) -> str:
    """SHA-256 over an ArrayRecord's names, dtypes, shapes and bytes (replies that agree)."""
    h = hashlib.sha256()
    for key in arrays:
        a = np.ascontiguousarray(arrays[key].numpy())
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sums_digest(sums: np.ndarray[Any, Any]) -> str:
    """SHA-256 of the lane sums as little-endian uint64 (the server's ``aggregate_sha256``)."""
    return hashlib.sha256(np.asarray(sums).astype("<u8").tobytes()).hexdigest()


def flag(value: object) -> bool:
    """A boolean config value: TOML ``true`` or "true"/"1"/"yes"; anything else is false."""
    if isinstance(value, bool):
        return value
    return value is not None and str(value).strip().lower() in {"true", "1", "yes"}
