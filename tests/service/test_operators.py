"""Per-operator admin credentials (issue 12, item 3): signed admin calls, replay, revocation,
the deprecated shared token, and the operator's name in every admin audit entry."""

from __future__ import annotations

import time

import pytest

from secagg.keys import IdentityKey
from secagg.service.auth import (
    TOKEN_OPERATOR,
    AdminVerifier,
    admin_call_metadata,
    admin_metadata,
    call_metadata,
)
from secagg.service.errors import AlreadyExists, NotFound, PermissionDenied, Unauthenticated
from secagg.service.store import Store

from .helpers import Deployment

M = "/secagg.v1.Admin/CreateRound"


@pytest.fixture
def setup() -> tuple[Store, AdminVerifier, IdentityKey]:
    store = Store(":memory:")
    key = IdentityKey()
    store.add_operator("alice", key.public)
    return store, AdminVerifier(store, None), key


def test_signed_admin_call_names_its_operator(
    setup: tuple[Store, AdminVerifier, IdentityKey],
) -> None:
    _, verifier, key = setup
    assert verifier.verify(admin_call_metadata("alice", key, M), M) == "alice"


def test_admin_call_replay_and_method_move_refused(
    setup: tuple[Store, AdminVerifier, IdentityKey],
) -> None:
    """Attack: a captured admin call is replayed, or replayed against another method
    (a status query turned into an abort). Both are refused."""
    _, verifier, key = setup
    md = admin_call_metadata("alice", key, "/secagg.v1.Admin/GetRoundStatus")
    verifier.verify(md, "/secagg.v1.Admin/GetRoundStatus")
    with pytest.raises(Unauthenticated, match="replayed"):
        verifier.verify(md, "/secagg.v1.Admin/GetRoundStatus")
    md = admin_call_metadata("alice", key, "/secagg.v1.Admin/GetRoundStatus")
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(md, "/secagg.v1.Admin/AbortRound")


def test_participant_key_is_no_operator(setup: tuple[Store, AdminVerifier, IdentityKey]) -> None:
    """Attack: an enrolled site signs an admin call with its identity key, or passes one
    of its participant-call signatures as an admin call. Neither is an operator."""
    store, verifier, _ = setup
    site = IdentityKey()
    store.enroll("site-1", site.public)
    with pytest.raises(Unauthenticated, match="not registered"):
        verifier.verify(admin_call_metadata("site-1", site, M), M)
    # The same key registered as an operator too: a participant signature still fails
    # (another domain string), so no participant call can be turned into an admin call.
    store.add_operator("site-1-op", site.public)
    md = dict(call_metadata(site, M))
    md["secagg-operator"] = b"site-1-op".hex()
    md["secagg-operator-key"] = md.pop("secagg-key")
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(list(md.items()), M)


def test_stale_and_revoked(setup: tuple[Store, AdminVerifier, IdentityKey]) -> None:
    store, _, key = setup
    late = AdminVerifier(store, None, clock=lambda: time.time() + 3600)
    with pytest.raises(Unauthenticated, match="window"):
        late.verify(admin_call_metadata("alice", key, M), M)
    store.revoke_operator("alice")
    with pytest.raises(PermissionDenied, match="revoked"):
        AdminVerifier(store, None).verify(admin_call_metadata("alice", key, M), M)


def test_shared_token_still_works_as_deprecated_operator(
    setup: tuple[Store, AdminVerifier, IdentityKey],
) -> None:
    store, _, _ = setup
    verifier = AdminVerifier(store, "tok")
    assert verifier.verify(admin_metadata("tok"), M) == TOKEN_OPERATOR
    with pytest.raises(Unauthenticated, match="wrong admin token"):
        verifier.verify(admin_metadata("nope"), M)
    with pytest.raises(PermissionDenied, match="disabled"):
        AdminVerifier(store, None).verify(admin_metadata("tok"), M)


def test_operator_table_refuses_duplicates_and_unknowns() -> None:
    store = Store(":memory:")
    key = IdentityKey()
    store.add_operator("alice", key.public)
    with pytest.raises(AlreadyExists):
        store.add_operator("alice", IdentityKey().public)
    with pytest.raises(AlreadyExists):
        store.add_operator("bob", key.public)
    with pytest.raises(NotFound):
        store.revoke_operator("bob")
    assert [o.name for o in store.operators()] == ["alice"]
    assert [e.kind for e in store.audit_entries()] == ["operator_added"]


def test_token_actions_are_audited_as_admin_token(deployment: Deployment) -> None:
    """Every admin action over the (deprecated) shared token names operator admin-token:
    enrolment, round creation, abort request, revocation."""
    names = deployment.enroll(3)
    rid = deployment.create(names, 10)
    assert deployment.admin is not None
    deployment.admin.abort(rid, "test")
    deployment.admin.revoke(names[0])
    admin_kinds = {
        "participant_enrolled",
        "participant_entry_set",
        "participant_revoked",
        "round_created",
        "round_abort_requested",
    }
    entries = [e for e in deployment.store.audit_entries() if e.kind in admin_kinds]
    assert {e.kind for e in entries} == admin_kinds - {"participant_entry_set"}
    assert {e.data["operator"] for e in entries} == {TOKEN_OPERATOR}
