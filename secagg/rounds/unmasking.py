"""Round 4, Unmasking: reconstruct seeds and keys from shares and remove every mask.

For each survivor ``u`` (in U2) the server reconstructs the self-mask seed ``b_u`` and
subtracts ``PRG(b_u)``; for each client ``w`` that dropped after sharing its keys (U1 \\ U2)
it reconstructs the mask private key and removes the pairwise masks its surviving
neighbours added (Bonawitz et al. 2017, section 4). Reconstructed secrets are checked against
the commitment (seeds) or the advertised public key (mask keys), so a client that reveals a
wrong share is caught and another subset of shares is tried.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from secagg import ckks, kernels, shamir
from secagg.errors import ProtocolViolation, ReconstructionError, RoundAborted
from secagg.keys import AgreementKey, constant_time_equal, x25519_public
from secagg.messages import (
    AggregateResult,
    EncryptedResult,
    Message,
    UnmaskShares,
    seed_commitment,
)
from secagg.prg import Purpose, StreamMask, derive_key
from secagg.rounds.base import Outgoing, RoundResult, ServerContext, ServerState, Stage
from secagg.rounds.blame import after_result

__all__ = ["UnmaskingState", "pair_sign"]


def pair_sign(u: int, v: int) -> int:
    """Sign with which client ``u`` adds the mask it shares with ``v`` (+1 iff ``u < v``)."""
    return 1 if u < v else -1


class UnmaskingState(ServerState):
    """Collects revealed shares, then reconstructs, unmasks and publishes the sum."""

    stage = Stage.UNMASKING
    accepts = UnmaskShares

    def validate(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, UnmaskShares)
        ctx = self.ctx
        self.check_session(cid, msg.session_id)
        alive = set(ctx.u2)
        dropped = ctx.u1 - alive
        seed_owners = [o for o, _ in msg.seed_shares]
        key_owners = [o for o, _ in msg.key_shares]
        held = ctx.holders(cid)
        if len(set(seed_owners)) != len(seed_owners) or len(set(key_owners)) != len(key_owners):
            raise ProtocolViolation("a share is revealed twice", client_id=cid)
        if not set(seed_owners) <= (alive & held):
            raise ProtocolViolation(
                "seed shares revealed for clients that are not surviving holders' peers",
                client_id=cid,
            )
        if not set(key_owners) <= (dropped & held):
            raise ProtocolViolation(
                "key shares revealed for clients that did not drop", client_id=cid
            )
        for _, share in (*msg.seed_shares, *msg.key_shares):
            try:
                shamir.decode_share(share)
            except ReconstructionError as exc:
                raise ProtocolViolation(f"malformed share: {exc}", client_id=cid) from None

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, UnmaskShares)
        for owner, share in msg.seed_shares:
            self.ctx.seed_shares.setdefault(owner, {})[cid] = share
        for owner, share in msg.key_shares:
            self.ctx.key_shares.setdefault(owner, {})[cid] = share

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        ctx = self.ctx
        u4 = self.survivors()
        self.require(u4, "revealed their shares")
        try:
            result = unmask(ctx, u4)
        except ReconstructionError as exc:
            raise RoundAborted(self.stage, str(exc)) from None
        ctx.result = result
        msg: Message
        if result.ciphertexts is not None:
            msg = EncryptedResult(
                ctx.params.round_id, 0, ctx.session_id, result.contributors, result.ciphertexts
            )
        else:
            msg = AggregateResult(
                ctx.params.round_id, 0, ctx.session_id, result.contributors, ctx.acc
            )
        return after_result(ctx), [(cid, msg) for cid in sorted(ctx.active(ctx.u2))]


def _recover(
    ctx: ServerContext,
    owners: list[int],
    table: dict[int, dict[int, bytes]],
    responders: frozenset[int],
    check: Callable[[int, bytes], bool],
    what: str,
) -> dict[int, bytes]:
    """Reconstruct one secret per owner from exactly ``t`` shares, verified by ``check``."""
    t = ctx.params.threshold
    shares = []
    for owner in owners:
        got = {h: s for h, s in table.get(owner, {}).items() if h in responders}
        if len(got) < t:
            raise ReconstructionError(
                f"the {what} of client {owner} has {len(got)} revealed shares; the threshold is {t}"
            )
        shares.append(got)
    secrets_ = shamir.reconstruct_many(shares, t)
    out: dict[int, bytes] = {}
    for owner, got, secret in zip(owners, shares, secrets_, strict=True):
        if not check(owner, secret):
            secret, suspects = shamir.reconstruct_verified(
                got, t, functools.partial(check, owner), max_attempts=8
            )
            ctx.warnings.append(
                f"clients {sorted(suspects)} revealed wrong shares of client {owner}'s {what}"
            )
        out[owner] = secret
    return out


def unmask(ctx: ServerContext, responders: frozenset[int]) -> RoundResult:
    """Remove all masks from ``ctx.acc`` and decode the lane sums."""
    params, sid = ctx.params, ctx.session_id
    alive = list(ctx.u2)
    dropped = sorted(ctx.u1 - set(alive))

    def seed_ok(owner: int, seed: bytes) -> bool:
        commit = seed_commitment(ctx.params_digest, owner, seed)
        return constant_time_equal(commit, ctx.advertised[owner].seed_commit)

    def key_ok(owner: int, sk: bytes) -> bool:
        return constant_time_equal(x25519_public(sk), ctx.advertised[owner].mask_pk)

    seeds = _recover(ctx, alive, ctx.seed_shares, responders, seed_ok, "self-mask seed")
    keys = _recover(ctx, dropped, ctx.key_shares, responders, key_ok, "mask key")

    masks = [
        StreamMask(derive_key(seeds[u], sid, Purpose.SELF_MASK, u), Purpose.SELF_MASK, -1)
        for u in alive
    ]
    alive_set = set(alive)
    for w in dropped:
        sk = AgreementKey(keys[w])
        for u in sorted(ctx.graph[w] & alive_set):
            shared = sk.agree(ctx.advertised[u].mask_pk)
            key = derive_key(shared, sid, Purpose.PAIR_MASK, min(u, w), max(u, w))
            masks.append(StreamMask(key, Purpose.PAIR_MASK, -pair_sign(u, w)))
    if ctx.he_sum is not None:
        # hybrid: the negated masks, mod 2^mask_bits, go into the ciphertext sum as a plaintext
        he = params.he
        removal = np.zeros(he.n_slots, dtype=np.uint64)
        kernels.add_masks(removal, masks)
        cts = ctx.he_sum.finish(ckks.masks_from_words(removal, he))
        return RoundResult(tuple(alive), ciphertexts=tuple(cts))
    acc = ctx.acc
    kernels.add_masks(acc, masks)
    sums = kernels.unpack(acc, params.quant, params.quant.values(params.dim))
    weighted_sum, total = kernels.dequantize(sums, params.quant, len(alive), params.dim)
    return RoundResult(tuple(alive), sums, total, weighted_sum)
