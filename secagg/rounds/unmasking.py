"""Round 4, Unmasking: reconstruct seeds and keys from shares and remove every mask.

For each survivor ``u`` (in U2) the server reconstructs the self-mask seed ``b_u`` and
subtracts ``PRG(b_u)``; for each client ``w`` that dropped after sharing its keys (U1 \\ U2)
it reconstructs the mask private key and removes the pairwise masks its surviving
neighbours added (Bonawitz et al. 2017, section 4).

Blame (docs/protocol.md, "Shares with evidence"): every revealed share is checked, as it
arrives, against the commitment its dealer signed at ShareKeys (one SHA-256 per share). A
holder whose share does not match lied: its whole message is refused, so it is dropped and
named once and none of its shares is used. Shares that pass are exactly what their dealer
committed to, so the first ``t`` of them reconstruct the secret of an honest dealer with one
Lagrange combination (no error-correcting search that liars could make expensive). If they
do not reproduce the dealer's signed seed commitment or mask public key, the dealer dealt
inconsistent shares: the round aborts naming it, with its signed commitments and the
matching shares as evidence (:func:`check_dealer_evidence` re-checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from secagg import ckks, kernels, shamir
from secagg.errors import (
    InvalidSignature,
    ProtocolViolation,
    ReconstructionError,
    RoundAborted,
    SecAggError,
)
from secagg.keys import AgreementKey, constant_time_equal, verify_signature, x25519_public
from secagg.messages import (
    AdvertiseKeys,
    AggregateResult,
    EncryptedResult,
    Message,
    UnmaskShares,
    dp_share_kind,
    seed_commitment,
    share_commit_payload,
    share_commitment,
)
from secagg.prg import Purpose, StreamMask, derive_key
from secagg.rounds.base import Outgoing, RoundResult, ServerContext, ServerState, Stage
from secagg.rounds.blame import after_result
from secagg.rounds.terminal import CompletedState

__all__ = ["UnmaskingState", "check_dealer_evidence", "pair_sign"]

_SEED, _KEY = b"seed", b"key"
"""The ``kind`` labels of :func:`secagg.messages.share_commitment`."""


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
        try:  # every share at once: C-level length, type and range checks
            shamir.decode_shares([share for _, share in (*msg.seed_shares, *msg.key_shares)])
        except ReconstructionError as exc:
            raise ProtocolViolation(f"malformed share: {exc}", client_id=cid) from None
        sid = ctx.session_id
        for kind, pairs, at in ((_SEED, msg.seed_shares, 0), (_KEY, msg.key_shares, 32)):
            for owner, share in pairs:
                signed = ctx.share_commits[owner][cid][at : at + 32]
                if not constant_time_equal(share_commitment(sid, owner, cid, kind, share), signed):
                    what = "self-mask seed" if kind == _SEED else "mask key"
                    raise ProtocolViolation(
                        f"client {cid} revealed a share of client {owner}'s {what} that does "
                        f"not match client {owner}'s signed commitment; all its shares are "
                        "excluded",
                        client_id=cid,
                    )
        if ctx.params.dp is not None or msg.dp_shares:
            validate_dp_shares(ctx, cid, msg, set(seed_owners))

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, UnmaskShares)
        for owner, share in msg.seed_shares:
            self.ctx.seed_shares.setdefault(owner, {})[cid] = share
        for owner, share in msg.key_shares:
            self.ctx.key_shares.setdefault(owner, {})[cid] = share
        for owner, k, share in msg.dp_shares:
            self.ctx.dp_seed_shares.setdefault((owner, k), {})[cid] = share

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        ctx = self.ctx
        u4 = self.survivors()
        self.require(u4, "revealed their shares")
        try:
            result = unmask(ctx, u4)
        except _DealerBlamed as exc:
            ctx.drop(exc.dealer, self.stage, exc.reason)
            raise RoundAborted(
                self.stage, exc.reason, blamed=exc.dealer, evidence=exc.evidence
            ) from None
        except ReconstructionError as exc:
            raise RoundAborted(self.stage, str(exc)) from None
        ctx.result = result
        msg: Message
        if result.ciphertexts is not None:
            # A sharded group round (he_clients): the group's sum is the coordinator's; the
            # members get the contributors only and decrypt the total alone (no verdicts).
            group = bool(ctx.params.he_clients)
            msg = EncryptedResult(
                ctx.params.round_id,
                0,
                ctx.session_id,
                result.contributors,
                () if group else result.ciphertexts,
                result.dp_removal,
            )
            nxt = CompletedState(ctx) if group else after_result(ctx)
        else:
            msg = AggregateResult(
                ctx.params.round_id, 0, ctx.session_id, result.contributors, ctx.acc
            )
            nxt = after_result(ctx)
        return nxt, [(cid, msg) for cid in sorted(ctx.active(ctx.u2))]


def validate_dp_shares(
    ctx: ServerContext, cid: int, msg: UnmaskShares, seed_owners: set[int]
) -> None:
    """DP rounds: ``cid`` reveals, for exactly the survivors it reveals seed shares of,
    its shares of the noise seeds ``plan.removed(|U|)``, each matching the dealer's signed
    DP commitment (a liar is refused whole, like a bad seed share)."""
    offer = ctx.params.dp
    if offer is None:
        raise ProtocolViolation("DP seed shares revealed in a round without DP", client_id=cid)
    removed = offer.plan.removed(len(ctx.u2))
    pairs = [(o, k) for o, k, _ in msg.dp_shares]
    want = {(o, k) for o in seed_owners for k in removed}
    if len(set(pairs)) != len(pairs) or set(pairs) != want:
        raise ProtocolViolation(
            f"client {cid} must reveal DP seed shares of components {list(removed)} of exactly"
            " the survivors it reveals seed shares of",
            client_id=cid,
        )
    sid = ctx.session_id
    for owner, k, share in msg.dp_shares:
        try:
            shamir.decode_share(share)
        except ReconstructionError as exc:
            raise ProtocolViolation(f"malformed share: {exc}", client_id=cid) from None
        signed = ctx.dp_commits[owner][cid][32 * k : 32 * k + 32]
        if not constant_time_equal(
            share_commitment(sid, owner, cid, dp_share_kind(k), share), signed
        ):
            raise ProtocolViolation(
                f"client {cid} revealed a share of client {owner}'s DP noise seed {k} that "
                f"does not match client {owner}'s signed commitment; all its shares are excluded",
                client_id=cid,
            )


class _DealerBlamed(ReconstructionError):
    """Shares matching a dealer's signed commitments do not give its committed secret."""

    def __init__(self, dealer: int, reason: str, evidence: dict[str, object]) -> None:
        super().__init__(reason)
        self.dealer = dealer
        self.reason = reason
        self.evidence = evidence


