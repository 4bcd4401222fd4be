"""Call authentication: Ed25519-signed call metadata for participants, a token for operators.

A participant signs every call (unary or stream) with its enrolled identity key::

    payload = "secagg/v1/call" 0x00 || method || 0x00 || round_id (16 bytes, zero if none)
              || identity public key (32) || timestamp ms (u64 BE) || nonce (16)

and sends ``secagg-key``, ``secagg-round``, ``secagg-ts``, ``secagg-nonce`` and
``secagg-sig`` (hex) as metadata. The server accepts a call only if the key is enrolled and
not revoked, the signature verifies, the timestamp is within ``skew`` seconds of its clock,
and the nonce was not seen in that window: a captured call cannot be replayed, moved to
another method or round, or made on behalf of another key. The round id is part of the
signed bytes, so the client id a call acts for is the one the server assigned to that key.
With mutual TLS the certificate is bound too: its common name must be the participant name.
"""

from __future__ import annotations

import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from secagg.errors import InvalidSignature
from secagg.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, IdentityKey, constant_time_equal
from secagg.keys import verify_signature as _verify
from secagg.params import ROUND_ID_BYTES
from secagg.service.errors import PermissionDenied, Unauthenticated
from secagg.service.store import ParticipantRecord, Store

__all__ = [
    "NONCE_BYTES",
    "CallVerifier",
    "admin_metadata",
    "call_metadata",
    "call_payload",
    "check_admin",
]

NONCE_BYTES = 16
DEFAULT_SKEW = 120.0
"""Seconds a call's timestamp may differ from the server clock."""
MAX_NONCES = 1 << 20
"""Replay cache bound; when full, the oldest nonces go first (they expire soonest)."""

_KEY, _ROUND, _TS, _NONCE, _SIG = (
    "secagg-key",
    "secagg-round",
    "secagg-ts",
    "secagg-nonce",
    "secagg-sig",
)


def call_payload(
    method: str, round_id: bytes, public_key: bytes, ts_ms: int, nonce: bytes
) -> bytes:
    """The bytes a participant signs for one call."""
    return (
        b"secagg/v1/call\0"
        + method.encode()
        + b"\0"
        + round_id
        + public_key
        + struct.pack(">Q", ts_ms)
        + nonce
    )


def call_metadata(
    identity: IdentityKey, method: str, round_id: bytes = bytes(ROUND_ID_BYTES)
) -> list[tuple[str, str]]:
    """Signed metadata for one call by ``identity`` (a fresh nonce and timestamp)."""
    ts_ms = int(time.time() * 1000)
    nonce = secrets.token_bytes(NONCE_BYTES)
    sig = identity.sign(call_payload(method, round_id, identity.public, ts_ms, nonce))
    return [
        (_KEY, identity.public.hex()),
        (_ROUND, round_id.hex()),
        (_TS, str(ts_ms)),
        (_NONCE, nonce.hex()),
        (_SIG, sig.hex()),
    ]


def admin_metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@dataclass(frozen=True)
class Caller:
    """An authenticated participant call."""

    participant: ParticipantRecord
    round_id: bytes


def _md(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in metadata or ():
        out[k.lower()] = v.decode("latin-1") if isinstance(v, bytes) else v
    return out


def _hex(md: Mapping[str, str], key: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(md[key])
    except (KeyError, ValueError):
        raise Unauthenticated(f"missing or malformed {key} metadata") from None
    if len(raw) != size:
        raise Unauthenticated(f"{key} must be {size} bytes")
    return raw


class CallVerifier:
    """Checks participant call metadata against the store (one per server)."""

    def __init__(
        self,
        store: Store,
        *,
        skew: float = DEFAULT_SKEW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._skew = skew
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def verify(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        method: str,
        *,
        peer_common_name: str | None = None,
        require_cert_binding: bool = False,
    ) -> Caller:
        """Authenticate one call.

        Raises
        ------
        Unauthenticated
            Missing or malformed credentials, unknown identity, bad signature, a timestamp
            outside the window, or a replayed nonce.
        PermissionDenied
            A revoked identity, or a client certificate issued to someone else.
        """
        md = _md(metadata)
        key = _hex(md, _KEY, PUBLIC_KEY_BYTES)
        round_id = _hex(md, _ROUND, ROUND_ID_BYTES)
        nonce = _hex(md, _NONCE, NONCE_BYTES)
        sig = _hex(md, _SIG, SIGNATURE_BYTES)
        try:
            ts_ms = int(md[_TS])
        except (KeyError, ValueError):
            raise Unauthenticated("missing or malformed secagg-ts metadata") from None
        participant = self._store.participant_by_key(key)
        if participant is None:
            raise Unauthenticated("this identity key is not enrolled")
        try:
            _verify(key, call_payload(method, round_id, key, ts_ms, nonce), sig)
        except InvalidSignature:
            raise Unauthenticated("call signature does not verify") from None
        if participant.revoked:
            raise PermissionDenied(f"participant {participant.name!r} is revoked")
        now = self._clock()
        if abs(ts_ms / 1000.0 - now) > self._skew:
            raise Unauthenticated("call timestamp outside the accepted window (clock skew?)")
        if require_cert_binding and peer_common_name != participant.name:
            raise PermissionDenied(
                f"the client certificate is not issued to participant {participant.name!r}"
            )
        self._remember(nonce, now)
        return Caller(participant, round_id)

    def _remember(self, nonce: bytes, now: float) -> None:
        with self._lock:
            if nonce in self._seen:
                raise Unauthenticated("replayed call (nonce already used)")
            horizon = now - 2 * self._skew
            while self._seen and (
                next(iter(self._seen.values())) < horizon or len(self._seen) >= MAX_NONCES
            ):
                self._seen.popitem(last=False)
            self._seen[nonce] = now


def check_admin(metadata: Iterable[tuple[str, str | bytes]] | None, token: str | None) -> None:
    """Require ``authorization: Bearer <token>``; the admin API is off without a token."""
    if not token:
        raise PermissionDenied("the admin API is disabled (no admin token configured)")
    given = _md(metadata).get("authorization", "")
    if not given.startswith("Bearer ") or not constant_time_equal(
        given[7:].encode(), token.encode()
    ):
        raise Unauthenticated("missing or wrong admin token")
