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

An operator signs every admin call the same way with its own Ed25519 key, under another
domain so that no participant call can pass for an admin call::

    payload = "secagg/v1/admin" 0x00 || method || 0x00 || operator name || 0x00
              || operator public key (32) || timestamp ms (u64 BE) || nonce (16)

sent as ``secagg-operator``, ``secagg-operator-key``, ``secagg-ts``, ``secagg-nonce`` and
``secagg-sig``. The server accepts it only from an operator in its store (``secagg operator
add``), not revoked, under the name the key was added with; the name goes into the audit
entry of the action. The shared bearer token (``SECAGG_ADMIN_TOKEN``) still works,
DEPRECATED: its calls are logged as operator ``admin-token``.
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
from secagg.service.store import OperatorRecord, ParticipantRecord, Store

__all__ = [
    "NONCE_BYTES",
    "TOKEN_OPERATOR",
    "AdminVerifier",
    "CallVerifier",
    "admin_call_metadata",
    "admin_call_payload",
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


TOKEN_OPERATOR = "admin-token"  # noqa: S105 (a name in the log, not a secret)
"""Operator named in the log for calls made with the shared (deprecated) admin token."""
_OP, _OP_KEY = "secagg-operator", "secagg-operator-key"


def admin_call_payload(
    method: str, operator: str, public_key: bytes, ts_ms: int, nonce: bytes
) -> bytes:
    """The bytes an operator signs for one admin call."""
    return (
        b"secagg/v1/admin\0"
        + method.encode()
        + b"\0"
        + operator.encode()
        + b"\0"
        + public_key
        + struct.pack(">Q", ts_ms)
        + nonce
    )


def admin_call_metadata(operator: str, key: IdentityKey, method: str) -> list[tuple[str, str]]:
    """Signed metadata for one admin call by operator ``operator`` holding ``key``."""
    ts_ms = int(time.time() * 1000)
    nonce = secrets.token_bytes(NONCE_BYTES)
    sig = key.sign(admin_call_payload(method, operator, key.public, ts_ms, nonce))
    return [
        (_OP, operator.encode().hex()),
        (_OP_KEY, key.public.hex()),
        (_TS, str(ts_ms)),
        (_NONCE, nonce.hex()),
        (_SIG, sig.hex()),
    ]


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


class _Replay:
    """Nonces seen within twice the accepted clock skew (a bounded replay cache)."""

    def __init__(self, skew: float) -> None:
        self._skew = skew
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, nonce: bytes, now: float) -> None:
        with self._lock:
            if nonce in self._seen:
                raise Unauthenticated("replayed call (nonce already used)")
            horizon = now - 2 * self._skew
            while self._seen and (
                next(iter(self._seen.values())) < horizon or len(self._seen) >= MAX_NONCES
            ):
                self._seen.popitem(last=False)
            self._seen[nonce] = now


class AdminVerifier:
    """Authenticates admin calls to an operator name (one per server).

    Parameters
    ----------
    store:
        Holds the operators (``secagg operator add``).
    token:
        The DEPRECATED shared admin token, or ``None``.
    """

    def __init__(
        self,
        store: Store,
        token: str | None,
        *,
        skew: float = DEFAULT_SKEW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._token = token
        self._skew = skew
        self._clock = clock
        self._replay = _Replay(skew)

    def verify(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        method: str,
        *,
        peer_common_name: str | None = None,
        require_cert_binding: bool = False,
    ) -> str:
        """The name of the operator making this call.

        Raises
        ------
        Unauthenticated
            Missing, malformed, wrong, stale or replayed credentials; an unknown key.
        PermissionDenied
            A revoked operator, a name the key was not added under, a client certificate
            issued to someone else, or no credential configured at all.
        """
        md = _md(metadata)
        if _OP_KEY not in md:
            check_admin(metadata, self._token)
            return TOKEN_OPERATOR
        key = _hex(md, _OP_KEY, PUBLIC_KEY_BYTES)
        nonce = _hex(md, _NONCE, NONCE_BYTES)
        sig = _hex(md, _SIG, SIGNATURE_BYTES)
        try:
            name = bytes.fromhex(md[_OP]).decode()
            ts_ms = int(md[_TS])
        except (KeyError, ValueError):
            raise Unauthenticated("missing or malformed secagg-operator/secagg-ts") from None
        record: OperatorRecord | None = self._store.operator_by_key(key)
        if record is None:
            raise Unauthenticated("this operator key is not registered (secagg operator add)")
        try:
            _verify(key, admin_call_payload(method, name, key, ts_ms, nonce), sig)
        except InvalidSignature:
            raise Unauthenticated("admin call signature does not verify") from None
        if record.name != name:
            raise PermissionDenied(f"this operator key belongs to {record.name!r}, not {name!r}")
        if record.revoked:
            raise PermissionDenied(f"operator {name!r} is revoked")
        now = self._clock()
        if abs(ts_ms / 1000.0 - now) > self._skew:
            raise Unauthenticated("call timestamp outside the accepted window (clock skew?)")
        if require_cert_binding and peer_common_name != name:
            raise PermissionDenied(f"the client certificate is not issued to operator {name!r}")
        self._replay.remember(nonce, now)
        return name


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
        self._replay = _Replay(skew)

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
        self._replay.remember(nonce, now)
        return Caller(participant, round_id)


def check_admin(metadata: Iterable[tuple[str, str | bytes]] | None, token: str | None) -> None:
    """Require ``authorization: Bearer <token>``; the admin API is off without a token."""
    if not token:
        raise PermissionDenied(
            "the admin API is disabled (no admin token configured): sign calls with an "
            "operator key (secagg operator add)"
        )
    given = _md(metadata).get("authorization", "")
    if not given.startswith("Bearer ") or not constant_time_equal(
        given[7:].encode(), token.encode()
    ):
        raise Unauthenticated("missing or wrong admin token")
