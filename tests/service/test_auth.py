"""Call authentication: signatures over (method, round, key, time, nonce), replay, revocation."""

from __future__ import annotations

import time

import pytest

from secagg.keys import IdentityKey
from secagg.service.auth import CallVerifier, call_metadata, check_admin
from secagg.service.errors import PermissionDenied, Unauthenticated
from secagg.service.store import Store

M = "/secagg.v1.Aggregation/Session"
RID = bytes(range(16))


@pytest.fixture
def setup() -> tuple[Store, CallVerifier, IdentityKey]:
    store = Store(":memory:")
    key = IdentityKey()
    store.enroll("alice", key.public)
    return store, CallVerifier(store), key


def test_valid_call(setup: tuple[Store, CallVerifier, IdentityKey]) -> None:
    _, verifier, key = setup
    caller = verifier.verify(call_metadata(key, M, RID), M)
    assert caller.participant.name == "alice" and caller.round_id == RID


def test_replay_refused(setup: tuple[Store, CallVerifier, IdentityKey]) -> None:
    _, verifier, key = setup
    md = call_metadata(key, M, RID)
    verifier.verify(md, M)
    with pytest.raises(Unauthenticated, match="replayed"):
        verifier.verify(md, M)


def test_signature_binds_method_and_round(setup: tuple[Store, CallVerifier, IdentityKey]) -> None:
    _, verifier, key = setup
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(call_metadata(key, M, RID), "/secagg.v1.Aggregation/GetRound")
    md = dict(call_metadata(key, M, RID))
    md["secagg-round"] = bytes(16).hex()  # move the call to another round
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(list(md.items()), M)


def test_unknown_and_impersonated_identities(
    setup: tuple[Store, CallVerifier, IdentityKey],
) -> None:
    _, verifier, key = setup
    with pytest.raises(Unauthenticated, match="not enrolled"):
        verifier.verify(call_metadata(IdentityKey(), M, RID), M)
    # Mallory signs with her key but claims Alice's: the signature does not verify.
    md = dict(call_metadata(IdentityKey(), M, RID))
    md["secagg-key"] = key.public.hex()
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(list(md.items()), M)


def test_stale_timestamp(setup: tuple[Store, CallVerifier, IdentityKey]) -> None:
    store, _, key = setup
    verifier = CallVerifier(store, clock=lambda: time.time() + 3600)
    with pytest.raises(Unauthenticated, match="window"):
        verifier.verify(call_metadata(key, M, RID), M)


def test_revoked(setup: tuple[Store, CallVerifier, IdentityKey]) -> None:
    store, verifier, key = setup
    store.revoke("alice")
    with pytest.raises(PermissionDenied, match="revoked"):
        verifier.verify(call_metadata(key, M, RID), M)


def test_certificate_binding(setup: tuple[Store, CallVerifier, IdentityKey]) -> None:
    _, verifier, key = setup
    with pytest.raises(PermissionDenied, match="certificate"):
        verifier.verify(
            call_metadata(key, M, RID), M, peer_common_name="bob", require_cert_binding=True
        )
    verifier.verify(
        call_metadata(key, M, RID), M, peer_common_name="alice", require_cert_binding=True
    )


def test_malformed_metadata(setup: tuple[Store, CallVerifier, IdentityKey]) -> None:
    _, verifier, _ = setup
    with pytest.raises(Unauthenticated, match="missing"):
        verifier.verify([], M)


def test_admin_token() -> None:
    check_admin([("authorization", "Bearer s3cret")], "s3cret")
    with pytest.raises(Unauthenticated):
        check_admin([("authorization", "Bearer wrong")], "s3cret")
    with pytest.raises(PermissionDenied, match="disabled"):
        check_admin([("authorization", "Bearer s3cret")], None)