def _commit_signed(ctx: ServerContext, owner: int, holder: int) -> bool:
    """Whether the stored commitment of ``owner`` for ``holder`` carries its signature."""
    sig = ctx.share_commits[owner][holder]
    h_dp = ctx.dp_commits.get(owner, {}).get(holder, b"")
    salt = ctx.dp_salts.get(owner, b"")
    payload = share_commit_payload(ctx.session_id, owner, holder, sig[:32], sig[32:64], h_dp, salt)
    try:
        verify_signature(ctx.directory[owner], payload, sig[64:], client_id=owner)
    except InvalidSignature:
        return False
    return True


def _evidence(
    ctx: ServerContext, owner: int, kind: bytes, used: Mapping[int, bytes]
) -> dict[str, object]:
    """JSON-ready proof that ``owner`` signed shares that do not give its committed secret."""
    adv = ctx.advertised[owner]
    return {
        "dealer": owner,
        "secret": kind.decode(),
        "session_id": ctx.session_id.hex(),
        "params_digest": ctx.params_digest.hex(),
        "threshold": ctx.params.threshold,
        "advertise": {
            "enc_pk": adv.enc_pk.hex(),
            "mask_pk": adv.mask_pk.hex(),
            "seed_commit": adv.seed_commit.hex(),
            "nonce_commit": adv.nonce_commit.hex(),
            "signature": adv.signature.hex(),
        },
        "shares": [
            {
                "holder": h,
                "share": share.hex(),
                "commitment": ctx.share_commits[owner][h].hex(),
                "dp_commitment": ctx.dp_commits.get(owner, {}).get(h, b"").hex(),
                "dp_salt": ctx.dp_salts.get(owner, b"").hex(),
            }
            for h, share in sorted(used.items())
        ],
    }


