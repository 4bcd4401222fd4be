"""Round 0, AdvertiseKeys (Bonawitz et al. 2017, figure 4): collect signed public keys."""

from __future__ import annotations

import hashlib

from secagg.keys import check_agreement_key, verify_signature
from secagg.messages import AdvertiseKeys, Message, Roster
from secagg.prg import Purpose, derive_key
from secagg.rounds.base import Outgoing, ServerState, Stage

__all__ = ["AdvertiseKeysState", "session_id_for"]


def session_id_for(params_digest: bytes, entries: list[AdvertiseKeys]) -> bytes:
    """Session id: SHA-256 over the parameters and every advertised key, in id order.

    As in fcp/secagg, binding every derived key and AEAD to it ties all masks and shares to
    exactly this round and this roster.
    """
    h = hashlib.sha256(b"secagg/v1/session" + params_digest)
    for e in sorted(entries, key=lambda e: e.sender):
        h.update(e.sender.to_bytes(4, "big") + e.enc_pk + e.mask_pk + e.seed_commit)
    return h.digest()


def graph_seed(session_id: bytes) -> bytes:
    """Public seed of the neighbour graph, fixed by the session (no server choice)."""
    return derive_key(session_id, session_id, Purpose.GRAPH)


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
        from secagg import graph
        from secagg.rounds.share_keys import ShareKeysState

        ctx = self.ctx
        u0 = self.survivors()
        self.require(u0, "advertised keys")
        entries = [ctx.advertised[c] for c in sorted(u0)]
        ctx.session_id = session_id_for(ctx.params_digest, entries)
        degree = min(ctx.params.degree, len(u0) - 1)
        ctx.graph = dict(graph.neighbours(sorted(u0), degree, graph_seed(ctx.session_id)))
        roster = Roster(ctx.params.round_id, 0, tuple(entries))
        out: list[Outgoing] = [(cid, roster) for cid in sorted(u0)]
        return ShareKeysState(ctx, u0), out
