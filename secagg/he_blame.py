"""Naming the sender of a bad upload in a ``hybrid`` round (sans-I/O).

When the encrypted sum of a hybrid round does not decrypt to in-range lanes, the key holders
cannot tell from the sum who spoiled it. Each upload, however, decrypts on its own to slot
values masked modulo ``2^mask_bits`` by the sender's self mask and pairwise masks, a
one-time pad (``docs/ckks.md``, "Hybrid masking"): a key holder may decrypt an upload alone
and learn nothing but uniform masked values. The blame step:

1. **Keyless checks first, on the server** (:func:`keyless_check`): the size, SEAL header,
   parameters, level and scale of every ciphertext. An upload that fails here (a foreign
   context, other parameters) names its sender with no decryption at all; the server already
   refuses such uploads on arrival.
2. **Per-upload checks by key holders** (:func:`check_uploads`): the server forwards the
   signed :class:`~secagg.messages.EncryptedInput` messages (split among key holders with
   :func:`assign_checks`, so no one spends more than its budget). The key holder verifies
   each signature over *its own* session id (a forged or replayed upload is the server's
   misbehaviour, never the sender's), then decrypts the upload with the range
   ``[0, 2^mask_bits)``, each decryption charged to its budget first. An upload under another
   key, out of range or with non-zero padding names its sender. Only the verdict (who, and
   the fixed reason text) leaves the key holder; the masked values are dropped at once.

Not in ``ckks`` mode: there an upload decrypts to a plain update, so :func:`check_uploads`
refuses (:class:`~secagg.errors.ConfigurationError`) and a spoiled ``ckks`` sum is detected
but cannot be traced to its sender.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from secagg import ckks
from secagg.errors import (
    ConfigurationError,
    DecryptionError,
    InvalidSignature,
    MalformedMessage,
    ServerMisbehaviour,
)
from secagg.keys import verify_signature
from secagg.messages import EncryptedInput, encrypted_input_payload
from secagg.params import Mode, RoundParams

__all__ = [
    "CHECK_COPIES",
    "BlameDecision",
    "BlameReport",
    "assign_checks",
    "check_uploads",
    "decide",
    "keyless_check",
]


@dataclass(frozen=True)
class BlameReport:
    """A key holder's verdict on the uploads it checked.

    Attributes
    ----------
    checked:
        Senders whose uploads were checked, in order.
    blamed:
        Sender -> reason, for the uploads that do not decrypt to in-range masked slots.
    """

    checked: tuple[int, ...]
    blamed: Mapping[int, str] = field(default_factory=dict)


def keyless_check(
    ctx: ckks.ServerContext | ckks.SecretContext, upload: EncryptedInput
) -> str | None:
    """What the server can check of an upload without any key; ``None`` when it passes.

    The number of ciphertexts, then each one's length, SEAL header, parameters, level and
    scale (as :meth:`secagg.ckks.CiphertextSum.add` does on arrival).
    """
    scratch = ckks.CiphertextSum(ctx)
    try:
        scratch.add(upload.ciphertexts, client_id=upload.sender)
    except MalformedMessage as exc:
        return str(exc)
    return None


def assign_checks(
    senders: Iterable[int],
    key_holders: Sequence[int],
    *,
    copies: int = 1,
    limit: int | None = None,
) -> dict[int, list[int]]:
    """Deal the uploads to check round-robin over ``key_holders``, never a holder its own.

    Each sender goes to ``copies`` distinct holders (fewer when not enough holders are left
    under ``limit`` checks each); the holder lists are in id order.

    Raises
    ------
    ConfigurationError
        With fewer than two key holders (one would have to check its own upload).
    """
    holders = sorted(set(key_holders))
    if len(holders) < 2:
        raise ConfigurationError("blame checks need at least two key holders")
    out: dict[int, list[int]] = {h: [] for h in holders}
    for i, sender in enumerate(sorted(set(senders))):
        taken = 0
        for j in range(len(holders)):
            h = holders[(i + j) % len(holders)]
            if taken == copies:
                break
            if h == sender or (limit is not None and len(out[h]) >= limit):
                continue
            out[h].append(sender)
            taken += 1
    return out


@dataclass(frozen=True)
class BlameDecision:
    """What the server concludes from the key holders' verdicts (:func:`decide`).

    Attributes
    ----------
    culprits:
        Sender -> reason, blamed by at least :data:`CHECK_COPIES` holders and cleared by none.
    disputed:
        Sender -> (holders blaming it, holders clearing it): blamed, but not by enough
        holders or contradicted by another. One of them lies; nobody is named culprit.
    unchecked:
        Senders no holder's verdict covers (holders silent or out of checks).
    """

    culprits: Mapping[int, str]
    disputed: Mapping[int, tuple[tuple[int, ...], tuple[int, ...]]]
    unchecked: tuple[int, ...]

    def summary(self) -> str:
        """One line for the abort reason, naming every client id."""
        parts = []
        if self.culprits:
            parts.append(
                f"clients {sorted(self.culprits)} uploaded ciphertexts that do not decrypt to "
                f"in-range lanes (each confirmed by {CHECK_COPIES} or more key holders)"
            )
        for cid, (by, against) in sorted(self.disputed.items()):
            parts.append(
                f"client {cid} is blamed by key holders {list(by)} and cleared by {list(against)}"
                " (disputed: not named)"
            )
        if self.unchecked:
            parts.append(f"uploads of clients {list(self.unchecked)} were not checked")
        if not parts:
            parts.append(
                "every upload checked decrypts to in-range lanes: the sum or its unmasking "
                "(the server's work) is at fault"
            )
        return "; ".join(parts)


CHECK_COPIES = 2
"""Key holders that check each upload. A sender is named only when this many holders blame
it and none clears it, so a single lying holder cannot frame an honest sender: its signed
verdict is contradicted or stands alone (disputed), and it names its signer."""


def decide(
    assignment: Mapping[int, Sequence[int]], verdicts: Mapping[int, BlameReport]
) -> BlameDecision:
    """Combine the verdicts of the holders that answered (``verdicts``) on ``assignment``.

    A sender is a culprit when at least :data:`CHECK_COPIES` holders blamed it and no holder
    that checked it cleared it; blamed otherwise, it is disputed.
    """
    by: dict[int, list[int]] = {}
    against: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    covered: set[int] = set()
    for holder, report in sorted(verdicts.items()):
        for cid in report.checked:
            covered.add(cid)
            if cid in report.blamed:
                by.setdefault(cid, []).append(holder)
                reasons.setdefault(cid, report.blamed[cid])
            else:
                against.setdefault(cid, []).append(holder)
    culprits: dict[int, str] = {}
    disputed: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for cid, blamers in sorted(by.items()):
        cleared = tuple(against.get(cid, ()))
        if len(blamers) >= CHECK_COPIES and not cleared:
            culprits[cid] = reasons[cid]
        else:
            disputed[cid] = (tuple(blamers), cleared)
    assigned = {cid for senders in assignment.values() for cid in senders}
    return BlameDecision(culprits, disputed, tuple(sorted(assigned - covered)))


def check_uploads(
    secret: ckks.SecretContext,
    params: RoundParams,
    session_id: bytes,
    directory: Mapping[int, bytes],
    uploads: Sequence[EncryptedInput],
) -> BlameReport:
    """Check individual hybrid uploads the server forwarded after a sum failed to decrypt.

    Parameters
    ----------
    secret:
        This key holder's context; each upload checked costs one decryption of its budget.
    params, session_id, directory:
        The round as this client knows it (its own session id and trusted directory).
    uploads:
        The signed uploads to check, as the server received them.

    Raises
    ------
    ConfigurationError
        In a ``ckks`` round (an upload alone is a plain update: never decrypted).
    ServerMisbehaviour
        If an upload is not signed by its sender over this session, a sender is unknown or
        repeated: the server forged or replayed it (nothing is decrypted).
    DecryptionBudgetExhausted
        If the budget cannot pay for every upload (nothing is decrypted).
    """
    if params.mode is not Mode.HYBRID:
        raise ConfigurationError(
            f"{params.mode.name.lower()} rounds cannot check uploads one by one: only hybrid "
            "uploads are masked, a ckks upload would decrypt to a plain update"
        )
    seen: set[int] = set()
    for up in uploads:
        if not isinstance(up, EncryptedInput):
            raise ServerMisbehaviour("blame request holds something other than uploads")
        cid = up.sender
        if cid in seen or cid not in directory:
            raise ServerMisbehaviour(f"blame request names client {cid} twice or unknown")
        seen.add(cid)
        if up.session_id != session_id:
            raise ServerMisbehaviour(f"upload of client {cid} is bound to another session")
        payload = encrypted_input_payload(session_id, cid, up.ciphertexts)
        try:
            verify_signature(directory[cid], payload, up.signature, client_id=cid)
        except InvalidSignature:
            raise ServerMisbehaviour(
                f"upload of client {cid} is not signed by it: the server altered it"
            ) from None
    secret.require_budget(len(uploads))
    he = params.he
    blamed: dict[int, str] = {}
    for up in uploads:
        try:
            ckks.decrypt(secret, up.ciphertexts, he.n_slots, bound_bits=he.mask_bits)
        except MalformedMessage as exc:
            blamed[up.sender] = f"not a ciphertext of this round's parameters ({exc})"
        except DecryptionError as exc:
            blamed[up.sender] = str(exc)
    return BlameReport(tuple(up.sender for up in uploads), blamed)