def _recover(
    ctx: ServerContext,
    owners: list[int],
    table: dict[int, dict[int, bytes]],
    responders: frozenset[int],
    check: Callable[[int, bytes], bool],
    kind: bytes,
) -> dict[int, bytes]:
    """Reconstruct one secret per owner from its first ``t`` committed shares.

    Every share in ``table`` matched its dealer's signed commitment on arrival, so an honest
    dealer's first ``t`` shares are right: one Lagrange combination per owner (shared by
    owners with the same holders). A result that fails ``check`` convicts the dealer, once
    its cited commitments' signatures verify (checked only on this path).
    """
    what = "self-mask seed" if kind == _SEED else "mask key"
    t = ctx.params.threshold
    shares = []
    for owner in owners:
        got = {h: s for h, s in table.get(owner, {}).items() if h in responders}
        if len(got) < t:
            raise ReconstructionError(
                f"the {what} of client {owner} has {len(got)} revealed shares; the threshold is {t}"
            )
        shares.append(got)
    secrets_ = shamir.reconstruct_each(shares, t)  # None: a value >= 2^256, inconsistent
    out: dict[int, bytes] = {}
    for owner, got, secret in zip(owners, shares, secrets_, strict=True):
        if secret is None or not check(owner, secret):
            secret = _convict(ctx, owner, got, check, kind, what)
        out[owner] = secret
    return out


def _convict(
    ctx: ServerContext,
    owner: int,
    got: dict[int, bytes],
    check: Callable[[int, bytes], bool],
    kind: bytes,
    what: str,
) -> bytes:
    """Blame ``owner`` with evidence, unless its shares fail only for lack of signatures.

    Holders check shares against the digests, not the signatures (a dealer's own copy is
    here): a share whose stored commitment carries no valid signature of ``owner`` is one
    the dealer itself sent unsigned, so it cannot be cited. Such shares are set aside (the
    dealer, never the holders, named in a warning) and the rest are tried once more.
    """
    t = ctx.params.threshold
    signed = {h: s for h, s in got.items() if _commit_signed(ctx, owner, h)}
    unsigned = sorted(set(got) - set(signed))
    if unsigned:
        ctx.warnings.append(
            f"client {owner} committed to its {what} shares for holders {unsigned} under no "
            "valid signature of its own; those shares were set aside"
        )
    if len(signed) < t:
        raise ReconstructionError(
            f"the {what} of client {owner} has {len(signed)} validly committed shares; "
            f"the threshold is {t}"
        )
    used = dict(sorted(signed.items())[:t])
    try:
        secret: bytes | None = shamir.reconstruct(used, t)
    except ReconstructionError:
        secret = None
    if secret is not None and check(owner, secret):
        return secret
    reason = (
        f"client {owner} dealt shares of its {what} that match its signed commitments but do "
        f"not reconstruct its advertised {'seed commitment' if kind == _SEED else 'public key'}"
    )
    raise _DealerBlamed(owner, reason, _evidence(ctx, owner, kind, used))


