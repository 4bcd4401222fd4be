"""Round 0, AdvertiseKeys (Bonawitz et al. 2017, figure 4): collect signed public keys and
graph-nonce commitments; publish the roster (the graph waits for reveal_nonces)."""

from __future__ import annotations

import hashlib

from secagg.keys import check_agreement_key, verify_signature
from secagg.messages import AdvertiseKeys, Message, Roster
from secagg.params import Mode
from secagg.rounds.base import Outgoing, ServerState, Stage

__all__ = ["AdvertiseKeysState", "session_id_for"]


def session_id_for(
    params_digest: bytes, entries: list[AdvertiseKeys], key_epoch: bytes = b""
) -> bytes:
    """Session id: SHA-256 over the parameters and every advertised key and commitment, in
    id order; in ``hybrid`` rounds also the CKKS key epoch's 16-byte fingerprint
    (``key_epoch``; empty otherwise, which leaves masked session ids as they were).

    As in fcp/secagg, binding every derived key and AEAD to it ties all masks and shares to
    exactly this round and this roster (and, hybrid, this key epoch: a client holding a
    context of another epoch computes another session id and its messages are refused).
    """
    h = hashlib.sha256(b"secagg/v1/session" + params_digest)
    if key_epoch:
        h.update(b"epoch" + key_epoch)
    for e in sorted(entries, key=lambda e: e.sender):
        h.update(
            e.sender.to_bytes(4, "big") + e.enc_pk + e.mask_pk + e.seed_commit + e.nonce_commit
        )
    return h.digest()


class AdvertiseKeysState(ServerState):
    """Waits for every enrolled client's keys; then publishes the roster."""

    stage = Stage.ADVERTISE_KEYS
    accepts = AdvertiseKeys

    def validate(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, AdvertiseKeys)
        ctx = self.ctx
        verify_signature(
            ctx.directory[cid], msg.signed_payload(ctx.params_digest), msg.signature, client_id=cid
        )
        # RFC 7748 section 6.1: a small-order or malformed key is its (signing) sender's
        # fault; refusing it here drops and names the sender before any peer uses it.
        check_agreement_key(msg.enc_pk, client_id=cid)
        check_agreement_key(msg.mask_pk, client_id=cid)

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, AdvertiseKeys)
        self.ctx.advertised[cid] = msg

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        from secagg.rounds.reveal_nonces import RevealNoncesState

        ctx = self.ctx
        u0 = self.survivors()
        self.require(u0, "advertised keys")
        entries = [ctx.advertised[c] for c in sorted(u0)]
        epoch = b""
        if ctx.params.mode is Mode.HYBRID and ctx.he is not None:
            epoch = ctx.he.epoch.fingerprint
        ctx.session_id = session_id_for(ctx.params_digest, entries, epoch)
        roster = Roster(ctx.params.round_id, 0, tuple(entries))
        out: list[Outgoing] = [(cid, roster) for cid in sorted(u0)]
        return RevealNoncesState(ctx, u0), out