def check_dealer_evidence(evidence: Mapping[str, Any], directory: Mapping[int, bytes]) -> bool:
    """Re-check an abort's evidence against the dealer's identity key alone.

    True iff the dealer signed its advertisement and a commitment to every cited share,
    the cited shares match those commitments, and ``t`` of them do not reconstruct the
    secret its advertisement commits to: the dealer, and nobody else, dealt them.
    """
    try:
        dealer = int(evidence["dealer"])
        kind = str(evidence["secret"]).encode()
        sid = bytes.fromhex(evidence["session_id"])
        digest = bytes.fromhex(evidence["params_digest"])
        t = int(evidence["threshold"])
        adv_f = evidence["advertise"]
        adv = AdvertiseKeys(
            b"",
            dealer,
            bytes.fromhex(adv_f["enc_pk"]),
            bytes.fromhex(adv_f["mask_pk"]),
            bytes.fromhex(adv_f["seed_commit"]),
            bytes.fromhex(adv_f["signature"]),
            bytes.fromhex(adv_f["nonce_commit"]),
        )
        pk = directory[dealer]
        verify_signature(pk, adv.signed_payload(digest), adv.signature)
        used: dict[int, bytes] = {}
        at = 0 if kind == _SEED else 32
        for item in evidence["shares"]:
            holder, share = int(item["holder"]), bytes.fromhex(item["share"])
            commit = bytes.fromhex(item["commitment"])
            h_dp = bytes.fromhex(item.get("dp_commitment", ""))
            salt = bytes.fromhex(item.get("dp_salt", ""))
            payload = share_commit_payload(
                sid, dealer, holder, commit[:32], commit[32:64], h_dp, salt
            )
            verify_signature(pk, payload, commit[64:])
            if share_commitment(sid, dealer, holder, kind, share) != commit[at : at + 32]:
                return False
            used[holder] = share
        if len(used) != t or kind not in (_SEED, _KEY):
            return False
        try:
            secret = shamir.reconstruct(used, t)
        except ReconstructionError:
            return True  # no 32-byte secret at all: inconsistent by itself
        if kind == _SEED:
            return not constant_time_equal(seed_commitment(digest, dealer, secret), adv.seed_commit)
        return not constant_time_equal(x25519_public(secret), adv.mask_pk)
    except (KeyError, TypeError, ValueError, SecAggError):
        return False


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

    seeds = _recover(ctx, alive, ctx.seed_shares, responders, seed_ok, _SEED)
    keys = _recover(ctx, dropped, ctx.key_shares, responders, key_ok, _KEY)

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
        if params.dp is not None:
            return dp_hybrid_release(ctx, alive, responders, tuple(cts))
        return RoundResult(tuple(alive), ciphertexts=tuple(cts))
    acc = ctx.acc
    kernels.add_masks(acc, masks)
    if params.dp is not None:
        return dp_release(ctx, alive, responders)
    sums = kernels.unpack(acc, params.quant, params.quant.values(params.dim))
    weighted_sum, total = kernels.dequantize(sums, params.quant, len(alive), params.dim)
    return RoundResult(tuple(alive), sums, total, weighted_sum)


def _dp_seeds(
    ctx: ServerContext, alive: list[int], responders: frozenset[int]
) -> dict[int, list[bytes]]:
    """The survivors' revealed noise seeds of components ``plan.removed(|U|)`` (in that
    order), each from its first ``t`` committed shares (the ``b_u`` path)."""
    offer = ctx.params.dp
    assert offer is not None
    t, removed = ctx.params.threshold, offer.plan.removed(len(alive))
    j = len(removed)
    tables = []
    for u in alive:
        for k in removed:
            got = {h: sh for h, sh in ctx.dp_seed_shares.get((u, k), {}).items() if h in responders}
            if len(got) < t:
                raise ReconstructionError(
                    f"DP noise seed {k} of client {u} has {len(got)} revealed shares; the "
                    f"threshold is {t}"
                )
            tables.append(got)
    found = shamir.reconstruct_each(tables, t)
    if any(seed is None for seed in found):
        bad = alive[found.index(None) // j]
        raise ReconstructionError(f"the DP noise-seed shares of client {bad} are inconsistent")
    return {u: [found[i * j + k] or b"" for k in range(j)] for i, u in enumerate(alive)}


def _dp_report(ctx: ServerContext, s: int) -> dict[str, object]:
    from secagg.dp.calibration import round_rho
    from secagg.dp.encoding import rounded_norm_bound_sq
    from secagg.dp.rotation import padded_dim

    offer = ctx.params.dp
    assert offer is not None
    plan, d = offer.plan, padded_dim(offer.dim)
    delta2_sq = rounded_norm_bound_sq(offer.clip, offer.gamma, d, offer.beta)
    return {
        "mechanism": "distributed-discrete-gaussian+xnoise",
        "clip": offer.clip,
        "gamma": offer.gamma,
        "bits": offer.bits,
        "rounds": offer.rounds,
        "target_std": plan.target_variance**0.5 / offer.gamma,
        "released_std": plan.residual_variance(s) ** 0.5 / offer.gamma,
        "honest_std": plan.honest_variance(s) ** 0.5 / offer.gamma,
        "contributors": s,
        "removed_components": plan.level(s),
        "removed_set": list(plan.removed(s)),
        "components": plan.components,
        "noise_plan": plan.kind,
        "levels": list(plan.levels),
        "max_release_ratio": plan.max_release_ratio,
        "max_withholders": plan.max_withholders,
        "rho_round": round_rho(plan, s, delta2_sq, d),
    }


def dp_release(ctx: ServerContext, alive: list[int], responders: frozenset[int]) -> RoundResult:
    """Masked DP rounds, after the masks are gone: rebuild the survivors' revealed noise
    seeds, reduce the lanes mod ``2^b``, subtract the removable components
    (``DPServer.release``), publish the released ring sum (repacked into ``ctx.acc``) and
    decode it."""
    from secagg.dp.encoding import decode_sum
    from secagg.dp.packing import dp_lane_bits, pack_ring, unpack_ring
    from secagg.dp.participants import DPServer, rotation_key
    from secagg.dp.rotation import padded_dim

    params = ctx.params
    offer = params.dp
    assert offer is not None
    seeds = _dp_seeds(ctx, alive, responders)
    lane = dp_lane_bits(offer.bits, params.n_clients)
    total = unpack_ring(ctx.acc, lane, padded_dim(offer.dim), offer.bits)
    released = DPServer(offer, session_id=ctx.session_id).release(
        total, alive, seeds, salts=ctx.dp_salts
    )
    ctx.acc = pack_ring(released, lane, params.words)
    aggregate = decode_sum(
        released,
        bits=offer.bits,
        gamma=offer.gamma,
        rotation_key=rotation_key(ctx.session_id),
        dim=offer.dim,
    )
    s = len(alive)
    return RoundResult(tuple(alive), released, s, aggregate, dp=_dp_report(ctx, s))


def dp_hybrid_release(
    ctx: ServerContext,
    alive: list[int],
    responders: frozenset[int],
    ciphertexts: tuple[bytes, ...],
) -> RoundResult:
    """Hybrid DP rounds: the server cannot see the sum, so it publishes the removal beside
    the encrypted sum: the survivors' removable components summed mod ``2^b``, packed. Key
    holders subtract it after decrypting. It tells them nothing the release does not: they
    only ever see the sum with every kept component in it."""
    from secagg.dp.packing import dp_lane_bits, pack_ring
    from secagg.dp.participants import DPServer
    from secagg.dp.rotation import padded_dim

    params = ctx.params
    offer = params.dp
    assert offer is not None
    seeds = _dp_seeds(ctx, alive, responders)
    d = padded_dim(offer.dim)
    zero = np.zeros(d, dtype=np.uint64)
    # release(0) = -removal mod 2^b; the key holders add it to their decrypted lane sums
    minus = DPServer(offer, session_id=ctx.session_id).release(
        zero, alive, seeds, salts=ctx.dp_salts
    )
    lane = dp_lane_bits(offer.bits, params.n_clients)
    words = pack_ring(minus, lane, -(-d // (64 // lane)))
    s = len(alive)
    return RoundResult(
        tuple(alive),
        ciphertexts=ciphertexts,
        dp=_dp_report(ctx, s),
        dp_removal=np.ascontiguousarray(words, dtype="<u8").tobytes(),
    )
